"""What a benchmark figure was measured on (CPU, cores and threads, library versions, date),
the arguments every benchmark takes, and the result file they all write."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("numpy", "torch", "faiss-cpu", "lightly", "scikit-learn", "pytorch-lightning", "timm",
            "ssl-pipeline")


def machine_info() -> dict:
    """CPU model, cores, memory, the thread count of every thread pool, versions and date."""
    import faiss
    import torch
    from threadpoolctl import threadpool_info

    return {
        "cpu_model": _cpu_model(),
        "cpu_id": _cpu_id(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "threads": {
            "torch": torch.get_num_threads(),
            "faiss_omp": faiss.omp_get_max_threads(),
            # each BLAS/OpenMP library loaded in this process (numpy's, faiss's, torch's), with
            # the kernels an OpenBLAS runs ("architecture"; see ssl_pipeline.blas)
            "pools": [f"{p['prefix']} ({p['user_api']}"
                      f"{', ' + p['architecture'] if p.get('architecture') else ''}): {p['num_threads']}"
                      for p in threadpool_info()],
        },
        # OpenBLAS reads these when it loads: preset on some machines, else ssl_pipeline's choice
        "openblas_environment": {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        "versions": {"python": sys.version.split()[0], **{p: _version(p) for p in PACKAGES}},
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: above the core count, other jobs shared the CPU."""
    return [round(v, 2) for v in os.getloadavg()]


def memory_available_bytes() -> int:
    return _meminfo_kib("MemAvailable") * 1024


def write_result(payload: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def benchmark_parser(doc: str, quick_help: str = "a seconds-long smoke configuration") -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --quick and --out (the script adds its own)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/)")
    return p


class BenchmarkRun:
    """One run of a benchmark script: started (time, load average) when created; `finish`
    writes its result JSON in the shape every script shares and says where."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.start, self.load_at_start = time.perf_counter(), load_average()

    def finish(self, fields: dict) -> dict:
        """`{benchmark, quick, machine, load_average, **fields, wall_seconds}`, written to
        `args.out`."""
        result = {
            "benchmark": self.name,
            "quick": self.args.quick,
            "machine": machine_info(),
            "load_average": {"start": self.load_at_start, "end": load_average()},
            **fields,
            "wall_seconds": time.perf_counter() - self.start,
        }
        print(f"\nwrote {write_result(result, self.args.out)} ({result['wall_seconds']:.0f} s)")
        return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_id(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Family/model numbers and the matrix extensions that set bf16 speed (AVX-512, its bf16
    instructions, AMX tiles), for CPUs whose model name is only "AMD EPYC" or "Intel Xeon"."""
    fields = {}
    try:
        for line in cpuinfo.read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        return "unknown"
    flags = set(fields.get("flags", "").split())
    has = {name: "yes" if flag in flags else "no"
           for name, flag in (("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"),
                              ("AMX-BF16", "amx_bf16"))}
    return (f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}, " + ", ".join(f"{k} {v}" for k, v in has.items()))


def _meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/meminfo")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
