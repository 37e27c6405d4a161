"""compare.py: several hand-written run directories side by side, without training."""

import base64
import json
import re

import pytest
import yaml

from ssl_pipeline.cli import main
from ssl_pipeline.compare import write_comparison
from ssl_pipeline.errors import SSLPipelineError

STAGES = ["pretrain", "knn", "linear_probe", "finetune", "few_shot"]
BASELINES = {"random_init": {"knn": {"top1": 0.3}, "linear_probe": {"top1": 0.35}},
             "raw_pixels": {"knn": {"top1": 0.5}}}


def _recipe(name="tiny", method="simclr", backbone="timm:resnet18"):
    return {"name": name, "stages": STAGES, "data": {"name": "fake", "image_size": 16},
            "backbone": {"name": backbone}, "method": {"name": method},
            "pretrain": {"epochs": 3}}


def _results(knn=0.7, probe=0.8, probe_std=0.02, ft=(0.5, 0.9), shot5=0.6, seconds=12.5):
    return {
        "pretrain": {"epochs": 3, "seconds": seconds, "images_per_second": 7.7},
        "knn": {"top1": knn, "top5": 0.95, "k": 20},
        "linear_probe": {"top1": probe, "top1_std": probe_std, "seeds": 3,
                         "test_metrics": {"top1": probe, "top5": 0.97}},
        "finetune": {"top1": ft[1], "top1_std": 0.01, "by_fraction": {
            "0.01": {"top1": ft[0], "top1_std": 0.04, "seeds": 3},
            "1.0": {"top1": ft[1], "top1_std": 0.01, "seeds": 3}}},
        "few_shot": {"by_shots": {"1": {"top1": shot5 - 0.2, "ci95": [0.3, 0.5]},
                                  "5": {"top1": shot5, "ci95": [0.5, 0.7]}}, "seeds": 5},
        "baselines": json.loads(json.dumps(BASELINES)),
        "provenance": {"split_hashes": {"train": "aaa", "test": "bbb"}},
    }


def _make_run(path, recipe=None, results=None, stages=None):
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe or _recipe()))
    if results is not False:
        (path / "results.json").write_text(json.dumps(results or _results()))
    states = stages or {s: {"status": "done", "seconds": 1.0} for s in STAGES}
    (path / "run_state.json").write_text(json.dumps({"stages": states}))
    return path


def _two_runs(tmp_path):
    a = _make_run(tmp_path / "a", _recipe(method="simclr"), _results())
    b = _make_run(tmp_path / "b", _recipe(method="supervised"),
                  _results(knn=0.75, probe=0.78, probe_std=0.03, ft=(0.6, 0.85), shot5=0.65,
                           seconds=10.0))
    return a, b


def _table(page):
    match = re.search(r'<table id="comparison">(.*?)</table>', page, re.S)
    assert match, "no comparison table"
    header = re.findall(r"<th>(.*?)</th>", match.group(1))
    rows = re.findall(r'<tr class="result-row">(.*?)</tr>', match.group(1), re.S)
    return header, [dict(zip(header, re.findall(r"<td>(.*?)</td>", row))) for row in rows]


def test_one_row_per_run_and_per_distinct_baseline(tmp_path):
    a, b = _two_runs(tmp_path)
    out = write_comparison([a, b], tmp_path / "cmp")
    header, rows = _table(out["html"].read_text())
    assert header == ["run", "status", "k-NN top-1", "k-NN top-5", "linear probe top-1",
                      "linear probe top-5", "fine-tune 1%", "fine-tune 100%", "few-shot 1-shot",
                      "few-shot 5-shot", "pretraining epochs", "pretraining seconds"]
    # Same data and identical baseline results in both runs: each baseline appears once.
    assert [r["run"] for r in rows] == ["tiny · simclr · timm:resnet18",
                                        "tiny · supervised · timm:resnet18",
                                        "random_init baseline", "raw_pixels baseline"]
    assert rows[0]["status"] == "done"
    assert rows[2]["status"] == ("reference for tiny · simclr · timm:resnet18, "
                                 "tiny · supervised · timm:resnet18")
    assert rows[2]["k-NN top-1"] == "0.3" and rows[2]["fine-tune 1%"] == "—"
    assert rows[3]["linear probe top-1"] == "—"
    assert rows[0]["pretraining epochs"] == "3" and rows[1]["pretraining seconds"] == "10"


def test_std_shown_and_best_per_column_marked_among_runs_only(tmp_path):
    a, b = _two_runs(tmp_path)
    out = write_comparison([a, b], tmp_path / "cmp")
    _, rows = _table(out["html"].read_text())
    assert rows[0]["linear probe top-1"] == "<strong>0.8 ± 0.02</strong>"
    assert rows[1]["linear probe top-1"] == "0.78 ± 0.03"
    assert rows[0]["fine-tune 1%"] == "0.5 ± 0.04"
    assert rows[1]["fine-tune 1%"] == "<strong>0.6 ± 0.04</strong>"
    assert rows[1]["k-NN top-1"] == "<strong>0.75</strong>"
    assert rows[0]["k-NN top-1"] == "0.7"  # no spread over seeds for k-NN
    # Equal top-5 in both runs: both marked. Baselines are never ranked, seconds neither.
    assert rows[0]["k-NN top-5"] == rows[1]["k-NN top-5"] == "<strong>0.95</strong>"
    assert rows[2]["k-NN top-1"] == "0.3"
    assert "strong" not in rows[1]["pretraining seconds"]
    md = out["md"].read_text()
    row = "| tiny · simclr · timm:resnet18 | done | 0.7 | **0.95** | **0.8 ± 0.02** | **0.97** |"
    assert row in md


def test_json_holds_the_table_data(tmp_path):
    a, b = _two_runs(tmp_path)
    data = json.loads(write_comparison([a, b], tmp_path / "cmp")["json"].read_text())
    keys = [c["key"] for c in data["columns"]]
    assert keys[:3] == ["knn/top1", "knn/top5", "linear_probe/top1"]
    first = data["rows"][0]
    assert first["kind"] == "run" and first["run_dirs"] == [str(a)]
    assert first["values"]["finetune@0.01"] == 0.5 and first["std"]["finetune@0.01"] == 0.04
    assert "knn/top1" not in first["std"]
    # top-5 values are equal in both runs, so both are best there.
    assert data["rows"][1]["best"] == ["knn/top1", "knn/top5", "linear_probe/top5",
                                       "finetune@0.01", "few_shot@1", "few_shot@5"]
    assert data["rows"][2]["kind"] == "baseline"
    assert data["rows"][2]["run_dirs"] == [str(a), str(b)]


def test_baselines_on_other_data_are_separate_rows(tmp_path):
    a, _ = _two_runs(tmp_path)
    other = _results()
    other["provenance"]["split_hashes"]["test"] = "ccc"
    c = _make_run(tmp_path / "c", _recipe(name="other"), other)
    _, rows = _table(write_comparison([a, c], tmp_path / "cmp")["html"].read_text())
    labels = [r["run"] for r in rows]
    assert len(rows) == 2 + 4
    assert "random_init baseline (tiny · simclr · timm:resnet18)" in labels
    assert "random_init baseline (other · simclr · timm:resnet18)" in labels


def test_failed_and_unfinished_runs_are_rows_and_the_others_still_compared(tmp_path):
    a, b = _two_runs(tmp_path)
    failed_results = _results()
    del failed_results["finetune"], failed_results["few_shot"]
    failed = _make_run(tmp_path / "failed", _recipe(name="broken"), failed_results, stages={
        "pretrain": {"status": "done"}, "knn": {"status": "done"},
        "linear_probe": {"status": "done"},
        "finetune": {"status": "failed", "error": "RuntimeError: out of memory"}})
    fresh = _make_run(tmp_path / "fresh", _recipe(name="fresh"), results=False,
                      stages={"pretrain": {"status": "done"}})
    out = write_comparison([a, failed, fresh, b], tmp_path / "cmp")
    _, rows = _table(out["html"].read_text())
    by_label = {r["run"]: r for r in rows}
    broken = by_label["broken · simclr · timm:resnet18"]
    assert broken["status"] == "failed: stage finetune failed: RuntimeError: out of memory"
    assert broken["k-NN top-1"] == "0.7" and broken["fine-tune 1%"] == "—"
    assert by_label["fresh · simclr · timm:resnet18"]["status"] == (
        "incomplete: no results.json yet")
    assert by_label["tiny · supervised · timm:resnet18"]["fine-tune 1%"] == (
        "<strong>0.6 ± 0.04</strong>")
    # The run without results has no baselines, so the shared row names the three others.
    assert by_label["random_init baseline"]["status"] == (
        "reference for tiny · simclr · timm:resnet18, broken · simclr · timm:resnet18, "
        "tiny · supervised · timm:resnet18")
    assert out["plots"][0].is_file()
    three = write_comparison([a, failed, b], tmp_path / "cmp3")["json"].read_text()
    assert json.loads(three)["rows"][3]["status"] == "reference for all runs"


def test_partial_state_without_failure_is_incomplete(tmp_path):
    run = _make_run(tmp_path / "run", results={"knn": {"top1": 0.7}},
                    stages={"pretrain": {"status": "done"}, "knn": {"status": "done"}})
    _, rows = _table(write_comparison([run], tmp_path / "cmp")["html"].read_text())
    assert rows[0]["status"] == "incomplete: stages not finished: linear_probe, finetune, few_shot"
    assert rows[0]["k-NN top-1"] == "0.7"  # a lone run: nothing to be best against


def test_torn_results_json_is_a_failed_row(tmp_path):
    a, _ = _two_runs(tmp_path)
    torn = _make_run(tmp_path / "torn", _recipe(name="torn"))
    (torn / "results.json").write_text('{"knn": {"top1": 0.')
    _, rows = _table(write_comparison([a, torn], tmp_path / "cmp")["html"].read_text())
    assert rows[1]["run"] == "torn · simclr · timm:resnet18"
    assert rows[1]["status"].startswith("failed: cannot read results.json:")
    assert rows[1]["k-NN top-1"] == "—" and rows[0]["k-NN top-1"] == "0.7"


def test_same_recipe_method_backbone_labelled_by_run_dir(tmp_path):
    a = _make_run(tmp_path / "20261123-1", results=_results())
    b = _make_run(tmp_path / "20261123-2", results=_results(knn=0.1))
    _, rows = _table(write_comparison([a, b], tmp_path / "cmp")["html"].read_text())
    assert [r["run"] for r in rows[:2]] == ["tiny · simclr · timm:resnet18 (20261123-1)",
                                            "tiny · simclr · timm:resnet18 (20261123-2)"]


def test_runs_sharing_a_label_are_told_apart_by_the_settings_they_differ_in(tmp_path):
    def recipe(**changes):
        r = _recipe()
        for key, value in changes.items():
            *parents, leaf = key.split("__")
            node = r
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return r

    runs = [_make_run(tmp_path / "r1", recipe(pretrain__epochs=3, seed=0,
                                              tracking__wandb__mode="offline")),
            _make_run(tmp_path / "r2", recipe(pretrain__epochs=5, seed=1, resolved__x=1,
                                              stages=["pretrain", "knn"])),
            _make_run(tmp_path / "r3", recipe(pretrain__epochs=5, seed=1)),
            _make_run(tmp_path / "r4", recipe(pretrain__epochs=3, seed=0, views__blur_prob=0.0,
                                              pretrain__lr=0.1, trainer__devices=2))]
    _, rows = _table(write_comparison(runs, tmp_path / "cmp")["html"].read_text())
    # tracking, resolved facts and stages are not settings that tell experiments apart
    assert [r["run"] for r in rows[:4]] == [
        "tiny · simclr · timm:resnet18 (pretrain.epochs=3, pretrain.lr=unset, seed=0, +2 more)",
        "tiny · simclr · timm:resnet18 (pretrain.epochs=5, pretrain.lr=unset, seed=1, +2 more) (r2)",
        "tiny · simclr · timm:resnet18 (pretrain.epochs=5, pretrain.lr=unset, seed=1, +2 more) (r3)",
        "tiny · simclr · timm:resnet18 (pretrain.epochs=3, pretrain.lr=0.1, seed=0, +2 more)",
    ]


def test_html_is_self_contained_and_plot_is_a_png(tmp_path):
    a, b = _two_runs(tmp_path)
    out = write_comparison([a, b], tmp_path / "cmp")
    assert out["plots"] == [tmp_path / "cmp" / "plots" / "comparison_top1.png"]
    assert out["plots"][0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    page = out["html"].read_text()
    assert "<link" not in page and "<script" not in page
    sources = re.findall(r'\ssrc="([^"]*)"', page)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == out["plots"][0].read_bytes()
    assert "![comparison_top1](plots/comparison_top1.png)" in out["md"].read_text()
    # Nothing written into the run directories.
    assert sorted(p.name for p in a.iterdir()) == ["recipe.yaml", "results.json", "run_state.json"]


def test_pretraining_curves_plotted_and_tabulated_per_epoch(tmp_path):
    with_aug, without = _results(), _results()
    with_aug["pretrain"]["curve"] = {"epoch": [1, 2, 3], "seconds": [30.0, 60.0, 90.0],
                                     "loss": [2.0, 1.2, 0.9], "knn_top1": [0.6, None, 0.7],
                                     "val_accuracy": [0.7, 0.8, 0.85]}
    without["pretrain"]["curve"] = {"epoch": [1, 2], "seconds": [20.0, 40.0],
                                    "loss": [1.5, 0.4], "val_accuracy": [0.75, 0.74]}
    a = _make_run(tmp_path / "a", _recipe(method="supervised"), with_aug)
    b = _make_run(tmp_path / "b", _recipe(method="supervised"), without)
    out = write_comparison([a, b], tmp_path / "cmp", labels=["with", "without"])
    curves = tmp_path / "cmp" / "plots" / "curves.png"
    assert curves in out["plots"] and curves.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    md = out["md"].read_text()
    section = md.split("## Pretraining curves", 1)[1].split("## Run directories")[0]
    loss = section.split("### Training loss per epoch", 1)[1].split("###")[0]
    assert "| run | epoch 1 | epoch 2 | epoch 3 |" in loss
    assert "| with | 2 | 1.2 | 0.9 |" in loss and "| without | 1.5 | 0.4 | — |" in loss
    knn = section.split("against pretraining time", 1)[1].split("###")[0]
    assert "| with | 0.6 (0.5 min) | — | 0.7 (1.5 min) |" in knn and "without" not in knn
    assert "| without | 0.75 | 0.74 | — |" in section.split("(classifier head)", 1)[1]
    assert "![curves](plots/curves.png)" in md
    page = out["html"].read_text()
    assert "<h2>Pretraining curves</h2>" in page and page.count('<table class="curve">') == 3
    data = json.loads(out["json"].read_text())
    assert data["curves"]["without"]["loss"] == [1.5, 0.4]


def test_no_curves_section_without_recorded_curves(tmp_path):
    a, b = _two_runs(tmp_path)
    out = write_comparison([a, b], tmp_path / "cmp")
    assert "Pretraining curves" not in out["md"].read_text()
    assert not (tmp_path / "cmp" / "plots" / "curves.png").exists()


def test_no_plot_when_no_run_has_results(tmp_path):
    run = _make_run(tmp_path / "run", results=False, stages={})
    out = write_comparison([run], tmp_path / "cmp")
    assert out["plots"] == [] and not (tmp_path / "cmp" / "plots").exists()
    assert "<img" not in out["html"].read_text()


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: tmp.joinpath("empty").mkdir() or tmp / "empty",
     "not a run directory \\(no recipe.yaml and no results.json\\)"),
])
def test_not_a_run_directory_is_a_user_error_and_nothing_is_written(tmp_path, make, message):
    a, _ = _two_runs(tmp_path)
    bad = make(tmp_path)
    with pytest.raises(SSLPipelineError, match=message) as err:
        write_comparison([a, bad], tmp_path / "cmp")
    assert str(bad) in str(err.value) and "ssl-pipeline run" in str(err.value)
    assert not (tmp_path / "cmp").exists()


def test_no_run_dirs_and_out_inside_a_run_are_user_errors(tmp_path):
    a, b = _two_runs(tmp_path)
    with pytest.raises(SSLPipelineError, match="at least one run directory"):
        write_comparison([], tmp_path / "cmp")
    with pytest.raises(SSLPipelineError, match="never writes into"):
        write_comparison([a, b], a / "cmp")
    assert not (a / "cmp").exists()


def test_default_out_dir_is_reports_compare_timestamp(tmp_path, monkeypatch):
    a, b = _two_runs(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = write_comparison([a, b])
    assert out["md"].parent.parent == tmp_path.joinpath("reports", "compare").relative_to(tmp_path)
    assert re.fullmatch(r"\d{8}-\d{6}-\d{3}", out["md"].parent.name)


def test_cli_compare_exit_statuses(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'cmp' / 'comparison.html'}" in printed
    assert "comparison_top1.png" in printed
    assert main(["compare", str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "does not exist" in captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "x").exists()


def test_baselines_equal_in_accuracy_share_a_row_whatever_their_timings(tmp_path):
    import json as _json

    from ssl_pipeline.compare import comparison_table, _load_run

    dirs = []
    for i, seconds in enumerate((12.0, 99.0)):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "recipe.yaml").write_text(f"name: r{i}\ndata: {{name: digits}}\n")
        baseline = {"finetune": {"top1": 0.9, "top1_std": 0.0,
                                 "by_fraction": {"1.0": {"top1": 0.9, "by_seed": [{"seconds": seconds}]}}}}
        (run / "results.json").write_text(_json.dumps(
            {"knn": {"top1": 0.5 + i / 10}, "baselines": {"random_init": baseline}}))
        dirs.append(run)
    table = comparison_table([_load_run(d) for d in dirs])
    baseline_rows = [r for r in table["rows"] if r["kind"] == "baseline"]
    assert len(baseline_rows) == 1


def test_std_of_equal_seeds_prints_as_zero_not_float_noise():
    from ssl_pipeline.compare import _cell_text

    assert _cell_text((0.95, 1.36e-16)) == "0.95 ± 0"
    assert _cell_text((0.95, 0.002778)) == "0.95 ± 0.002778"


def test_comparing_runs_imports_neither_torch_nor_lightning(tmp_path):
    """`ssl-pipeline compare` reads JSON and draws plots: it starts in about half a second."""
    from test_recipe import heavy_modules_imported_by

    a, b = _two_runs(tmp_path)
    assert heavy_modules_imported_by(
        "from ssl_pipeline.cli import main\n"
        f"assert main(['compare', {str(a)!r}, {str(b)!r}, '--out', {str(tmp_path / 'cmp')!r}]) == 0") == []
    assert (tmp_path / "cmp" / "comparison.md").is_file()
