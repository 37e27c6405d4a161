"""report.py: the report of one finished run, built from a hand-written run directory."""

import base64
import json
import re

import numpy as np
import pytest
import yaml

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.report import write_report

CLASSES = ["cat", "dog", "frog"]
CONFUSION = [[4, 1, 0], [0, 5, 0], [1, 0, 3]]  # rows are true classes
EVAL_METRICS = {
    "num_samples": 14,
    "top1": 0.857,
    "balanced_accuracy": 0.85,
    "macro_f1": 0.85,
    "per_class_accuracy": [0.8, 1.0, 0.75],
    "confusion_matrix": CONFUSION,
    "class_names": CLASSES,
}


def _recipe(name="tiny"):
    return {
        "name": name,
        "seed": 0,
        "stages": ["pretrain", "knn", "linear_probe", "finetune", "few_shot"],
        "data": {"name": "fake", "image_size": 16},
        "backbone": {"name": "timm:resnet18"},
        "method": {"name": "simsiam"},
        "pretrain": {"epochs": 2, "batch_size": 8, "optimizer": "sgd", "lr": 0.05},
        "resolved": {
            "effective_lr": 0.1,
            "per_device_batch_size": 8,
            "world_size": 2,
            "data": {"name": "fake", "num_classes": 3, "class_names": CLASSES},
        },
    }


def _metrics():
    rows = []
    for step in range(6):
        epoch = step // 3
        rows.append({"stage": "pretrain", "step": step, "time": 1.0 + step, "epoch": epoch,
                     "train/loss_step": 3.0 - 0.1 * step, "train/lr": 0.1 * (1 - step / 6)})
        if step % 3 == 2:
            rows.append({"stage": "pretrain", "step": step, "time": 1.5 + step, "epoch": epoch,
                         "train/loss_epoch": 2.9 - 0.2 * epoch,
                         "monitor/knn_top1": 0.5 + 0.1 * epoch,
                         "train/collapse_std": 0.02})
    rows.append({"stage": "finetune/backbone/1.0/seed0", "step": 0, "time": 9.0, "epoch": 0,
                 "finetune/loss_step": 1.1})
    return rows


def _results():
    knn = {**EVAL_METRICS, "top1": 0.714, "k": 20, "by_k": {"20": {"top1": 0.714}}}
    probe = {"top1": 0.857, "top1_std": 0.01, "seeds": 2, "chosen": {"lr": 0.001},
             "test_metrics": EVAL_METRICS}
    return {
        "pretrain": {"epochs": 2, "steps": 6, "seconds": 12.5, "images_per_second": 7.7,
                     "loss_by_epoch": [2.9, 2.7],
                     "monitor_knn_top1_by_epoch": {"1": 0.5, "2": 0.6}},
        "knn": knn,
        "linear_probe": probe,
        "finetune": {"top1": 0.6, "top1_std": 0.05,
                     "by_fraction": {"1.0": {"top1": 0.6, "top1_std": 0.05, "seeds": 2}}},
        "few_shot": {"by_shots": {"1": {"top1": 0.4, "ci95": [0.3, 0.5]},
                                  "5": {"top1": 0.55, "ci95": [0.5, 0.6]}}},
        "baselines": {"random_init": {"knn": {"top1": 0.33}, "linear_probe": {"top1": 0.4}},
                      "raw_pixels": {"knn": {"top1": 0.5}}},
        "provenance": {"git_commit": "abc123", "packages": {"torch": "2.4.0"},
                       "hardware": {"cpu": "x86_64", "gpus": []}},
    }


def _make_run(path, recipe=None, metrics=None, results=None, state=True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe or _recipe()))
    if metrics is not False:
        lines = (json.dumps(row) for row in (metrics or _metrics()))
        (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "results.json").write_text(json.dumps(results if results is not None else _results()))
    if state:
        stages = {"pretrain": {"status": "done", "seconds": 13.0},
                  "knn": {"status": "done", "seconds": 2.0}}
        (path / "run_state.json").write_text(json.dumps({"stages": stages}))
    return path


def _result_rows(page):
    match = re.search(r'<table id="results">(.*?)</table>', page, re.S)
    table = match.group(1) if match else ""
    return re.findall(r'<tr class="result-row">(.*?)</tr>', table, re.S)


def test_full_run_writes_md_html_and_three_plots(tmp_path):
    run = _make_run(tmp_path / "run")
    out = write_report(run)
    assert out["md"] == run / "report.md" and out["md"].is_file()
    assert out["html"] == run / "report.html" and out["html"].is_file()
    assert sorted(p.name for p in out["plots"]) == ["confusion.png", "monitor.png",
                                                   "pretrain_loss_lr.png"]
    assert all(p.parent == run / "plots" and p.read_bytes().startswith(b"\x89PNG")
               for p in out["plots"])
    # No temp files left behind by the atomic writes.
    assert not [p for p in run.rglob("*.tmp")]


def test_html_is_self_contained_with_embedded_pngs(tmp_path):
    page = write_report(_make_run(tmp_path / "run"))["html"].read_text()
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)
    assert "<link" not in page and "<script" not in page
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == 3
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(b"\x89PNG")


def test_results_table_has_one_row_per_stage_and_baseline_stage(tmp_path):
    page = write_report(_make_run(tmp_path / "run"))["html"].read_text()
    rows = _result_rows(page)
    # 4 backbone stages + random_init (knn, linear_probe) + raw_pixels (knn)
    assert len(rows) == 7
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in rows]
    assert [(c[0], c[1]) for c in cells] == [
        ("backbone", "knn"), ("backbone", "linear_probe"), ("backbone", "finetune"),
        ("backbone", "few_shot"), ("random_init", "knn"), ("random_init", "linear_probe"),
        ("raw_pixels", "knn"),
    ]
    assert cells[1][2:4] == ["0.857", "± 0.01"]
    assert cells[3][2] == "0.55" and "5-shot: 0.55 [0.5, 0.6]" in cells[3][4]
    assert cells[0][3] == ""  # k-NN has no spread over seeds


def test_markdown_has_recipe_results_timings_and_versions(tmp_path):
    md = write_report(_make_run(tmp_path / "run"))["md"].read_text()
    assert "| global batch | 16 |" in md  # 8 per device x world size 2
    assert "| effective lr | 0.1 |" in md
    assert "| backbone | linear_probe | 0.857 | ± 0.01 |" in md
    assert "| raw_pixels | knn | 0.5 |" in md
    assert "| pretraining images / s | 7.7 |" in md
    assert "| stage knn | done 2 s |" in md
    assert "| torch | 2.4.0 |" in md and "abc123" in md
    assert "![confusion](plots/confusion.png)" in md


def test_missing_metrics_finetune_and_state_do_not_crash(tmp_path):
    results = _results()
    for key in ("finetune", "few_shot", "baselines"):
        del results[key]
    run = _make_run(tmp_path / "run", metrics=False, results=results, state=False)
    out = write_report(run)
    # The monitor curve falls back to results.json; no step-wise curves without metrics.jsonl.
    assert sorted(p.name for p in out["plots"]) == ["confusion.png", "monitor.png"]
    page = out["html"].read_text()
    assert len(_result_rows(page)) == 2
    assert "<td>finetune</td>" not in page and "stage pretrain" not in page


def test_run_with_only_a_recipe_still_reports(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(_recipe()))
    out = write_report(run)
    assert out["plots"] == []
    page = out["html"].read_text()
    assert _result_rows(page) == [] and "<img" not in page
    assert "No evaluation results" in page
    assert "timm:resnet18" in out["md"].read_text()


def test_torn_last_metrics_line_is_skipped(tmp_path):
    run = _make_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"stage": "pretrain", "st')  # a run killed mid-write
    assert len(write_report(run)["plots"]) == 3


def test_confusion_plot_uses_best_stage_with_a_matrix(tmp_path):
    # Only linear_probe (under test_metrics) has a matrix, although k-NN scores higher.
    results = _results()
    results["knn"] = {"top1": 0.99}
    out = write_report(_make_run(tmp_path / "run", results=results))
    assert "confusion.png" in [p.name for p in out["plots"]]
    results["linear_probe"].pop("test_metrics")
    out = write_report(_make_run(tmp_path / "run2", results=results))
    assert "confusion.png" not in [p.name for p in out["plots"]]


def test_recipe_name_is_html_escaped(tmp_path):
    run = _make_run(tmp_path / "run", recipe=_recipe(name="<script>alert(1)</script>"))
    page = write_report(run)["html"].read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_missing_run_directory_is_a_user_error(tmp_path):
    with pytest.raises(SSLPipelineError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_embedding_map_is_plotted_when_the_run_saved_one(tmp_path):
    from ssl_pipeline.embedding_map import write_embedding_map

    run = _make_run(tmp_path / "run")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(size=(60, 16)) + 5 * np.eye(16)[labels]  # three separated clusters
    write_embedding_map(run, features, labels)
    out = write_report(run)
    assert "embedding_map.png" in [p.name for p in out["plots"]]
    assert len(re.findall(r"<img ", out["html"].read_text())) == 4
    assert "![embedding_map](plots/embedding_map.png)" in out["md"].read_text()



def test_multi_label_embedding_map_has_a_panel_per_label_colouring_its_images(tmp_path, monkeypatch):
    """Multi-label: every point may have several labels or none, so each label gets a panel
    with its own images in colour and the rest in grey; many labels: the most frequent ones."""
    from ssl_pipeline import report
    from ssl_pipeline.embedding_map import read_embedding_map, write_embedding_map

    run = _make_run(tmp_path / "run")
    rng = np.random.default_rng(0)
    labels = (rng.random((50, 3)) < [0.5, 0.2, 0.05]).astype(np.int64)
    labels[:3, 2] = 1  # at least 3 images with the rare label
    write_embedding_map(run, rng.normal(size=(50, 16)), labels)
    saved = read_embedding_map(run)
    assert saved[1].shape == (50, 3)
    results = {"knn": {"class_names": ["effusion", "mass", "hernia"]}}
    fig = report._embedding_figure(saved, results, {})
    assert [ax.get_title() for ax in fig.axes] == \
        [f"{name} ({int(n)})" for name, n in zip(["effusion", "mass", "hernia"], labels.sum(0))]
    for ax, column in zip(fig.axes, labels.T):
        grey, coloured = ax.collections
        assert len(coloured.get_offsets()) == column.sum()
        assert len(grey.get_offsets()) == len(column) - column.sum()
    assert "images with each label" in fig.get_suptitle()
    out = write_report(run)
    assert "embedding_map.png" in [p.name for p in out["plots"]]

    monkeypatch.setattr(report, "MAX_LABEL_PANELS", 2)  # the 2 most frequent, in label order
    fig = report._embedding_figure(saved, results, {})
    frequent = sorted(np.argsort(-labels.sum(0), kind="stable")[:2].tolist())
    assert [ax.get_title().split(" (")[0] for ax in fig.axes if ax.axison] == \
        [["effusion", "mass", "hernia"][j] for j in frequent]
    assert "the 2 most frequent of 3 labels" in fig.get_suptitle()

def test_timings_show_images_per_second_of_each_stage(tmp_path):
    run = _make_run(tmp_path / "run")
    stages = {"pretrain": {"status": "done", "seconds": 13.0, "images_per_second": 7.7},
              "knn": {"status": "done", "seconds": 2.0, "images_per_second": 950.5}}
    (run / "run_state.json").write_text(json.dumps({"stages": stages}))
    md = write_report(run)["md"].read_text()
    assert "| stage knn | done 2 s (950.5 images / s) |" in md
    assert "| stage pretrain | done 13 s (7.7 images / s) |" in md
