"""The benchmark scripts run end to end (smoke configuration); their figures are not tested."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["knn_scaling", "probe_speed", "pretrain_throughput"])
def test_benchmark_quick_run_writes_its_json(tmp_path, name, fashion_mnist_root):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["quick"] is True and figures["machine"]
    assert "x" in proc.stdout or "ratio" in proc.stdout.lower()  # it printed its ratios
