"""flashconv.fftconv on the CPU (numpy arrays and torch tensors) against float64 python_ref.

Tolerance rule (docs/testing.md): relative L2 error against float64 within 2x the error
of simply rounding the exact result to the output dtype (the best any implementation
returning that dtype can do) plus a small term for the float32 compute.
"""
import numpy as np
import pytest
import torch

import flashconv
from python_ref.conv import causal_conv_direct, fftconv_grads

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "float64": torch.float64}
# Relative error of float32 compute (FFT rounding grows like log N; generous by 10x).
COMPUTE_EPS = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-6, "bfloat16": 2e-6}


def rel_err(y, ref):
    y = np.asarray(y, np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(y - ref) / (den if den > 0 else 1.0))


def to_np64(t):
    return t.detach().to(torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


def floor_err(ref, dtype):
    """Error of rounding the exact result to `dtype`: what no implementation can beat."""
    return rel_err(to_np64(torch.from_numpy(ref).to(TORCH_DTYPES[dtype])), ref)


def check(y, ref, dtype, what=""):
    err = rel_err(to_np64(y), ref)
    bound = 2 * floor_err(ref, dtype) + COMPUTE_EPS[dtype]
    print("%s %s: rel err %.3g (bound %.3g), max abs %.3g"
          % (what, dtype, err, bound, np.abs(to_np64(y) - ref).max() if ref.size else 0.0))
    assert err <= bound


def make(rng, B, H, L, Lk, D=True, gates=False):
    u = rng.standard_normal((B, H, L))
    k = rng.standard_normal((H, Lk)) / np.sqrt(max(Lk, 1))
    d = rng.standard_normal(H) if D else None
    gi = rng.standard_normal((B, H, L)) if gates else None
    go = rng.standard_normal((B, H, L)) if gates else None
    return u, k, d, gi, go


def t(x, dtype):
    return None if x is None else torch.from_numpy(x).to(TORCH_DTYPES[dtype])


@pytest.mark.parametrize("L", [1, 2, 15, 17, 129, 151, 372, 1134])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_torch_odd_lengths(L, dtype):
    rng = np.random.default_rng(L)
    u, k, D, _, _ = make(rng, 3, 4, L, L)
    # The reference sees the inputs as rounded to the dtype, so only compute error is measured.
    ut, kt, Dt = t(u, dtype), t(k, "float32"), t(D, "float32")
    ref = causal_conv_direct(to_np64(ut), to_np64(kt), to_np64(Dt))
    y = flashconv.fftconv(ut, kt, Dt)
    assert y.dtype == ut.dtype and y.shape == ut.shape
    check(y, ref, dtype, "L=%d" % L)


@pytest.mark.parametrize("L,Lk", [(100, 7), (100, 1), (64, 200), (33, 33), (257, 300)])
@pytest.mark.parametrize("gates", [False, True])
def test_kernel_length_and_gates(L, Lk, gates):
    rng = np.random.default_rng(L * 7 + Lk)
    u, k, D, gi, go = make(rng, 2, 3, L, Lk, gates=gates)
    ref = causal_conv_direct(u, k, D, gi, go)
    for dtype in ("float32", "float64"):
        y = flashconv.fftconv(t(u, dtype), t(k, dtype), t(D, dtype), g_in=t(gi, dtype), g_out=t(go, dtype))
        check(y, ref, dtype, "L=%d Lk=%d gates=%s" % (L, Lk, gates))
        yn = flashconv.fftconv(u.astype(dtype), k.astype(dtype), D.astype(dtype),
                               g_in=None if gi is None else gi.astype(dtype),
                               g_out=None if go is None else go.astype(dtype))
        assert isinstance(yn, np.ndarray) and yn.dtype == np.dtype(dtype)
        check(yn, ref, dtype, "numpy L=%d Lk=%d" % (L, Lk))


def test_numpy_float16_and_no_D():
    rng = np.random.default_rng(5)
    u, k, _, _, _ = make(rng, 2, 5, 300, 300, D=False)
    u16 = u.astype(np.float16)
    ref = causal_conv_direct(u16.astype(np.float64), k)
    y = flashconv.fftconv(u16, k)
    assert y.dtype == np.float16
    check(y, ref, "float16", "numpy fp16")


def test_strided_inputs_match_contiguous():
    rng = np.random.default_rng(11)
    big = torch.from_numpy(rng.standard_normal((4, 6, 2 * 151))).float()
    u = big[1:4, ::2, 1::2]                       # sliced: non-trivial strides in every dim
    assert not u.is_contiguous()
    ut = torch.from_numpy(rng.standard_normal((151, 3, 3))).float().permute(1, 2, 0)  # transposed
    k = torch.from_numpy(rng.standard_normal((6, 2 * 140))).float()[::2, ::2]
    D = torch.randn(6)[::2]
    g = torch.from_numpy(rng.standard_normal((3, 3, 151))).float().transpose(0, 1)
    for x in (u, ut):
        y = flashconv.fftconv(x, k, D, g_in=g, g_out=g)
        y_c = flashconv.fftconv(x.contiguous(), k.contiguous(), D.contiguous(),
                                g_in=g.contiguous(), g_out=g.contiguous())
        ref = causal_conv_direct(to_np64(x), to_np64(k), to_np64(D), to_np64(g), to_np64(g))
        print("strided vs contiguous max diff", (y - y_c).abs().max().item())
        assert torch.equal(y, y_c)
        check(y, ref, "float32", "strided")
        yn = flashconv.fftconv(x.numpy(), k.numpy(), D.numpy(), g_in=g.numpy(), g_out=g.numpy())
        check(yn, ref, "float32", "strided numpy")


@pytest.mark.parametrize("shape", [(0, 3, 10), (2, 3, 0), (2, 0, 10)])
def test_empty(shape):
    B, H, L = shape
    for make_arr in (np.zeros, lambda s: torch.zeros(s)):
        u = make_arr((B, H, L))
        y = flashconv.fftconv(u, make_arr((H, 4)), make_arr((H,)))
        assert tuple(y.shape) == shape


def test_precomputed_spectrum():
    rng = np.random.default_rng(3)
    u, k, D, gi, go = make(rng, 2, 4, 200, 50, gates=True)
    ref = causal_conv_direct(u, k, D, gi, go)
    for xp in ("numpy", "torch"):
        conv = (lambda a: a.astype(np.float32)) if xp == "numpy" else (lambda a: t(a, "float32"))
        ks = flashconv.fft_kernel(conv(k), 200)
        assert ks.L == 200 and ks.lk == 50 and ks.H == 4
        y = flashconv.fftconv(conv(u), ks, conv(D), g_in=conv(gi), g_out=conv(go))
        check(y, ref, "float32", "precomputed " + xp)
        with pytest.raises(ValueError, match="L = 200"):
            flashconv.fftconv(conv(u[..., :100]), ks)


def test_gradcheck_float64():
    rng = np.random.default_rng(0)
    u, k, D, gi, go = make(rng, 2, 2, 9, 6, gates=True)
    args = [torch.from_numpy(a).requires_grad_() for a in (u, k, D, gi, go)]
    assert torch.autograd.gradcheck(
        lambda u_, k_, D_, gi_, go_: flashconv.fftconv(u_, k_, D_, g_in=gi_, g_out=go_), args)
    assert torch.autograd.gradcheck(lambda u_, k_: flashconv.fftconv(u_, k_), args[:2])


@pytest.mark.parametrize("L,Lk,gates", [(151, 151, True), (100, 30, False), (60, 90, True)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradients_vs_reference(L, Lk, gates, dtype):
    rng = np.random.default_rng(L + Lk)
    u, k, D, gi, go = make(rng, 3, 4, L, Lk, gates=gates)
    dy = rng.standard_normal((3, 4, L))
    ins = {"u": t(u, dtype), "k": t(k, "float32"), "D": t(D, "float32"),
           "g_in": t(gi, dtype), "g_out": t(go, dtype)}
    ins = {n: (v.requires_grad_() if v is not None else None) for n, v in ins.items()}
    y = flashconv.fftconv(ins["u"], ins["k"], ins["D"], g_in=ins["g_in"], g_out=ins["g_out"])
    y.backward(t(dy, dtype))
    ref = fftconv_grads(*(to_np64(ins[n]) for n in ("u", "k")), to_np64(t(dy, dtype)),
                        D=to_np64(ins["D"]),
                        g_in=None if gi is None else to_np64(ins["g_in"]),
                        g_out=None if go is None else to_np64(ins["g_out"]))
    for name, key in (("u", "du"), ("k", "dk"), ("D", "dD"), ("g_in", "dg_in"), ("g_out", "dg_out")):
        if ins[name] is None:
            continue
        g = ins[name].grad
        assert g is not None and g.dtype == ins[name].dtype and g.shape == ins[name].shape
        check(g, ref[key], dtype if name in ("u", "g_in", "g_out") else "float32", "grad " + name)


def test_torch_compute_is_float32_for_half_inputs():
    # A float16 input whose convolution overflows float16 midway but not at the end
    # must not return inf: compute happens in float32.
    u = torch.full((1, 1, 64), 60000.0).half()
    k = torch.zeros(1, 64)
    k[0, 0], k[0, 1] = 1.0, -1.0          # y[t] = u[t] - u[t-1]: large products cancel
    y = flashconv.fftconv(u, k)
    assert torch.isfinite(y).all()
    assert y[0, 0, 0].item() == 60000.0 and abs(y[0, 0, 1:].float()).max().item() < 64


# --- bad input -------------------------------------------------------------------------

def _good(xp="torch"):
    rng = np.random.default_rng(0)
    u, k, D, gi, go = make(rng, 2, 3, 10, 10, gates=True)
    if xp == "torch":
        return [torch.from_numpy(a).float() for a in (u, k, D, gi, go)]
    return [a.astype(np.float32) for a in (u, k, D, gi, go)]


@pytest.mark.parametrize("xp", ["torch", "numpy"])
def test_bad_shapes(xp):
    u, k, D, gi, go = _good(xp)
    cases = [
        ((u[0], k, D), "u must have shape \\(B, H, L\\)"),
        ((u, k[:2], D), "k must have shape \\(H, Lk\\) = \\(3, Lk\\)"),
        ((u, k[0], D), "k must have shape"),
        ((u, k, D[:2]), "D must have shape \\(3,\\)"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            flashconv.fftconv(*args)
    with pytest.raises(ValueError, match="g_in must have shape \\(2, 3, 10\\)"):
        flashconv.fftconv(u, k, D, g_in=gi[:, :, :5])
    with pytest.raises(ValueError, match="g_out must have shape"):
        flashconv.fftconv(u, k, D, g_out=gi[:1])


def test_bad_types():
    u, k, D, gi, go = _good()
    with pytest.raises(TypeError, match="u must be a real floating"):
        flashconv.fftconv(u.long(), k)
    with pytest.raises(TypeError, match="u must be a real floating"):
        flashconv.fftconv(u.to(torch.complex64), k)
    with pytest.raises(TypeError, match="k must be a real floating"):
        flashconv.fftconv(u, k.int())
    with pytest.raises(TypeError, match="D must be a real floating"):
        flashconv.fftconv(u, k, D.to(torch.complex64))
    with pytest.raises(TypeError, match="k must be a torch.Tensor like u"):
        flashconv.fftconv(u, k.numpy())
    with pytest.raises(TypeError, match="u must be a torch.Tensor or numpy.ndarray"):
        flashconv.fftconv([[[1.0]]], k)
    with pytest.raises(TypeError, match="u must be a real floating array"):
        flashconv.fftconv(np.zeros((1, 3, 4), np.int32), k.numpy())
    with pytest.raises(TypeError, match="g_in must be a real floating"):
        flashconv.fftconv(u, k, g_in=gi.bool())


def test_mixed_devices():
    u, k, D, _, _ = _good()
    meta_k = k.to("meta")
    with pytest.raises(ValueError, match="k is on meta but u is on cpu"):
        flashconv.fftconv(u, meta_k, D)
    with pytest.raises(ValueError, match="D is on meta"):
        flashconv.fftconv(u, k, D.to("meta"))


# --- bidirectional (k_rev) ----------------------------------------------------------------

@pytest.mark.parametrize("L,Lk,Lkr", [(37, 37, 37), (100, 20, 150), (64, 64, 5), (1, 1, 1)])
def test_bidirectional_forward_and_grads(L, Lk, Lkr):
    from python_ref.conv import fftconv as ref_fftconv
    rng = np.random.default_rng(L + Lkr)
    u, k, D, gi, go = make(rng, 2, 3, L, Lk, gates=True)
    k_rev = rng.standard_normal((3, Lkr)) / np.sqrt(Lkr)
    ref = causal_conv_direct(u, k, D, gi, go, k_rev=k_rev)
    assert rel_err(ref_fftconv(u, k, D, gi, go, k_rev=k_rev), ref) < 1e-12
    yn = flashconv.fftconv(u, k, D, g_in=gi, g_out=go, k_rev=k_rev)
    check(yn, ref, "float64", "numpy bidirectional")
    ins = [torch.from_numpy(a).requires_grad_() for a in (u, k, D, gi, go, k_rev)]
    y = flashconv.fftconv(ins[0], ins[1], ins[2], g_in=ins[3], g_out=ins[4], k_rev=ins[5])
    check(y, ref, "float64", "torch bidirectional")
    dy = rng.standard_normal(u.shape)
    y.backward(torch.from_numpy(dy))
    g = fftconv_grads(u, k, dy, D, gi, go, k_rev=k_rev)
    for t, key in zip(ins, ("du", "dk", "dD", "dg_in", "dg_out", "dk_rev")):
        check(t.grad, g[key], "float64", "grad " + key)
    gn = flashconv.fftconv_backward(dy, u, k, D, gi, go, k_rev=k_rev)
    for key in ("du", "dk", "dD", "dg_in", "dg_out", "dk_rev"):
        check(gn[key], g[key], "float64", "numpy grad " + key)


def test_bidirectional_gradcheck_and_spectrum():
    rng = np.random.default_rng(8)
    u, k, D, _, _ = make(rng, 2, 2, 7, 5)
    k_rev = rng.standard_normal((2, 4))
    args = [torch.from_numpy(a).requires_grad_() for a in (u, k, k_rev)]
    assert torch.autograd.gradcheck(lambda u_, k_, kr_: flashconv.fftconv(u_, k_, k_rev=kr_), args)
    ref = causal_conv_direct(u, k, D, k_rev=k_rev)
    for conv in (lambda a: a.astype(np.float32), lambda a: t(a, "float32")):
        ks = flashconv.fft_kernel(conv(k), 7, k_rev=conv(k_rev))
        check(flashconv.fftconv(conv(u), ks, conv(D)), ref, "float32", "bidirectional spectrum")
        with pytest.raises(ValueError, match="k_rev cannot be combined"):
            flashconv.fftconv(conv(u), ks, k_rev=conv(k_rev))
    with pytest.raises(ValueError, match="k_rev must have shape \\(H, Lk\\) = \\(2, Lk\\)"):
        flashconv.fftconv(u, k, k_rev=k_rev[:1])
    with pytest.raises(TypeError, match="k_rev must be a real floating"):
        flashconv.fftconv(u, k, k_rev=k_rev.astype(np.complex64))


def test_short_kernel_dispatches_to_overlap_save(monkeypatch):
    from flashconv import _overlap
    calls = []
    real = _overlap.overlap_save
    monkeypatch.setattr(_overlap, "overlap_save", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    rng = np.random.default_rng(1)
    u, k, D, gi, go = make(rng, 1, 2, 8192, 8, gates=True)
    assert _overlap.overlap_save_cheaper(8192, 8)
    ref = causal_conv_direct(u, k, D, gi, go)
    y = flashconv.fftconv(t(u, "float32"), t(k, "float32"), t(D, "float32"), g_in=t(gi, "float32"),
                          g_out=t(go, "float32"))
    check(y, ref, "float32", "overlap-save torch")
    check(flashconv.fftconv(u, k, D, g_in=gi, g_out=go), ref, "float64", "overlap-save numpy")
    assert len(calls) == 2
