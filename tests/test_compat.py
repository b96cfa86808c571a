"""flashconv.compat against the peers' own reference computations, re-expressed here.

The peers' references are re-expressed in torch from their published algorithms (H3's
src/ops/fftconv.py fftconv_ref and its tests' fftconv_h3_ref; flash-fft-conv's circular
convolution at FFT size seqlen), in float64 for the semantics (wrap-around, channel order),
and in the test dtype for the accuracy comparison. H3's test grid
(tests/ops/test_fftconv.py::test_fftconv: fp32 / fp16 / bf16, gelu on / off, dropout None / 0 /
0.17, D and k_rev, L = 8 ... 8192) is checked against an independent float64 reference
(python_ref.conv) at H3's tolerances, through compat.fftconv_ref and compat.fftconv_func; the
default run takes a few lengths and channels; the full grid runs with FLASHCONV_H3_FULL_GRID=1.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from flashconv import compat
from python_ref.conv import fftconv as ref_fftconv, fftconv_grads

# H3's tolerances (rtol, atol) per dtype, on outputs and every gradient.
TOLS = {torch.float32: (1e-4, 5e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def h3_fftconv_ref(u, k, D, dropout_mask, gelu=True, k_rev=None, n=None):
    """H3's fftconv_ref, re-expressed: rfft at n = 2L (k longer than L wraps around), in k's
    dtype, + u D, GELU, the (B, H) mask, rounded to u's dtype."""
    L = u.shape[-1]
    n = 2 * L if n is None else n
    k_f = torch.fft.rfft(k, n=n) / n
    if k_rev is not None:
        k_f = k_f + (torch.fft.rfft(k_rev, n=n) / n).conj()
    u_f = torch.fft.rfft(u.to(k.dtype), n=n)
    if u.ndim > 3:
        k_f = k_f.unsqueeze(1)
    y = torch.fft.irfft(u_f * k_f, n=n, norm="forward")[..., :L]
    out = y + u * D.unsqueeze(-1)
    if gelu:
        out = F.gelu(out)
    if dropout_mask is not None:
        out = out * dropout_mask.unsqueeze(-1)
    return out.to(u.dtype)


def h3_inner_ref(k, ssm_kernel, D, q, v, head_dim=1, n=None):
    """H3's fftconv_h3_ref (its tests' reference for fftconv_func with v, q), re-expressed:
    kv = k (h d1) x v (h d2), conv with the SSM kernel of channel h, + D kv, contracted with q
    over d1; output channel h d + d2 (h-major)."""
    B, C, L = k.shape
    d = head_dim
    H = C // d
    n = 2 * L if n is None else n
    kv = k.view(B, H, d, 1, L).permute(0, 2, 3, 1, 4) * v.view(B, H, 1, d, L).permute(0, 2, 3, 1, 4)
    kv_f = torch.fft.rfft(kv.to(ssm_kernel.dtype), n=n) / n
    y = torch.fft.irfft(kv_f * torch.fft.rfft(ssm_kernel, n=n), n=n, norm="forward")[..., :L]
    out = y + kv * D.unsqueeze(-1)
    qq = q.view(B, H, d, L).permute(0, 2, 1, 3).unsqueeze(2)
    out = (out * qq).sum(1)  # (B, d2, H, L)
    return out.permute(0, 2, 1, 3).reshape(B, C, L).to(k.dtype)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --- semantics in float64: wrap-around, channel order, circular FlashFFTConv ---------------------

@pytest.mark.parametrize("L,Lk,Lkr", [(16, 16, None), (16, 9, 5), (16, 32, None), (16, 40, 33),
                                      (15, 29, 17), (8, 12, 3)])
def test_fftconv_ref_long_k_wraps_around_as_h3(L, Lk, Lkr):
    g = torch.Generator().manual_seed(L + Lk)
    u = torch.randn(2, 3, L, dtype=torch.float64, generator=g)
    k = torch.randn(3, Lk, dtype=torch.float64, generator=g)
    D = torch.randn(3, dtype=torch.float64, generator=g)
    kr = None if Lkr is None else torch.randn(3, Lkr, dtype=torch.float64, generator=g)
    m = F.dropout(torch.ones(2, 3, dtype=torch.float64), 0.3)
    for gelu in (False, True):
        want = h3_fftconv_ref(u, k, D, m, gelu, kr)
        assert _rel(compat.fftconv_ref(u, k, D, m, gelu, kr), want) < 1e-13
        nf = compat._fft_size_func(L)
        want = h3_fftconv_ref(u, k, D, m, gelu, kr, n=nf)
        assert _rel(compat.fftconv_func(u, k, D, m, gelu, k_rev=kr), want) < 1e-13


def test_fftconv_ref_wrap_gradients():
    """Gradients through the wrapped taps (Lk = 2L + 3: taps L+1 ... 2L-1 wrap, >= 2L dropped)."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()
            for s in ((2, 2, 10), (2, 23), (2,), (2, 14))]
    m = torch.rand(2, 2, dtype=torch.float64)
    for f in (compat.fftconv_ref, lambda *a: h3_fftconv_ref(*a)):
        for a in args:
            a.grad = None
        y = f(args[0], args[1], args[2], m, True, args[3])
        y.backward(torch.ones_like(y))
        if f is compat.fftconv_ref:
            got = [a.grad.clone() for a in args]
    for a, gg in zip(args, got):
        assert _rel(gg, a.grad) < 1e-12
    assert torch.count_nonzero(got[1][:, 20:]) == 0  # taps >= 2L: no gradient


def test_fftconv_ref_four_dims():
    """(B, H, N, L): k's spectrum broadcast over N, u * D.unsqueeze(-1) as torch broadcasts."""
    g = torch.Generator().manual_seed(7)
    u = torch.randn(2, 3, 4, 16, dtype=torch.float64, generator=g)
    k = torch.randn(3, 16, dtype=torch.float64, generator=g)
    D = torch.randn(4, dtype=torch.float64, generator=g)  # pairs with N, as in theirs
    for gelu in (False, True):
        want = h3_fftconv_ref(u, k, D, None, gelu)
        assert _rel(compat.fftconv_ref(u, k, D, None, gelu), want) < 1e-13
        uf = u.float()
        got = compat.fftconv_ref(uf, k.float(), D.float(), None, gelu)
        assert got.dtype == torch.float32 and _rel(got, want) < 1e-5


@pytest.mark.parametrize("head_dim", [1, 2, 8])
def test_fftconv_func_inner_product_matches_h3(head_dim):
    """q * conv(u v) with head_dim 1 and 8 (channel order h d + j), values and gradients."""
    g = torch.Generator().manual_seed(head_dim)
    H, B, L = 3, 2, 24
    C = H * head_dim

    def rnd(*s):
        return torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()

    u, v, q, k, D = rnd(B, C, L), rnd(B, C, L), rnd(B, C, L), rnd(H, L), rnd(H)
    dy = torch.randn(B, C, L, dtype=torch.float64, generator=g)
    grads = []
    for f in (lambda: compat.fftconv_func(u, k, D, None, False, False, False, v, head_dim, q),
              lambda: h3_inner_ref(u, k, D, q, v, head_dim)):
        for a in (u, v, q, k, D):
            a.grad = None
        y = f()
        y.backward(dy)
        grads.append((y.detach(), [a.grad.clone() for a in (u, v, q, k, D)]))
    assert _rel(grads[0][0], grads[1][0]) < 1e-13
    for a, b in zip(grads[0][1], grads[1][1]):
        assert _rel(a, b) < 1e-12


def test_fftconv_func_layout_and_fp16_output():
    u = torch.randn(4, 3, 32)
    k, D = torch.randn(3, 32), torch.randn(3)
    y = compat.fftconv_func(u, k, D, None, True, True, True)
    assert y.dtype == torch.float16 and y.shape == (4, 3, 32)
    assert y.stride() == (32, 4 * 32, 1)  # (H, B, L) storage
    want = compat.fftconv_ref(u, k, D, None, True)
    torch.testing.assert_close(y.float(), want.half().float())
    y2 = compat.fftconv_func(u, k, D, None, True, fftfp16=True)  # accepted, no effect
    assert torch.equal(y2, want)


def test_fftconv_func_bad_input():
    u, k, D = torch.randn(2, 6, 8), torch.randn(3, 8), torch.randn(3)
    with pytest.raises(ValueError, match=r"head_dim = 4 must divide the channels of u "
                                         r"\(H \* head_dim = 6\)"):
        compat.fftconv_func(u, k, D, None, v=u, q=u, head_dim=4)
    with pytest.raises(ValueError, match="head_dim must be an int >= 1"):
        compat.fftconv_func(u, k, D, None, head_dim=0)
    with pytest.raises(ValueError, match="needs v and q"):
        compat.fftconv_func(u, k, D, None, head_dim=2)
    with pytest.raises(ValueError, match="dropout_mask is not supported with head_dim > 1"):
        compat.fftconv_func(u, k, D, torch.ones(2, 3), v=u, q=u, head_dim=2)
    with pytest.raises(ValueError, match=r"v must have u's shape \(2, 6, 8\)"):
        compat.fftconv_func(u, k, D, None, v=u[:, :3], q=u, head_dim=2)
    with pytest.raises(ValueError, match="dropout_mask must have shape"):
        compat.fftconv_ref(u[:, :3], k, D, torch.ones(3, 2))


@pytest.mark.parametrize("seqlen,L,Lk", [(32, 32, 32), (64, 32, 32), (32, 20, 32), (48, 40, 30)])
def test_flashfftconv_circular_as_theirs(seqlen, L, Lk):
    """FFT size seqlen: circular when seqlen == L (and whenever L + Lk - 1 > seqlen)."""
    g = torch.Generator().manual_seed(seqlen + L)
    u = torch.randn(2, 3, L, dtype=torch.float64, generator=g)
    k = torch.randn(3, Lk, dtype=torch.float64, generator=g)
    pre, post = torch.randn_like(u), torch.randn_like(u)
    conv = compat.FlashFFTConv(seqlen, dtype=torch.float16)
    want = torch.fft.irfft(torch.fft.rfft(u * pre, n=seqlen) * torch.fft.rfft(k, n=seqlen),
                           n=seqlen)[..., :L] * post
    assert _rel(conv(u, k, pre, post), want) < 1e-13
    want0 = torch.fft.irfft(torch.fft.rfft(u, n=seqlen) * torch.fft.rfft(k, n=seqlen),
                            n=seqlen)[..., :L]
    assert _rel(conv(u, k), want0) < 1e-13


def test_flashfftconv_bad_input_and_defaults():
    conv = compat.FlashFFTConv(64)
    assert conv.dtype == torch.bfloat16 and conv.seqlen == 64
    with pytest.raises(ValueError, match="more than seqlen = 64"):
        conv(torch.randn(1, 2, 65), torch.randn(2, 65))
    with pytest.raises(ValueError, match="seqlen"):
        compat.FlashFFTConv(0)
    y = conv(torch.randn(1, 2, 32, dtype=torch.bfloat16), torch.randn(2, 32))
    assert y.dtype == torch.bfloat16


# --- H3's test grid ----------------------------------------------------------------------------

def run_h3_case(fn, seqlen, gelu, dropout_prob, bidirectional, dtype, batch_size=8, H=256,
                seed=0):
    """One case of H3's test_fftconv through compat.fftconv_ref or fftconv_func: the errors of
    the output and every gradient against the float64 reference of the same (rounded) inputs
    (max abs, and "/tol": the largest |error| / (atol + rtol |reference|), <= 1 passes),
    whether all are within H3's tolerance, and the peer reference's own output error."""
    torch.random.manual_seed(seed)
    u = torch.randn(batch_size, H, seqlen, dtype=torch.float32).to(dtype).requires_grad_()
    k = torch.randn(H, seqlen, requires_grad=True)
    k_rev = torch.randn(H, seqlen, requires_grad=True) if bidirectional else None
    D = torch.randn(H, requires_grad=True)
    mask = (F.dropout(torch.ones(batch_size, H), dropout_prob)
            if dropout_prob is not None else None)
    dy = torch.randn(batch_size, H, seqlen).to(dtype) / 32
    act = "gelu" if gelu else None
    n64 = [None if t is None else t.detach().double().numpy() for t in (u, k, D, k_rev, mask, dy)]
    want = torch.from_numpy(ref_fftconv(n64[0], n64[1], n64[2], k_rev=n64[3], activation=act,
                                        dropout_mask=n64[4]))
    gw = fftconv_grads(n64[0], n64[1], n64[5], n64[2], k_rev=n64[3], activation=act,
                       dropout_mask=n64[4])
    f = compat.fftconv_ref if fn == "fftconv_ref" else compat.fftconv_func
    y = f(u, k, D, mask, gelu, k_rev=k_rev)
    y.backward(dy)
    rtol, atol = TOLS[dtype]
    res = {}
    pairs = [("out", y, want), ("du", u.grad, gw["du"]), ("dk", k.grad, gw["dk"]),
             ("dD", D.grad, gw["dD"])]
    if bidirectional:
        pairs.append(("dk_rev", k_rev.grad, gw["dk_rev"]))
    ok = True
    for name, got, ref in pairs:
        ref = torch.as_tensor(ref)
        got = got.detach().double()
        err = float((got - ref).abs().max())
        ok &= bool(torch.allclose(got, ref, rtol=rtol, atol=atol))
        res[name] = err
        res[name + "/tol"] = float(((got - ref).abs() / (atol + rtol * ref.abs())).max())
    with torch.no_grad():
        peer = h3_fftconv_ref(u.detach(), k.detach(), D.detach(), mask, gelu,
                              None if k_rev is None else k_rev.detach())
    res["peer_out"] = float((peer.double() - want).abs().max())
    return ok, res


# Default run: two of H3's lengths (a power of two and 784), dropout None and 0.17 (p = 0 is an
# all-ones mask: in the slow grid), at B = 2, H = 8.
GRID_FAST = [(L, gelu, p, bi, dt) for L in (8, 784) for gelu in (True, False)
             for p in (None, 0.17) for bi in (False, True) for dt in TOLS]


def _check_case(fn, L, gelu, p, bi, dtype, batch_size, H):
    ok, res = run_h3_case(fn, L, gelu, p, bi, dtype, batch_size, H)
    assert ok, res
    if dtype != torch.float32:
        # The output error of half precision: at most 2x the peer reference's own (the
        # rounding of the output dominates both).
        assert res["out"] <= 2 * res["peer_out"], res


@pytest.mark.parametrize("fn", ["fftconv_ref", "fftconv_func"])
@pytest.mark.parametrize("L,gelu,p,bi,dtype", GRID_FAST,
                         ids=["L%d-%s-p%s-%s-%s" % (c[0], "gelu" if c[1] else "id", c[2],
                                                    "bi" if c[3] else "causal",
                                                    str(c[4])[6:]) for c in GRID_FAST])
def test_h3_grid(fn, L, gelu, p, bi, dtype):
    _check_case(fn, L, gelu, p, bi, dtype, batch_size=2, H=8)


H3_LENGTHS = [8, 16, 32, 64, 128, 256, 512, 784, 1024, 2048, 4096, 8192]


# H3's whole grid at its sizes takes tens of minutes on a 2-core CPU, beyond CI's budget (CI
# runs the slow tests too): opt in with FLASHCONV_H3_FULL_GRID=1.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FLASHCONV_H3_FULL_GRID") != "1",
                    reason="H3's full grid at its sizes: set FLASHCONV_H3_FULL_GRID=1")
@pytest.mark.parametrize("fn", ["fftconv_ref", "fftconv_func"])
@pytest.mark.parametrize("dtype", list(TOLS), ids=str)
@pytest.mark.parametrize("L", H3_LENGTHS)
def test_h3_grid_full(fn, L, dtype):
    """H3's whole grid at its sizes (batch 8, H 256) for one length and dtype."""
    for gelu in (True, False):
        for p in (None, 0.0, 0.17):
            for bi in (False, True):
                _check_case(fn, L, gelu, p, bi, dtype, batch_size=8, H=256)
