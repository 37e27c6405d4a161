"""Our k-NN against lightly's `knn_predict` and scikit-learn, and how it scales.

Part 1, side by side on one synthetic bank (default 60k x 512, 10k queries, 10 classes): the
same classifier three ways, k=200 and T=0.1 (InstDisc, lightly's default): each of the k
nearest bank rows by cosine similarity votes for its class with weight exp(sim / T).

- ours: `knn_classify(..., ks=(200,), temperature=0.1)`, top-1 = scores.argmax(1), with its
  default exact search (`search="auto"`: the bf16 first pass on the AMX tiles with float32
  re-scoring on CPUs with AMX, else faiss; each row records which ran). "ours with search=faiss" is the same call
  on faiss's exact search. "ours, pipeline call" is what the pipeline runs: k=20 T=0.07 and
  k=200 T=0.1 from one search.
- lightly: `knn_predict` on L2-normalized torch tensors, the bank as (D, N) the way lightly's
  `KNNClassifier` stores it, all queries at once as its docstring shows; top-1 = pred[:, 0].
- scikit-learn: `KNeighborsClassifier(algorithm="brute", metric="cosine")` with
  weights = exp((1 - cosine distance) / T), i.e. the same vote; fit + predict.
- ours with OpenBLAS's own kernels: "ours with search=faiss", faiss's OpenBLAS on the kernels
  it picks by itself when `OPENBLAS_CORETYPE` is unset (found by a probe process), i.e. without
  `ssl_pipeline.blas` choosing the AVX-512 ones; numpy's OpenBLAS is loaded as in every row.
  Every row records the kernels each OpenBLAS in its process ran (threadpoolctl).

`OPENBLAS_CORETYPE` is read when OpenBLAS loads: a value already in the environment is kept
by every row but the last, and by `ssl_pipeline`. Some machines preset it (with
OPENBLAS_L2_SIZE) because old OpenBLAS builds fail on their CPU; to measure what a user's
machine does by default, unset both for this command alone:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.knn_scaling

Part 2, our time and memory as the bank grows (default 60k, 250k and 1M rows at 2048 dims).

Each measurement runs in a fresh subprocess: it makes the data, warms the method up on a small
problem (imports, thread pools, the compiled kernel), resets the kernel's peak-RSS mark, runs
the method once and reads the peak. "Peak growth" = peak RSS during the call - RSS before it,
so it counts numpy, torch and faiss allocations alike; the bank itself is already resident
before the call. Part 1 measures every method `--repeats` times (default 3), the methods taking
turns, and reports each one's median run (with every run's seconds): on a shared machine a
single run can land in a slow spell.

    python -m benchmarks.knn_scaling            # a few minutes on 2 cores
    python benchmarks/knn_scaling.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import (
    RESULTS_DIR,
    BenchmarkRun,
    benchmark_parser,
    memory_available_bytes,
)
from ssl_pipeline.blas import (
    openblas_kernels,  # standard library only: loads no OpenBLAS
)

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
METHODS = {
    "ours": "ours: knn_classify, k=200 T=0.1, its default search",
    "ours_faiss": "ours with search=faiss (faiss.knn, exact float32)",
    "ours_pipeline": "ours, pipeline call: k=20 T=0.07 and k=200 T=0.1 from one search",
    "lightly": "lightly knn_predict, all queries at once",
    "sklearn": "scikit-learn KNeighborsClassifier, brute, cosine, exp(sim/T) weights",
    "ours_own_kernels": "ours with search=faiss, faiss's OpenBLAS choosing its kernels",
}


# ------------------------------------------------------------------ synthetic data


def class_centres(classes: int, dim: int, separation: float, seed: int) -> np.ndarray:
    """Gaussian class centres `(C, D)`; scaled by D**-0.25 so that, with unit noise, the
    k-NN accuracy depends little on D (the centre distance grows like the noise's spread)."""
    rng = np.random.default_rng([seed, 0])
    return rng.standard_normal((classes, dim), dtype=np.float32) * np.float32(separation / dim**0.25)


def synthetic(n: int, centres: np.ndarray, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """`(features (n, D) float32, labels (n,))`: a random class's centre plus N(0, 1) noise.

    Written in place chunk by chunk, so making a 1M x 2048 bank never holds a second copy.
    """
    rng = np.random.default_rng([seed, stream])
    labels = rng.integers(0, len(centres), n)
    x = np.empty((n, centres.shape[1]), np.float32)
    for start in range(0, n, 16384):
        block = x[start : start + 16384]
        rng.standard_normal(out=block, dtype=np.float32)
        block += centres[labels[start : start + 16384]]
    return x, labels


def make_data(spec: dict) -> dict:
    centres = class_centres(spec["classes"], spec["dim"], spec["separation"], spec["seed"])
    bank, bank_labels = synthetic(spec["bank"], centres, spec["seed"], 1)
    queries, query_labels = synthetic(spec["queries"], centres, spec["seed"], 2)
    return {"bank": bank, "bank_labels": bank_labels, "queries": queries,
            "query_labels": query_labels}


# ------------------------------------------------------------------ the methods
# Each takes the data dict and returns top-1 predictions (and, for the pipeline call, the
# k=20 ones too). With spec["handoff"] the bank is popped from the dict, so the callee holds
# the only reference and may free it (used only where the bank, its normalized copy and a spare
# bank's worth of memory do not fit).


def bank_of(data: dict, spec: dict) -> np.ndarray:
    return data.pop("bank") if spec.get("handoff") else data["bank"]


def run_ours(data: dict, spec: dict, search: str = "auto") -> dict[str, np.ndarray]:
    from ssl_pipeline.evals.knn import knn_classify

    k, t = spec["k"], spec["temperature"]
    scores = knn_classify(bank_of(data, spec), data["bank_labels"], data["queries"],
                          spec["classes"], ks=(k,), temperature=t, search=search)
    return {"top1": scores[k].argmax(1)}


def run_ours_faiss(data: dict, spec: dict) -> dict[str, np.ndarray]:
    return run_ours(data, spec, search="faiss")


def run_ours_pipeline(data: dict, spec: dict) -> dict[str, np.ndarray]:
    from ssl_pipeline.evals.knn import PROTOCOLS, knn_classify

    scores = knn_classify(bank_of(data, spec), data["bank_labels"], data["queries"],
                          spec["classes"], ks=tuple(PROTOCOLS), temperature=PROTOCOLS)
    return {"top1": scores[200].argmax(1), "top1_k20": scores[20].argmax(1)}


def run_lightly(data: dict, spec: dict) -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as F
    from lightly.utils.benchmarking import knn_predict

    # (D, N), normalized and contiguous, as lightly's KNNClassifier prepares its bank
    bank = F.normalize(torch.from_numpy(bank_of(data, spec)), dim=1).t().contiguous()
    queries = F.normalize(torch.from_numpy(data["queries"]), dim=1)
    labels = torch.from_numpy(data["bank_labels"])
    pred = knn_predict(queries, bank, labels, spec["classes"], knn_k=spec["k"],
                       knn_t=spec["temperature"])  # (Q, C) classes, best first
    return {"top1": pred[:, 0].numpy()}


def run_sklearn(data: dict, spec: dict) -> dict[str, np.ndarray]:
    from sklearn.neighbors import KNeighborsClassifier

    t = spec["temperature"]
    # cosine distance = 1 - cosine similarity: the same exp(sim / T) vote as ours and lightly's
    classifier = KNeighborsClassifier(n_neighbors=spec["k"], weights=lambda d: np.exp((1 - d) / t),
                                      algorithm="brute", metric="cosine")
    classifier.fit(bank_of(data, spec), data["bank_labels"])
    return {"top1": classifier.predict(data["queries"])}


RUNNERS = {"ours": run_ours, "ours_faiss": run_ours_faiss, "ours_pipeline": run_ours_pipeline,
           "lightly": run_lightly, "sklearn": run_sklearn, "ours_own_kernels": run_ours_faiss}
SEARCH = {"ours": "auto", "ours_faiss": "faiss", "ours_pipeline": "auto", "ours_own_kernels": "faiss"}


def openblas_own_choice() -> str | None:
    """The kernels faiss's OpenBLAS picks with `OPENBLAS_CORETYPE` unset (a probe process that
    imports faiss but not ssl_pipeline); None if it cannot tell."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    code = ("import faiss\nfrom ssl_pipeline.blas import openblas_kernels\n"
            "print(openblas_kernels().get('faiss'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=False)
    choice = proc.stdout.strip()
    return choice if proc.returncode == 0 and choice not in ("", "None") else None


# ------------------------------------------------------------------ one measurement, isolated


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(spec: dict) -> dict:
    """Run one method once in this (fresh) process: seconds, RSS before and peak during."""
    try:  # if the machine runs out of memory, the kernel kills this process, not a neighbour
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    if spec.get("faiss_openblas"):  # numpy's OpenBLAS has loaded (above); faiss's has not
        assert "faiss" not in sys.modules
        os.environ["OPENBLAS_CORETYPE"] = spec["faiss_openblas"]
    run = RUNNERS[spec["method"]]
    # imports, thread pools, BLAS buffers, the bf16 kernel: not part of the call (8192 rows:
    # the smallest bank on which the default search takes the bf16 path where it would)
    warmup = dict(spec, bank=min(spec["bank"], 8192), queries=100, handoff=False)
    run(make_data(warmup), warmup)
    data = make_data(spec)
    search = None
    if spec["method"] in SEARCH:  # which exact search knn_classify runs (BankSearch's choice)
        from ssl_pipeline.evals.knn import choose_search

        search = choose_search(data["bank"], SEARCH[spec["method"]])
    gc.collect()
    exact_peak = reset_peak_rss()
    rss_before = status_mib("VmRSS")
    start = time.perf_counter()
    out = run(data, spec)
    seconds = time.perf_counter() - start
    if exact_peak:
        peak, how = status_mib("VmHWM"), "VmHWM after resetting it (/proc/self/clear_refs)"
    else:  # the process-lifetime peak: a lower bound on the growth if setup peaked higher
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"
    truth = data["query_labels"]
    result = {
        "method": spec["method"], "seconds": seconds, "rss_before_mib": rss_before,
        "peak_rss_mib": peak, "peak_growth_mib": peak - rss_before, "peak_measured_by": how,
        "top1_accuracy": float((out["top1"] == truth).mean()),
        "openblas_kernels": openblas_kernels(),
    }
    if "top1_k20" in out:
        result["top1_accuracy_k20"] = float((out["top1_k20"] == truth).mean())
    if search:
        result["search"] = search
    np.save(spec["predictions"], out["top1"])
    return result


def run_isolated(spec: dict, workdir: Path) -> dict:
    """`measure(spec)` in a fresh Python process; an error (even an OOM kill) is recorded."""
    name = f"{spec['method']}_{spec['bank']}x{spec['dim']}_{spec['queries']}_{spec.get('repeat', 0)}"
    spec = dict(spec, predictions=str(workdir / f"{name}.npy"), result=str(workdir / f"{name}.json"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.knn_scaling", "--worker",
                           json.dumps(spec)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"method": spec["method"], "error": f"exit code {proc.returncode}: {' | '.join(tail)}"}
    result = json.loads(Path(spec["result"]).read_text())
    result["predictions"] = spec["predictions"]
    return result


def worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    Path(spec["result"]).write_text(json.dumps(measure(spec)))


# ------------------------------------------------------------------ the benchmark


def compare(args, workdir: Path) -> dict:
    """Each method `args.repeats` times, each time in a fresh process, the methods taking turns
    (repeat 1 of every method, then repeat 2, ...) so that a slow spell of a shared machine
    falls on all of them; each row is the method's median run, with every run's seconds."""
    spec = dict(bank=args.bank, dim=args.dim, queries=args.queries, classes=args.classes,
                separation=args.separation, seed=args.seed, k=args.k, temperature=args.temperature)
    runs: dict[str, list[dict]] = {method: [] for method in args.methods}
    own_choice = None
    for repeat in range(args.repeats):
        for method in args.methods:
            extra = {}
            if method == "ours_own_kernels":
                own_choice = own_choice or openblas_own_choice()
                if own_choice is None:
                    runs[method].append({"method": method,
                                         "error": "could not tell faiss's OpenBLAS kernels"})
                    continue
                extra = {"faiss_openblas": own_choice}
            turn = f" (run {repeat + 1} of {args.repeats})" if args.repeats > 1 else ""
            print(f"  {METHODS[method]}{f' ({own_choice})' if extra else ''}{turn} ...", flush=True)
            runs[method].append(run_isolated(dict(spec, method=method, repeat=repeat, **extra),
                                             workdir))
    rows = {method: median_run(method_runs) for method, method_runs in runs.items()}
    ours = np.load(rows["ours"]["predictions"]) if "predictions" in rows.get("ours", {}) else None
    for row in rows.values():
        if ours is not None and "predictions" in row:
            row["agreement_with_ours"] = float((np.load(row["predictions"]) == ours).mean())
        row.pop("predictions", None)
    bank_mib = args.bank * args.dim * 4 / MIB
    return {"setup": {**spec, "repeats": args.repeats, "bank_mib": bank_mib,
                      "similarity_matrix_mib": args.queries * args.bank * 4 / MIB,
                      "environment": {v: os.environ.get(v)
                                      for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
                      "faiss_openblas_own_choice": own_choice},
            "rows": rows, "ratios": ratios(rows)}


def median_run(runs: list[dict]) -> dict:
    """The run with the median time (the lower middle one of an even count), with every run's
    seconds; a failed run stands for the method only if every run failed."""
    done = sorted((r for r in runs if "seconds" in r), key=lambda r: r["seconds"])
    if not done:
        return runs[-1]
    row = dict(done[(len(done) - 1) // 2])
    row["seconds_of_each_run"] = [r["seconds"] for r in runs if "seconds" in r]
    row["failed_runs"] = sum("seconds" not in r for r in runs)
    return row


REFERENCES = ("lightly", "sklearn", "ours_faiss", "ours_pipeline", "ours_own_kernels")


def ratios(rows: dict) -> dict:
    """Reference / ours, for time and peak-memory growth (above 1: ours is faster or smaller)."""
    ours = rows.get("ours", {})
    out = {}
    for ref in REFERENCES:
        row = rows.get(ref, {})
        if "seconds" in row and "seconds" in ours:
            out[f"{ref}_time_over_ours"] = row["seconds"] / ours["seconds"]
            out[f"{ref}_memory_over_ours"] = row["peak_growth_mib"] / max(ours["peak_growth_mib"], 1.0)
    return out


def curve(args, workdir: Path) -> list[dict]:
    points = []
    queries = args.curve_queries * len(args.curve_banks) if len(args.curve_queries) == 1 \
        else args.curve_queries
    for bank, q in zip(args.curve_banks, queries, strict=True):
        bank_bytes = bank * args.curve_dim * 4
        spec = dict(method="ours_pipeline", bank=bank, dim=args.curve_dim, queries=q,
                    classes=args.classes, separation=args.separation, seed=args.seed,
                    k=200, temperature=0.1)
        # knn_classify holds the caller's bank and its normalized copy at once (faiss; the bf16
        # search holds a bf16 copy, half a bank); when those two and a spare bank's worth do
        # not fit, hand the bank over so the caller's copy is freed
        available = memory_available_bytes()
        spec["handoff"] = 3.2 * bank_bytes + 2**30 > available
        point = {"bank": bank, "dim": args.curve_dim, "queries": q, "bank_mib": bank_bytes / MIB,
                 "similarity_matrix_mib": q * bank * 4 / MIB, "caller_keeps_bank": not spec["handoff"],
                 "memory_available_mib_before": available / MIB}
        if 2.2 * bank_bytes + 2**30 > available:
            point["skipped"] = "not enough free memory for two copies of the bank"
        else:
            print(f"  ours, bank {bank} x {args.curve_dim}, {q} queries"
                  f"{' (bank handed over)' if spec['handoff'] else ''} ...", flush=True)
            result = run_isolated(spec, workdir)
            result.pop("predictions", None)
            point.update(result)
            if "seconds" in result:
                point["seconds_per_1k_queries"] = result["seconds"] / q * 1000
                point["peak_growth_over_bank"] = result["peak_growth_mib"] / point["bank_mib"]
        points.append(point)
    return points


def print_comparison(c: dict) -> None:
    s = c["setup"]
    print(f"\nk-NN on a {s['bank']} x {s['dim']} bank, {s['queries']} queries, {s['classes']} "
          f"classes, k={s['k']} T={s['temperature']} (bank {s['bank_mib']:.0f} MiB; a full "
          f"queries x bank similarity matrix {s['similarity_matrix_mib']:.0f} MiB)")
    print(f"{'method':<72} {'time s':>8} {'peak+ MiB':>10} {'top-1':>6} {'agree':>6}")
    for method, row in c["rows"].items():
        if "error" in row:
            print(f"{METHODS[method]:<72} failed: {row['error']}")
            continue
        agree = row.get("agreement_with_ours", float("nan"))
        kernels = ", ".join(f"{lib} {arch}" for lib, arch in sorted(row["openblas_kernels"].items()))
        search = f"  search {row['search']}" if "search" in row else ""
        each = row.get("seconds_of_each_run", [])
        each = f"  runs {', '.join(f'{t:.2f}' for t in each)} s" if len(each) > 1 else ""
        print(f"{METHODS[method]:<72} {row['seconds']:>8.2f} {row['peak_growth_mib']:>10.0f} "
              f"{row['top1_accuracy']:>6.3f} {agree:>6.3f}  OpenBLAS {kernels or '-'}{search}{each}")
    r = c["ratios"]
    for ref in REFERENCES:
        if f"{ref}_time_over_ours" in r:
            print(f"  {ref} / ours: time x{r[f'{ref}_time_over_ours']:.2f}, "
                  f"peak memory growth x{r[f'{ref}_memory_over_ours']:.2f}")


def print_curve(points: list[dict]) -> None:
    print("\nours (pipeline call, k=20 and k=200 from one search) as the bank grows")
    print(f"{'bank':>9} {'dim':>5} {'queries':>7} {'time s':>8} {'s/1k q':>7} {'bank MiB':>9} "
          f"{'peak+ MiB':>10} {'peak+/bank':>10} {'QxN matrix MiB':>15}  caller keeps bank")
    for p in points:
        head = f"{p['bank']:>9} {p['dim']:>5} {p['queries']:>7}"
        if "seconds" not in p:
            print(f"{head} {p.get('skipped') or p.get('error')}")
            continue
        print(f"{head} {p['seconds']:>8.1f} {p['seconds_per_1k_queries']:>7.2f} {p['bank_mib']:>9.0f} "
              f"{p['peak_growth_mib']:>10.0f} {p['peak_growth_over_bank']:>10.2f} "
              f"{p['similarity_matrix_mib']:>15.0f}  {'yes' if p['caller_keeps_bank'] else 'no'}")


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    p = benchmark_parser(__doc__)
    p.add_argument("--bank", type=int, default=60_000, help="bank rows of the comparison")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--separation", type=float, default=0.6,
                   help="class-centre scale; 0.6 gives ~80%% k=200 accuracy at 512 dims")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3,
                   help="fresh-process runs of each method in the comparison; rows are medians")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--curve-banks", type=ints, default=[60_000, 250_000, 1_000_000],
                   help="bank sizes of the scaling curve; empty to skip it")
    p.add_argument("--curve-dim", type=int, default=2048)
    p.add_argument("--curve-queries", type=ints, default=[10_000, 5_000, 2_000],
                   help="queries per curve point (one value for all); fewer at 1M keep the "
                        "default run to a few minutes (time is linear in queries)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    if p.parse_known_args(argv)[0].quick:  # smaller defaults; sizes given explicitly still win
        p.set_defaults(bank=5_000, dim=64, queries=500, curve_banks=[2_000, 8_000], curve_dim=128,
                       curve_queries=[200], repeats=1)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if "ours" not in args.methods or set(args.methods) - set(METHODS):
        p.error(f"--methods must include 'ours' and only name {', '.join(METHODS)}")
    args.out = args.out or RESULTS_DIR / ("knn_scaling_quick.json" if args.quick else "knn_scaling.json")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    run = BenchmarkRun("knn_scaling", args)
    with tempfile.TemporaryDirectory(prefix="knn_scaling_") as tmp:
        print("comparison (each method in a fresh process):", flush=True)
        comparison = compare(args, Path(tmp))
        print_comparison(comparison)
        print("\nscaling curve:", flush=True)
        points = curve(args, Path(tmp)) if args.curve_banks else []
        print_curve(points)
    result = run.finish({
        "comparison": comparison,
        "curve": points,
        "notes": [
            ("Synthetic float32 features: gaussian class centres (scaled by separation / D**0.25)"
             " plus N(0, 1) noise, seeded; bank and queries drawn alike."),
            ("Comparison rows: the median of `repeats` runs per method (seconds_of_each_run), the"
             " methods taking turns; curve points: one run each."),
            ("Each measurement runs in a fresh subprocess after a warm-up on an 8,192-row bank;"
             " peak_growth_mib = peak RSS during the call - RSS before it (bank already resident)."),
            "agreement_with_ours: fraction of queries whose top-1 class equals ours (k=200 T=0.1).",
            ("openblas_kernels: the kernels each OpenBLAS in the row's process ran (threadpoolctl);"
             " ours_own_kernels loaded faiss's OpenBLAS with OPENBLAS_CORETYPE set to its own"
             " choice (setup.faiss_openblas_own_choice); everything else with setup.environment."),
            ("Curve points list their queries: by default fewer at the larger banks (10k, 5k, 2k)"
             " to keep the run to minutes; time is linear in queries, compare"
             " seconds_per_1k_queries (which also carries the per-call normalized copy of the bank)."),
            ("caller_keeps_bank=false: the bank was handed to knn_classify (the caller dropped its"
             " reference) because it, the normalized copy and a spare bank's worth would not fit;"
             " peak growth then excludes"
             " the caller's copy."),
        ],
    })
    return result


if __name__ == "__main__":
    main()
