"""faiss's exact search on the OpenBLAS kernels this process loaded, checked against float64.

`ssl_pipeline.blas` loads faiss's OpenBLAS on its AVX-512 ("SkylakeX") kernels where OpenBLAS
would pick older ones. This script checks that the search on whatever kernels loaded returns the
true neighbours: for each shape (dimensions, bank rows, queries; inner product and L2) it
compares faiss.knn with the float64 distances numpy computes, and counts a case as bad when
a returned distance is off by more than float32 rounding or a returned neighbour is not among
the true k nearest (up to ties within that rounding).

Not a unit test: the kernels are chosen by `OPENBLAS_CORETYPE`, which some machines preset
(with OPENBLAS_L2_SIZE) and tests must leave alone. To check the kernels ssl_pipeline picks
on a machine that presets them, unset both for this command alone:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.faiss_kernels_check
    python -m benchmarks.faiss_kernels_check --quick    # fewer shapes, seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import RESULTS_DIR, BenchmarkRun, benchmark_parser

DIMS = (1, 3, 17, 64, 100, 128, 384, 512, 768, 1000, 2048)
BANKS = (1, 5, 999, 1024, 3001, 20000)
QUERIES = (1, 7, 513, 4097, 6000)
MAX_PRODUCT = 5e9  # bank x queries x dims of the largest case: keeps the run to a few minutes


def check(faiss, dims, banks, queries, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    cases, bad, worst = 0, [], 0.0
    for d in dims:
        for nb in banks:
            for nq in queries:
                if nb * nq * d > MAX_PRODUCT:
                    continue
                bank = rng.standard_normal((nb, d), dtype=np.float32)
                query = rng.standard_normal((nq, d), dtype=np.float32)
                k = min(50, nb)
                for metric in ("ip", "l2"):
                    error, ok = _one(faiss, bank, query, k, metric)
                    cases += 1
                    worst = max(worst, error)
                    if not ok or error > 1e-5:
                        bad.append({"dim": d, "bank": nb, "queries": nq, "metric": metric,
                                    "relative_error": error, "true_neighbours": ok})
    return {"cases": cases, "bad": bad, "worst_relative_error": worst}


def _one(faiss, bank, query, k, metric) -> tuple[float, bool]:
    exact = query.astype(np.float64) @ bank.astype(np.float64).T
    if metric == "l2":
        exact = (query.astype(np.float64) ** 2).sum(1)[:, None] \
            + (bank.astype(np.float64) ** 2).sum(1)[None] - 2 * exact
        dist, idx = faiss.knn(query, bank, k, metric=faiss.METRIC_L2)
    else:
        dist, idx = faiss.knn(query, bank, k, metric=faiss.METRIC_INNER_PRODUCT)
    scale = max(1.0, float(np.abs(exact).max()))
    got = np.take_along_axis(exact, idx, 1)
    error = float(np.abs(dist - got).max()) / scale
    tolerance = 1e-5 * scale
    if metric == "l2":  # the k-th smallest true distance bounds every returned one
        kth = np.sort(exact, 1)[:, k - 1]
        ok = bool((got <= kth[:, None] + tolerance).all())
    else:
        kth = np.sort(exact, 1)[:, -k]
        ok = bool((got >= kth[:, None] - tolerance).all())
    return error, ok


def main(argv=None) -> dict:
    p = benchmark_parser(__doc__)
    args = p.parse_args(argv)
    args.out = args.out or RESULTS_DIR / ("faiss_kernels_check_quick.json" if args.quick
                                          else "faiss_kernels_check.json")
    run = BenchmarkRun("faiss_kernels_check", args)
    from ssl_pipeline.blas import import_faiss, openblas_kernels

    faiss = import_faiss()
    kernel = openblas_kernels().get("faiss")
    shapes = ((64, 512), (5, 3001), (7, 4097)) if args.quick else (DIMS, BANKS, QUERIES)
    result = check(faiss, *shapes)
    print(f"faiss's OpenBLAS kernels: {kernel or 'not seen by threadpoolctl'}")
    print(f"{result['cases']} cases, {len(result['bad'])} bad, worst relative distance error "
          f"{result['worst_relative_error']:.2e}")
    for case in result["bad"][:10]:
        print(f"  bad: {case}")
    return run.finish({"faiss_openblas_kernels": kernel, **result})


if __name__ == "__main__":
    sys.exit(1 if main()["bad"] else 0)
