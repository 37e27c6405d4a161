"""Exact inner-product search with a bf16 first pass, for CPUs that multiply bf16 in matrix units.

On an Intel Xeon with AMX, torch's bf16 matrix products run on the AMX tiles about 7x faster
than float32 ones (1,836 against 261 GFLOP/s on the 2 cores we measured), and faiss-cpu's exact
search is float32 throughout. Here:

1. torch computes every query-bank similarity in bf16 (`bank_bf16 @ queries_bf16.T`), one block
   of queries at a time so the block's similarities stay within `block_bytes`;
2. a small C kernel (`bf16_select.c`) takes, per query, a lower bound on its k-th similarity
   from the maxima of 32-row chunks, and re-scores in float32 every bank row whose bf16
   similarity could reach that bound within the proven error of bf16 (the rounding of the
   inputs, measured per vector; the float32 accumulation; the rounding of the output);
3. the k best float32 similarities, most similar first.

No row outside the re-scored ones can be among the k most similar, so the neighbours are those
of an exact float32 search (up to the order of float32 sums when two similarities tie to the last
bit): on the benchmark's 60k x 512 bank with 10k queries and k=200, ~370 rows re-scored per query,
the same neighbour sets as `faiss.knn`, in about half its time (`benchmarks/knn_scaling.py`).

The kernel is compiled on first use with the system's C compiler (`$CC`, else the one Python
was built with, else `cc`) and cached under `$XDG_CACHE_HOME/ssl_pipeline/kernels` (default
`~/.cache/...`), keyed by its source, the compiler's flags and the CPU; without a compiler
`compiled_kernel()` returns None and `BankSearch` uses faiss.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np

from ssl_pipeline.blas import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bf16_select.c")
CHUNK = 32  # bank rows per chunk in the kernel (its CHUNK)
PANEL = 128  # queries per torch product: (bank, 128) panels ran fastest on AMX (256: same)
_FLAGS = (["-O3", "-march=native", "-fopenmp-simd"], ["-O3"])  # the first that compiles
_U = 2.0**-24  # float32 unit roundoff


def has_bf16_matrix_units() -> bool:
    """True on CPUs with AMX-BF16 tiles (Intel Sapphire Rapids and later), where this search
    beats faiss's float32 one; elsewhere a bf16 product is no faster than float32."""
    return "amx_bf16" in cpu_flags()


def fits_in_memory(bank: np.ndarray, block_bytes: int = 128 * 2**20) -> bool:
    """True when the bf16 copy of `bank` and a block of similarities fit in the memory the
    kernel reports available, with 1 GiB to spare (True where it reports none)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return True
    return bank.size * 2 + block_bytes + 2**30 <= kib * 1024


def _compiler() -> str | None:
    names = [os.environ.get("CC", ""), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ssl_pipeline" / "kernels"


@cache
def compiled_kernel() -> ctypes.CDLL | None:
    """The kernel as a loaded library, compiled on first use; None (logged once) when this
    machine has no working C compiler."""
    cc = _compiler()
    if cc is None:
        log.info("bf16 k-NN search: no C compiler found ($CC, cc); using faiss")
        return None
    source = SOURCE.read_bytes()
    machine = f"{platform.machine()} {sorted(cpu_flags())}"  # -march=native differs by CPU
    for flags in _FLAGS:
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(),
                                          machine.encode()])).hexdigest()[:16]
        library = _cache_dir() / f"bf16_select_{key}.so"
        if not library.exists() and not _compile(cc, flags, library):
            continue
        try:
            return _declare(ctypes.CDLL(str(library)))
        except OSError as e:
            log.info("bf16 k-NN search: %s does not load (%s)", library, e)
    log.info("bf16 k-NN search: %s could not compile %s; using faiss", cc, SOURCE.name)
    return None


def _compile(cc: str, flags: list[str], library: Path) -> bool:
    library.parent.mkdir(parents=True, exist_ok=True)
    # compiled beside its final name, then renamed: processes compiling at once (DDP ranks
    # sharing a home directory) never load a half-written file
    fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    cmd = [cc, *flags, "-fPIC", "-shared", "-o", partial, str(SOURCE)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode == 0:
            os.replace(partial, library)
            return True
        log.info("bf16 k-NN search: %s failed: %s", " ".join(cmd), done.stderr.strip()[-500:])
    except (OSError, subprocess.SubprocessError) as e:
        log.info("bf16 k-NN search: %s failed: %s", " ".join(cmd), e)
    Path(partial).unlink(missing_ok=True)
    return False


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.select_and_rescore.restype = i
    lib.select_and_rescore.argtypes = [p, i, i, i, i, i, p, p, i, i, p, p, p]
    return lib


def _rounding(x, bf16) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `x (N, D)` float32: the larger of the norms of x and of its bf16 copy, and the
    norm of the rounding error x - bf16(x) (exact in float32), each raised by (D + 2) unit
    roundoffs to cover the float32 error of computing a norm. In slices of 4M values, so the
    float32 temporaries stay at 16 MB whatever the size of x."""
    slack = 1 + (x.shape[1] + 2) * _U
    norm, err = np.empty(len(x)), np.empty(len(x))
    step = max(1, 2**22 // max(x.shape[1], 1))
    for start in range(0, len(x), step):
        rows = slice(start, start + step)
        wide = bf16[rows].float()
        norm[rows] = np.maximum(x[rows].norm(dim=1).numpy(), wide.norm(dim=1).numpy())
        err[rows] = wide.sub_(x[rows]).norm(dim=1).numpy()
    return norm * slack, err * slack


def all_finite(x: np.ndarray) -> bool:
    """`np.isfinite(x).all()` without a boolean copy of x (2 GB for a 1M x 2048 bank)."""
    step = max(1, 2**22 // max(x.shape[1] if x.ndim == 2 else 1, 1))
    return all(np.isfinite(x[start : start + step]).all() for start in range(0, len(x), step))


class Bf16Search:
    """`search(queries, k)` over `bank (N, D)` float32 (C-contiguous), as `faiss.knn` with the
    inner product: `(similarities, rows)` each (len(queries), k), most similar first.

    Holds a bf16 copy of the bank beside it (half its size). `block_bytes` caps the bf16
    similarities held at once (one block of queries against the whole bank).
    """

    def __init__(self, bank: np.ndarray, block_bytes: int = 128 * 2**20):
        import torch

        lib = compiled_kernel()
        if lib is None:
            raise RuntimeError("bf16 search needs its compiled kernel (a C compiler)")
        self.lib, self.torch = lib, torch
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        bank_t = torch.from_numpy(self.bank)
        self.bank_bf16 = bank_t.to(torch.bfloat16)
        norm, err = _rounding(bank_t, self.bank_bf16)
        self.bank_norm = float(norm.max()) if len(norm) else 0.0
        self.bank_err = float(err.max()) if len(err) else 0.0
        panels = block_bytes // (2 * PANEL * max(len(self.bank), 1))
        self.block = PANEL * int(min(max(panels, 1), 16))
        self.threads = max(torch.get_num_threads(), 1)
        self.rescored_per_query = 0.0  # rows re-scored in float32 per query, last search

    def bands(self, queries, queries_bf16) -> np.ndarray:
        """Per query, a bound on |bf16 product before output rounding - float32 product|:
        |q.x - q'.x'| <= |q - q'| |x| + |q'| |x - x'| (inputs' rounding, Cauchy-Schwarz), plus
        the float32 accumulation of D products, gamma_D |q'| |x'|."""
        d = self.bank.shape[1]
        gamma = d * _U / (1 - d * _U)
        q_norm, q_err = _rounding(queries, queries_bf16)
        band = q_err * self.bank_norm + q_norm * self.bank_err + gamma * q_norm * self.bank_norm
        return (band * (1 + 1e-5) + 1e-30).astype(np.float32)  # 1e-30: flushed subnormals

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        nb, d = self.bank.shape
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not 1 <= k <= nb or queries.shape[1:] != (d,):
            raise ValueError(f"k={k} over a bank of {nb} rows, queries {queries.shape}")
        sims = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        panels = torch.empty(self.block // PANEL, nb, PANEL, dtype=torch.bfloat16)
        rescored = 0
        with ThreadPoolExecutor(self.threads) as pool:
            for start in range(0, len(queries), self.block):
                q = queries[start : start + self.block]
                q_bf16 = torch.from_numpy(q).to(torch.bfloat16)
                band = self.bands(torch.from_numpy(q), q_bf16)
                n_panels = -(-len(q) // PANEL)
                q_bf16 = torch.cat([q_bf16, q_bf16.new_zeros(n_panels * PANEL - len(q), d)])
                for p in range(n_panels):  # (nb, PANEL) each, on the AMX tiles
                    torch.mm(self.bank_bf16, q_bf16[p * PANEL : (p + 1) * PANEL].T, out=panels[p])
                # ctypes releases the GIL: the threads run the kernel on their own panels
                cuts = np.linspace(0, n_panels, min(self.threads, n_panels) + 1).astype(int)
                out_s, out_r = sims[start : start + len(q)], rows[start : start + len(q)]
                jobs = [pool.submit(self.lib.select_and_rescore, panels.data_ptr(), nb, PANEL,
                                    int(a), int(b), len(q), q.ctypes.data, self.bank.ctypes.data,
                                    d, k, band.ctypes.data, out_s.ctypes.data, out_r.ctypes.data)
                        for a, b in itertools.pairwise(cuts)]
                counts = [job.result() for job in jobs]
                if min(counts) < 0:
                    raise MemoryError("bf16 k-NN search: out of memory for the re-scored rows")
                rescored += sum(counts)
        self.rescored_per_query = rescored / max(len(queries), 1)
        return sims, rows
