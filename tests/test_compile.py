"""flashconv.fftconv as a torch operator: opcheck, torch.compile, gradcheck, the backward op.

The operators are flashconv::fftconv and flashconv::fftconv_bwd (flashconv/_torch_op.py). Only
one test compiles with inductor (its cold start costs most of this file's time on a small
CPU); the others use the aot_eager backend, which runs the same Dynamo trace and the same
AOT autograd graph (fake tensors, the registered autograd formula) without code generation.
"""
import numpy as np
import pytest
import torch

import flashconv
from flashconv import problem
from flashconv.engines import torch_fft
from flashconv.plan import fused_fft_size
from flashconv.problem import Operands
from flashconv.spectrum import cuda_fft_size, monarch_spectrum
from python_ref.conv import causal_conv_direct, fftconv_grads

FWD = torch.ops.flashconv.fftconv.default
BWD = torch.ops.flashconv.fftconv_bwd.default


def rel_err(y, ref):
    y = y.detach().double().cpu().numpy()
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))


def np64(t):
    return None if t is None else t.detach().double().cpu().numpy()


def inputs(B, H, L, Lk, dtype=torch.float32, D=True, gates=False, device="cpu", grad=True, seed=0):
    """u, k, D, g_in, g_out; u and the gates in `dtype`, k and D in float32 (float64 for float64)."""
    gen = torch.Generator().manual_seed(seed)
    kdt = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, dt=dtype, scale=1.0):
        x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)
        return x.requires_grad_(grad)

    return (rnd(B, H, L), rnd(H, Lk, dt=kdt, scale=Lk ** -0.5), rnd(H, dt=kdt) if D else None,
            rnd(B, H, L) if gates else None, rnd(B, H, L) if gates else None)


def test_schemas():
    assert str(FWD._schema) == (
        "flashconv::fftconv(Tensor u, Tensor k, Tensor? D=None, Tensor? g_in=None, "
        "Tensor? g_out=None, Tensor? k_exponent=None, SymInt n=0, Tensor? k_rev=None, "
        "Tensor? dropout_mask=None, str activation=\"\") -> Tensor")
    assert str(BWD._schema) == (
        "flashconv::fftconv_bwd(Tensor dy, Tensor u, Tensor k, Tensor? D=None, "
        "Tensor? g_in=None, Tensor? g_out=None, Tensor? k_exponent=None, SymInt n=0, "
        "bool[]? output_mask=None, Tensor? k_rev=None, Tensor? dropout_mask=None, "
        "str activation=\"\") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


CASES = [  # L, Lk, D, gates: odd lengths, Lk < L, Lk > L, with and without D and gates
    (17, 17, True, True),
    (33, 10, False, False),
    (20, 45, True, False),
    (1, 3, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L,Lk,D,gates", CASES)
def test_opcheck_forward(L, Lk, D, gates, dtype):
    u, k, D_, gi, go = inputs(2, 3, L, Lk, dtype, D=D, gates=gates, seed=L + Lk)
    torch.library.opcheck(FWD, (u, k, D_, gi, go))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_precomputed_spectrum(dtype):
    u, k, D, gi, go = inputs(2, 3, 21, 8, dtype, gates=True)
    ks = flashconv.fft_kernel(k.detach(), 21)
    torch.library.opcheck(FWD, (u, ks.spectrum, D, gi, go, ks.exponent, ks.n))


@pytest.mark.parametrize("mask", [None, [True] * 6, [False, True, False, True, False, True]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_backward(mask, dtype):
    u, k, D, gi, go = inputs(2, 3, 19, 7, dtype, gates=True, grad=False)
    dy = torch.randn(2, 3, 19).to(dtype)
    torch.library.opcheck(BWD, (dy, u, k, D, gi, go, None, 0, mask))


def test_backward_op_convention():
    """Absent, masked and spectrum inputs give empty (0,) tensors of u's dtype; others their input's."""
    u, k, D, gi, _ = inputs(2, 3, 12, 5, torch.bfloat16, gates=True, grad=False)
    dy = torch.randn(2, 3, 12).to(torch.bfloat16)
    du, dk, dD, dgi, dgo, dkr = BWD(dy, u, k, D, gi, None,
                                    output_mask=[True, True, False, True, True, True])
    assert du.shape == u.shape and du.dtype == torch.bfloat16
    assert dk.shape == k.shape and dk.dtype == torch.float32
    assert dD.shape == (0,) and dD.dtype == torch.bfloat16      # masked out
    assert dgi.shape == gi.shape and dgi.dtype == torch.bfloat16
    assert dgo.shape == (0,)                                      # g_out absent
    assert dkr.shape == (0,)                                      # k_rev absent
    ks = flashconv.fft_kernel(k, 12)
    grads = BWD(dy, u, ks.spectrum, D, None, None, ks.exponent, ks.n)
    assert [tuple(g.shape) for g in grads] == [u.shape, (0,), D.shape, (0,), (0,), (0,)]
    k_rev = torch.randn(3, 20)
    grads = BWD(dy, u, k, None, None, None, None, 0, None, k_rev)
    assert [tuple(g.shape) for g in grads] == [u.shape, k.shape, (0,), (0,), (0,), k_rev.shape]
    with pytest.raises(ValueError, match="output_mask must have 6 entries"):
        BWD(dy, u, k, output_mask=[True, True])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_bidirectional(dtype):
    u, k, D, gi, go = inputs(2, 3, 15, 15, dtype, gates=True, seed=3)
    k_rev = torch.randn(3, 9, dtype=dtype, requires_grad=True)
    torch.library.opcheck(FWD, (u, k, D, gi, go, None, 0, k_rev))
    dy = torch.randn(2, 3, 15, dtype=dtype)
    torch.library.opcheck(BWD, (dy, u.detach(), k.detach(), D.detach(), gi.detach(), go.detach(),
                                None, 0, None, k_rev.detach()))


@pytest.mark.parametrize("activation,mask_shape", [("gelu", (2, 3)), ("silu", (2, 3, 15)),
                                                   ("", (2, 3))])
def test_opcheck_epilogue(activation, mask_shape):
    """The fused epilogue (issue 19): dropout_mask and activation through both operators."""
    u, k, D, gi, go = inputs(2, 3, 15, 15, torch.float32, gates=True, seed=4)
    m = torch.rand(*mask_shape)
    torch.library.opcheck(FWD, (u, k, D, gi, go, None, 0, None, m, activation))
    dy = torch.randn(2, 3, 15)
    torch.library.opcheck(BWD, (dy, u.detach(), k.detach(), D.detach(), gi.detach(), go.detach(),
                                None, 0, None, None, m, activation))


def test_compile_epilogue_fullgraph():
    torch._dynamo.reset()

    def f(u, k, D, m):
        return flashconv.fftconv(u, k, D, activation="gelu", dropout_mask=m).float().square()

    u, k, D, _, _ = inputs(2, 4, 33, 20, torch.bfloat16, seed=5)
    m = torch.nn.functional.dropout(torch.ones(2, 4), 0.17)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = []
    for fn in (f, compiled):
        for a in (u, k, D):
            a.grad = None
        y = fn(u, k, D, m)
        y.sum().backward()
        out.append((y.detach(), [a.grad.clone() for a in (u, k, D)]))
    torch.testing.assert_close(out[1][0], out[0][0])
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b)


def test_meta_tensors():
    y = flashconv.fftconv(torch.empty(2, 3, 50, device="meta", dtype=torch.bfloat16),
                          torch.empty(3, 7, device="meta"), torch.empty(3, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 3, 50) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("L,Lk", [(9, 6), (8, 3), (5, 11)])
def test_gradcheck_through_op(L, Lk):
    u, k, D, gi, go = inputs(2, 2, L, Lk, torch.float64, gates=True, seed=L)
    assert torch.autograd.gradcheck(
        lambda *a: flashconv.fftconv(a[0], a[1], a[2], g_in=a[3], g_out=a[4]), (u, k, D, gi, go))
    assert torch.autograd.gradcheck(lambda u_, k_: FWD(u_, k_), (u, k))
    # Only some inputs require grad: the mask skips the rest.
    assert torch.autograd.gradcheck(
        lambda k_, go_: flashconv.fftconv(u.detach(), k_, D.detach(), g_out=go_), (k, go))


def test_gradcheck_precomputed_spectrum():
    u, k, D, gi, _ = inputs(2, 2, 10, 4, torch.float64, gates=True)
    ks = flashconv.fft_kernel(k.detach(), 10)
    assert torch.autograd.gradcheck(lambda u_, D_, g_: flashconv.fftconv(u_, ks, D_, g_in=g_), (u, D, gi))


class TinyConv(torch.nn.Module):
    """One long-convolution mixer: a learnable (H, L) kernel and skip, a sigmoid output gate."""

    def __init__(self, H, L):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.k = torch.nn.Parameter(torch.randn(H, L, generator=gen) / L ** 0.5)
        self.D = torch.nn.Parameter(torch.randn(H, generator=gen))

    def forward(self, u):  # u (B, H, L)
        return flashconv.fftconv(u, self.k, self.D, g_out=torch.sigmoid(u))


def _grads(module, u):
    module.zero_grad()
    u = u.detach().requires_grad_()
    y = module(u)
    (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    return y.detach(), [u.grad] + [p.grad.clone() for p in module.parameters()]


def test_compile_module_forward_backward_inductor():
    torch._dynamo.reset()
    model = TinyConv(4, 37)
    u = torch.randn(2, 4, 37)
    y_e, g_e = _grads(model, u)
    y_c, g_c = _grads(torch.compile(model, fullgraph=True), u)
    print("compiled vs eager: y %.3g, grads %s" % ((y_c - y_e).abs().max(),
          ["%.3g" % (a - b).abs().max() for a, b in zip(g_c, g_e)]))
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_function_fullgraph(dtype):
    torch._dynamo.reset()

    def f(u, k, D, gi, go):
        return flashconv.fftconv(u * 2, k, D, g_in=gi, g_out=go).float().square()

    args = inputs(3, 4, 29, 40, dtype, gates=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for fn in (f, compiled):
        for a in args:
            a.grad = None
        y = fn(*args)
        y.sum().backward()
        if fn is f:
            y_e, g_e = y.detach(), [a.grad.clone() for a in args]
    torch.testing.assert_close(y.detach(), y_e)
    for a, g in zip(args, g_e):
        torch.testing.assert_close(a.grad, g)


def test_compile_precomputed_spectrum_and_dynamic_shapes():
    torch._dynamo.reset()
    _, k, D, _, _ = inputs(1, 3, 1, 16, grad=False)
    compiled = torch.compile(lambda u, ks, D: flashconv.fftconv(u, ks, D) + 1, fullgraph=True,
                             backend="aot_eager", dynamic=True)
    for L in (16, 24):
        ks = flashconv.fft_kernel(k, L)
        for B in (1, 3):
            u = torch.randn(B, 3, L)
            torch.testing.assert_close(compiled(u, ks, D), flashconv.fftconv(u, ks, D) + 1)


@pytest.mark.parametrize("L,Lk,gates", [(37, 37, True), (50, 9, False), (20, 64, True)])
def test_torch_fft_path_matches_reference(L, Lk, gates):
    """The CUDA fallback (torch.fft forward and backward) is device-generic: run it on CPU,
    with the kernel as taps, as a natural spectrum and as the fused kernel's Monarch spectrum."""
    u, k, D, gi, go = inputs(2, 3, L, Lk, torch.float32, gates=gates, grad=False, seed=L)
    dy = torch.randn(2, 3, L)
    y_ref = causal_conv_direct(*(np64(t) for t in (u, k, D, gi, go)))
    g_ref = fftconv_grads(np64(u), np64(k), np64(dy), D=np64(D), g_in=np64(gi), g_out=np64(go))
    mask = (True, True, True, gates, gates, False)
    nat = torch.fft.rfft(k[:, :L].double(), n=cuda_fft_size(L, min(L, Lk))).to(torch.complex64)
    N = fused_fft_size(L)
    mon, exp = monarch_spectrum(k, min(L, Lk), N)
    for what, kk, kexp, n in (("taps", k, None, 0), ("rfft", nat, None, nat.shape[1] * 2 - 2),
                              ("monarch", mon, exp, N)):
        a = Operands(u, kk, D, gi, go, None, kexp, n)
        y = torch_fft.forward(problem.from_arrays(a), a)
        p = problem.from_arrays(a, "backward", mask)
        grads = torch_fft.backward(p, a, dy, p.mask)
        errs = {key: rel_err(g, g_ref[key]) for key, g in zip(("du", "dk", "dD", "dg_in", "dg_out"), grads)
                if g is not None}
        print(what, "y %.3g" % rel_err(y, y_ref), {key: "%.3g" % e for key, e in errs.items()})
        assert y.is_contiguous() and rel_err(y, y_ref) < 1e-5
        assert all(e < 1e-5 for e in errs.values())
        assert (grads[1] is None) == (what != "taps")


# --- CUDA ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_cuda(dtype):
    torch._dynamo.reset()
    model = TinyConv(8, 300).cuda()
    u = torch.randn(2, 8, 300, device="cuda").to(dtype)
    model = model.to(dtype) if dtype != torch.float32 else model
    y_e, g_e = _grads(model, u)
    y_c, g_c = _grads(torch.compile(model, fullgraph=True), u)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_c, y_e, **tol)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_cuda(dtype):
    u, k, D, gi, go = inputs(2, 3, 300, 300, dtype, gates=True, device="cuda")
    torch.library.opcheck(FWD, (u, k, D, gi, go))
    if dtype == torch.float32:
        ks = flashconv.fft_kernel(k.detach(), 300)
        torch.library.opcheck(FWD, (u, ks.spectrum, D, gi, go, ks.exponent, ks.n))
