"""faiss's OpenBLAS on the AVX-512 kernels where the CPU has them and nobody chose otherwise."""

import json
import subprocess
import sys

import pytest

from ssl_pipeline.blas import AVX512_SUBSETS, CORETYPE, cpu_flags, openblas_coretype

ZEN5_FLAGS = frozenset(["fpu", "sse2", "avx2", "fma", "avx512f", "avx512dq", "avx512cd", "avx512bw",
                        "avx512vl", "avx512_bf16"])


def test_avx512_cpu_gets_the_avx512_kernels_while_faiss_loads_only():
    environ = {"PATH": "/bin"}
    with openblas_coretype(environ, ZEN5_FLAGS) as chosen:
        assert chosen == CORETYPE == "SkylakeX"
        assert environ == {"PATH": "/bin", "OPENBLAS_CORETYPE": "SkylakeX"}
    assert environ == {"PATH": "/bin"}  # unset again: numpy and child processes choose as before


def test_unset_again_when_the_import_fails():
    environ = {}
    with pytest.raises(ImportError), openblas_coretype(environ, ZEN5_FLAGS):
        raise ImportError("no faiss")
    assert environ == {}


@pytest.mark.parametrize("preset", ["Haswell", "SkylakeX", ""])
def test_a_value_already_set_is_kept(preset):
    environ = {"OPENBLAS_CORETYPE": preset, "OPENBLAS_L2_SIZE": "512"}
    with openblas_coretype(environ, ZEN5_FLAGS) as chosen:
        assert chosen is None
        assert environ == {"OPENBLAS_CORETYPE": preset, "OPENBLAS_L2_SIZE": "512"}
    assert environ == {"OPENBLAS_CORETYPE": preset, "OPENBLAS_L2_SIZE": "512"}


@pytest.mark.parametrize("missing", sorted(AVX512_SUBSETS))
def test_cpu_without_every_subset_the_kernels_use_is_left_alone(missing):
    # e.g. Knights Landing has avx512f and avx512cd only; Zen 3 no AVX-512 at all
    for flags in (ZEN5_FLAGS - {missing}, frozenset({"avx2", "fma"})):
        environ = {}
        with openblas_coretype(environ, flags) as chosen:
            assert chosen is None and environ == {}


def test_cpu_flags_reads_the_first_cpu_of_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx512f avx512bw\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "avx512bw"}
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # aarch64 lists no "flags"
    assert cpu_flags(cpuinfo) == frozenset()
    assert cpu_flags(tmp_path / "absent") == frozenset()  # macOS, Windows


def test_knn_loads_faiss_on_the_chosen_kernels_and_leaves_the_environment_as_it_was():
    """A fresh process with this machine's environment as it is (a preset, if the machine has
    one, is kept): faiss's OpenBLAS runs the kernels the rules give, numpy's the ones it picks
    in a process without ssl_pipeline, and the environment afterwards is the one before."""
    code = """
import json, os, sys
before = dict(os.environ)
import ssl_pipeline.evals.knn
unchanged = dict(os.environ) == before  # (threadpoolctl sets a variable of its own)
from ssl_pipeline.blas import AVX512_SUBSETS, cpu_flags, openblas_kernels
kernels = openblas_kernels()
print(json.dumps({
    "preset": before.get("OPENBLAS_CORETYPE"), "unchanged": unchanged,
    "avx512": AVX512_SUBSETS <= cpu_flags(), "faiss": kernels.pop("faiss", None),
    "numpy": kernels}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = json.loads(proc.stdout)
    assert seen["unchanged"]
    numpy_alone = ("import numpy, json\nfrom ssl_pipeline.blas import openblas_kernels\n"
                   "print(json.dumps(openblas_kernels()))")
    proc = subprocess.run([sys.executable, "-c", numpy_alone], capture_output=True, text=True, check=True)
    assert seen["numpy"] == json.loads(proc.stdout)  # numpy chose as it does without us
    if not seen["faiss"]:
        pytest.skip("this faiss build links no OpenBLAS that threadpoolctl sees (e.g. MKL)")
    if seen["preset"]:
        assert seen["faiss"].lower() == seen["preset"].lower()
    elif seen["avx512"]:
        assert seen["faiss"] == "SkylakeX"
