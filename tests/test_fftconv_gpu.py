"""The fused CUDA forward kernel against float64 python_ref (marked gpu: skipped without a GPU).

Rule (docs/testing.md): rel L2 error of the kernel <= 2 x the error of the torch.fft reference
run at the same input/output dtype, plus a small absolute term. Errors are printed first.
"""
import numpy as np
import pytest
import torch

import flashconv
from flashconv import _ext, dispatch
from flashconv.problem import Operands, from_arrays
from flashconv.reference import fftconv_ref
from python_ref.conv import causal_conv_direct, fftconv as ref_fftconv

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LENGTHS = [1, 2, 15, 16, 17, 100, 255, 256, 1000, 1023, 1024, 2048, 4095, 4096, 8191, 8192, 16384]


def rel_err(y, ref):
    y = y.detach().double().cpu().numpy()
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))


def torch_same_dtype(u, k, D, g_in, g_out):
    """torch.fft at u's io dtype (fp32 compute): the error the kernel is allowed 2x of."""
    x = u.float() if g_in is None else u.float() * g_in.float()
    y = fftconv_ref(x, k.float(), D.float() if D is not None else torch.zeros(k.shape[0], device=u.device))
    return (y if g_out is None else y * g_out.float()).to(u.dtype)


def fused_used(u, k, backward=False):
    p = from_arrays(Operands(u, k), "backward" if backward else "forward")
    return dispatch.select(p).NAME == "cuda_fused"


@pytest.fixture(scope="module", autouse=True)
def require_extension():
    if _ext.extension() is None:
        pytest.fail("a GPU is visible but flashconv._C is not built: " + _ext.unavailable_reason())


def check_case(B, H, L, dtype, with_D=True, gates=False, strided=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (B, H, 2 * L) if strided else (B, H, L)
    u_full = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    u = u_full[..., ::2] if strided else u_full
    k = torch.randn(H, L, device="cuda", generator=gen) / max(L, 1) ** 0.5
    D = torch.randn(H, device="cuda", generator=gen) if with_D else None
    gi = torch.randn(B, H, L, device="cuda", generator=gen).to(dtype) if gates else None
    go = torch.randn(B, H, L, device="cuda", generator=gen).to(dtype) if gates else None
    ref = ref_fftconv(*(None if t is None else t.double().cpu().numpy() for t in (u, k, D, gi, go)))
    y = flashconv.fftconv(u, k, D, g_in=gi, g_out=go)
    assert y.dtype == dtype and y.shape == u.shape
    e_k = rel_err(y, ref)
    e_t = rel_err(torch_same_dtype(u, k, D, gi, go), ref)
    print("B=%d H=%d L=%d %s D=%s gates=%s strided=%s fused=%s: kernel %.3g torch %.3g"
          % (B, H, L, dtype, with_D, gates, strided, fused_used(u, k), e_k, e_t))
    assert np.isfinite(e_k)
    assert e_k <= 2 * e_t + 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", LENGTHS)
def test_lengths(L, dtype):
    for B, H in ((1, 1), (3, 7)):
        check_case(B, H, L, dtype, seed=L)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [17, 1000, 4096, 16384])
def test_wide_gates_strided(L, dtype):
    check_case(3, 768, L, dtype, gates=True, seed=1)
    check_case(1, 768, L, dtype, with_D=False, strided=True, seed=2)
    check_case(3, 7, L, dtype, gates=True, strided=True, seed=3)


def test_fused_kernel_is_used():
    u = torch.randn(2, 4, 4096, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 4096, device="cuda")
    assert fused_used(u, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_values_no_silent_overflow(dtype):
    # bf16 values far beyond fp16's range, and a kernel whose spectrum is large.
    gen = torch.Generator(device="cuda").manual_seed(7)
    u = (torch.randn(2, 3, 2048, device="cuda", generator=gen) * 1e6).to(dtype)
    if dtype == torch.float16:
        u = u.clamp(-6e4, 6e4)
    k = torch.ones(3, 2048, device="cuda")
    ref = causal_conv_direct(u.double().cpu().numpy(), k.double().cpu().numpy())
    y = flashconv.fftconv(u, k)
    print("large values %s: rel err %.3g, finite=%s" % (dtype, rel_err(y, ref), bool(torch.isfinite(y).all())))
    if dtype != torch.float16:  # float16 output may itself overflow here; then it must be inf, not garbage
        assert torch.isfinite(y).all()
        assert rel_err(y, ref) < 5e-2


def test_precomputed_spectrum_matches():
    u = torch.randn(4, 16, 3000, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(16, 3000, device="cuda")
    ks = flashconv.fft_kernel(k, 3000)
    assert ks.layout == "monarch"
    # fft_kernel transforms k in float64; fftconv's own spectrum for bf16 io in float32
    # (flashconv/spectrum.py): equal up to the bf16 output rounding.
    y_ks, y_k = flashconv.fftconv(u, ks).float(), flashconv.fftconv(u, k).float()
    assert (y_ks - y_k).norm() <= 4e-3 * y_k.norm()
    u32 = u.float()
    assert torch.equal(flashconv.fftconv(u32, ks), flashconv.fftconv(u32, k))  # float64 both


def test_nan_propagates():
    u = torch.randn(2, 2, 100, device="cuda", dtype=torch.bfloat16)
    u[0, 1, 10] = float("nan")
    y = flashconv.fftconv(u, torch.randn(2, 100, device="cuda"))
    assert torch.isnan(y[0, 1, 10:]).all() and torch.isfinite(y[0, 0]).all()


def test_gradients_through_fused_forward():
    u = torch.randn(3, 5, 300, device="cuda", requires_grad=True)
    k = torch.randn(5, 300, device="cuda", requires_grad=True)
    D = torch.randn(5, device="cuda", requires_grad=True)
    y = flashconv.fftconv(u, k, D)
    dy = torch.randn_like(y)
    y.backward(dy)
    from python_ref.conv import fftconv_grads
    ref = fftconv_grads(u.detach().double().cpu().numpy(), k.detach().double().cpu().numpy(),
                        dy.double().cpu().numpy(), D=D.detach().double().cpu().numpy())
    for t, key in ((u, "du"), (k, "dk"), (D, "dD")):
        err = float(np.linalg.norm(t.grad.double().cpu().numpy() - ref[key]) / np.linalg.norm(ref[key]))
        print(key, err)
        assert err < 1e-5


def test_current_stream_is_used():
    s = torch.cuda.Stream()
    u = torch.randn(2, 8, 1024, device="cuda", dtype=torch.float16)
    k = torch.randn(8, 1024, device="cuda")
    expect = flashconv.fftconv(u, k)
    with torch.cuda.stream(s):
        y = flashconv.fftconv(u, k)
    s.synchronize()
    assert torch.equal(y, expect)


# --- backward kernel and bidirectional ------------------------------------------------------

def grads_case(B, H, L, dtype, gates=True, bidirectional=False, seed=0):
    """Gradients from the fused backward vs float64 python_ref; io-dtype grads within 2x the
    torch.fft reference's error at that dtype, dk/dD/dk_rev float32 accumulations."""
    from python_ref.conv import fftconv_grads
    gen = torch.Generator(device="cuda").manual_seed(seed)
    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, device="cuda", generator=gen).to(dt).requires_grad_()
    u, k, D = rnd(B, H, L), rnd(H, L, dt=torch.float32), rnd(H, dt=torch.float32)
    gi, go = (rnd(B, H, L), rnd(B, H, L)) if gates else (None, None)
    kr = rnd(H, L // 2 + 1, dt=torch.float32) if bidirectional else None
    assert fused_used(u, k, backward=True)
    y = flashconv.fftconv(u, k, D, g_in=gi, g_out=go, k_rev=kr)
    dy = torch.randn(B, H, L, device="cuda", generator=gen).to(dtype)
    y.backward(dy)
    np64 = lambda t: None if t is None else t.detach().double().cpu().numpy()  # noqa: E731
    ref = fftconv_grads(np64(u), np64(k), np64(dy), np64(D), np64(gi), np64(go), k_rev=np64(kr))
    # the torch.fft reference at the same dtype: autograd through the torch.fft path
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (u, k, D, gi, go, kr)]
    with flashconv.use_engines("torch_fft"):
        y_t = flashconv.fftconv(leaves[0], leaves[1], leaves[2], g_in=leaves[3], g_out=leaves[4],
                                k_rev=leaves[5])
        y_t.backward(dy)
    for t, tt, key in zip((u, k, D, gi, go, kr), leaves, ("du", "dk", "dD", "dg_in", "dg_out", "dk_rev")):
        if t is None:
            continue
        e_k, e_t = rel_err(t.grad, ref[key]), rel_err(tt.grad, ref[key])
        print("L=%d %s %s: kernel %.3g torch %.3g" % (L, dtype, key, e_k, e_t))
        if key in ("dk", "dk_rev") and dtype == torch.bfloat16:
            assert e_k < 4e-3  # fp16 tensor-core operands (documented); torch is fp32 here
        else:
            assert e_k <= 2 * e_t + 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [1, 17, 256, 1000, 4096, 8192])
def test_backward_kernel(L, dtype):
    if dtype != torch.bfloat16 and L > 4096:
        pytest.skip("fp32/fp16 backward kernel serves L <= 4K")
    grads_case(3, 7, L, dtype, seed=L)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bidirectional_kernel(dtype):
    grads_case(3, 5, 777, dtype, bidirectional=True, seed=5)


def test_caller_device_restored():
    """The binding makes the tensors' device current for the launch and restores the caller's
    (cuda/src/bindings.cpp DeviceGuard): a call on cuda:1 leaves cuda:0 current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    u = torch.randn(2, 4, 1000, device="cuda:1", dtype=torch.bfloat16)
    k = torch.randn(4, 1000, device="cuda:1")
    assert fused_used(u, k)
    y = flashconv.fftconv(u, k)
    assert torch.cuda.current_device() == 0
    ref = ref_fftconv(u.double().cpu().numpy(), k.double().cpu().numpy())
    assert rel_err(y, ref) < 4e-3
    x = torch.ones(3, device="cuda")  # the caller's later work still lands on cuda:0
    assert x.device.index == 0
