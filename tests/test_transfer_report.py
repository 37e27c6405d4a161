"""The transfer report: a row per target and subject, AUC / ACC per stage, published rows."""

import json

import pytest
import yaml

from ssl_pipeline.cli import main
from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.transfer_report import transfer_table, write_transfer_report

STAGES = ["knn", "linear_probe", "finetune", "few_shot"]
PUBLISHED = "published: MedMNIST v2 ResNet-18 (28 px) from scratch, Yang et al. 2023, Table 3"


def stage_results(scale: float) -> dict:
    return {
        "knn": {"top1": 0.8 * scale, "auc": 0.9 * scale, "k": 20},
        "linear_probe": {"top1": 0.85 * scale, "top1_std": 0.01,
                         "test_metrics": {"top1": 0.85 * scale, "auc": 0.95 * scale}},
        "finetune": {"top1": 0.88 * scale, "auc": 0.97 * scale, "by_fraction": {
            "0.1": {"top1": 0.7 * scale}, "1.0": {"top1": 0.88 * scale}}},
        "few_shot": {"by_shots": {"1": {"top1": 0.3}, "10": {"top1": 0.6 * scale}},
                     "vtab_1k": {"top1": 0.75 * scale, "train": 800, "val": 200}},
    }


def make_run(path, data: dict, scale: float = 1.0):
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump(
        {"name": "transfer", "stages": STAGES, "data": data,
         "resolved": {"data": {"name": data["name"], "bands": data.get("_bands")}}}))
    results = {**stage_results(scale), "baselines": {"random_init": stage_results(0.5)}}
    (path / "results.json").write_text(json.dumps(results))
    (path / "run_state.json").write_text(json.dumps(
        {"stages": {s: {"status": "done"} for s in STAGES}}))
    return path


def test_rows_cells_and_published_references(tmp_path):
    derma = make_run(tmp_path / "derma", {"name": "medmnist",
                                           "medmnist": {"subset": "dermamnist", "size": 28}})
    sat = make_run(tmp_path / "sat", {"name": "eurosat", "eurosat": {"bands": "rgb"},
                                      "_bands": ["B04", "B03", "B02"]}, scale=0.9)
    ms = make_run(tmp_path / "ms", {"name": "eurosat", "eurosat": {"bands": "ms"},
                                    "_bands": ["B01"] * 13})
    paths = write_transfer_report([derma, sat, ms], tmp_path / "out")
    table = json.loads(paths["json"].read_text())
    rows = [(r["target"], r["subject"]) for r in table["rows"]]
    assert rows[:3] == [("dermamnist (28 px)", "backbone"), ("dermamnist (28 px)", "random init"),
                        ("dermamnist (28 px)", PUBLISHED)]
    assert table["rows"][2]["cells"]["finetune"] == {"auc": 0.917, "acc": 0.735,
                                                     "note": "100% labels, from scratch"}
    assert ("eurosat (RGB)", "backbone") in rows and ("eurosat (13 bands)", "random init") in rows
    published = [r for r in table["rows"] if r["kind"] == "reference"]
    assert len(published) == 2  # MedMNIST and EuroSAT RGB; none for 13 bands
    md = paths["md"].read_text()
    assert "| dermamnist (28 px) | backbone | 0.9 / 0.8 | 0.95 / 0.85 | 0.97 / 0.88 (100% labels) " \
           "| 0.6 (10-shot) | 0.75 (800 + 200 examples) |" in md
    assert "| dermamnist (28 px) | random init | 0.45 / 0.4 |" in md
    assert "0.919 (k=5)" in md
    assert 'class="reference"' in paths["html"].read_text()


def test_cli_writes_the_report_and_refuses_bad_input(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"name": "medmnist", "medmnist": {"subset": "pathmnist"}})
    assert main(["transfer-report", str(run), "--out", str(tmp_path / "t")]) == 0
    assert "0.983 / 0.907" in (tmp_path / "t" / "transfer.md").read_text()
    assert main(["transfer-report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SSLPipelineError, match="inside the run directory"):
        write_transfer_report([run], run / "sub")
    assert not (run / "sub").exists()


def test_a_run_without_results_is_a_row_saying_so(tmp_path):
    from ssl_pipeline.compare import read_run

    path = tmp_path / "broken"
    path.mkdir()
    (path / "recipe.yaml").write_text(yaml.safe_dump({"data": {"name": "eurosat"}}))
    (path / "run_state.json").write_text(json.dumps(
        {"stages": {"knn": {"status": "failed", "error": "boom"}}}))
    table = transfer_table([read_run(path)])
    assert table["rows"][0]["subject"] == "(no results)" and "boom" in table["rows"][0]["status"]
