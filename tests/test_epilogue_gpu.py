"""The CUDA kernels' fused epilogue (activation, dropout mask) on a GPU, forward and backward,
against float64 python_ref (marked gpu: skipped without a GPU).

Each case runs under flashconv.use_engines(<engine>), so a call the engine refused would raise
NoEngineError instead of passing through another engine. Rule (docs/testing.md): rel L2 error
<= 2 x the torch_fft engine's error at the same io dtype (its epilogue is also float32 before
the rounding) + a small term; the bf16 dk/dD carry the tensor-core operands' documented error.
"""
import numpy as np
import pytest
import torch

import flashconv
from flashconv import _ext
from python_ref.conv import fftconv as ref_fftconv
from python_ref.conv import fftconv_grads

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def require_extension():
    if _ext.extension() is None:
        pytest.fail("a GPU is visible but flashconv._C is not built: " + _ext.unavailable_reason())


def rel_err(y, ref):
    y = y.detach().double().cpu().numpy()
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))


def np64(t):
    return None if t is None else t.detach().double().cpu().numpy()


def make(B, H, L, dtype, form, seed, gates=True):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, device="cuda", generator=gen).to(dt).requires_grad_()

    u, k, D = rnd(B, H, L), rnd(H, L, dt=torch.float32) / L ** 0.5, rnd(H, dt=torch.float32)
    k = k.detach().requires_grad_()
    gi, go = (rnd(B, H, L), rnd(B, H, L)) if gates else (None, None)
    shape = (B, H) if form == "BH" else (B, H, L)
    keep = torch.rand(shape, device="cuda", generator=gen) >= 0.17
    m = keep.to(torch.float32) / 0.83
    return u, k, D, gi, go, m


def run(engine, u, k, D, gi, go, m, act, dy=None):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (u, k, D, gi, go)]
    with flashconv.use_engines(engine):
        y = flashconv.fftconv(leaves[0], leaves[1], leaves[2], g_in=leaves[3], g_out=leaves[4],
                              activation=act, dropout_mask=m)
        if dy is not None:
            y.backward(dy)
    return y, [None if t is None else t.grad for t in leaves]


CASES = [("cuda_fused", 17, "gelu", "BH"), ("cuda_fused", 1000, "silu", "BHL"),
         ("cuda_fused", 4096, "gelu", "BHL"), ("cuda_fused", 4000, None, "BH"),
         ("cuda_two_level", 40000, "gelu", "BH"), ("cuda_two_level", 20000, "silu", "BHL")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("engine,L,act,form", CASES)
def test_epilogue_forward_backward(engine, L, act, form, dtype):
    B, H = 3, 5
    u, k, D, gi, go, m = make(B, H, L, dtype, form, seed=L)
    dy = torch.randn(B, H, L, device="cuda").to(dtype)
    y, grads = run(engine, u, k, D, gi, go, m, act, dy)
    y_t, grads_t = run("torch_fft", u, k, D, gi, go, m, act, dy)
    ref = ref_fftconv(np64(u), np64(k), np64(D), np64(gi), np64(go), activation=act,
                      dropout_mask=np64(m))
    e_k, e_t = rel_err(y, ref), rel_err(y_t, ref)
    print("%s L=%d %s %s %s y: kernel %.3g torch_fft %.3g" % (engine, L, act, form, dtype, e_k, e_t))
    assert y.dtype == dtype and np.isfinite(e_k) and e_k <= 2 * e_t + 1e-6
    # dropped elements are exactly zero
    m3 = (m[..., None] if m.ndim == 2 else m).expand(B, H, L)
    assert (y.detach()[m3 == 0] == 0).all()
    gref = fftconv_grads(np64(u), np64(k), np64(dy), np64(D), np64(gi), np64(go), activation=act,
                         dropout_mask=np64(m))
    for g, g_t, key in zip(grads, grads_t, ("du", "dk", "dD", "dg_in", "dg_out")):
        r = gref[key]
        e_k, e_t = rel_err(g, r), rel_err(g_t, r)
        print("  %s: kernel %.3g torch_fft %.3g" % (key, e_k, e_t))
        if key in ("dk", "dD") and dtype == torch.bfloat16 and engine == "cuda_fused":
            assert e_k < 4e-3  # fp16 tensor-core operands (documented); torch_fft is fp32
        else:
            assert e_k <= 2 * e_t + 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_epilogue_strided_mask_and_no_gates(dtype):
    """A (B, H) mask sliced from a wider tensor (strided), no gates, no D."""
    B, H, L = 4, 6, 777
    u, k, _, _, _, _ = make(B, H, L, dtype, "BH", seed=3, gates=False)
    wide = (torch.rand(B, 2 * H, device="cuda") >= 0.3).to(torch.float32) * 2
    m = wide[:, ::2]
    with flashconv.use_engines("cuda_fused"):
        y = flashconv.fftconv(u.detach(), k.detach(), activation="silu", dropout_mask=m)
    ref = ref_fftconv(np64(u), np64(k), activation="silu", dropout_mask=np64(m))
    with flashconv.use_engines("torch_fft"):
        y_t = flashconv.fftconv(u.detach(), k.detach(), activation="silu", dropout_mask=m)
    assert rel_err(y, ref) <= 2 * rel_err(y_t, ref) + 1e-6
