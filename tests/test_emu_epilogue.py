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

from python_ref.conv import activation_fn, fftconv as ref_fftconv

from tests.test_emu_fftconv import ROUND, check_grads, make, rel_err, run_bwd, run_fwd
from tests.test_emu_long import check, run_long

pytestmark = pytest.mark.emu

ACT = {None: 0, "gelu": 1, "silu": 2}


def mask_for(rng, B, H, L, form):
    """A dropout mask as H3 makes it (0 or 1 / (1 - p), p = 0.17), float64; None for form None."""
    if form is None:
        return None
    shape = (B, H) if form == "BH" else (B, H, L)
    keep = rng.random(shape) >= 0.17
    return np.where(keep, np.float32(1 / 0.83), 0).astype(np.float32).astype(np.float64)


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
    y = run_fwd(u, k, dtype, D=D, g_in=gi, g_out=go, act=act, mask=m)
    ref = ref_fftconv(u, k, D, gi, go, activation=act, dropout_mask=m)
    check(y, ref, dtype, "fwd L=%d %s %s gates=%s %s" % (L, act, form, gates, dtype))
    if form is not None:  # the mask really zeroes: dropped rows / elements are exactly 0
        assert (y[np.broadcast_to(m[..., None] if m.ndim == 2 else m, y.shape) == 0] == 0).all()


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_fwd_z_output(dtype):
    """The recompute: the float32 pre-activation conv + D x (no g_out, no epilogue)."""
    rng = np.random.default_rng(11)
    u, k, D, gi, _ = make(rng, 3, 2, 300, dtype, gates=True)
    z = run_fwd(u, k, dtype, D=D, g_in=gi, want_z=True)
    ref = ref_fftconv(u, k, D, gi, None)
    # float32 output: fp32-class for the fp32 stages; the bf16 tensor-core path carries its
    # fp16-operand error (below the bf16 rounding floor, as its y does).
    extra = 1e-6 if dtype != "bf16" else 2 * rel_err(ROUND["bf16"](ref), ref)
    check(z, ref, "f32", "z %s" % dtype, extra=extra)


def run_bwd_epilogue(u, k, dy, dtype, D, gi, go, act, mask, variant="plain", sm=80):
    """The CUDA engine's backward with the epilogue, emulated: z from the forward kernel, the
    float32 factors, then the backward kernel with the float32 gate. Returns the gradients
    (float64) including dg_out."""
    z = run_fwd(u, k, dtype, D=D, g_in=gi, want_z=True, variant=variant, sm=sm).astype(np.float32)
    a, da = (f(z.astype(np.float64)).astype(np.float32) for f in activation_fn(act))
    m3 = None if mask is None else (mask[..., None] if mask.ndim == 2 else mask).astype(np.float32)
    gate = da if act else np.ones_like(z)
    if m3 is not None:
        gate = gate * m3
    if go is not None:
        gate = gate * go.astype(np.float32)
    ones = np.ones_like(u)  # g_in when absent; g_out is unused (the float32 gate replaces it)
    g = run_bwd(u, k, dy, dtype, D=D, g_in=gi if gi is not None else ones, g_out=ones,
                variant=variant, gate32=gate, sm=sm)
    assert "dg_out" not in g  # the kernel makes no dg_out with a float32 gate
    if gi is None:
        g.pop("dg_in")
    if go is not None:
        g["dg_out"] = ROUND[dtype]((a * dy.astype(np.float32) * (1 if m3 is None else m3))
                                   .astype(np.float64))
    return g


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
    assert set(g) == {"du", "dk", "dD"} | ({"dg_in", "dg_out"} if gates else set())
    check_grads(g, u, k, dy, D, gi, go, dtype, "bwd L=%d %s %s gates=%s %s" % (
        L, act, form, gates, dtype), activation=act, dropout_mask=m)


@pytest.mark.slow
def test_bwd_epilogue_bf16_n16k():
    """bf16 at N = 16K: the tensor-core backward without stagings (no dg_out with the float32
    gate) reads u, dy and the float32 gate from global memory (sm = 90: 192 KB of rows)."""
    rng = np.random.default_rng(5)
    B, H, L = 2, 1, 5000
    u, k, D, gi, go = make(rng, B, H, L, "bf16", gates=True)
    m = mask_for(rng, B, H, L, "BH")
    dy = ROUND["bf16"](rng.standard_normal((B, H, L)))
    g = run_bwd_epilogue(u, k, dy, "bf16", D, gi, go, "gelu", m, sm=90)
    check_grads(g, u, k, dy, D, gi, go, "bf16", "bwd bf16 N=16K gelu", activation="gelu",
                dropout_mask=m)


@pytest.mark.parametrize("variant", ["tsan", "asan"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_epilogue_sanitizers(variant, dtype):
    rng = np.random.default_rng(2)
    B, H, L = 3, 2, 100
    u, k, D, gi, go = make(rng, B, H, L, dtype, gates=True)
    m = mask_for(rng, B, H, L, "BH")
    y = run_fwd(u, k, dtype, D=D, g_in=gi, g_out=go, act="gelu", mask=m, variant=variant)
    check(y, ref_fftconv(u, k, D, gi, go, activation="gelu", dropout_mask=m), dtype,
          "fwd %s %s" % (variant, dtype))
    dy = ROUND[dtype](rng.standard_normal((B, H, L)))
    g = run_bwd_epilogue(u, k, dy, dtype, D, gi, go, "silu", m, variant=variant)
    check_grads(g, u, k, dy, D, gi, go, dtype, "bwd %s %s" % (variant, dtype), activation="silu",
                dropout_mask=m)


# --- the two-level forward ------------------------------------------------------------------

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
    y = run_long(u, k, dtype, 128, D=D, g_in=gi, g_out=go, variant=variant, act=act, mask=m)
    check(y, ref_fftconv(u, k, D, gi, go, activation=act, dropout_mask=m), dtype,
          "long %s %s %s %s" % (dtype, act, form, variant))
