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


def check(y, ref64, dtype, what):
    assert torch.isfinite(y).all(), what
    err = rel(y.double(), ref64)
    floor = rel(ref64.to(dtype).double(), ref64)
    bound = 2 * floor + 2e-6
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
