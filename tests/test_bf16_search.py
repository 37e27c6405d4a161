"""The bf16 first-pass search finds the exact neighbours (bf16_search.py), and when it is used."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from ssl_pipeline.errors import SSLPipelineError
from ssl_pipeline.evals import bf16_search, knn
from ssl_pipeline.evals.bf16_search import Bf16Search, compiled_kernel
from ssl_pipeline.evals.knn import (
    BankSearch,
    choose_search,
    knn_classify,
    l2_normalized,
)

TIE = 1e-6  # float32 sums in another order move a similarity by ~1e-7; closer pairs may swap


def exact(bank: np.ndarray, queries: np.ndarray, k: int):
    """float64 similarities (Q, N) and the top-k similarities (Q, k)."""
    sims = queries.astype(np.float64) @ bank.astype(np.float64).T
    return sims, -np.sort(-sims, axis=1)[:, :k]


def assert_exact_neighbours(bank, queries, k, found_sims, found_rows):
    """Every row found is among the k most similar up to ties within TIE, the similarities
    are the float64 ones to float32 precision, most similar first, and no row repeats."""
    sims, top = exact(bank, queries, k)
    assert found_rows.shape == found_sims.shape == (len(queries), k)
    assert (np.diff(found_sims, axis=1) <= 0).all(), "not most similar first"
    np.testing.assert_allclose(found_sims, top, atol=TIE)  # the k best values, in order
    true = np.take_along_axis(sims, found_rows, axis=1)
    np.testing.assert_allclose(found_sims, true, atol=TIE)  # each row's own similarity
    assert all(len(set(r)) == k for r in found_rows)


def normalized(rng, n, d):
    return l2_normalized(rng.standard_normal((n, d), dtype=np.float32))


def on_tiles() -> bool:
    """True where the kernel runs step 1 on the AMX tiles (an Intel CPU with AMX-BF16, a
    compiler that builds for it, Linux granting the tile state)."""
    return compiled_kernel().amx_ready() == 1


# Both first passes: on the AMX tiles (`amx_select`) where this machine has them, and torch's
# bf16 product with `select_candidates` (everywhere; the path of CPUs without AMX).
PATHS = pytest.mark.parametrize("tiles", [True, False], ids=["tiles", "panels"])


def make_search(bank, tiles, **kwargs) -> Bf16Search:
    search = Bf16Search(bank, tiles=tiles, **kwargs)
    assert search.tiles == (tiles and on_tiles())
    return search


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path_factory, monkeypatch):
    """Compile into a directory of this test session, not the user's cache. Without a C
    compiler these tests skip, except in CI (CI=true), which must have one (.ci/run installs
    gcc): there they fail."""
    if bf16_search._compiler() is None:
        message = "no C compiler for the bf16 k-NN kernel; install one: apt-get install gcc"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg"))
    compiled_kernel.cache_clear()
    yield
    compiled_kernel.cache_clear()


@PATHS
@pytest.mark.parametrize("n, d, queries, k", [
    (9000, 64, 300, 200),  # the protocols' k; queries not a multiple of the 128-query panel
    (9000, 37, 130, 20),   # no multiple of a vector register nor of a tile (32) in rows or dims
    (4000, 16, 64, 1),     # k=1
    (500, 32, 40, 50),     # fewer 32-row chunks than k: every row is re-scored
    (3000, 100, 1, 40),    # one query: 31 zero queries pad its tile group
])
def test_same_neighbours_as_float64_search(n, d, queries, k, tiles):
    rng = np.random.default_rng([n, d, k])
    bank, q = normalized(rng, n, d), normalized(rng, queries, d)
    search = make_search(bank, tiles)
    assert_exact_neighbours(bank, q, k, *search.search(q, k))
    if n // 32 >= 4 * k:  # the bound prunes: far fewer rows re-scored than the bank
        assert search.rescored_per_query < n / 4


def crowded_at_zero(rng, n=6000, near=600, d=64, spread=1e-3):
    """Queries along one direction q and a bank where `near` rows have similarities spread
    over +-spread around 0 and the rest -0.5: the k-th similarity sits in a crowd whose
    gaps (~3e-6) are far below the error of rounding the vectors to bf16 (~1e-4), while the
    bf16 output's own rounding near 0 is tiny, so the search is right only if its bound on
    the inputs' rounding is."""
    q = normalized(rng, 1, d)[0]
    r = normalized(rng, n, d)
    r -= np.outer(r @ q, q)  # orthogonal to q
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    along = np.full(n, -0.5, np.float32)
    along[rng.permutation(n)[:near]] = rng.uniform(-spread, spread, near)
    bank = l2_normalized(r * np.sqrt(1 - along**2)[:, None] + along[:, None] * q)
    queries = l2_normalized(q + 1e-6 * rng.standard_normal((20, d), dtype=np.float32))
    return bank, queries


@PATHS
def test_exact_where_bf16_rounding_reorders_the_neighbours(tiles):
    bank, q = crowded_at_zero(np.random.default_rng(0))
    search = make_search(bank, tiles)
    found_sims, found_rows = search.search(q, 100)
    assert_exact_neighbours(bank, q, 100, found_sims, found_rows)
    # the test can fail: ranking by the bf16 similarities alone picks other rows
    bf16 = (torch.from_numpy(q).bfloat16() @ torch.from_numpy(bank).bfloat16().T).float()
    by_bf16 = bf16.topk(100, dim=1).indices.numpy()
    assert any(set(a) != set(b) for a, b in zip(by_bf16, found_rows))


@PATHS
def test_without_its_error_bound_the_search_would_miss_neighbours(monkeypatch, tiles):
    """The crowded bank needs the bound: with it zeroed the kernel prunes true neighbours (so
    the test above checks the bound, not luck)."""
    bank, q = crowded_at_zero(np.random.default_rng(0))
    search = make_search(bank, tiles)
    monkeypatch.setattr(search, "bands", lambda *a: np.zeros(len(a[0]), np.float32))
    with pytest.raises(AssertionError):
        assert_exact_neighbours(bank, q, 100, *search.search(q, 100))


@PATHS
def test_negative_similarities_and_several_blocks(tiles):
    """Queries pointing away from the bank (all similarities negative), in the smallest panels
    (16 queries, as for a bank too large for 128) and several blocks."""
    rng = np.random.default_rng(3)
    bank = normalized(rng, 7000, 32)
    q = l2_normalized(-bank[:300] + 0.05 * rng.standard_normal((300, 32), dtype=np.float32))
    search = make_search(bank, tiles, block_bytes=1, block=40)
    assert (search.panel, search.block) == (16, 32)
    assert_exact_neighbours(bank, q, 30, *search.search(q, 30))


@PATHS
def test_normalizing_as_it_goes_equals_searching_normalized_copies(tiles):
    """`normalize=True` (what BankSearch asks for: no normalized copy of the bank) finds the
    cosine neighbours of unnormalized rows of any length, zero rows included (similarity 0)."""
    rng = np.random.default_rng(5)
    bank = rng.standard_normal((9000, 70), dtype=np.float32)
    bank *= rng.uniform(1e-3, 1e3, (9000, 1)).astype(np.float32)
    bank[[3, 4000]] = 0
    q = rng.standard_normal((200, 70), dtype=np.float32) * 30
    q[7] = 0
    search = make_search(bank, tiles, normalize=True)
    sims, rows = search.search(q, 100)
    assert_exact_neighbours(l2_normalized(bank), l2_normalized(q), 100, sims, rows)
    assert (sims[7] == 0).all()  # a zero query is as similar to every row


@PATHS
def test_a_bank_in_increasing_similarity_order(tiles):
    """The worst order for a cut that rises as the bank streams by: every row is more similar
    to the query than the rows before it, so every row is kept for a while and the lists are
    cut down and regrown again and again."""
    rng = np.random.default_rng(6)
    q = normalized(rng, 1, 48)
    bank = normalized(rng, 20000, 48)
    bank = bank[np.argsort(bank @ q[0])]
    queries = l2_normalized(q + 1e-3 * rng.standard_normal((40, 48), dtype=np.float32))
    assert_exact_neighbours(bank, queries, 150, *make_search(bank, tiles).search(queries, 150))


@PATHS
def test_ties_come_lower_row_first(tiles):
    """Equal similarities (repeated bank rows) in increasing row order, as faiss orders them."""
    rng = np.random.default_rng(8)
    bank = normalized(rng, 9000, 32)
    bank[[100, 2500, 8999]] = bank[50]
    sims, rows = make_search(bank, tiles).search(bank[[50]], 10)
    assert list(rows[0][:4]) == [50, 100, 2500, 8999]
    assert sims[0][0] == sims[0][1] == sims[0][2] == sims[0][3]


def test_knn_classify_scores_equal_faiss_scores():
    rng = np.random.default_rng(4)
    bank, queries = rng.standard_normal((9000, 64), dtype=np.float32), rng.standard_normal(
        (500, 64), dtype=np.float32)
    labels = rng.integers(0, 10, 9000)
    ours = knn_classify(bank, labels, queries, 10, ks=(20, 200), temperature=0.1, search="bf16")
    theirs = knn_classify(bank, labels, queries, 10, ks=(20, 200), temperature=0.1, search="faiss")
    for k in (20, 200):
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-4)


def test_compiled_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiled_kernel.cache_clear()
    assert compiled_kernel() is not None
    built = list((tmp_path / "ssl_pipeline" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    compiled_kernel.cache_clear()
    assert compiled_kernel() is not None
    assert [p.stat().st_mtime_ns for p in built] == [stamp]


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    """A read-only home (a file where the cache folder should be, here): the kernel is built in
    a folder of the temporary directory; with that unwritable too, faiss, and no error."""
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not_a_folder"))
    monkeypatch.setattr(bf16_search.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    compiled_kernel.cache_clear()
    assert compiled_kernel() is not None
    assert len(list((tmp_path / "tmp").glob("ssl_pipeline-kernels-*/*.so"))) == 1
    monkeypatch.setattr(bf16_search.tempfile, "gettempdir", lambda: str(tmp_path / "not_a_folder"))
    compiled_kernel.cache_clear()
    assert compiled_kernel() is None


def test_a_failing_compiler_leaves_faiss_and_no_partial_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists, always fails
    monkeypatch.setattr(bf16_search.sysconfig, "get_config_var", lambda name: None)
    monkeypatch.setattr(bf16_search.shutil, "which",
                        lambda name: "/bin/false" if name == "false" else None)
    compiled_kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger=bf16_search.__name__):
        assert compiled_kernel() is None
    assert "could not build" in caplog.text
    assert list((tmp_path / "ssl_pipeline" / "kernels").iterdir()) == []
    bank = np.random.default_rng(5).standard_normal((9000, 16), dtype=np.float32)
    monkeypatch.setattr(bf16_search, "has_bf16_matrix_units", lambda: True)
    assert BankSearch(bank).bf16 is None  # auto: faiss
    with pytest.raises(SSLPipelineError, match="no working C compiler.*eval.knn.search: faiss"):
        BankSearch(bank, "bf16")


@pytest.mark.parametrize("amx, rows, finite, fits, used", [
    (True, 9000, True, True, True),
    (False, 9000, True, True, False),  # no bf16 matrix units: faiss is as fast or faster
    (True, 4000, True, True, False),   # a small bank: faiss
    (True, 9000, False, True, False),  # NaN features: faiss, as before
    (True, 9000, True, False, False),  # no room for the bf16 copy: faiss
])
def test_auto_uses_bf16_only_where_it_pays(monkeypatch, amx, rows, finite, fits, used):
    monkeypatch.setattr(bf16_search, "has_bf16_matrix_units", lambda: amx)
    monkeypatch.setattr(bf16_search, "fits_in_memory", lambda bank: fits)
    monkeypatch.setattr(knn.faiss, "get_num_gpus", lambda: 0, raising=False)
    bank = np.random.default_rng(6).standard_normal((rows, 16), dtype=np.float32)
    if not finite:
        bank[5, 3] = np.nan
    assert (BankSearch(bank).bf16 is not None) == used
    assert choose_search(bank) == ("bf16" if used else "faiss")
    assert BankSearch(bank, "faiss").bf16 is None


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_auto_falls_back_to_faiss_when_the_bf16_pass_finds_non_finite_values(monkeypatch, bad):
    """BankSearch leaves the scan for inf and nan to Bf16Search's own pass over the bank; what
    it finds sends `auto` to faiss, as choose_search's scan would have."""
    monkeypatch.setattr(bf16_search, "has_bf16_matrix_units", lambda: True)
    monkeypatch.setattr(knn.faiss, "get_num_gpus", lambda: 0, raising=False)
    bank = np.random.default_rng(9).standard_normal((9000, 40), dtype=np.float32)
    bank[4321, 7] = bad
    assert choose_search(bank, check_finite=False) == "bf16"
    search = BankSearch(bank)
    assert (search.kind, search.bf16) == ("faiss", None)
    assert BankSearch(bank, "bf16").kind == "bf16"  # asked for: as before, no fallback


def test_memory_check_reads_the_available_memory():
    assert bf16_search.fits_in_memory(np.zeros((10, 4), np.float32))
    if os.path.exists("/proc/meminfo"):  # elsewhere it cannot tell, and says it fits
        assert not bf16_search.fits_in_memory(np.zeros(1, np.float32), block_bytes=2**60)


def test_an_unknown_search_is_a_user_error():
    with pytest.raises(SSLPipelineError, match="auto, faiss, bf16"):
        BankSearch(np.ones((3, 4), np.float32), "bf17")


def test_the_portable_build_finds_the_same_neighbours(tmp_path, monkeypatch):
    """Built without -march=native (no AVX-512 paths), as where the native flags fail."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(bf16_search, "_FLAGS", (["-O3"],))
    compiled_kernel.cache_clear()
    assert not on_tiles()  # the AMX step needs the native flags
    bank, q = crowded_at_zero(np.random.default_rng(1))
    assert_exact_neighbours(bank, q, 100, *Bf16Search(bank).search(q, 100))
    rng = np.random.default_rng(7)
    bank, q = normalized(rng, 9000, 40), normalized(rng, 150, 40)
    assert_exact_neighbours(bank, q, 50, *Bf16Search(bank).search(q, 50))


def test_the_recipe_option_reaches_the_knn_stage(tiny_overrides, tmp_path, monkeypatch):
    """`eval.knn.search` picks the search of the k-NN stage and of the pretraining monitor
    (recorded by the spy below), and both searches give the stage the same result."""
    import json
    from pathlib import Path

    import ssl_pipeline

    chosen = []
    real = knn.BankSearch.__init__

    def spy(self, bank, search="auto"):
        real(self, bank, search)
        chosen.append(self.kind)

    monkeypatch.setattr(knn.BankSearch, "__init__", spy)
    quickstart = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    results = {}
    for search in ("faiss", "bf16"):
        out = tmp_path / search
        ssl_pipeline.run(quickstart, out_dir=out, quiet=True, overrides=[
            *tiny_overrides, "stages=[pretrain, knn]", f"eval.knn.search={search}",
            f"eval.cache_dir={tmp_path / 'cache'}", "eval.knn.settings=[[5, 0.07], [10, 0.1]]"])
        results[search] = json.loads((out / "results.json").read_text())["knn"]
        assert chosen and set(chosen) == {search}
        chosen.clear()
    assert results["faiss"]["by_k"] == results["bf16"]["by_k"]
