"""The benchmark scripts run end to end (smoke configuration); their figures are not tested."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
KNN_METHODS = "ours,ours_pipeline,lightly,sklearn,ours_faiss"


def quick_run(name: str, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m benchmarks.<name> --quick`: its output and the figures it wrote, checked to
    be a quick run's on a described machine."""
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["quick"] is True and figures["machine"]
    return proc, figures


@pytest.mark.slow
@pytest.mark.parametrize("name", ["knn_scaling", "probe_speed", "pretrain_throughput"])
def test_benchmark_quick_run_writes_its_json(tmp_path, name, fashion_mnist_root):
    extra = {"pretrain_throughput": ["--options", "contiguous,bf16"],
             # not ours_own_kernels: it changes OPENBLAS_CORETYPE, which a machine may preset
             # because old OpenBLAS builds fail on its CPU (the benchmark's docstring)
             "knn_scaling": ["--methods", KNN_METHODS]}.get(name, [])
    proc, figures = quick_run(name, tmp_path, *extra)
    assert "x" in proc.stdout or "ratio" in proc.stdout.lower()  # it printed its ratios
    if name == "knn_scaling":  # every row says which kernels each OpenBLAS in it ran
        rows = figures["comparison"]["rows"]
        assert set(rows) == set(KNN_METHODS.split(","))
        assert all("error" not in row and row["openblas_kernels"] for row in rows.values())
        # our rows say which exact search ran; the quick bank (5000 rows) is below bf16's minimum
        assert rows["ours"]["search"] == rows["ours_faiss"]["search"] == "faiss"
        preset = os.environ.get("OPENBLAS_CORETYPE")
        if preset:  # kept by ssl_pipeline: faiss's OpenBLAS ran the preset kernels
            assert rows["ours"]["openblas_kernels"]["faiss"].lower() == preset.lower()
        assert figures["machine"]["openblas_environment"]["OPENBLAS_CORETYPE"] == preset
    if name == "pretrain_throughput":  # speed options timed against our defaults
        from ssl_pipeline.compute import cpu_has_native_bf16

        for case in figures["cases"].values():
            default, option = case["rows"]["ours_default"], case["rows"]["ours_contiguous"]
            assert default["ran_with"]["channels_last"] is True
            assert option["ran_with"]["channels_last"] is False  # the option took effect
            assert option["settings"] == ["trainer.channels_last=false"]
            assert option["views_per_second"] > 0 and option["seconds_to_end_of_warmup"] > 0
            assert "contiguous x" in proc.stdout
            if cpu_has_native_bf16():  # bf16 runs where it is native, and took effect
                assert case["rows"]["ours_bf16"]["ran_with"]["precision"] == "bf16-mixed"
                assert set(case["ratios"]["options_over_ours_default"]) == {"contiguous", "bf16"}
            else:  # emulated: not run, with the measured reason
                assert "ours_bf16" not in case["rows"]
                assert case["options_not_run"]["bf16"]["conv_forward_bf16_over_fp32_time"] > 0
                assert "bf16 not run" in proc.stdout
                assert list(case["ratios"]["options_over_ours_default"]) == ["contiguous"]


@pytest.mark.slow
def test_point_output_convs_quick_run_times_both_sides_of_the_same_training(tmp_path):
    proc, figures = quick_run("point_output_convs", tmp_path)
    assert [c["image_size"] for c in figures["cases"]] == [8, 32]
    for case in figures["cases"]:
        # all 20 of ResNet-18's convs; only those with a 1x1 output take the matrix product
        assert case["convs_converted"] == 20
        assert case["speedup_point_over_plain"] > 0 and case["max_loss_difference"] < 1e-2
    assert proc.stdout.count(" x") >= 2  # each case printed its ratio


def test_faiss_kernels_check_quick_run_finds_the_true_neighbours(tmp_path):
    # on the kernels this machine's environment gives (a preset is left alone)
    proc, figures = quick_run("faiss_kernels_check", tmp_path)
    assert figures["cases"] == 14 and figures["bad"] == []
    assert "14 cases, 0 bad" in proc.stdout


@pytest.mark.slow
def test_decode_throughput_quick_run_reports_per_worker_ratios(tmp_path):
    proc, figures = quick_run("decode_throughput", tmp_path)
    assert "x" in proc.stdout
    for case in figures["cases"]:
        assert set(case["rows"]) == {"reference", "ours_pil", "ours_files", "ours_shards"}
        assert all(row["images_per_second_per_worker"] > 0 for row in case["rows"].values())
    # ours decode to the same tensors, within the resize's 1 gray level
    differences = figures["setup"]["max_difference_from_ours_pil"]
    assert differences["ours_files"] <= 1 and differences["ours_shards"] <= 1


@pytest.mark.slow
def test_feature_throughput_quick_run_compares_equal_work(tmp_path, fashion_mnist_root):
    from ssl_pipeline.compute import cpu_has_native_bf16

    proc, figures = quick_run("feature_throughput", tmp_path)
    assert "x" in proc.stdout
    assert set(figures["cases"]) == {"28px", "224px"}
    # the opt-in bf16 features row where bf16 is native (its features: cosine > 0.9999 below)
    bf16_row = {"ours_cold_bf16_features"} if cpu_has_native_bf16() else set()
    for case in figures["cases"].values():
        assert set(case["rows"]) == {"reference", "ours_cold", "ours_cached",
                                     "ours_extract_features_only", *bf16_row}
        assert all(row["images_per_second"] > 0 for row in case["rows"].values())
        # both sides computed the same features from the same images
        for agreement in case["agreement_with_reference"].values():
            assert agreement["same_shape"] and agreement["cosine_min"] > 0.9999
        # what our side ran with was observed in its forward, for every image of the call
        seen = case["ours"]["observed_in_forward"]
        assert sum(seen["batch_sizes"]) == case["setup"]["warmup_images"]
        # channels_last by default, at 28 px (gray) as at 224 px (RGB)
        assert seen["weight_channels_last"] and seen["input_channels_last"], seen


@pytest.mark.slow
def test_pretrain_quality_quick_run_trains_both_sides_equally_and_scores_them_alike(tmp_path, fashion_mnist_root):
    proc, figures = quick_run("pretrain_quality", tmp_path)
    assert "ours - reference" in proc.stdout
    rows = {row["side"]: row for row in figures["rows"]}
    assert set(rows) == {"ours", "ours_constant_lr", "reference", "random_init"}
    # the same epochs over the same images at the same batch: the same number of steps
    per_epoch = figures["setup"]["train_images"] // figures["setup"]["batch"]
    assert (rows["ours"]["steps"] == rows["ours_constant_lr"]["steps"] == rows["reference"]["steps"]
            == per_epoch * figures["setup"]["epochs"])
    # ours at its default schedule, and with the reference's
    assert [rows[s]["lr_schedule"] for s in ("ours", "ours_constant_lr", "reference")] == [
        "cosine", "constant", "constant"]
    for row in rows.values():
        assert set(row["knn"]) == {"k20", "k200"} and all(0 <= v <= 1 for v in row["knn"].values())
    summary = figures["summary"]
    for k in ("k20", "k200"):
        for side in ("ours", "ours_constant_lr"):
            expected = 100 * (summary[side][k]["mean"] - summary["reference"][k]["mean"])
            assert summary[f"{side}_minus_reference_points"][k] == pytest.approx(expected, abs=0.01)


def test_machine_cpu_id_names_the_bf16_matrix_extensions(tmp_path):
    from benchmarks.machine import _cpu_id

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
                       "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert _cpu_id(cpuinfo) == ("GenuineIntel family 6 model 143, AVX-512 yes, AVX512-BF16 yes, "
                                "AMX-BF16 yes")
    cpuinfo.write_text("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nflags\t\t: avx2\n")
    assert _cpu_id(cpuinfo) == ("AuthenticAMD family 25 model 1, AVX-512 no, AVX512-BF16 no, "
                                "AMX-BF16 no")
    assert _cpu_id(tmp_path / "missing") == "unknown"


def test_pretrain_quality_names_the_sides_a_random_init_backbone_beats():
    from benchmarks.pretrain_quality import summarize

    def row(side, seed, k20, k200):
        return {"side": side, "seed": seed, "knn": {"k20": k20, "k200": k200}}

    rows = [row("ours", 0, 0.70, 0.71), row("ours", 1, 0.72, 0.73),
            row("ours_constant_lr", 0, 0.76, 0.72), row("reference", 0, 0.75, 0.70),
            row("random_init", 0, 0.75, 0.69), row("random_init", 1, 0.77, 0.69)]
    summary = summarize(rows)
    assert summary["random_init"]["k20"]["mean"] == 0.76
    assert summary["below_random_init"] == {"ours": ["k20"], "ours_constant_lr": [],
                                            "reference": ["k20"]}
    assert summary["ours_minus_reference_points"] == {"k20": -4.0, "k200": 2.0}


def test_knn_scaling_rows_are_median_runs():
    """A comparison row is the run with the median time (the lower middle of an even count),
    keeping every run's seconds; failed runs are counted and stand only when all failed."""
    from benchmarks.knn_scaling import median_run

    runs = [{"method": "m", "seconds": t, "peak_growth_mib": t * 10} for t in (0.9, 0.6, 0.7)]
    row = median_run(runs)
    assert (row["seconds"], row["peak_growth_mib"]) == (0.7, 7.0)
    assert row["seconds_of_each_run"] == [0.9, 0.6, 0.7] and row["failed_runs"] == 0
    row = median_run([*runs[:2], {"method": "m", "error": "exit code -9"}])
    assert row["seconds"] == 0.6 and row["failed_runs"] == 1
    assert median_run([{"method": "m", "error": "x"}]) == {"method": "m", "error": "x"}


def test_knn_scaling_repeats_must_be_positive(capsys):
    from benchmarks.knn_scaling import parse_args

    assert parse_args([]).repeats == 3 and parse_args(["--quick"]).repeats == 1
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
