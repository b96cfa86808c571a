"""Overlap-save (flashconv/_overlap.py) against python_ref's direct convolution, and its cost model."""
import numpy as np
import pytest

from flashconv._overlap import choose_block, overlap_save, overlap_save_cheaper
from python_ref.conv import causal_conv_direct


def rel_err(y, ref):
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / (den if den > 0 else 1.0))


def report(what, y, ref, bound):
    err = rel_err(y, ref)
    print("%s: rel err %.3g (bound %.3g), max abs %.3g"
          % (what, err, bound, np.abs(np.asarray(y, np.float64) - ref).max() if ref.size else 0.0))
    assert err <= bound


def strided(rng, shape):
    """A random array viewed out of a bigger buffer: no axis has its natural stride."""
    big = rng.standard_normal(tuple(2 * s + 1 for s in shape))
    return big[tuple(slice(1, None, 2) for _ in shape)]


@pytest.mark.parametrize("L", [1, 2, 37, 1001, 4099])
@pytest.mark.parametrize("lk", [1, 3, 16, 100])
def test_matches_direct(L, lk):
    rng = np.random.default_rng(L * 131 + lk)
    u = rng.standard_normal((2, 3, L))
    k = rng.standard_normal((3, lk)) / np.sqrt(lk)
    D = rng.standard_normal(3)
    ref = causal_conv_direct(u, k, D)
    # Default block, the smallest legal one (a single kept output per block when lk <= L),
    # and an odd non-power-of-two one.
    for block in (None, min(lk, L), min(lk, L) + 6):
        y = overlap_save(u, k, D, block=block)
        assert y.dtype == np.float64 and y.shape == u.shape
        report("L=%d lk=%d block=%s f64" % (L, lk, block), y, ref, 1e-13)
    y32 = overlap_save(u.astype(np.float32), k.astype(np.float32), D.astype(np.float32))
    ref32 = causal_conv_direct(u.astype(np.float32), k.astype(np.float32), D.astype(np.float32))
    assert y32.dtype == np.float32
    report("L=%d lk=%d f32" % (L, lk), y32, ref32, 2e-6)


@pytest.mark.parametrize("L,lk", [(1001, 16), (4099, 100), (37, 100), (515, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gates_D_and_strides(L, lk, dtype):
    rng = np.random.default_rng(L + lk)
    B, H = 2, 3
    u, gi, go = (strided(rng, (B, H, L)).astype(dtype, copy=False) for _ in range(3))
    k = strided(rng, (H, lk)).astype(dtype, copy=False)
    k *= 1 / np.sqrt(lk)  # in place: k stays a strided view
    D = strided(rng, (H,)).astype(dtype, copy=False)
    if dtype == np.float64:
        assert not u.flags.c_contiguous and not k.flags.c_contiguous
    ref = causal_conv_direct(u, k, D, gi, go)
    y = overlap_save(u, k, D, gi, go)
    report("L=%d lk=%d gates %s" % (L, lk, np.dtype(dtype).name), y, ref,
           1e-13 if dtype == np.float64 else 3e-6)
    # Each of the optional inputs on its own.
    for kw in ({"g_in": gi}, {"g_out": go}, {}):
        ref = causal_conv_direct(u, k, None, kw.get("g_in"), kw.get("g_out"))
        report("  %s" % sorted(kw), overlap_save(u, k, **kw), ref, 1e-13 if dtype == np.float64 else 3e-6)


def test_float16_in_float32_compute():
    rng = np.random.default_rng(7)
    u = rng.standard_normal((1, 2, 3000)).astype(np.float16)
    k = rng.standard_normal((2, 16)).astype(np.float32) / 4
    y = overlap_save(u, k)
    assert y.dtype == np.float16
    ref = causal_conv_direct(u, k)
    floor = rel_err(ref.astype(np.float16), ref)
    report("float16", y, ref, 2 * floor + 2e-6)


def test_many_blocks_many_items():
    """Enough blocks that the work is split into several items across rows and blocks."""
    rng = np.random.default_rng(8)
    L, lk = 300_007, 64
    u = rng.standard_normal((1, 2, L))
    k = rng.standard_normal((2, lk)) / 8
    y = overlap_save(u, k, block=128)  # ~4700 blocks per row, several work items per row
    z = np.stack([np.convolve(u[0, h], k[h])[:L] for h in range(2)])[None]
    report("L=300007 lk=64 block=128", y, z, 1e-13)


def test_empty_and_errors():
    assert overlap_save(np.zeros((0, 2, 5)), np.ones((2, 3))).shape == (0, 2, 5)
    assert overlap_save(np.zeros((1, 2, 0)), np.ones((2, 3))).shape == (1, 2, 0)
    u = np.ones((1, 2, 10))
    np.testing.assert_allclose(overlap_save(u, np.ones((2, 0)), np.full(2, 2.0)), 2 * u)
    with pytest.raises(ValueError, match="k must have shape"):
        overlap_save(u, np.ones((3, 4)))
    with pytest.raises(ValueError, match="u must have shape"):
        overlap_save(np.ones((2, 10)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="D must have shape"):
        overlap_save(u, np.ones((2, 4)), np.ones(3))
    with pytest.raises(ValueError, match="g_out must have shape"):
        overlap_save(u, np.ones((2, 4)), g_out=np.ones((1, 2, 9)))
    with pytest.raises(ValueError, match="block must be"):
        overlap_save(u, np.ones((2, 4)), block=3)
    with pytest.raises(TypeError, match="u must be a numpy"):
        overlap_save([[[1.0]]], np.ones((1, 1)))
    with pytest.raises(TypeError, match="real floating"):
        overlap_save(np.ones((1, 2, 10), np.complex64), np.ones((2, 4)))


def test_choose_block():
    for lk in (1, 3, 16, 64, 100, 1000, 4096, 30000):
        P = choose_block(lk)
        print("lk=%d: P=%d (%.1f x lk)" % (lk, P, P / lk))
        assert P & (P - 1) == 0 and 2 * lk <= P <= max(32, 1 << 16)
        if 16 <= lk <= 1000:
            assert 4 * lk <= P <= 32 * lk
    assert choose_block(64, L=100) == 256  # one block covering all 100 outputs suffices
    assert choose_block(100_000) >= 200_000


def test_cost_model_monotone_and_sane():
    lengths = sorted({2 ** i for i in range(26)} | {3 ** i for i in range(1, 16)}
                     | {1000 * i + 7 for i in range(1, 300, 7)} | {999_999, 3_000_017})
    taps = sorted({2 ** i for i in range(20)} | {3, 5, 7, 100, 1000, 10_000, 30_000})
    table = {(L, lk): overlap_save_cheaper(L, lk) for L in lengths for lk in taps}
    for lk in taps:  # once cheaper, stays cheaper for every longer L
        row = [table[L, lk] for L in lengths]
        assert row == sorted(row), "not monotone in L for lk=%d" % lk
    for L in lengths:  # once not cheaper, stays so for every longer kernel
        col = [table[L, lk] for lk in taps]
        assert col == sorted(col, reverse=True), "not monotone in lk for L=%d" % L
    # Sane corners: short kernels on long sequences yes; long kernels and short sequences no.
    assert overlap_save_cheaper(1 << 20, 1) and overlap_save_cheaper(1 << 20, 64)
    assert overlap_save_cheaper(1 << 22, 4096)
    assert not overlap_save_cheaper(1 << 20, 1 << 19)
    assert not overlap_save_cheaper(1 << 20, 1 << 20)
    assert not overlap_save_cheaper(1000, 3)
    assert not overlap_save_cheaper(0, 1)
    assert not overlap_save_cheaper(16384, 4096)
