"""The two-level (long) forward convolution (cuda/include/flashconv/fftconv_long.h), unchanged,
under the CPU SIMT emulation (tests/emu) vs python_ref, with small N and a small inner size N2
forced so the outer stage spans every plan family (N1 = 2 ... 512); and its numpy mirror
(flashconv._long.two_level_reference) vs python_ref. Rule as tests/test_emu_fftconv.py: rel L2
error <= 2x the io-dtype rounding floor of the exact result + a small float32 term.
"""
import numpy as np
import pytest

from flashconv._long import long_order, long_spectrum, two_level_plan, two_level_reference
from flashconv.plan import monarch_perm
from python_ref.conv import activation_fn, fftconv as ref_fftconv
from python_ref.rounding import round_bf16

from tests.emu import build as emu
from tests.test_emu_fftconv import ROUND, epilogue_params, from_io, make, rel_err, to_io

pytestmark = pytest.mark.emu

CASE = {"f32": "fftconv_long_f32", "f16": "fftconv_long_f16", "bf16": "fftconv_long_bf16"}


def run_long(u, k, dtype, N2, D=None, g_in=None, g_out=None, variant="plain", num_sms=1, C=0,
             k_rev=None, act=None, mask=None):
    B, H, L = u.shape
    N, N1, N2 = two_level_plan(L, n2=N2)
    K, k_exp = long_spectrum(k, L, N1, N2, k_rev)
    inputs = {"u": to_io(u, dtype), "K": np.stack([K.real, K.imag], -1).astype(np.float32),
              "k_exp": k_exp}
    params = {"B": B, "H": H, "L": L, "N1": N1, "N2": N2, "num_sms": num_sms, "C": C}
    if D is not None:
        inputs["D"] = D.astype(np.float32)
        params["has_D"] = 1
    if g_in is not None:
        inputs["g_in"] = to_io(g_in, dtype)
        inputs["g_out"] = to_io(g_out, dtype)
        params["has_gates"] = 1
    ei, ep = epilogue_params(B, H, L, act, mask)  # the fused epilogue (act, mask), if any
    return from_io(emu.run(CASE[dtype], {**inputs, **ei}, variant, params={**params, **ep})
                   .outputs["y"], dtype)


def check(y, ref, dtype, what, extra=5e-7):
    """rel L2 error <= 2x the io rounding floor of the exact result + extra."""
    assert np.isfinite(y).all(), "%s: non-finite or unwritten outputs" % what
    err = rel_err(y, ref)
    floor = rel_err(ROUND[dtype](ref), ref)
    bound = 2 * floor + extra
    print("%s: rel err %.3g, io rounding floor %.3g, bound %.3g" % (what, err, floor, bound))
    assert err <= bound
    return err


def test_orders():
    for n in (2, 4, 8, 16):  # one stage: the outer factors' order is natural
        assert (monarch_perm(n) == np.arange(n)).all()
    for n1, n2 in ((2, 16), (8, 128), (16, 256), (32, 64)):
        assert sorted(long_order(n1, n2)) == list(range(n1 * n2))
    # For N1 a power of 16, the two-level order is the one-level Monarch order.
    assert (long_order(16, 256) == monarch_perm(4096)).all()


@pytest.mark.parametrize("L,N2", [(1000, 128), (1024, 16), (4000, 128), (3000, 16), (100, 16),
                                  (20000, 4096), (9000, 2048)])
def test_numpy_mirror(L, N2):
    rng = np.random.default_rng(L + N2)
    u, k, D, gi, go = make(rng, 3, 2, L, "f32", gates=True)
    _, N1, N2 = two_level_plan(L, n2=N2)
    y = two_level_reference(u, k, D, gi, go, N1, N2)
    ref = ref_fftconv(u, k, D, gi, go)
    err = rel_err(y, ref)
    print("mirror L=%d N1=%d N2=%d: %.3g" % (L, N1, N2, err))
    assert err < 1e-6  # K is complex64; everything else float64
    k_rev = rng.standard_normal((2, 50)) / 7
    y = two_level_reference(u, k, D, None, None, N1, N2, k_rev=k_rev)
    ref = ref_fftconv(u, k, D, k_rev=k_rev)
    assert rel_err(y, ref) < 1e-6


def test_plan():
    assert two_level_plan(16384 + 1) == (65536, 2, 32768)
    assert two_level_plan(1 << 22) == (1 << 23, 256, 32768)
    assert two_level_plan(1 << 22, max_n2=16384) == (1 << 23, 512, 16384)
    assert two_level_plan(1000, n2=128) == (2048, 16, 128)
    with pytest.raises(ValueError):
        two_level_plan(1000, n2=2048)  # N1 = 1
    with pytest.raises(ValueError):
        two_level_plan(1 << 24)  # N = 2^25


# (L, N2, B, H) -> N = N1 x N2 with the outer plan: 2048 = 16 x 128 (one radix-16 stage),
# 4096 = 32 x 128 (16 x 2), 8192 = 64 x 128 (16 x 4), 512 = 2 x 256 (radix 2 only), 1024 =
# 8 x 128 (radix 8 only), 2048 = 128 x 16 (16 x 8; N2 = 16: one inner stage), 2048 = 64 x 32
# (inner 16 x 2). Emulation time grows with the rows of pass B (pairs * H * N1): big N1 run
# with one pair and one channel.
LONG_CASES = [(1000, 128, 3, 2), (2000, 128, 3, 1), (4000, 128, 2, 1), (200, 256, 3, 2),
              (500, 128, 3, 2), (1000, 16, 2, 1), (700, 32, 2, 1)]


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("L,N2,B,H", LONG_CASES)
def test_long_fwd(L, N2, B, H, dtype):
    rng = np.random.default_rng(L * 7 + N2)
    u, k, D, _, _ = make(rng, B, H, L, dtype)
    y = run_long(u, k, dtype, N2, D=D)
    N, N1, _ = two_level_plan(L, n2=N2)
    check(y, ref_fftconv(u, k, D), dtype, "L=%d N=%d=%dx%d %s" % (L, N, N1, N2, dtype))


@pytest.mark.slow  # 512 pass-B rows: ~6 s alone on 2 cores
def test_long_fwd_three_outer_stages():
    # N = 8192 = 512 x 16: the outer transform is 16 x 16 x 2 (a middle stage with twiddles).
    rng = np.random.default_rng(8)
    u, k, D, _, _ = make(rng, 2, 1, 4096, "f32")
    y = run_long(u, k, "f32", 16, D=D)
    check(y, ref_fftconv(u, k, D), "f32", "N=8192=512x16 f32")


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_long_gates_tiles_pairs(dtype):
    # Gates, odd B (a half pair), and C = 16 columns per outer tile with num_sms = 1 (CTAs loop
    # over (pair, tile) and (pair, row) items).
    rng = np.random.default_rng(11)
    u, k, D, gi, go = make(rng, 5, 1, 1500, dtype, gates=True)
    y = run_long(u, k, dtype, 128, D=D, g_in=gi, g_out=go, C=16)
    check(y, ref_fftconv(u, k, D, gi, go), dtype, "gates tiles pairs %s" % dtype)


def test_long_short_kernel_bidirectional_no_D():
    rng = np.random.default_rng(12)
    u, _, _, _, _ = make(rng, 2, 1, 900, "bf16", D=False)
    k = rng.standard_normal((1, 13))
    k_rev = rng.standard_normal((1, 40)) / 6
    y = run_long(u, k, "bf16", 128, k_rev=k_rev)
    check(y, ref_fftconv(u, k, k_rev=k_rev), "bf16", "Lk=13 + k_rev, no D")


def test_long_large_values():
    # bf16 values far beyond fp16's range: pass B's row scale keeps fp16 storage finite.
    rng = np.random.default_rng(3)
    u = round_bf16(rng.standard_normal((2, 1, 1000)) * 1e30)
    k = np.ones((1, 1000)) * 3.0
    y = run_long(u, k, "bf16", 128)
    check(y, ref_fftconv(u, k), "bf16", "large values")


def test_long_large_values_f32():
    # float32 values whose unscaled inner transform would overflow (gain ~N2 each way on
    # constant data: 2e33 * 1024 * 1024 > 3.4e38): pass B scales each row by a power of two.
    rng = np.random.default_rng(13)
    u = (rng.standard_normal((2, 1, 1000)) * 1e33).astype(np.float32).astype(np.float64)
    u[1] = 2e33
    k = np.ones((1, 1000)) / 1000
    y = run_long(u, k, "f32", 1024)
    check(y, ref_fftconv(u, k), "f32", "large values f32")


def test_long_overflow_retry():
    # fp16 store limit lowered to 8: constant rows overflow pass B's stages; right only if the
    # rows are redone at a smaller scale.
    rng = np.random.default_rng(4)
    u = np.concatenate([np.ones((2, 1, 1024)), round_bf16(rng.standard_normal((2, 1, 1024)))])
    k = round_bf16(rng.standard_normal((1, 1024))) / 32
    y = run_long(u, k, "bf16", 128, variant="fp16limit8")
    check(y, ref_fftconv(u, k), "bf16", "overflow retry")


def test_long_bad_plan_rejected():
    rng = np.random.default_rng(5)
    u, k, _, _, _ = make(rng, 1, 1, 100, "f32", D=False)
    K, k_exp = long_spectrum(k, 100, 16, 16)
    r = emu.run("fftconv_long_f32", {"u": to_io(u, "f32"), "K": np.stack([K.real, K.imag], -1)
                                     .astype(np.float32), "k_exp": k_exp},
                params={"B": 1, "H": 1, "L": 100, "N1": 16, "N2": 8}, check=False)
    assert r.returncode == 3  # N2 < 16: launcher says invalid value


@pytest.mark.parametrize("variant", ["tsan"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_long_sanitizers(variant, dtype):
    rng = np.random.default_rng(1)
    u, k, D, gi, go = make(rng, 2, 1, 100, dtype, gates=True)  # N = 256 = 16 x 16, 2 tiles
    y = run_long(u, k, dtype, 16, D=D, g_in=gi, g_out=go, variant=variant, C=8)
    check(y, ref_fftconv(u, k, D, gi, go), dtype, "%s %s" % (variant, dtype))


# --- the torch entry point, with the extension faked on the CPU -------------------------------

class _FakeExt:
    """Stands in for flashconv._C: reads the tensors the wrapper passes (addresses, strides in
    elements) and computes y with the numpy mirror from the K, k_exp and D it was given, so
    argument order, strides, the K layout and the chunking are checked without a GPU."""

    def __init__(self):
        self.calls = []

    def max_shared_memory(self, device):
        return 227 * 1024

    @staticmethod
    def _view(addr, shape, strides, dtype):
        import ctypes
        dt = np.dtype(dtype)
        n = 1 + sum((s - 1) * st for s, st in zip(shape, strides))
        buf = (ctypes.c_char * (n * dt.itemsize)).from_address(addr)
        a = np.frombuffer(buf, dtype=dt, count=n)
        return np.lib.stride_tricks.as_strided(a, shape, [st * dt.itemsize for st in strides])

    def fftconv_long_fwd(self, u, g_in, g_out, y, K, k_exp, D, ws, B, H, L, N1, N2, u_s, gi_s,
                         go_s, y_s, dtype, device, stream, act=0, mask=0, mask_strides=(0, 0, 0)):
        self.calls.append((B, H))
        io = {0: np.float32, 1: np.float16}[dtype]
        shp = (B, H, L)
        uu = self._view(u, shp, u_s, io).astype(np.float64)
        gi = None if g_in == 0 else self._view(g_in, shp, gi_s, io).astype(np.float64)
        go = None if g_out == 0 else self._view(g_out, shp, go_s, io).astype(np.float64)
        Kv = self._view(K, (H, N1, N2, 2), (N1 * N2 * 2, N2 * 2, 2, 1), np.float32)
        spec = (Kv[..., 0] + 1j * Kv[..., 1], self._view(k_exp, (H,), (1,), np.int32).copy())
        Dv = None if D == 0 else self._view(D, (H,), (1,), np.float32).astype(np.float64)
        assert ws != 0
        out = two_level_reference(uu, None, Dv, gi, None, N1, N2, spectrum=spec)
        out = activation_fn({0: None, 1: "gelu", 2: "silu"}[act])[0](out)
        if mask:  # float32, read through the strides the wrapper passed (0 along L: (B, H))
            out = out * self._view(mask, shp, mask_strides, np.float32)
        if go is not None:
            out = out * go
        yv = self._view(y, shp, y_s, io)
        yv[...] = out.astype(io)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_entry_point_fake_extension(monkeypatch, dtype):
    torch = pytest.importorskip("torch")
    import types
    from flashconv import _ext, _long

    fake = _FakeExt()
    monkeypatch.setattr(_ext, "extension", lambda: fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    tdt = getattr(torch, dtype)
    rng = np.random.default_rng(6)
    B, H, L = 5, 3, 3000
    u = torch.from_numpy(rng.standard_normal((B, H, 2 * L))).to(tdt)[..., ::2]  # strided
    k = torch.from_numpy(rng.standard_normal((H, L)) / np.sqrt(L)).float()
    D = torch.from_numpy(rng.standard_normal(H)).float()
    gi = torch.from_numpy(rng.standard_normal((B, H, L))).to(tdt)
    go = torch.from_numpy(rng.standard_normal((B, H, L))).to(tdt)
    N, N1, N2 = _long.two_level_plan(L, n2=1024)
    # Workspace for 2 (pair, channel) rows: chunks of 2 channels x 1 pair.
    y = _long.fftconv_long_forward(u, k, D, gi, go, n2=1024, max_workspace_bytes=2 * 8 * N)
    assert fake.calls == [(2, 2), (2, 1), (2, 2), (2, 1), (1, 2), (1, 1)]
    ref = ref_fftconv(u.double().numpy(), k.double().numpy(), D.double().numpy(),
                      gi.double().numpy(), go.double().numpy())
    key = {"float32": "f32", "float16": "f16"}[dtype]
    check(y.double().numpy(), ref, key, "entry point, fake extension, %s" % dtype)
    # A precomputed spectrum (torch path of long_spectrum) gives the same result.
    spec = _long.long_spectrum(k, L, N1, N2)
    y2 = _long.fftconv_long_forward(u, k, D, gi, go, n2=1024, spectrum=spec)
    assert torch.equal(y, y2)
    # The epilogue's arguments: the activation code, a strided (B, H) mask (stride 0 along L)
    # and a float16 (B, H, L) mask (converted to float32), chunked like the rest.
    wide = torch.from_numpy((rng.random((B, 2 * H)) > 0.2) / 0.8).float()
    for act, m in (("gelu", wide[:, ::2]), ("silu", torch.from_numpy(rng.random((B, H, L))).half())):
        y3 = _long.fftconv_long_forward(u, k, D, gi, go, n2=1024, max_workspace_bytes=2 * 8 * N,
                                        activation=act, dropout_mask=m)
        ref = ref_fftconv(u.double().numpy(), k.double().numpy(), D.double().numpy(),
                          gi.double().numpy(), go.double().numpy(), activation=act,
                          dropout_mask=m.float().double().numpy())
        check(y3.double().numpy(), ref, key, "entry point, fake extension, %s %s" % (dtype, act))
