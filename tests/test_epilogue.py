"""The fused epilogue of fftconv (issue 19): activation ("gelu", "silu") and dropout mask.

    y = g_out * m * act(conv(g_in u, k) + D g_in u)

Every CPU/torch engine, forward and backward, against python_ref.conv's float64 reference and
analytic gradients; float64 gradcheck through the operator; half precision within the rounding
of the output; bad input; which CUDA engines serve it (the kernels' epilogue itself:
tests/test_emu_epilogue.py under the emulation, tests/test_epilogue_gpu.py on a GPU).
"""
import re
import warnings

import numpy as np
import pytest
import torch

import flashconv
from flashconv import dispatch, problem
from flashconv.engines import _cuda
from python_ref.conv import causal_conv_direct, fftconv as ref_fftconv, fftconv_grads
from tests.test_interop import FakeArray

ACTS = [None, "gelu", "silu"]
MASKS = [None, "BH", "BHL"]
KEYS = ("du", "dk", "dD", "dg_in", "dg_out", "dk_rev")


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def case(B=2, H=3, L=40, Lk=17, Lkr=9, gates=True, mask=None, seed=0, scale_mask=0.83):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((B, H, L))
    k = rng.standard_normal((H, Lk)) / np.sqrt(Lk)
    D = rng.standard_normal(H)
    gi = rng.standard_normal((B, H, L)) if gates else None
    go = rng.standard_normal((B, H, L)) if gates else None
    kr = None if not Lkr else rng.standard_normal((H, Lkr)) / np.sqrt(Lkr)
    m = None
    if mask:
        shape = (B, H) if mask == "BH" else (B, H, L)
        m = (rng.random(shape) > 0.17) / scale_mask
    dy = rng.standard_normal((B, H, L))
    return u, k, D, gi, go, kr, m, dy


def T(a, dtype=torch.float64):
    return None if a is None else torch.tensor(a, dtype=dtype)


def test_reference_direct_and_fft_agree():
    for act in ACTS:
        for mask in MASKS:
            u, k, D, gi, go, kr, m, _ = case(mask=mask)
            a = causal_conv_direct(u, k, D, gi, go, kr, act, m)
            b = ref_fftconv(u, k, D, gi, go, kr, act, m)
            assert rel(a, b) < 1e-13


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_reference_gradients_by_finite_differences(act):
    """python_ref's analytic gradients (dz = dy g_out m act'(z), dg_out = dy m act(z))."""
    u, k, D, gi, go, kr, m, dy = case(B=1, H=2, L=12, Lk=5, Lkr=3, mask="BHL")
    g = fftconv_grads(u, k, dy, D, gi, go, kr, act, m)

    def loss(**kw):
        args = dict(u=u, k=k, D=D, g_in=gi, g_out=go, k_rev=kr)
        args.update(kw)
        return float((ref_fftconv(activation=act, dropout_mask=m, **args) * dy).sum())

    eps = 1e-6
    for name, key, arr in (("u", "du", u), ("k", "dk", k), ("D", "dD", D), ("g_in", "dg_in", gi),
                           ("g_out", "dg_out", go), ("k_rev", "dk_rev", kr)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            p, q = arr.copy(), arr.copy()
            p[idx] += eps
            q[idx] -= eps
            num[idx] = (loss(**{name: p}) - loss(**{name: q})) / (2 * eps)
        assert rel(g[key], num) < 1e-7, key


def _torch_engine(eng, u, k, D, gi, go, kr, m, dy, act, dtype=torch.float64):
    with flashconv.use_engines(eng):
        y = flashconv.fftconv(T(u, dtype), T(k), T(D), g_in=T(gi, dtype), g_out=T(go, dtype),
                              k_rev=T(kr), activation=act, dropout_mask=T(m, dtype))
        if eng == "cpu_overlap_save":
            return y, None
        g = flashconv.fftconv_backward(T(dy, dtype), T(u, dtype), T(k), T(D), T(gi, dtype),
                                       T(go, dtype), T(kr), activation=act,
                                       dropout_mask=T(m, dtype))
    return y, g


@pytest.mark.parametrize("eng", ["cpu_torch", "torch_fft", "cpu_scipy", "cpu_overlap_save"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("act", ACTS)
def test_engines_against_reference_float64(eng, act, mask):
    """Forward and every gradient of each CPU/torch engine against the float64 reference."""
    ols = eng == "cpu_overlap_save"
    u, k, D, gi, go, kr, m, dy = case(mask=mask, Lkr=0 if ols else 9, L=4096 if ols else 40,
                                      Lk=4 if ols else 17)
    want = ref_fftconv(u, k, D, gi, go, kr, act, m)
    if eng == "cpu_scipy":
        with flashconv.use_engines(eng):
            y = flashconv.fftconv(u, k, D, g_in=gi, g_out=go, k_rev=kr, activation=act,
                                  dropout_mask=m)
            g = flashconv.fftconv_backward(dy, u, k, D, gi, go, kr, activation=act,
                                           dropout_mask=m)
    else:
        if ols:
            p = problem.from_shape(2, 3, 4096, "fp64", Lk=4, activation=act, dropout_mask=mask)
            assert flashconv.engines.cpu_overlap_save.check(p) is None
        y, g = _torch_engine(eng, u, k, D, gi, go, kr, m, dy, act)
        y = y.numpy()
        g = None if g is None else {key: None if v is None else v.numpy() for key, v in g.items()}
    assert rel(y, want) < 1e-13
    if g is None:
        return
    gw = fftconv_grads(u, k, dy, D, gi, go, kr, act, m)
    for key in KEYS:
        assert rel(g[key], gw[key]) < 1e-12, key
    assert set(g) == set(KEYS)  # no gradient for the mask


@pytest.mark.parametrize("eng", ["cpu_torch", "torch_fft"])
def test_gradcheck_float64(eng):
    gen = torch.Generator().manual_seed(1)

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()

    B, H, L = 2, 2, 11
    u, k, D, gi, go, kr = rnd(B, H, L), rnd(H, 6), rnd(H), rnd(B, H, L), rnd(B, H, L), rnd(H, 4)
    for act, m in (("gelu", torch.rand(B, H, dtype=torch.float64)),
                   ("silu", torch.rand(B, H, L, dtype=torch.float64)), ("gelu", None),
                   (None, torch.rand(B, H, dtype=torch.float64))):
        with flashconv.use_engines(eng):
            assert torch.autograd.gradcheck(
                lambda *a: flashconv.fftconv(a[0], a[1], a[2], g_in=a[3], g_out=a[4], k_rev=a[5],
                                             activation=act, dropout_mask=m),
                (u, k, D, gi, go, kr), fast_mode=True)


TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("eng", ["cpu_torch", "torch_fft"])
@pytest.mark.parametrize("act,mask", [("gelu", "BH"), ("silu", "BHL")])
def test_low_precision_against_reference(dtype, eng, act, mask):
    """u, gates, mask and dy in dtype (k, D float32): output and gradients within the
    dtype's rounding of the float64 result of the rounded inputs."""
    u, k, D, gi, go, kr, m, dy = case(B=2, H=4, L=256, Lk=256, Lkr=32, mask=mask)
    u, gi, go, m, dy = (np.asarray(T(a, dtype).double()) for a in (u, gi, go, m, dy))
    k, D, kr = (np.asarray(T(a, torch.float32).double()) for a in (k, D, kr))
    with flashconv.use_engines(eng):
        y = flashconv.fftconv(T(u, dtype), T(k, torch.float32), T(D, torch.float32),
                              g_in=T(gi, dtype), g_out=T(go, dtype), k_rev=T(kr, torch.float32),
                              activation=act, dropout_mask=T(m, dtype))
        g = flashconv.fftconv_backward(T(dy, dtype), T(u, dtype), T(k, torch.float32),
                                       T(D, torch.float32), T(gi, dtype), T(go, dtype),
                                       T(kr, torch.float32), activation=act,
                                       dropout_mask=T(m, dtype))
    assert y.dtype == dtype
    assert rel(y.double(), ref_fftconv(u, k, D, gi, go, kr, act, m)) < TOL[dtype]
    gw = fftconv_grads(u, k, dy, D, gi, go, kr, act, m)
    for key in KEYS:
        assert rel(g[key].double(), gw[key]) < TOL[dtype], key


def test_epilogue_before_rounding_beats_outside_bf16():
    """GELU and the mask applied inside (float32, rounded once) against the same applied
    outside to a bfloat16 y: the fused output is at least as accurate."""
    u, k, D, _, _, _, m, _ = case(B=4, H=8, L=512, Lk=512, Lkr=0, gates=False, mask="BH")
    ub = T(u, torch.bfloat16)
    u64 = ub.double().numpy()
    want = ref_fftconv(u64, k, D, activation="gelu", dropout_mask=m)
    inside = flashconv.fftconv(ub, T(k, torch.float32), T(D, torch.float32), activation="gelu",
                               dropout_mask=T(m, torch.float32))
    y = flashconv.fftconv(ub, T(k, torch.float32), T(D, torch.float32))
    outside = torch.nn.functional.gelu(y) * T(m, torch.bfloat16)[..., None]
    assert rel(inside.double(), want) <= rel(outside.double(), want)


def test_mask_gets_no_gradient():
    u = torch.randn(2, 3, 16, requires_grad=True)
    k = torch.randn(3, 16, requires_grad=True)
    m = torch.rand(2, 3, requires_grad=True)
    flashconv.fftconv(u, k, activation="gelu", dropout_mask=m).sum().backward()
    assert u.grad is not None and k.grad is not None and m.grad is None


def test_long_rows_leave_inputs_unchanged():
    """Long rows (a padded row of 128 KB and more) form x = g_in u again for D x: on a copy
    (before, float32 u was multiplied by g_in in place there)."""
    gen = torch.Generator().manual_seed(0)
    u, gi, go, dy = (torch.randn(1, 1, 17000, generator=gen) for _ in range(4))
    k, D = torch.randn(1, 17000, generator=gen) / 130, torch.randn(1, generator=gen)
    keep = u.clone()
    for act in (None, "silu"):
        with flashconv.use_engines("cpu_torch"):
            y = flashconv.fftconv(u, k, D, g_in=gi, g_out=go, activation=act)
            g = flashconv.fftconv_backward(dy, u, k, D, gi, go, activation=act)
        assert torch.equal(u, keep)
        want = ref_fftconv(u.double().numpy(), k.double().numpy(), D.double().numpy(),
                           gi.double().numpy(), go.double().numpy(), activation=act)
        assert rel(y.double(), want) < 1e-5
        gw = fftconv_grads(u.double().numpy(), k.double().numpy(), dy.double().numpy(),
                           D.double().numpy(), gi.double().numpy(), go.double().numpy(),
                           activation=act)
        for key in ("du", "dk", "dD", "dg_in", "dg_out"):
            assert rel(g[key].double(), gw[key]) < 1e-5, key


# --- validation -------------------------------------------------------------------------------

def test_bad_activation():
    u, k = torch.randn(2, 3, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"activation must be None, 'gelu' or 'silu', got 'relu'"):
        flashconv.fftconv(u, k, activation="relu")
    with pytest.raises(TypeError, match="activation must be"):
        flashconv.fftconv(u, k, activation=1)
    with pytest.raises(ValueError, match="fftconv_backward: activation"):
        flashconv.fftconv_backward(u, u, k, activation="tanh")
    assert torch.equal(flashconv.fftconv(u, k, activation="GELU"),
                       flashconv.fftconv(u, k, activation="gelu"))


def test_bad_mask():
    u, k = torch.randn(2, 3, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"dropout_mask must have shape \(B, H\) = \(2, 3\) or "
                                         r"\(B, H, L\) = \(2, 3, 8\), got shape \(3, 2\)"):
        flashconv.fftconv(u, k, dropout_mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="dropout_mask must have shape"):
        flashconv.fftconv(u, k, dropout_mask=torch.ones(2, 3, 1))
    with pytest.raises(TypeError, match="dropout_mask must be a real floating tensor"):
        flashconv.fftconv(u, k, dropout_mask=torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"dropout_mask must be a torch.Tensor like u, of shape "
                                        r"\(B, H\)"):
        flashconv.fftconv(u, k, dropout_mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="dropout_mask is on meta but u is on cpu"):
        flashconv.fftconv(u, k, dropout_mask=torch.ones(2, 3, device="meta"))
    with pytest.raises(TypeError, match="dropout_mask must be a numpy.ndarray like u"):
        flashconv.fftconv(u.numpy(), k.numpy(), dropout_mask=torch.ones(2, 3))


# --- dispatch: the CUDA kernels serve the epilogue (overlap-save blocks excepted) -------------

@pytest.mark.parametrize("L,direction,engine", [(4096, "forward", "cuda_fused"),
                                                (4096, "backward", "cuda_fused"),
                                                (1 << 20, "forward", "cuda_two_level"),
                                                (1 << 20, "backward", "cuda_two_level")])
def test_cuda_engines_serve_epilogue(L, direction, engine):
    p = problem.from_shape(8, 64, L, "bf16", "cuda", activation="gelu", dropout_mask="BH",
                           direction=direction)
    assert p.has_epilogue and "gelu, dropout_mask (B, H)" in p.summary()
    with _cuda.assume_gpu(_cuda.ASSUMED_SMEM):
        assert dispatch.select(p).NAME == engine
        text = flashconv.ops.explain_problem(p, direction)
    assert re.search(engine + r" +<- serves it", text), text


def test_overlap_save_refuses_epilogue():
    p = problem.from_shape(2, 8, 1 << 20, "bf16", "cuda", Lk=64, activation="silu")
    plain = problem.from_shape(2, 8, 1 << 20, "bf16", "cuda", Lk=64)
    with _cuda.assume_gpu(_cuda.ASSUMED_SMEM):
        assert flashconv.engines.cuda_overlap_save.check(plain) is None
        why = flashconv.engines.cuda_overlap_save.check(p)
        assert "no activation/dropout epilogue" in why
        assert dispatch.select(p).NAME == "cuda_two_level"


def test_problem_records_the_epilogue():
    u, k = torch.randn(2, 3, 8), torch.randn(3, 8)
    text = flashconv.explain(u, k, activation="silu", dropout_mask=torch.ones(2, 3, 8),
                             direction="forward")
    assert "silu, dropout_mask (B, H, L)" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flashconv.fftconv(u, k, activation="silu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_epilogue_on_cuda(dtype, monkeypatch):
    """On a GPU an epilogue call runs on the fused kernels, without a KernelFallbackWarning
    even under FLASHCONV_REQUIRE_KERNEL=1, and matches the CPU."""
    monkeypatch.setenv("FLASHCONV_REQUIRE_KERNEL", "1")
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(4, 16, 2048, generator=gen).to(dtype)
    k, D = torch.randn(16, 2048, generator=gen) / 45, torch.randn(16, generator=gen)
    go = torch.randn(4, 16, 2048, generator=gen).to(dtype)
    m = torch.nn.functional.dropout(torch.ones(4, 16), 0.17)
    dy = torch.randn(4, 16, 2048, generator=gen).to(dtype)
    args = dict(activation="gelu", dropout_mask=m)
    want = flashconv.fftconv(u, k, D, g_out=go, **args)
    gwant = flashconv.fftconv_backward(dy, u, k, D, None, go, **args)
    c = {n: t.cuda() for n, t in dict(u=u, k=k, D=D, go=go, m=m, dy=dy).items()}
    cargs = dict(activation="gelu", dropout_mask=c["m"])
    text = flashconv.explain(c["u"], c["k"], c["D"], g_out=c["go"], **cargs)
    assert re.search(r"cuda_fused +<- serves it", text), text
    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.KernelFallbackWarning)
        y = flashconv.fftconv(c["u"], c["k"], c["D"], g_out=c["go"], **cargs)
        g = flashconv.fftconv_backward(c["dy"], c["u"], c["k"], c["D"], None, c["go"], **cargs)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(y.double().cpu(), want.double()) < tol
    for key in ("du", "dk", "dD", "dg_out"):
        assert rel(g[key].double().cpu(), gwant[key].double()) < tol, key


def test_explain_cli_epilogue_flags(capsys):
    from flashconv.__main__ import main

    assert main(["explain", "2", "8", "512", "--dtype", "bf16", "--device", "cuda", "--assume-gpu",
                 "--activation", "silu", "--dropout-mask", "BHL", "--direction", "forward"]) == 0
    out = capsys.readouterr().out
    assert "silu, dropout_mask (B, H, L)" in out
    assert re.search(r"cuda_fused +<- serves it", out), out


# A foreign DLPack array library (tests/test_interop.py's).
_Fake = FakeArray


def test_epilogue_numpy_through_cpu_torch_and_dlpack():
    u, k, D, gi, go, kr, m, dy = case(mask="BH")
    want = ref_fftconv(u, k, D, gi, go, kr, "silu", m)
    gw = fftconv_grads(u, k, dy, D, gi, go, kr, "silu", m)
    assert "cpu_torch          <- serves it" in flashconv.explain(
        u, k, D, g_in=gi, g_out=go, k_rev=kr, activation="silu", dropout_mask=m,
        direction="backward")
    y = flashconv.fftconv(u, k, D, g_in=gi, g_out=go, k_rev=kr, activation="silu", dropout_mask=m)
    g = flashconv.fftconv_backward(dy, u, k, D, gi, go, kr, activation="silu", dropout_mask=m)
    assert isinstance(y, np.ndarray) and rel(y, want) < 1e-13
    for key in KEYS:
        assert rel(g[key], gw[key]) < 1e-12, key
    f = [None if a is None else _Fake(T(a)) for a in (u, k, D, gi, go, kr, m, dy)]
    y = flashconv.fftconv(f[0], f[1], f[2], g_in=f[3], g_out=f[4], k_rev=f[5], activation="silu",
                          dropout_mask=f[6])
    assert isinstance(y, _Fake) and rel(y.t, want) < 1e-13
    g = flashconv.fftconv_backward(f[7], *f[:6], activation="silu", dropout_mask=f[6])
    for key in KEYS:
        assert isinstance(g[key], _Fake) and rel(g[key].t, gw[key]) < 1e-12, key
    with pytest.raises(ValueError, match="dropout_mask must have shape"):
        flashconv.fftconv(f[0], f[1], dropout_mask=_Fake(torch.ones(3, 2, dtype=torch.float64)))
