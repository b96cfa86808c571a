"""CUDA graph capture of fftconv's forward and backward, and torch.compile(mode=
"reduce-overhead") of a small H3 training step (marked gpu: skipped without a GPU).

The host path issues no synchronisation (tests/test_host_path.py proves it on the CPU with
meta tensors); here the real thing: a captured graph replayed on new input values must give
what eager gives for the same values, on every CUDA engine (fused kernel, overlap-save
blocks, two-level kernel) and on the torch.fft fallback.
"""
import pytest
import torch

import flashconv
from flashconv import dispatch
from flashconv.problem import Operands, from_arrays

pytestmark = pytest.mark.gpu

CASES = [  # engine, B, H, L, Lk, dtype
    ("cuda_fused", 3, 8, 1000, 1000, torch.bfloat16),
    ("cuda_fused", 2, 8, 777, 300, torch.float32),
    ("cuda_overlap_save", 2, 4, 40000, 16, torch.bfloat16),
    ("cuda_two_level", 2, 4, 40000, 40000, torch.bfloat16),
    ("torch_fft", 2, 4, 1000, 1000, torch.float64),
]


def _inputs(B, H, L, Lk, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kdt = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dt)

    return [rnd(B, H, L), rnd(H, Lk, dt=kdt, scale=Lk ** -0.5), rnd(H, dt=kdt),
            rnd(B, H, L), rnd(B, H, L), rnd(B, H, L)]  # u, k, D, g_in, g_out, dy


@pytest.mark.parametrize("engine,B,H,L,Lk,dtype", CASES)
def test_graph_capture_forward_backward(engine, B, H, L, Lk, dtype):
    static = [t.clone().requires_grad_(i < 5) for i, t in enumerate(_inputs(B, H, L, Lk, dtype, 0))]
    u, k, D, gi, go, dy = static
    fwd = from_arrays(Operands(u, k, D, gi, go))
    assert dispatch.select(fwd).NAME == engine
    # the backward may be another engine (overlap-save is forward only)

    def step():
        y = flashconv.fftconv(u, k, D, g_in=gi, g_out=go)
        grads = torch.autograd.grad(y, (u, k, D, gi, go), dy)
        return (y,) + grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (plans, workspaces, cuFFT)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step()
    fresh = _inputs(B, H, L, Lk, dtype, 1)
    with torch.no_grad():
        for s, f in zip(static, fresh):
            s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    names = ("y", "du", "dk", "dD", "dg_in", "dg_out")
    for name, a, b in zip(names, out_static, eager):
        # the same kernels on the same values: equal up to the order of float32 atomics
        torch.testing.assert_close(a, b, **tol, msg=lambda m: "%s %s: %s" % (engine, name, m))


def test_graph_capture_precomputed_spectrum():
    u, k, D, _, _, _ = _inputs(2, 8, 2000, 2000, torch.bfloat16, 3)
    ks = flashconv.fft_kernel(k, 2000)
    flashconv.fftconv(u, ks, D)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = flashconv.fftconv(u, ks, D)
    u.copy_(torch.randn_like(u))
    graph.replay()
    torch.testing.assert_close(y, flashconv.fftconv(u, ks, D), rtol=0, atol=0)


def test_compile_reduce_overhead_h3_step():
    """A small H3 layer's training step under torch.compile(mode="reduce-overhead") (CUDA
    graphs): outputs and gradients match eager over several replays."""
    from flashconv.nn import H3

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = H3(d_model=64, d_state=16).cuda()
    ref = H3(d_model=64, d_state=16).cuda()
    ref.load_state_dict(layer.state_dict())

    def step(model, u):
        y = model(u)
        loss = (y.float() ** 2).mean()
        loss.backward()
        return y.detach(), [p.grad.detach().clone() for p in model.parameters()]

    compiled = torch.compile(lambda u: step(layer, u), mode="reduce-overhead")
    for i in range(4):  # warm-up, recording, then replays
        u = torch.randn(4, 512, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(i))
        for m in (layer, ref):
            m.zero_grad(set_to_none=False)
        y_c, g_c = compiled(u)
        y_e, g_e = step(ref, u)
        torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-4)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
