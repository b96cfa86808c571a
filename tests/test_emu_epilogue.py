"""The kernels' fused epilogue (y = g_out * m * act(conv + D x); flashconv/_epilogue.py) under
the CPU SIMT emulation (tests/emu), against python_ref in float64:

- the fused forward (fp32 stages for float32/float16, tensor cores for bfloat16) and the
  two-level forward with GELU / SiLU and a (B, H) or (B, H, L) float32 mask, gates and D;
- the backward as the CUDA engine runs it (flashconv/engines/cuda_fused.py): the forward
  kernel's float32 z output (the recompute), the factors gate = g_out m act'(z) and
  dg_out = dy m act(z) in float32 (numpy here, torch there), then the backward kernel with the
  float32 gate in g_out's place (dz formed in fp32 on chip);
- the ThreadSanitizer and AddressSanitizer builds on the new paths.

Rule as tests/test_emu_fftconv.py: rel L2 error <= 2x the io-dtype rounding floor of the exact
result + a float32 term (dk, dD: the backward's float32 accumulation term).
"""
import numpy as np
import pytest

from flashconv._long import long_spectrum, two_level_plan
from flashconv.plan import fused_fft_size
from python_ref.conv import activation_fn, fftconv as ref_fftconv
from python_ref.conv import fftconv_grads

from tests.emu import build as emu
from tests.test_emu_fftconv import (BWD_CASE, BWD_F32_TERM, CASE, ROUND, from_io, make, rel_err,
                                    spectrum_inputs, to_io)

pytestmark = pytest.mark.emu

ACT = {None: 0, "gelu": 1, "silu": 2}


def mask_for(rng, B, H, L, form):
    """A dropout mask as H3 makes it (0 or 1 / (1 - p), p = 0.17), float64; None for form None."""
    if form is None:
        return None
    shape = (B, H) if form == "BH" else (B, H, L)
    keep = rng.random(shape) >= 0.17
    return np.where(keep, np.float32(1 / 0.83), 0).astype(np.float32).astype(np.float64)


def epilogue_params(B, H, L, act, mask):
    """The driver's inputs and params for the epilogue: the mask as float32 with its (B, H, L)
    strides (0 along L for a (B, H) mask)."""
    params = {"act": ACT[act]}
    inputs = {}
    if mask is not None:
        inputs["mask"] = mask.astype(np.float32).reshape(-1)
        params.update(has_mask=1, mask_sb=H * (L if mask.ndim == 3 else 1),
                      mask_sh=L if mask.ndim == 3 else 1, mask_st=1 if mask.ndim == 3 else 0)
    return inputs, params


def run_fwd(u, k, dtype, D=None, g_in=None, g_out=None, act=None, mask=None, want_z=False,
            variant="plain", num_sms=1):
    """The emulated fused forward with the epilogue: y (float64 of the io values), or the
    float32 pre-activation z with want_z."""
    B, H, L = u.shape
    N = fused_fft_size(L)
    inputs = {"u": to_io(u, dtype).reshape(-1), **spectrum_inputs(k, L, N, dtype)}
    params = {"B": B, "H": H, "L": L, "N": N, "num_sms": num_sms, "u_sb": H * L, "u_sh": L,
              "u_st": 1, "want_z": int(want_z)}
    if D is not None:
        inputs["D"] = D.astype(np.float32)
        params["has_D"] = 1
    if g_in is not None:
        inputs["g_in"] = to_io(g_in, dtype).reshape(-1)
        inputs["g_out"] = to_io(g_out if g_out is not None else np.ones_like(g_in), dtype).reshape(-1)
        params["has_gates"] = 1
    ei, ep = epilogue_params(B, H, L, act, mask)
    out = emu.run(CASE[dtype], {**inputs, **ei}, variant, params={**params, **ep}).outputs
    return out["z"].astype(np.float64) if want_z else from_io(out["y"], dtype)


def check(y, ref, dtype, what, extra=5e-7):
    assert np.isfinite(y).all(), "%s: non-finite or unwritten outputs" % what
    err = rel_err(y, ref)
    floor = rel_err(ROUND[dtype](ref), ref)
    bound = 2 * floor + extra
    print("%s: rel err %.3g, io rounding floor %.3g, bound %.3g" % (what, err, floor, bound))
    assert err <= bound
    return err


# Forward cases: every dtype; L whose N covers the tensor-core forward's radix-r phases (N = 64:
# r = 4, 256: r = 1, 1024: r = 4, 2048: r = 8) and the fp32-stage plans; both activations,
# both mask forms, with and without gates.
FWD_CASES = [(33, "gelu", "BH", True), (100, "silu", "BHL", False), (300, "gelu", None, True),
             (1000, None, "BH", True), (1000, "silu", "BH", False)]


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("L,act,form,gates", FWD_CASES)
def test_fwd_epilogue(L, act, form, gates, dtype):
    rng = np.random.default_rng(L + 7 * ACT[act])
    B, H = 3, 2
    u, k, D, gi, go = make(rng, B, H, L, dtype, gates=gates)
    m = mask_for(rng, B, H, L, form)
    y = run_fwd(u, k, dtype, D, gi, go, act=act, mask=m)
    ref = ref_fftconv(u, k, D, gi, go, activation=act, dropout_mask=m)
    check(y, ref, dtype, "fwd L=%d %s %s gates=%s %s" % (L, act, form, gates, dtype))
    if form is not None:  # the mask really zeroes: dropped rows / elements are exactly 0
        assert (y[np.broadcast_to(m[..., None] if m.ndim == 2 else m, y.shape) == 0] == 0).all()


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_fwd_z_output(dtype):
    """The recompute: the float32 pre-activation conv + D x (no g_out, no epilogue)."""
    rng = np.random.default_rng(11)
    u, k, D, gi, _ = make(rng, 3, 2, 300, dtype, gates=True)
    z = run_fwd(u, k, dtype, D, gi, None, want_z=True)
    ref = ref_fftconv(u, k, D, gi, None)
    # float32 output: fp32-class for the fp32 stages; the bf16 tensor-core path carries its
    # fp16-operand error (below the bf16 rounding floor, as its y does).
    extra = 1e-6 if dtype != "bf16" else 2 * rel_err(ROUND["bf16"](ref), ref)
    check(z, ref, "f32", "z %s" % dtype, extra=extra)


def run_bwd_epilogue(u, k, dy, dtype, D, gi, go, act, mask, variant="plain"):
    """The CUDA engine's backward with the epilogue, emulated: z from the forward kernel, the
    float32 factors, then the backward kernel with the float32 gate. Returns the gradients
    (float64) including dg_out."""
    B, H, L = u.shape
    N = fused_fft_size(L)
    z = run_fwd(u, k, dtype, D, gi, None, want_z=True, variant=variant).astype(np.float32)
    a, da = (f(z.astype(np.float64)).astype(np.float32) for f in activation_fn(act))
    m3 = None if mask is None else (mask[..., None] if mask.ndim == 2 else mask).astype(np.float32)
    gate = da if act else np.ones_like(z)
    if m3 is not None:
        gate = gate * m3
    if go is not None:
        gate = gate * go.astype(np.float32)
    dgo = None
    if go is not None:
        dgo = ROUND[dtype]((a * dy.astype(np.float32) * (1 if m3 is None else m3)).astype(np.float64))
    inputs = {"u": to_io(u, dtype).reshape(-1), "dy": to_io(dy, dtype),
              "g_out32": np.ascontiguousarray(gate, np.float32).reshape(-1),
              **spectrum_inputs(k, L, N, dtype)}
    params = {"B": B, "H": H, "L": L, "N": N, "lk": min(k.shape[1], L), "num_sms": 1,
              "u_sb": H * L, "u_sh": L, "u_st": 1, "gate32": 1, "has_gates": 1}
    gi_ = gi if gi is not None else np.ones_like(u)
    inputs["g_in"] = to_io(gi_, dtype).reshape(-1)
    inputs["g_out"] = to_io(np.ones_like(u), dtype).reshape(-1)  # unused: g_out32 replaces it
    if D is not None:
        inputs["D"] = D.astype(np.float32)
        params["has_D"] = 1
    out = emu.run(BWD_CASE[dtype], inputs, variant, params=params).outputs
    assert "dg_out" not in out  # the kernel makes no dg_out with a float32 gate
    g = {key: (from_io(v, dtype) if key in ("du", "dg_in") else v.astype(np.float64))
         for key, v in out.items()}
    if gi is None:
        g.pop("dg_in")
    if dgo is not None:
        g["dg_out"] = dgo
    return g


def check_grads(g, ref, dtype, what, L):
    for key, val in g.items():
        r = ref[key][:, :min(ref[key].shape[1], L)] if key == "dk" else ref[key]
        assert np.isfinite(val).all(), "%s %s: non-finite or unwritten" % (what, key)
        err = rel_err(val, r)
        floor = rel_err(ROUND[dtype](r), r) if key in ("du", "dg_in", "dg_out") else 0.0
        bound = 2 * floor + (BWD_F32_TERM[dtype] if key in ("dk", "dD") else 5e-7)
        print("%s %s: rel err %.3g (floor %.3g, bound %.3g)" % (what, key, err, floor, bound))
        assert err <= bound, (what, key)


# Backward cases: the bf16 tensor-core backward (N = 256, 2048) and the fp32-stage kernels.
BWD_CASES = [(100, "gelu", "BH", True), (1000, "silu", "BHL", True), (300, None, "BH", False),
             (300, "gelu", None, False)]


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("L,act,form,gates", BWD_CASES)
def test_bwd_epilogue(L, act, form, gates, dtype):
    rng = np.random.default_rng(3 * L + ACT[act])
    B, H = 3, 2
    u, k, D, gi, go = make(rng, B, H, L, dtype, gates=gates)
    m = mask_for(rng, B, H, L, form)
    dy = ROUND[dtype](rng.standard_normal((B, H, L)))
    g = run_bwd_epilogue(u, k, dy, dtype, D, gi, go, act, m)
    ref = fftconv_grads(u, k, dy, D, gi, go, activation=act, dropout_mask=m)
    assert set(g) == {"du", "dk", "dD"} | ({"dg_in", "dg_out"} if gates else set())
    check_grads(g, ref, dtype, "bwd L=%d %s %s gates=%s %s" % (L, act, form, gates, dtype), L)


@pytest.mark.slow
def test_bwd_epilogue_bf16_n16k():
    """bf16 at N = 16K: the fp32-stage backward kernel (beyond the tensor-core backward's 8K)
    reads the float32 gate through gated<T>."""
    rng = np.random.default_rng(5)
    B, H, L = 2, 1, 5000
    u, k, D, gi, go = make(rng, B, H, L, "bf16", gates=True)
    m = mask_for(rng, B, H, L, "BH")
    dy = ROUND["bf16"](rng.standard_normal((B, H, L)))
    g = run_bwd_epilogue(u, k, dy, "bf16", D, gi, go, "gelu", m)
    ref = fftconv_grads(u, k, dy, D, gi, go, activation="gelu", dropout_mask=m)
    check_grads(g, ref, "bf16", "bwd bf16 N=16K gelu", L)


@pytest.mark.parametrize("variant", ["tsan", "asan"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_epilogue_sanitizers(variant, dtype):
    rng = np.random.default_rng(2)
    B, H, L = 3, 2, 100
    u, k, D, gi, go = make(rng, B, H, L, dtype, gates=True)
    m = mask_for(rng, B, H, L, "BH")
    y = run_fwd(u, k, dtype, D, gi, go, act="gelu", mask=m, variant=variant)
    check(y, ref_fftconv(u, k, D, gi, go, activation="gelu", dropout_mask=m), dtype,
          "fwd %s %s" % (variant, dtype))
    dy = ROUND[dtype](rng.standard_normal((B, H, L)))
    g = run_bwd_epilogue(u, k, dy, dtype, D, gi, go, "silu", m, variant=variant)
    ref = fftconv_grads(u, k, dy, D, gi, go, activation="silu", dropout_mask=m)
    check_grads(g, ref, dtype, "bwd %s %s" % (variant, dtype), L)


# --- the two-level forward ------------------------------------------------------------------

LONG_CASE = {"f32": "fftconv_long_f32", "f16": "fftconv_long_f16", "bf16": "fftconv_long_bf16"}


@pytest.mark.parametrize("dtype,act,form,variant", [("f32", "gelu", "BH", "plain"),
                                                    ("bf16", "silu", "BHL", "plain"),
                                                    ("f16", "gelu", "BHL", "plain"),
                                                    ("bf16", "gelu", "BH", "asan"),
                                                    ("f32", "silu", "BH", "tsan")])
def test_long_epilogue(dtype, act, form, variant):
    rng = np.random.default_rng(ACT[act] + len(form))
    B, H, L = 3, 2, 1000
    u, k, D, gi, go = make(rng, B, H, L, dtype, gates=True)
    m = mask_for(rng, B, H, L, form)
    N, N1, N2 = two_level_plan(L, n2=128)
    K, k_exp = long_spectrum(k, L, N1, N2)
    inputs = {"u": to_io(u, dtype), "K": np.stack([K.real, K.imag], -1).astype(np.float32),
              "k_exp": k_exp, "D": D.astype(np.float32), "g_in": to_io(gi, dtype),
              "g_out": to_io(go, dtype)}
    params = {"B": B, "H": H, "L": L, "N1": N1, "N2": N2, "num_sms": 1, "has_D": 1,
              "has_gates": 1}
    ei, ep = epilogue_params(B, H, L, act, m)
    y = from_io(emu.run(LONG_CASE[dtype], {**inputs, **ei}, variant, params={**params, **ep})
                .outputs["y"], dtype)
    check(y, ref_fftconv(u, k, D, gi, go, activation=act, dropout_mask=m), dtype,
          "long %s %s %s %s" % (dtype, act, form, variant))
