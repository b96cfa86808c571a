"""The CPU engines behind flashconv.fftconv: the torch.fft engine (flashconv/_cpu_torch.py,
torch tensors and viewable numpy arrays) and the scipy engine (flashconv/_cpu.py, numpy
arrays torch cannot view), against float64 python_ref.

What these tests pin down beyond test_fftconv_cpu.py: chunking (channel ranges of one
batch row, a short last chunk), the reused zero-tailed workspace (calls with different L
on the same FFT size must not see each other's data), and the numpy fallbacks.
"""
import numpy as np
import pytest
import torch

import flashconv
from flashconv import _cpu, _cpu_torch
from python_ref.conv import causal_conv_direct, fftconv_grads


def rel(a, b):
    a = np.asarray(a, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def problem(seed, B, H, L, lk, gates=True):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((B, H, L))
    k = rng.standard_normal((H, lk)) / np.sqrt(lk)
    D = rng.standard_normal(H)
    gi = rng.standard_normal((B, H, L)) if gates else None
    go = rng.standard_normal((B, H, L)) if gates else None
    return u, k, D, gi, go


def f32(*arrays):
    return [None if a is None else torch.from_numpy(a).float() for a in arrays]


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 1 << 20])
@pytest.mark.parametrize("B,H,L,lk", [(3, 5, 131, 131), (2, 7, 300, 40), (1, 9, 1000, 999)])
def test_chunking_forward_and_backward(monkeypatch, chunk_bytes, B, H, L, lk):
    """Chunks of a few channels of one row (chunk_bytes tiny), of whole rows, and one chunk."""
    monkeypatch.setattr(_cpu_torch, "_CHUNK_BYTES", chunk_bytes)
    n = _cpu.fft_size(L, lk)
    items = _cpu_torch.chunks(B, H, n, 4, threads=1)
    covered = np.zeros((B, H), int)
    for b0, b1, h0, h1 in items:
        covered[b0:b1, h0:h1] += 1
    assert (covered == 1).all()  # every (b, h) row exactly once
    u, k, D, gi, go = problem(B * H + L, B, H, L, lk)
    ut, kt, Dt, git, got = f32(u, k, D, gi, go)
    y = flashconv.fftconv(ut, kt, Dt, g_in=git, g_out=got)
    assert rel(y, causal_conv_direct(u, k, D, gi, go)) < 5e-6
    dy = np.random.default_rng(1).standard_normal((B, H, L))
    g = flashconv.fftconv_backward(torch.from_numpy(dy).float(), ut, kt, Dt, git, got)
    ref = fftconv_grads(u, k, dy, D, gi, go)
    for key in ("du", "dk", "dD", "dg_in", "dg_out"):
        assert rel(g[key], ref[key]) < 2e-5, key


def test_workspace_reuse_across_lengths():
    """Same FFT size, same chunk shape, different L: the zero tail must follow L."""
    H = 4
    n = _cpu.fft_size(600, 600)
    assert _cpu.fft_size(500, 500) == n or _cpu.fft_size(590, 590) == n
    L2 = 500 if _cpu.fft_size(500, 500) == n else 590
    for L, lk in ((600, 600), (L2, L2), (600, 600), (L2, 7)):
        u, k, D, _, _ = problem(L + lk, 2, H, L, lk, gates=False)
        y = flashconv.fftconv(*f32(u, k, D))
        assert rel(y, causal_conv_direct(u, k, D)) < 5e-6, (L, lk)


def test_long_row_chunks_hold_several_rows():
    # 2 rows per intra-op thread at least, whatever the row length.
    items = _cpu_torch.chunks(1, 16, 1 << 20, 4, threads=2)
    assert all(h1 - h0 >= 4 for _, _, h0, h1 in items)
    # Short rows: whole batch rows, about _CHUNK_BYTES (2 MB) of padded input per chunk.
    assert _cpu_torch.chunks(8, 64, 2048, 4, threads=2) == [(0, 4, 0, 64), (4, 8, 0, 64)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gates_are_not_rounded(dtype):
    """x = g_in u and the output gate are formed in float32, not in the storage dtype."""
    u, k, D, gi, go = problem(7, 2, 3, 257, 257)
    ut, kt, Dt, git, got = (None if a is None else torch.from_numpy(a).to(dtype)
                            for a in (u, k, D, gi, go))
    y = flashconv.fftconv(ut, kt, Dt, g_in=git, g_out=got)
    ref = causal_conv_direct(*(None if a is None else a.double().numpy()
                               for a in (ut, kt, Dt, git, got)))
    exact_rounded = torch.from_numpy(ref).to(dtype).double().numpy()
    assert rel(y.double(), ref) <= 2 * rel(exact_rounded, ref) + 2e-6


def _numpy_variants(a):
    """The same values as a read-only array, a negative-stride view and big-endian."""
    ro = a.copy()
    ro.flags.writeable = False
    rev = np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    be = a.astype(a.dtype.newbyteorder(">"))
    return {"read-only": ro, "negative strides": rev, "big-endian": be}


@pytest.mark.parametrize("variant", ["read-only", "negative strides", "big-endian"])
def test_numpy_arrays_torch_cannot_view(variant):
    """Arrays torch.from_numpy refuses go to the scipy engine; same results either way."""
    u, k, D, gi, go = problem(3, 2, 3, 200, 150)
    u32, k32, D32, gi32, go32 = (a.astype(np.float32) for a in (u, k, D, gi, go))
    uv = _numpy_variants(u32)[variant]
    y = flashconv.fftconv(uv, k32, D32, g_in=gi32, g_out=go32)
    assert y.dtype.newbyteorder("=") == np.float32
    assert rel(y, causal_conv_direct(u32, k32, D32, gi32, go32)) < 5e-6
    dy = np.random.default_rng(2).standard_normal(u.shape).astype(np.float32)
    g = flashconv.fftconv_backward(_numpy_variants(dy)[variant], uv, k32, D32, gi32, go32)
    ref = fftconv_grads(u32, k32, dy, D32, gi32, go32)
    for key in ("du", "dk", "dD", "dg_in", "dg_out"):
        assert isinstance(g[key], np.ndarray) and rel(g[key], ref[key]) < 2e-5, key


def test_numpy_backward_matches_torch_backward():
    u, k, D, gi, go = problem(4, 2, 3, 100, 60)
    kr = np.random.default_rng(9).standard_normal((3, 20)) / 5
    dy = np.random.default_rng(8).standard_normal(u.shape)
    g_np = flashconv.fftconv_backward(dy, u, k, D, gi, go, k_rev=kr)
    g_t = flashconv.fftconv_backward(*(torch.from_numpy(a) for a in (dy, u, k, D, gi, go)),
                                     k_rev=torch.from_numpy(kr))
    ref = fftconv_grads(u, k, dy, D, gi, go, k_rev=kr)
    for key in ref:
        assert isinstance(g_np[key], np.ndarray) and g_np[key].dtype == np.float64
        np.testing.assert_allclose(g_np[key], g_t[key].numpy(), rtol=1e-12, atol=1e-12)
        assert rel(g_np[key], ref[key]) < 1e-12, key


def test_large_workspaces_are_not_kept():
    """Long-row chunks (several MB) are dropped at the end of the call; small ones are kept."""
    _cpu_torch.release_workspaces()
    u, k, D, _, _ = problem(1, 1, 8, 100000, 100000, gates=False)
    ut, kt, Dt = f32(u, k, D)
    y = flashconv.fftconv(ut, kt, Dt)
    bufs = _cpu_torch._tls.bufs
    assert all(e[0].nbytes <= _cpu_torch._KEEP_BYTES for e in bufs.values())
    np.testing.assert_allclose(y.numpy(), flashconv.fftconv(u, k, D), rtol=1e-4, atol=1e-4)
    flashconv.fftconv(*f32(*problem(2, 2, 3, 100, 100, gates=False)[:3]))
    assert "x" in _cpu_torch._tls.bufs  # a small workspace stays for the next call
