"""faiss's OpenBLAS on its AVX-512 kernels, on CPUs where it would pick older ones.

faiss-cpu's exact search multiplies matrices with the OpenBLAS that the faiss-cpu wheel ships
(0.3.15, older than Zen 4). OpenBLAS picks its kernels when the library loads, from the CPU's
family and model, and that build runs a CPU it does not know on older kernels: AMD's Zen 5 on
"Barcelona" (SSE, 2007). Measured on a 2-core Zen 5 (10k queries against a 60k x 512 bank,
k=200, `benchmarks/knn_scaling.py`): our k-NN 6.5 s on those kernels, 2.0 s on the AVX-512
ones ("SkylakeX"), the same neighbours; a float32 check of faiss's results against float64
found no difference beyond rounding on 590 shapes (`benchmarks/faiss_kernels_check.py`).

`import_faiss` imports faiss with `OPENBLAS_CORETYPE=SkylakeX` in the environment when the CPU
has every AVX-512 subset those kernels use and the variable is unset, and removes it again
once faiss has loaded: numpy (imported first, with the environment as it was) and child
processes are not affected. A value already set is the user's (or the machine's) choice and is
kept: some machines preset it, with OPENBLAS_L2_SIZE, because old OpenBLAS builds fail on their
CPU. Set `OPENBLAS_CORETYPE` yourself to keep OpenBLAS's own choice or make another.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

CORETYPE = "SkylakeX"
# The subsets OpenBLAS's SkylakeX kernels need: Knights Landing (F and CD only) lacks the rest.
AVX512_SUBSETS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags as Linux lists them (those the kernel enabled); empty
    where there is no /proc/cpuinfo (macOS, Windows) or it lists none (ARM)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@contextmanager
def openblas_coretype(
    environ: MutableMapping[str, str] = os.environ, flags: frozenset[str] | None = None
) -> Iterator[str | None]:
    """Within the block, `OPENBLAS_CORETYPE` is the AVX-512 kernels where the CPU has them and
    the variable was unset; afterwards it is unset again. Yields what it set, or None when it
    left the environment alone (a value already set, or a CPU without AVX-512)."""
    if "OPENBLAS_CORETYPE" in environ or not AVX512_SUBSETS <= (cpu_flags() if flags is None else flags):
        yield None
        return
    environ["OPENBLAS_CORETYPE"] = CORETYPE
    try:
        yield CORETYPE
    finally:
        environ.pop("OPENBLAS_CORETYPE", None)


def openblas_kernels() -> dict[str, str]:
    """The kernels ("architecture") each OpenBLAS loaded in this process runs, by the package
    that ships it (`faiss`, `numpy`, `scipy`, else the library's file name): faiss-cpu and
    numpy each bring their own. threadpoolctl reads them; importing it sets
    KMP_DUPLICATE_LIB_OK in the environment."""
    from threadpoolctl import threadpool_info

    def owner(path: str) -> str:
        return next((pkg for pkg in ("faiss", "numpy", "scipy") if pkg in path), Path(path).name)

    return {owner(p["filepath"]): p.get("architecture") or "?"
            for p in threadpool_info() if p.get("internal_api") == "openblas"}


def import_faiss() -> ModuleType:
    """`import faiss`, its OpenBLAS loading within `openblas_coretype()` unless faiss has
    loaded already (then it is returned as it is)."""
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    import numpy  # noqa: F401  numpy's OpenBLAS loads first, with the environment as it is

    with openblas_coretype():
        import faiss
    return faiss
