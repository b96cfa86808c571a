"""The two-level (long) forward convolution on the GPU (flashconv._long.fftconv_long_forward),
L = 32K ... 4M (marked gpu: skipped without a GPU).

Rule (as tests/test_fftconv_gpu.py): rel L2 error <= 2x the io-dtype rounding floor of the
exact result plus a small float32 term. Reference: python_ref's float64 fftconv on the CPU for
moderate sizes; torch.fft in float64 on the GPU for the largest.
"""
import numpy as np
import pytest
import torch

from flashconv import _ext
from flashconv._long import fftconv_long_forward, long_applies, long_plan_for, two_level_plan
from python_ref.conv import fftconv as ref_fftconv

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def require_extension():
    ext = _ext.extension()
    if ext is None:
        pytest.fail("a GPU is visible but flashconv._C is not built: " + _ext.unavailable_reason())
    if not hasattr(ext, "fftconv_long_fwd"):
        pytest.fail("flashconv._C was built without fftconv_long_fwd: rebuild the extension")


def rel(a, b):
    return float(torch.linalg.vector_norm((a - b).flatten()) / torch.linalg.vector_norm(b.flatten()))


def torch_ref64(u, k, D, g_in=None, g_out=None):
    """float64 FFT convolution on the GPU (torch.fft), the exact result to ~1e-15."""
    L = u.shape[-1]
    n = 2 * L
    x = u.double() if g_in is None else u.double() * g_in.double()
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(k.double()[:, :L], n=n), n=n)[..., :L]
    if D is not None:
        y = y + D.double()[:, None] * x
    return y if g_out is None else y * g_out.double()


def inputs(B, H, L, dtype, seed=0, gates=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    u = torch.randn(B, H, L, device="cuda", generator=g).to(dtype)
    k = torch.randn(H, L, device="cuda", generator=g) / L ** 0.5
    D = torch.randn(H, device="cuda", generator=g)
    gi = torch.randn(B, H, L, device="cuda", generator=g).to(dtype) if gates else None
    go = torch.randn(B, H, L, device="cuda", generator=g).to(dtype) if gates else None
    return u, k, D, gi, go


def check(y, ref64, dtype, what, eps=2e-6):
    assert torch.isfinite(y).all(), what
    err = rel(y.double(), ref64)
    floor = rel(ref64.to(dtype).double(), ref64)
    bound = 2 * floor + eps
    print("%s: rel err %.3g, floor %.3g, bound %.3g" % (what, err, floor, bound))
    assert err <= bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [32768, 40000, 1 << 17])
def test_long_vs_python_ref(L, dtype):
    u, k, D, gi, go = inputs(3, 2, L, dtype, seed=L, gates=True)
    assert long_applies(u)
    y = fftconv_long_forward(u, k, D, gi, go)
    ref = ref_fftconv(u.double().cpu().numpy(), k.double().cpu().numpy(), D.double().cpu().numpy(),
                      gi.double().cpu().numpy(), go.double().cpu().numpy())
    N, N1, N2 = long_plan_for(u)
    check(y, torch.from_numpy(ref).cuda(), dtype, "L=%d N=%d=%dx%d %s" % (L, N, N1, N2, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1 << 20, (1 << 22) - 5, 1 << 22])
def test_long_largest(L, dtype):
    u, k, D, _, _ = inputs(2, 1, L, dtype, seed=3)
    y = fftconv_long_forward(u, k, D)
    check(y, torch_ref64(u, k, D), dtype, "L=%d %s plan %s" % (L, dtype, long_plan_for(u)))


@pytest.mark.parametrize("n2", [1024, 4096])
def test_long_forced_split_and_strided(n2):
    # Smaller inner sizes (more outer stages), odd B, u non-contiguous.
    L = 50000
    u, k, D, _, _ = inputs(5, 3, 2 * L, torch.bfloat16, seed=7)
    u = u[..., ::2]
    y = fftconv_long_forward(u, k, D, n2=n2)
    check(y, torch_ref64(u, k, D), torch.bfloat16, "n2=%d strided" % n2)
    assert two_level_plan(L, n2=n2)[2] == n2


def test_long_matches_fused_size_boundary():
    # L = 16K (N = 32K): the fused kernel's top bf16 size also runs as 2 x 16K here.
    u, k, D, _, _ = inputs(2, 4, 16384, torch.bfloat16, seed=9)
    y = fftconv_long_forward(u, k, D, n2=16384)
    check(y, torch_ref64(u, k, D), torch.bfloat16, "L=16K two-level")


def test_long_workspace_chunks():
    # A workspace of one (pair, channel) per launch: the wrapper loops over chunks.
    L = 40000
    u, k, D, gi, go = inputs(5, 3, L, torch.float32, seed=5, gates=True)
    N = two_level_plan(L)[0]
    y = fftconv_long_forward(u, k, D, gi, go, max_workspace_bytes=8 * N)
    y_one = fftconv_long_forward(u, k, D, gi, go)
    assert torch.equal(y, y_one)
    check(y, torch_ref64(u, k, D, gi, go), torch.float32, "workspace chunks")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fftconv_dispatches_long_lengths_to_two_level(dtype, monkeypatch):
    """flashconv.fftconv itself takes the two-level kernel where the fused one cannot serve."""
    import flashconv
    from flashconv import _long
    calls = []
    real = _long.fftconv_long_forward
    monkeypatch.setattr(_long, "fftconv_long_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    L = 40000
    u = torch.randn(2, 3, L, device="cuda").to(dtype)
    k = torch.randn(3, L, device="cuda") / L ** 0.5
    y = flashconv.fftconv(u, k)
    assert calls == [1]
    from python_ref.conv import fftconv as ref_fftconv
    ref = ref_fftconv(u.double().cpu().numpy(), k.double().cpu().numpy())
    err = float(np.linalg.norm(y.double().cpu().numpy() - ref) / np.linalg.norm(ref))
    print("dispatch L=%d %s: rel err %.3g" % (L, dtype, err))
    assert err < (4e-3 if dtype == torch.bfloat16 else 1e-5)


def grads64(u, k, D, g_in, g_out, dy):
    """float64 autograd gradients of torch_ref64 on the GPU: (du, dk, dD, dg_in, dg_out)."""
    leaves = [None if t is None else t.detach().double().requires_grad_()
              for t in (u, k, D, g_in, g_out)]
    torch_ref64(*leaves).backward(dy.double())
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [32768, 100000, 1 << 20])
def test_long_backward_vs_float64(L, dtype):
    """Gradients beyond the fused backward: the two-level kernel with conj(K) for dx,
    batch-chunked torch.fft for dk (forced to several chunks)."""
    from flashconv._long import fftconv_long_backward
    B = 3 if L < (1 << 20) else 1
    u, k, D, gi, go = inputs(B, 2, L, dtype, seed=L % 97, gates=True)
    dy = torch.randn(B, 2, L, device="cuda").to(dtype)
    N = two_level_plan(L)[0]
    got = fftconv_long_backward(dy, u, k, D, gi, go, max_corr_bytes=16 * 2 * (N // 2 + 1))
    ref = grads64(u, k, D, gi, go, dy)
    for name, g, r in zip(("du", "dk", "dD", "dg_in", "dg_out"), got, ref):
        out_dtype = dtype if name in ("du", "dg_in", "dg_out") else torch.float32
        assert g.dtype == out_dtype and g.shape == r.shape, name
        # float32 results (dk, dD) of float32 transforms of up to 2M points: ~log2(N) eps.
        check(g, r, out_dtype, "backward %s L=%d %s" % (name, L, dtype), eps=1e-5)


def test_autograd_dispatches_long_backward(monkeypatch):
    import flashconv
    from flashconv import _long
    calls = []
    real = _long.fftconv_long_backward
    monkeypatch.setattr(_long, "fftconv_long_backward",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    L = 40000
    u, k, D, gi, go = inputs(2, 3, L, torch.bfloat16, seed=1)
    leaves = [t.clone().requires_grad_() for t in (u, k, D)]
    dy = torch.randn(2, 3, L, device="cuda").to(torch.bfloat16)
    flashconv.fftconv(*leaves).backward(dy)
    assert calls == [1]
    ref = grads64(u, k, D, None, None, dy)
    for name, t, r in zip(("du", "dk", "dD"), leaves, ref):
        check(t.grad, r, t.dtype if name == "du" else torch.float32, "autograd " + name, eps=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,lk", [(40000, 1), (100000, 64), (1 << 20, 1000)])
def test_short_kernel_overlap_save_on_cuda(L, lk, dtype, monkeypatch):
    """A short kernel beyond the fused size: overlap-save blocks through the fused kernel."""
    import flashconv
    from flashconv import _overlap
    calls = []
    real = _overlap.overlap_save_blocks
    monkeypatch.setattr(_overlap, "overlap_save_blocks",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    u, _, D, gi, go = inputs(2, 3, L, dtype, seed=lk, gates=True)
    k = torch.randn(3, lk, device="cuda") / lk ** 0.5
    y = flashconv.fftconv(u, k, D, g_in=gi, g_out=go)
    assert calls == [1]
    check(y, torch_ref64(u, k, D, gi, go), dtype, "overlap-save L=%d lk=%d" % (L, lk))
