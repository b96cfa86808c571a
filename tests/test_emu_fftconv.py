"""The fused forward kernel, unchanged, under the CPU SIMT emulation (tests/emu) vs python_ref.

Every dtype and every plan family (N = 16^a * r, r in 1, 2, 4, 8) on small shapes, with and
without D and gates, strided u, odd B, and a grid that makes CTAs loop over batch pairs. The
ThreadSanitizer and AddressSanitizer builds run a smaller set. Rule: rel L2 error vs float64
within 2x the error of rounding the exact result to the io dtype (what the torch.fft reference
at that dtype achieves) plus a float32 compute term; the bf16 tensor-core path is also held to
python_ref's stage-by-stage emulation of it.
"""
import numpy as np
import pytest

from flashconv.plan import fragment_spectrum, fused_fft_size, monarch_perm
from python_ref.blockfft import blockfft_conv
from python_ref.conv import fftconv as ref_fftconv
from python_ref.rounding import round_bf16, round_fp16

from tests.emu import build as emu

pytestmark = pytest.mark.emu

CASE = {"f32": "fftconv_fwd_f32", "f16": "fftconv_fwd_f16", "bf16": "fftconv_fwd_bf16"}
ROUND = {"f32": lambda a: a.astype(np.float32).astype(np.float64), "f16": round_fp16, "bf16": round_bf16}


def to_io(a, dtype):
    """float64 array -> what the driver reads for dtype (bf16 as raw uint16 bits)."""
    if dtype == "f32":
        return a.astype(np.float32)
    if dtype == "f16":
        return a.astype(np.float16)
    return (round_bf16(a).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def from_io(a, dtype):
    if dtype == "bf16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def spectrum(k, L, N, k_rev=None):
    """The kernel's K: FFT of k (truncated to L) in Monarch order, scaled per channel;
    bidirectional: FFT(k) + conj(FFT(k_rev))."""
    K = np.fft.fft(k[:, :L], n=N)
    if k_rev is not None:
        K = K + np.conj(np.fft.fft(k_rev[:, :L], n=N))
    K = K[:, monarch_perm(N)]
    _, e = np.frexp(np.abs(K).max(axis=1))
    K = K * np.ldexp(1.0, -e)[:, None]
    return np.stack([K.real, K.imag], -1).astype(np.float32), e.astype(np.int32)


def spectrum_inputs(k, L, N, dtype, k_rev=None):
    """The forward kernel's spectrum inputs: K and k_exp, and for bf16 the tensor-core kernel's
    fp16 fragment-order K16."""
    K, k_exp = spectrum(k, L, N, k_rev)
    out = {"K": K, "k_exp": k_exp}
    if dtype == "bf16":
        out["K16"] = fragment_spectrum(K[..., 0] + 1j * K[..., 1]).view(np.uint16)
    return out


def epilogue_params(B, H, L, act, mask):
    """The driver's inputs and params for the fused epilogue (tests/test_emu_epilogue.py): the
    activation code, the mask as float32 with its (B, H, L) strides (0 along L for (B, H))."""
    params = {"act": {None: 0, "gelu": 1, "silu": 2}[act]}
    inputs = {}
    if mask is not None:
        inputs["mask"] = mask.astype(np.float32).reshape(-1)
        params.update(has_mask=1, mask_sb=H * (L if mask.ndim == 3 else 1),
                      mask_sh=L if mask.ndim == 3 else 1, mask_st=1 if mask.ndim == 3 else 0)
    return inputs, params


def run_case(case, inputs, variant, sm, params, counters=None):
    """The driver's outputs for one case; counters: a list that gets its per-launch counters."""
    res = emu.run(case, inputs, variant, sm=sm, params=params, counters=counters is not None)
    if counters is not None:
        counters.extend(res.counters)
    return res.outputs


def u_layout(B, H, L, strided):
    """How u (and the gates, which share its strides) are laid out for the driver: (spread, the
    stride params, offset). strided: every other element of a (B, H, 2L+1) buffer, starting
    one element in (so not 16-byte aligned either); else dense."""
    if not strided:
        return (lambda a: a), {"u_sb": H * L, "u_sh": L, "u_st": 1}, 0

    def spread(a):
        buf = np.zeros((B, H, 2 * L + 1))
        buf[..., 1::2] = a
        return buf
    return spread, {"u_sb": H * (2 * L + 1), "u_sh": 2 * L + 1, "u_st": 2}, 1


def run_fwd(u, k, dtype, D=None, g_in=None, g_out=None, strided=False, variant="plain", num_sms=1,
            k_rev=None, sm=80, act=None, mask=None, want_z=False, counters=None):
    """Run the emulated kernel; u etc. are float64 values already representable in dtype.
    act / mask: the fused epilogue; want_z: return the float32 pre-activation z instead of y
    (g_out may then be None with g_in given). counters: a list that gets the emulator's
    per-launch counters."""
    B, H, L = u.shape
    N = fused_fft_size(L)
    spread, strides, off = u_layout(B, H, L, strided)
    inputs = {"u": to_io(spread(u), dtype).reshape(-1)[off:], **spectrum_inputs(k, L, N, dtype, k_rev)}
    params = {"B": B, "H": H, "L": L, "N": N, "num_sms": num_sms, **strides}
    if D is not None:
        inputs["D"] = D.astype(np.float32)
        params["has_D"] = 1
    if g_in is not None:
        go = g_out if g_out is not None else np.ones_like(g_in)
        inputs["g_in"] = to_io(spread(g_in), dtype).reshape(-1)[off:]
        inputs["g_out"] = to_io(spread(go), dtype).reshape(-1)[off:]
        params["has_gates"] = 1
    ei, ep = epilogue_params(B, H, L, act, mask)
    params.update(ep, want_z=int(want_z))
    out = run_case(CASE[dtype], {**inputs, **ei}, variant, sm, params, counters)
    return out["z"].astype(np.float64) if want_z else from_io(out["y"], dtype)


def rel_err(y, ref):
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))


def make(rng, B, H, L, dtype, D=True, gates=False):
    rnd = ROUND[dtype]
    u = rnd(rng.standard_normal((B, H, L)))
    k = rng.standard_normal((H, L)) / np.sqrt(L)
    Dv = rnd(rng.standard_normal(H)).astype(np.float32).astype(np.float64) if D else None
    gi = rnd(rng.standard_normal((B, H, L))) if gates else None
    go = rnd(rng.standard_normal((B, H, L))) if gates else None
    return u, k, Dv, gi, go


def check(y, u, k, D, gi, go, dtype, what):
    assert np.isfinite(y).all(), "%s: non-finite or unwritten outputs" % what
    ref = ref_fftconv(u, k, D, gi, go)
    err = rel_err(y, ref)
    floor = rel_err(ROUND[dtype](ref), ref)
    bound = 2 * floor + 5e-7
    print("%s: rel err %.3g, io rounding floor %.3g, bound %.3g" % (what, err, floor, bound))
    assert err <= bound
    return err, ref


# L values whose N cover every plan family: N = 32 (16x2), 64 (16x4), 128 (16x8),
# 256 (16x16), 512 (16x16x2), 2048 (16x16x8), 4096 (16x16x16).
PLAN_LENGTHS = [1, 17, 33, 100, 128, 255, 1000, 2048]


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("L", PLAN_LENGTHS)
def test_fwd_plans(L, dtype):
    rng = np.random.default_rng(L)
    u, k, D, _, _ = make(rng, 3, 2, L, dtype)
    y = run_fwd(u, k, dtype, D=D)
    err, _ = check(y, u, k, D, None, None, dtype, "L=%d N=%d %s" % (L, fused_fft_size(L), dtype))
    if dtype == "bf16" and L >= 17:
        # The tensor-core path against python_ref's emulation of it (fp16 operands).
        mirror = blockfft_conv(u, k, D, precision="fp16", io_dtype="bf16", plan=None)
        m_err = rel_err(mirror, ref_fftconv(u, k, D))
        print("  python_ref mirror (fp16 operands): %.3g" % m_err)
        assert err <= 1.5 * m_err + 1e-6


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_fwd_gates_strided_no_D(dtype):
    rng = np.random.default_rng(5)
    u, k, D, gi, go = make(rng, 5, 3, 300, dtype, gates=True)
    y = run_fwd(u, k, dtype, D=D, g_in=gi, g_out=go, strided=True)
    check(y, u, k, D, gi, go, dtype, "gates strided %s" % dtype)
    u, k, _, _, _ = make(rng, 2, 2, 77, dtype, D=False)
    y = run_fwd(u, k, dtype)
    check(y, u, k, None, None, None, dtype, "no D %s" % dtype)


def test_fwd_pairs_loop_and_short_kernel():
    # num_sms=1 with H=1 gives 4 CTAs per channel: CTAs loop over the 6 pairs of B=11 (odd).
    rng = np.random.default_rng(9)
    u, _, D, _, _ = make(rng, 11, 1, 200, "bf16")
    k = rng.standard_normal((1, 13))  # Lk < L: zero-extended
    y = run_fwd(u, k, "bf16", D=D, num_sms=1)
    check(y, u, k, D, None, None, "bf16", "pairs loop, Lk=13")


def test_fwd_large_values():
    # bf16 values far beyond fp16's range: the kernel's row scaling keeps fp16 storage finite.
    rng = np.random.default_rng(3)
    u = round_bf16(rng.standard_normal((2, 1, 512)) * 1e30)
    k = np.ones((1, 512)) * 3.0
    y = run_fwd(u, k, "bf16")
    check(y, u, k, None, None, None, "bf16", "large values")


def test_fwd_overflow_retry():
    # With the fp16 store limit lowered to 8, constant rows overflow it in the forward stages
    # (a store above the limit is clamped and flagged): the output is right only if the kernel
    # redoes those pairs at a smaller scale. Random rows stay under the limit.
    rng = np.random.default_rng(4)
    u = np.concatenate([np.ones((2, 1, 2048)), round_bf16(rng.standard_normal((2, 1, 2048)))])
    k = round_bf16(rng.standard_normal((1, 2048))) / 45
    y = run_fwd(u, k, "bf16", variant="fp16limit8")
    check(y, u, k, None, None, None, "bf16", "overflow retry")


@pytest.mark.parametrize("variant", ["tsan", "asan"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_fwd_sanitizers(variant, dtype):
    rng = np.random.default_rng(1)
    u, k, D, gi, go = make(rng, 3, 2, 100, dtype, gates=True)
    y = run_fwd(u, k, dtype, D=D, g_in=gi, g_out=go, strided=True, variant=variant)
    check(y, u, k, D, gi, go, dtype, "%s %s" % (variant, dtype))


# --- backward ---------------------------------------------------------------------------

BWD_CASE = {"f32": "fftconv_bwd_f32", "f16": "fftconv_bwd_f16", "bf16": "fftconv_bwd_bf16"}


def run_bwd(u, k, dy, dtype, D=None, g_in=None, g_out=None, variant="plain", num_sms=1,
            k_rev=None, sm=80, gate32=None, strided=False, dg_out=True, counters=None):
    """Run the emulated backward kernel: dict of du, dk, dD, dg_in, dg_out (float64). gate32:
    a float32 (B, H, L) factor read in g_out's place (the fused epilogue's backward; g_in and
    g_out must be given, g_out unused; no dg_out then). strided: u and the gates laid out as
    u_layout says (dy stays dense). dg_out=False: gates without dg_out wanted. counters: a list
    that gets the emulator's per-launch counters."""
    B, H, L = u.shape
    N = fused_fft_size(L)
    lk = min(k.shape[1], L)
    spread, strides, off = u_layout(B, H, L, strided)
    inputs = {"u": to_io(spread(u), dtype).reshape(-1)[off:], "dy": to_io(dy, dtype),
              **spectrum_inputs(k, L, N, dtype, k_rev)}
    params = {"B": B, "H": H, "L": L, "N": N, "lk": lk, "num_sms": num_sms, **strides}
    if k_rev is not None:
        params["lk_rev"] = min(k_rev.shape[1], L)
    if D is not None:
        inputs["D"] = D.astype(np.float32)
        params["has_D"] = 1
    if g_in is not None:
        inputs["g_in"] = to_io(spread(g_in), dtype).reshape(-1)[off:]
        inputs["g_out"] = to_io(spread(g_out), dtype).reshape(-1)[off:]
        params["has_gates"] = 1
        params["no_dg_out"] = int(not dg_out)
    if gate32 is not None:
        inputs["g_out32"] = np.ascontiguousarray(gate32, np.float32).reshape(-1)
        params["gate32"] = 1
    out = run_case(BWD_CASE[dtype], inputs, variant, sm, params, counters)
    return {key: (from_io(v, dtype) if key in ("du", "dg_in", "dg_out") else v.astype(np.float64))
            for key, v in out.items()}


def check_grads(g, u, k, dy, D, gi, go, dtype, what, k_rev=None, activation=None,
                dropout_mask=None):
    from python_ref.conv import fftconv_grads
    ref = fftconv_grads(u, k, dy, D, gi, go, k_rev=k_rev, activation=activation,
                        dropout_mask=dropout_mask)
    L = u.shape[-1]
    errs = {}
    for key, val in g.items():
        r = ref[key][:, :min(ref[key].shape[1], L)] if key in ("dk", "dk_rev") else ref[key]
        assert np.isfinite(val).all(), "%s %s: non-finite or unwritten" % (what, key)
        err = rel_err(val, r)
        # io-dtype outputs: 2x their rounding floor; dk and dD are float32 accumulations.
        floor = rel_err(ROUND[dtype](r), r) if key in ("du", "dg_in", "dg_out") else 0.0
        bound = 2 * floor + (BWD_F32_TERM[dtype] if key in ("dk", "dk_rev", "dD") else 5e-7)
        print("%s %s: rel err %.3g (floor %.3g, bound %.3g)" % (what, key, err, floor, bound))
        errs[key] = err
        assert err <= bound
    return errs


# Error allowed in the float32 accumulations dk and dD beyond their own rounding: fp32 stages
# give float32-class results; the bf16 path's fp16 tensor-core operands give ~1e-3.
BWD_F32_TERM = {"f32": 2e-6, "f16": 2e-6, "bf16": 4e-3}


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("L,Lk", [(17, 17), (100, 30), (255, 255), (1000, 1000)])
def test_bwd(L, Lk, dtype):
    rng = np.random.default_rng(L + Lk)
    u, k, D, gi, go = make(rng, 3, 2, L, dtype, gates=True)
    k = rng.standard_normal((2, Lk)) / np.sqrt(Lk)
    dy = ROUND[dtype](rng.standard_normal((3, 2, L)))
    g = run_bwd(u, k, dy, dtype, D=D, g_in=gi, g_out=go)
    assert set(g) == {"du", "dk", "dD", "dg_in", "dg_out"}
    check_grads(g, u, k, dy, D, gi, go, dtype, "bwd L=%d Lk=%d %s" % (L, Lk, dtype))


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_bidirectional(dtype):
    # LRA-style non-causal convolution: K = FFT(k) + conj(FFT(k_rev)), forward and backward.
    rng = np.random.default_rng(12)
    u, k, D, gi, go = make(rng, 3, 2, 150, dtype, gates=True)
    k_rev = rng.standard_normal((2, 90)) / np.sqrt(90)
    from python_ref.conv import fftconv as ref_conv
    y = run_fwd(u, k, dtype, D=D, g_in=gi, g_out=go, k_rev=k_rev)
    ref = ref_conv(u, k, D, gi, go, k_rev=k_rev)
    err, floor = rel_err(y, ref), rel_err(ROUND[dtype](ref), ref)
    print("bidirectional fwd %s: rel err %.3g (floor %.3g)" % (dtype, err, floor))
    assert err <= 2 * floor + 5e-7
    dy = ROUND[dtype](rng.standard_normal((3, 2, 150)))
    g = run_bwd(u, k, dy, dtype, D=D, g_in=gi, g_out=go, k_rev=k_rev)
    assert "dk_rev" in g
    check_grads(g, u, k, dy, D, gi, go, dtype, "bidirectional bwd %s" % dtype, k_rev=k_rev)


def test_bwd_no_gates_no_D_pairs_loop():
    rng = np.random.default_rng(2)
    u, k, _, _, _ = make(rng, 7, 1, 300, "bf16", D=False)
    dy = round_bf16(rng.standard_normal((7, 1, 300)))
    g = run_bwd(u, k, dy, "bf16", num_sms=1)
    assert set(g) == {"du", "dk"}
    check_grads(g, u, k, dy, None, None, None, "bf16", "bwd pairs loop")


@pytest.mark.parametrize("variant", ["tsan", "asan"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_bwd_sanitizers(variant, dtype):
    rng = np.random.default_rng(4)
    u, k, D, gi, go = make(rng, 3, 1, 40, dtype, gates=True)
    dy = ROUND[dtype](rng.standard_normal((3, 1, 40)))
    g = run_bwd(u, k, dy, dtype, D=D, g_in=gi, g_out=go, variant=variant)
    check_grads(g, u, k, dy, D, gi, go, dtype, "bwd %s %s" % (variant, dtype))


def test_bwd_overflow_retry():
    # The backward's overflow path (as test_fwd_overflow_retry): constant rows overflow fp16 at
    # the lowered limit; every gradient is right only if the pairs are redone before their dk
    # is added.
    rng = np.random.default_rng(6)
    L = 1024
    u = np.concatenate([np.ones((2, 1, L)), round_bf16(rng.standard_normal((1, 1, L)))])
    k = round_bf16(rng.standard_normal((1, L))) / 32
    dy = np.concatenate([np.ones((2, 1, L)), round_bf16(rng.standard_normal((1, 1, L)))])
    D = np.array([0.5])
    g = run_bwd(u, k, dy, "bf16", D=D, variant="fp16limit8")
    check_grads(g, u, k, dy, D, None, None, "bf16", "bwd overflow retry")


# The bf16 backward at N = 16K without dg_out runs on tensor cores with u and dy read from
# global memory (bwd_tc.h: not staged); with dg_out it is the fp32-stage kernel. Odd B, odd L,
# gates with and without dg_out, strided and misaligned u and gates (the element-by-element
# reads), k_rev (negative lags), and the overflow retry. (sm = 90: the rows need 192 KB.)
@pytest.mark.parametrize("strided", [False, True])
def test_bwd_unstaged_16k(strided):
    rng = np.random.default_rng(16 + strided)
    L = 4999 if strided else 8192
    u, k, D, gi, go = make(rng, 3, 1, L, "bf16", gates=True)
    dy = round_bf16(rng.standard_normal((3, 1, L)))
    g = run_bwd(u, k, dy, "bf16", D=D, g_in=gi, g_out=go, strided=strided, dg_out=False, sm=90)
    assert set(g) == {"du", "dk", "dD", "dg_in"}
    check_grads(g, u, k, dy, D, gi, go, "bf16", "bwd N=16K unstaged strided=%s" % strided)


def test_bwd_16k_dg_out_and_k_rev():
    rng = np.random.default_rng(17)
    L = 6000
    u, k, D, gi, go = make(rng, 2, 1, L, "bf16", gates=True)
    dy = round_bf16(rng.standard_normal((2, 1, L)))
    g = run_bwd(u, k, dy, "bf16", D=D, g_in=gi, g_out=go, sm=90)  # dg_out: fp32 stages
    assert "dg_out" in g
    check_grads(g, u, k, dy, D, gi, go, "bf16", "bwd N=16K dg_out")
    k_rev = rng.standard_normal((1, 700)) / np.sqrt(700)
    g = run_bwd(u, k, dy, "bf16", D=D, k_rev=k_rev, sm=90)  # no gates: tensor cores, unstaged
    assert set(g) == {"du", "dk", "dD", "dk_rev"}
    check_grads(g, u, k, dy, D, None, None, "bf16", "bwd N=16K k_rev", k_rev=k_rev)


@pytest.mark.parametrize("variant", ["asan", "fp16limit8"])
def test_bwd_unstaged_16k_variants(variant):
    rng = np.random.default_rng(18)
    L = 4200
    u, k, D, gi, go = make(rng, 3, 1, L, "bf16", gates=True)
    dy = round_bf16(rng.standard_normal((3, 1, L)))
    if variant == "fp16limit8":  # a constant row overflows fp16 at the lowered limit: redone
        u[0] = dy[0] = gi[0] = go[0] = 1.0
    stats = []
    g = run_bwd(u, k / 32, dy, "bf16", D=D, g_in=gi, g_out=go, dg_out=False, variant=variant, sm=90,
                strided=variant == "asan", counters=stats)  # (ASan: the element reads' bounds)
    check_grads(g, u, k / 32, dy, D, gi, go, "bf16", "bwd N=16K unstaged %s" % variant)
    # two iterations (pairs), each one pass -- and one more pass where the overflow was redone
    passes = sum(r["barriers"] for c in stats for r in c["regions"] if r["name"] == "overflow")
    assert passes == (3 if variant == "fp16limit8" else 2)


def gate_bytes_per_request(stats, names=("g_in", "g_out")):
    """Bytes per warp-level global load request of the gates, over every launch and region."""
    req = byt = 0
    for launch in stats:
        for region in launch["regions"]:
            for name, s in region["ldg"].items():
                if name in names:
                    req, byt = req + s["requests"], byt + s["bytes"]
    return byt / req


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_gate_loads_vectorised(kind):
    # Dense gates are read in runs of 2-8 elements (tc_core.h gate_vals: >= 4 bytes a lane, so
    # >= 128 bytes a request; element by element would be 64); strided ones element by element.
    rng = np.random.default_rng(21)
    u, k, D, gi, go = make(rng, 4, 1, 1000, "bf16", gates=True)
    dy = round_bf16(rng.standard_normal((4, 1, 1000)))
    per = {}
    for strided in (False, True):
        stats = []
        if kind == "fwd":
            y = run_fwd(u, k, "bf16", D=D, g_in=gi, g_out=go, strided=strided, counters=stats)
            check(y, u, k, D, gi, go, "bf16", "fwd gates strided=%s" % strided)
        else:
            g = run_bwd(u, k, dy, "bf16", D=D, g_in=gi, g_out=go, strided=strided, counters=stats)
            check_grads(g, u, k, dy, D, gi, go, "bf16", "bwd gates strided=%s" % strided)
        per[strided] = gate_bytes_per_request(stats)
    print("%s gate bytes per request: dense %.0f, strided %.0f" % (kind, per[False], per[True]))
    assert per[False] >= 128 and per[True] <= 64
