"""Tests of python_ref, the float64 ground truth and kernel specification.

Every comparison prints its max and relative error before asserting (run with -s to see).
"""

import math

import numpy as np
import pytest

import python_ref as pr
from python_ref.__main__ import error_table

# Expected default plans, written out by hand from the rule "16s, then one 2/4/8 last".
EXPECTED_PLANS = {
    2**5: (2, 16),
    2**6: (4, 16),
    2**7: (8, 16),
    2**8: (16, 16),
    2**9: (2, 16, 16),
    2**12: (16, 16, 16),
    2**14: (4, 16, 16, 16),
    2**16: (16, 16, 16, 16),
    2**22: (4, 16, 16, 16, 16, 16),
}
ALT_PLANS = [(32, 16), (16, 16, 2), (16, 4, 16), (8, 4, 2, 4), (256,), (2,) * 9, (4, 32, 8)]


def report(name, y, y_ref):
    """Print and return (max abs error, relative L2 error) of y against y_ref."""
    max_err = float(np.max(np.abs(np.asarray(y) - np.asarray(y_ref)))) if np.size(y) else 0.0
    rel = pr.relative_error(y, y_ref)
    print(f"{name}: max_abs={max_err:.3e} rel={rel:.3e}")
    return max_err, rel


def crandn(rng, shape):
    """Complex standard normal array of the given shape."""
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


# ---------------------------------------------------------------------------------------
# Plan, DFT matrices, twiddles, Monarch permutation


def test_plan_rule():
    for m in range(5, 23):
        N = 2**m
        p = pr.plan(N)
        assert math.prod(p) == N
        # All 16 except possibly the first radix, which is 2, 4 or 8.
        assert all(r == 16 for r in p[1:]) and p[0] in (2, 4, 8, 16)
        assert len(p) == math.ceil(m / 4)
    for N, expected in EXPECTED_PLANS.items():
        assert pr.plan(N) == expected
    for bad in (16, 48, 2**23, 0):
        with pytest.raises(ValueError):
            pr.plan(bad)
    with pytest.raises(ValueError):
        pr.block_fft(np.ones(64), (16, 2))
    with pytest.raises(ValueError):
        pr.block_fft(np.ones(48), (16, 3))


def test_fft_size():
    assert pr.fft_size(1, 1) == 32
    assert pr.fft_size(16, 16) == 32
    assert pr.fft_size(17, 17) == 64
    assert pr.fft_size(1134, 1134) == 4096
    assert pr.fft_size(1134, 10) == 2048
    assert pr.fft_size(100, 5000) == 256  # Lk > L is truncated to L
    assert pr.fft_size(2048, 2048) == 4096  # L = N/2 exactly


@pytest.mark.parametrize("r", [2, 4, 8, 16, 32])
def test_dft_matrix_and_twiddles(r):
    rng = np.random.default_rng(1)
    x = crandn(rng, (r, 3))
    F = pr.dft_matrix(r)
    report(f"F_{r} @ x vs fft", F @ x, np.fft.fft(x, axis=0))
    np.testing.assert_allclose(F @ x, np.fft.fft(x, axis=0), rtol=0, atol=1e-13)
    assert np.array_equal(pr.dft_matrix(r, inverse=True), np.conj(F))
    # Quarter turns are exact, so F_2 and F_4 hold only 0, +-1 and +-i.
    assert F[0, 0] == 1 and (r < 4 or F[1, r // 4] == -1j)
    assert np.array_equal(F, F.T)
    N1, N2 = r, 8
    k1, n2 = np.meshgrid(np.arange(N1), np.arange(N2), indexing="ij")
    T_ref = np.exp(-2j * np.pi * k1 * n2 / (N1 * N2))
    T = pr.twiddles(N1, N2)
    report(f"twiddles({N1}, {N2})", T, T_ref)
    assert T.shape == (N1, N2)
    np.testing.assert_allclose(T, T_ref, rtol=0, atol=4e-15)  # T_ref loses ~1e-15 at large angles
    assert np.array_equal(pr.twiddles(N1, N2, inverse=True), np.conj(T))


@pytest.mark.parametrize("N, plan", [(32, None), (512, None), (4096, None), (2**16, None)]
                         + [(math.prod(p), p) for p in ALT_PLANS])
def test_monarch_perm(N, plan):
    p = pr.monarch_perm(N, plan)
    assert p.shape == (N,)
    assert np.array_equal(np.sort(p), np.arange(N))
    # Position ((k0*r1 + k1)*r2 + k2)... holds frequency k0 + r0*k1 + r0*r1*k2 + ...
    radices = plan or pr.plan(N)
    digits = np.unravel_index(np.arange(N), radices)
    expected = sum(d * math.prod(radices[:s]) for s, d in enumerate(digits))
    assert np.array_equal(p, expected)
    q = pr.monarch_negation_index(N, plan)
    assert np.array_equal(p[q], (-p) % N)


def test_monarch_perm_two_level():
    N1, N2 = 16, 32
    p = pr.monarch_perm(N1 * N2, (N1, N2))
    for k1 in range(N1):
        for k2 in range(N2):
            assert p[k1 * N2 + k2] == k1 + N1 * k2


# ---------------------------------------------------------------------------------------
# Block FFT against numpy.fft


@pytest.mark.parametrize("m", range(5, 23))
def test_block_fft_matches_numpy(m):
    N = 2**m
    rng = np.random.default_rng(m)
    rows = 3 if N <= 2**16 else 1  # keep the largest sizes to one row (~1 s each)
    x = crandn(rng, (rows, N))
    X = pr.block_fft(x)
    ref = np.fft.fft(x)[..., pr.monarch_perm(N)]
    _, rel = report(f"block_fft N={N} plan={pr.plan(N)}", X, ref)
    assert rel < 1e-13


@pytest.mark.parametrize("plan", ALT_PLANS)
def test_block_fft_alternative_plans(plan):
    N = math.prod(plan)
    rng = np.random.default_rng(N)
    x = crandn(rng, (2, 3, N))
    X = pr.block_fft(x, plan)
    ref = np.fft.fft(x)[..., pr.monarch_perm(N, plan)]
    _, rel = report(f"block_fft plan={plan}", X, ref)
    assert rel < 1e-13
    xi = pr.block_ifft(X, plan)
    _, rel = report(f"block_ifft(block_fft) plan={plan}", xi, x)
    assert rel < 1e-13


def test_block_fft_real_input_and_scalings_agree():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 1024))
    ref = np.fft.fft(x)[..., pr.monarch_perm(1024)]
    for scaling in pr.SCALINGS:
        X = pr.block_fft(x, scaling=scaling)
        _, rel = report(f"block_fft scaling={scaling}", X, ref)
        assert rel < 1e-13
        _, rel = report(f"block_ifft scaling={scaling}", pr.block_ifft(X, scaling=scaling), x)
        assert rel < 1e-13


@pytest.mark.parametrize("N, plan", [(32, None), (512, None), (8192, None), (512, (32, 16)),
                                     (1024, (16, 4, 16))])
def test_block_ifft(N, plan):
    rng = np.random.default_rng(N)
    x = crandn(rng, (3, N))
    X = pr.block_fft(x, plan)
    _, rel = report(f"block_ifft(block_fft(x)) N={N} plan={plan}", pr.block_ifft(X, plan), x)
    assert rel < 1e-13
    # Directly from a numpy spectrum put in Monarch order.
    Y = crandn(rng, (2, N))
    y = pr.block_ifft(Y[..., pr.monarch_perm(N, plan)], plan)
    _, rel = report(f"block_ifft vs numpy.fft.ifft N={N}", y, np.fft.ifft(Y))
    assert rel < 1e-13


def test_block_fft_lowp_is_close():
    """fp32/fp16/bf16 operands give errors of the order of their unit roundoff."""
    rng = np.random.default_rng(7)
    x = crandn(rng, (4, 4096))
    ref = np.fft.fft(x)[..., pr.monarch_perm(4096)]
    for precision, bound in (("fp32", 1e-6), ("fp16", 3e-3), ("bf16", 2e-2)):
        _, rel = report(f"block_fft precision={precision}", pr.block_fft(x, precision=precision),
                        ref)
        assert rel < bound
        xi = pr.block_ifft(pr.block_fft(x, precision=precision), precision=precision)
        _, rel = report(f"round trip precision={precision}", xi, x)
        assert rel < 2 * bound


# ---------------------------------------------------------------------------------------
# Zero-half and discarded-half skips


SKIP_CASES = [(32, None), (512, None), (4096, None), (512, (32, 16)), (512, (2, 16, 16))]


@pytest.mark.parametrize("N, plan", SKIP_CASES)
@pytest.mark.parametrize("precision", ["fp64", "fp16", "bf16"])
def test_zero_half_skip(N, plan, precision):
    rng = np.random.default_rng(N + 1)
    M0 = N // (plan or pr.plan(N))[0]
    for nonzero_len in (1, 17, N // 2 - 3, N // 2, N):
        x = np.zeros((3, N), dtype=np.complex128)  # (3, N) causally zero-padded rows
        x[:, :nonzero_len] = crandn(rng, (3, nonzero_len))
        full = pr.block_fft(x, plan, precision=precision)
        # Poison what the skip promises never to read.
        poisoned = x.copy()
        poisoned[:, -(-nonzero_len // M0) * M0:] = np.nan
        skipped = pr.block_fft(poisoned, plan, precision=precision, nonzero_len=nonzero_len)
        _, rel = report(f"nonzero_len={nonzero_len} N={N} {precision}", skipped, full)
        assert rel < (1e-14 if precision == "fp64" else 1e-6)


@pytest.mark.parametrize("N, plan", SKIP_CASES)
@pytest.mark.parametrize("precision", ["fp64", "fp16", "bf16"])
def test_discarded_half_skip(N, plan, precision):
    rng = np.random.default_rng(N + 2)
    X = crandn(rng, (3, N))
    full = pr.block_ifft(X, plan, precision=precision)
    for keep in (1, 17, N // 2 - 3, N // 2, N):
        kept = pr.block_ifft(X, plan, precision=precision, keep=keep)
        assert kept.shape == (3, keep)
        _, rel = report(f"keep={keep} N={N} {precision}", kept, full[:, :keep])
        assert rel < (1e-13 if precision == "fp64" else 1e-6)


# ---------------------------------------------------------------------------------------
# Two-row packing


@pytest.mark.parametrize("N, plan", [(64, None), (2048, None), (512, (32, 16))])
def test_packing(N, plan):
    rng = np.random.default_rng(N + 3)
    u1 = rng.standard_normal((2, N))
    u2 = rng.standard_normal((2, N))
    z = pr.pack_rows(u1, u2)
    assert np.array_equal(z.real, u1) and np.array_equal(z.imag, u2)
    U1, U2 = pr.unpack_spectrum(np.fft.fft(z))
    report("unpack U1", U1, np.fft.fft(u1))
    report("unpack U2", U2, np.fft.fft(u2))
    np.testing.assert_allclose(U1, np.fft.fft(u1), rtol=0, atol=1e-11)
    np.testing.assert_allclose(U2, np.fft.fft(u2), rtol=0, atol=1e-11)
    V1, V2 = pr.unpack_spectrum_monarch(pr.block_fft(z, plan), plan)
    report("unpack Monarch U1", V1, pr.block_fft(u1, plan))
    report("unpack Monarch U2", V2, pr.block_fft(u2, plan))
    np.testing.assert_allclose(V1, pr.block_fft(u1, plan), rtol=0, atol=1e-11)
    np.testing.assert_allclose(V2, pr.block_fft(u2, plan), rtol=0, atol=1e-11)
    # A product with the spectrum of a real kernel keeps the two rows apart.
    k = rng.standard_normal(N)
    w = np.fft.ifft(np.fft.fft(z) * np.fft.fft(k))
    ref1 = np.fft.ifft(np.fft.fft(u1) * np.fft.fft(k)).real
    report("packed circular conv row 1", w.real, ref1)
    np.testing.assert_allclose(w.real, ref1, rtol=0, atol=1e-11)


# ---------------------------------------------------------------------------------------
# Convolutions: direct == scipy FFT == block FFT (fp64)


CONV_LENGTHS = [1, 2, 15, 17, 129, 151, 372, 1134]
# (D, g_in, g_out) present?
CONV_OPTIONS = [(False, False, False), (True, False, False), (True, True, True),
                (False, True, False), (False, False, True)]


def make_conv_inputs(rng, B, H, L, Lk):
    return dict(
        u=rng.standard_normal((B, H, L)),
        k=rng.standard_normal((H, Lk)),
        D=rng.standard_normal(H),
        g_in=rng.standard_normal((B, H, L)),
        g_out=rng.standard_normal((B, H, L)),
    )


@pytest.mark.parametrize("L", CONV_LENGTHS)
@pytest.mark.parametrize("lk_kind", ["short", "equal", "long"])
def test_conv_references_agree(L, lk_kind):
    Lk = {"short": max(1, L // 3), "equal": L, "long": 2 * L + 3}[lk_kind]
    rng = np.random.default_rng(L * 7 + len(lk_kind))
    inp = make_conv_inputs(rng, 3, 2, L, Lk)
    for use_D, use_gin, use_gout in CONV_OPTIONS:
        args = dict(D=inp["D"] if use_D else None, g_in=inp["g_in"] if use_gin else None,
                    g_out=inp["g_out"] if use_gout else None)
        direct = pr.causal_conv_direct(inp["u"], inp["k"], **args)
        assert direct.shape == (3, 2, L)
        tag = f"L={L} Lk={Lk} D={use_D} g_in={use_gin} g_out={use_gout}"
        _, rel = report(f"fftconv vs direct {tag}", pr.fftconv(inp["u"], inp["k"], **args),
                        direct)
        assert rel < 1e-12
        y = pr.blockfft_conv(inp["u"], inp["k"], **args)
        _, rel = report(f"blockfft_conv fp64 vs direct {tag}", y, direct)
        assert rel < 1e-12


def test_direct_conv_by_definition():
    """The direct reference against the defining double loop on a tiny case."""
    rng = np.random.default_rng(11)
    B, H, L, Lk = 2, 3, 7, 4
    inp = make_conv_inputs(rng, B, H, L, Lk)
    y_ref = np.zeros((B, H, L))  # (B, H, L)
    x = inp["g_in"] * inp["u"]
    for b in range(B):
        for h in range(H):
            for t in range(L):
                acc = sum(inp["k"][h, s] * x[b, h, t - s] for s in range(min(Lk, t + 1)))
                y_ref[b, h, t] = inp["g_out"][b, h, t] * (acc + inp["D"][h] * x[b, h, t])
    y = pr.causal_conv_direct(**inp)
    _, rel = report("direct vs loop", y, y_ref)
    assert rel < 1e-14
    # Many rows and few taps take the per-tap branch; few rows and many taps per-row convolve.
    u = rng.standard_normal((1, 1, 300))
    k = rng.standard_normal((1, 200))
    y1 = pr.causal_conv_direct(u, k)
    y2 = pr.causal_conv_direct(np.repeat(u, 300, axis=0), k)[:1]
    _, rel = report("direct: per-row vs per-tap branch", y1, y2)
    assert rel < 1e-14


def test_conv_strided_inputs():
    """Inputs sliced out of bigger buffers (non-trivial strides)."""
    rng = np.random.default_rng(12)
    big = rng.standard_normal((6, 5, 400))
    u = big[::2, 1:4, 7:380:2]  # (3, 3, 187), every stride non-trivial
    k = rng.standard_normal((3, 200))[:, ::3]
    D = rng.standard_normal(6)[::2]
    g = rng.standard_normal((3, 3, 374))[:, :, ::2]
    direct = pr.causal_conv_direct(u, k, D, g, g)
    for name, y in (("fftconv", pr.fftconv(u, k, D, g, g)),
                    ("blockfft_conv", pr.blockfft_conv(u, k, D, g, g))):
        _, rel = report(f"strided {name}", y, direct)
        assert rel < 1e-12


@pytest.mark.parametrize("plan", [(32, 16), (2, 16, 16), (16, 4, 8)])
@pytest.mark.parametrize("scaling", pr.SCALINGS)
def test_blockfft_conv_plans_and_scalings(plan, scaling):
    rng = np.random.default_rng(13)
    N = math.prod(plan)
    L = N // 2 - 5
    inp = make_conv_inputs(rng, 5, 2, L, L)
    direct = pr.causal_conv_direct(**inp)
    y = pr.blockfft_conv(**inp, plan=plan, scaling=scaling)
    _, rel = report(f"blockfft_conv plan={plan} scaling={scaling}", y, direct)
    assert rel < 1e-12


def test_blockfft_conv_fp32_accuracy():
    """fp32 operands and fp32 io give float32-class accuracy."""
    rng = np.random.default_rng(14)
    inp = make_conv_inputs(rng, 3, 2, 1134, 1134)
    inp = {name: pr.round_fp32(a) for name, a in inp.items()}
    direct = pr.causal_conv_direct(**inp)
    y = pr.blockfft_conv(**inp, precision="fp32", io_dtype="fp32")
    floor = pr.relative_error(pr.round_fp32(direct), direct)
    _, rel = report(f"blockfft_conv fp32 (fp32 floor {floor:.2e})", y, direct)
    assert rel < 1e-6


# ---------------------------------------------------------------------------------------
# Emulated low-precision errors


# Unit roundoff (half the spacing of significands in [1, 2)) of the operand formats.
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8, "fp32": 2.0**-24}


@pytest.mark.parametrize("N", [256, 4096, 16384])
def test_emulated_errors(N):
    """Prints the numbers behind the kernel's precision choice (docs/kernels.md) and bounds them.

    A-priori bound for every combination: the io floor plus u_op * sqrt(4 * stages), one
    unit roundoff per operand (data and DFT matrix) per stage, forward and inverse,
    added in quadrature. For bf16 io also the design targets: fp16 operands within 2x of
    the floor, bf16 operands within 5x.
    """
    stages = len(pr.plan(N))
    for io in ("bf16", "fp16"):
        for op in ("fp16", "bf16", "fp32"):
            r = pr.emulated_error(N, op, io)
            print(f"N={N} io={io} operands={op}: max_abs={r['max_abs']:.3e} "
                  f"rel={r['error']:.3e} floor={r['floor']:.3e} ratio={r['ratio']:.2f}")
            assert r["error"] >= r["floor"] * 0.9
            assert r["error"] <= r["floor"] + UNIT_ROUNDOFF[op] * math.sqrt(4 * stages)
            if io == "bf16" and op == "fp16":
                assert r["ratio"] < 2.0
            if io == "bf16" and op == "bf16":
                assert r["ratio"] < 5.0
            if op == "fp32":
                assert r["ratio"] < 1.01


def test_error_table_prints():
    lines = error_table(sizes=(256,))
    print("\n".join(lines))
    assert len(lines) == 3 and "fp16 operands" in lines[0]


def test_overflow_never_silent():
    N = 16384
    rng = np.random.default_rng(15)
    # (N,) row with a large constant part: a radix-r stage multiplies that part by r.
    x = 100.0 + rng.standard_normal(N)
    with pytest.raises(FloatingPointError):
        pr.block_fft(x, precision="fp16", scaling="none")
    ref = np.fft.fft(x)[pr.monarch_perm(N)]
    for scaling in ("stage", "row"):
        _, rel = report(f"100 + noise, fp16, scaling={scaling}",
                        pr.block_fft(x, precision="fp16", scaling=scaling), ref)
        assert rel < 1e-3
    x = np.full(N, 60000.0)  # (N,) near fp16's maximum: only row normalisation copes
    with pytest.raises(FloatingPointError):
        pr.block_fft(x, precision="fp16", scaling="stage")
    _, rel = report("constant 60000, fp16, scaling=row",
                    pr.block_fft(x, precision="fp16", scaling="row"),
                    np.fft.fft(x)[pr.monarch_perm(N)])
    assert rel < 1e-3
    # A convolution of inputs near fp16's maximum: unscaled stages overflow, scaled ones do not.
    u = pr.round_fp16(np.clip(2e4 * rng.standard_normal((2, 2, 2048)), -6e4, 6e4))
    k = pr.round_fp32(rng.standard_normal((2, 2048)) / 2048)
    with pytest.raises(FloatingPointError):
        pr.blockfft_conv(u, k, precision="fp16", io_dtype="fp32", scaling="none")
    y_ref = pr.fftconv(u, k)
    for scaling in ("stage", "row"):
        y = pr.blockfft_conv(u, k, precision="fp16", io_dtype="fp32", scaling=scaling)
        _, rel = report(f"conv near fp16 max, scaling={scaling}", y, y_ref)
        assert rel < 2e-3


# ---------------------------------------------------------------------------------------
# Rounding


def fp16_bits(v):
    return int(np.float16(pr.round_fp16(v)).view(np.uint16))


def bf16_bits(v):
    """Upper 16 bits of the float32 pattern of round_bf16(v); asserts the lower 16 are 0."""
    bits = int(np.float32(pr.round_bf16(v)).view(np.uint32))
    assert bits & 0xFFFF == 0
    return bits >> 16


def f32_from_bits(b):
    return float(np.uint32(b).view(np.float32))


def test_round_fp16_bit_patterns():
    cases = [
        (1.0, 0x3C00),
        (1 + 2**-11, 0x3C00),  # tie between 0x3C00 and 0x3C01 -> even
        (1 + 3 * 2**-11, 0x3C02),  # tie between 0x3C01 and 0x3C02 -> even
        (1 + 2**-11 + 2**-40, 0x3C01),  # just above the tie: double rounding would give 0x3C00
        (-(1 + 2**-11), 0xBC00),
        (65504.0, 0x7BFF),  # largest finite
        (65519.99, 0x7BFF),
        (65520.0, 0x7C00),  # tie with 2**16 -> inf
        (1e6, 0x7C00),
        (-1e6, 0xFC00),
        (2.0**-14, 0x0400),  # smallest normal
        (2.0**-24, 0x0001),  # smallest subnormal
        (2.0**-25, 0x0000),  # tie with 0 -> even (0)
        (2.0**-25 + 2.0**-40, 0x0001),
        (3 * 2.0**-25, 0x0002),  # tie between subnormals 1 and 2 -> even
        (-0.0, 0x8000),
        (np.inf, 0x7C00),
        (-np.inf, 0xFC00),
    ]
    for value, bits in cases:
        got = fp16_bits(value)
        print(f"round_fp16({value!r}) = {got:#06x}, expected {bits:#06x}")
        assert got == bits
    assert np.isnan(pr.round_fp16(np.nan))


def test_round_bf16_bit_patterns():
    cases = [
        (1.0, 0x3F80),
        (1 + 2**-8, 0x3F80),  # tie -> even
        (1 + 3 * 2**-8, 0x3F82),  # tie -> even
        (1 + 2**-8 + 2**-30, 0x3F81),  # above the tie; fp32 RNE first would give 0x3F80
        (-(1 + 3 * 2**-8), 0xBF82),
        (f32_from_bits(0x7F7F0000), 0x7F7F),  # largest finite bf16
        (f32_from_bits(0x7F7F7FFF), 0x7F7F),  # just below the tie with inf
        (f32_from_bits(0x7F7F8000), 0x7F80),  # tie with inf -> inf
        (f32_from_bits(0x7F7E8000), 0x7F7E),  # tie -> even
        (1e39, 0x7F80),  # beyond float32's range
        (-1e39, 0xFF80),
        (f32_from_bits(0x00008000), 0x0000),  # subnormal tie -> even (0)
        (f32_from_bits(0x00018000), 0x0002),  # subnormal tie -> even
        (f32_from_bits(0x00008001), 0x0001),
        (f32_from_bits(0x00800000), 0x0080),  # smallest normal
        (1e-50, 0x0000),
        (-0.0, 0x8000),
        (np.inf, 0x7F80),
        (-np.inf, 0xFF80),
    ]
    for value, bits in cases:
        got = bf16_bits(value)
        print(f"round_bf16({value!r}) = {got:#06x}, expected {bits:#06x}")
        assert got == bits
    # NaN stays NaN, including payloads a naive "add 0x7FFF" would carry into inf.
    nans = np.array([np.nan, f32_from_bits(0x7F800001), f32_from_bits(0xFFFFFFFF)])
    assert np.all(np.isnan(pr.round_bf16(nans)))


def _check_nearest_even(x, r, next_up, next_down, last_bit):
    """r is a nearest neighbour of x, and the even one on a tie (normal range)."""
    d = np.abs(x - r)
    assert np.all(d <= np.abs(x - next_up(r)))
    assert np.all(d <= np.abs(x - next_down(r)))
    ties = (d == np.abs(x - next_up(r))) | (d == np.abs(x - next_down(r)))
    assert np.all(last_bit(r[ties]) == 0)


def test_rounding_random_values():
    rng = np.random.default_rng(16)
    x = rng.standard_normal(200_000) * np.exp2(rng.integers(-12, 14, 200_000))
    # Values with exactly one bit beyond bf16/fp16 precision: many exact ties.
    ties = np.ldexp(np.round(rng.uniform(256, 512, 20_000)) + 0.5, -8)
    x = np.concatenate([x, ties, ties * 2**-3])
    # fp16: against numpy's own float32 -> float16 conversion for float32 inputs ...
    x32 = x.astype(np.float32).astype(np.float64)
    assert np.array_equal(pr.round_fp16(x32), x32.astype(np.float16).astype(np.float64))
    # ... and nearest-even for float64 inputs.
    r = pr.round_fp16(x)
    h = r.astype(np.float16)
    _check_nearest_even(x, r, lambda v: np.nextafter(v.astype(np.float16), np.float16(np.inf)),
                        lambda v: np.nextafter(v.astype(np.float16), np.float16(-np.inf)),
                        lambda v: v.astype(np.float16).view(np.uint16) & 1)
    assert np.all(np.abs(x - h) <= np.abs(x) * 2**-11 + 2**-25)
    # bf16: nearest-even by stepping the 16-bit pattern.
    r = pr.round_bf16(x)

    def step(v, direction):
        bits = (v.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
        toward = np.where((v > 0) == (direction > 0), 1, -1)
        stepped = ((bits + toward) << 16).astype(np.uint32).view(np.float32)
        return stepped.astype(np.float64)

    _check_nearest_even(x[x != 0], r[x != 0], lambda v: step(v, 1), lambda v: step(v, -1),
                        lambda v: (v.astype(np.float32).view(np.uint32) >> 16) & 1)


def test_round_complex_and_dispatch():
    z = np.array([complex(1 + 2**-11, 1 + 2**-11 + 2**-40), complex(np.inf, -np.inf)])
    r = pr.round_fp16(z)
    assert r[0] == 1 + 1j * (1 + 2**-10)
    assert r[1].real == np.inf and r[1].imag == -np.inf  # no NaN from inf * 1j
    assert pr.round_to(z, "fp16")[0] == r[0]
    assert np.array_equal(pr.round_to(z, "fp64"), z)
    assert pr.round_to(np.float64(1 + 2**-30), "fp32") == 1.0
    assert pr.round_to(1 + 2**-8 + 2**-30, "bf16") == 1 + 2**-7
    with pytest.raises(ValueError):
        pr.round_to(1.0, "fp8")


# ---------------------------------------------------------------------------------------
# Gradients against finite differences


def _loss(args, dy):
    """<dy, y> with y from the direct definition (independent of the FFT gradients)."""
    return float(np.sum(dy * pr.causal_conv_direct(**args)))


@pytest.mark.parametrize("Lk", [3, 6, 9])
@pytest.mark.parametrize("options", CONV_OPTIONS)
def test_grads_finite_differences(Lk, options):
    use_D, use_gin, use_gout = options
    rng = np.random.default_rng(17 + Lk)
    B, H, L = 2, 2, 6
    inp = make_conv_inputs(rng, B, H, L, Lk)
    args = dict(u=inp["u"], k=inp["k"], D=inp["D"] if use_D else None,
                g_in=inp["g_in"] if use_gin else None, g_out=inp["g_out"] if use_gout else None)
    dy = rng.standard_normal((B, H, L))
    grads = pr.fftconv_grads(dy=dy, **args)
    names = {"u": "du", "k": "dk", "D": "dD", "g_in": "dg_in", "g_out": "dg_out"}
    # y is linear in each argument separately, so central differences are exact up to
    # round-off for any step.
    eps = 1e-3
    for arg, gname in names.items():
        if args[arg] is None:
            assert grads[gname] is None
            continue
        fd = np.zeros_like(args[arg])  # same shape as the argument
        for idx in np.ndindex(args[arg].shape):
            plus = {**args, arg: args[arg].copy()}
            minus = {**args, arg: args[arg].copy()}
            plus[arg][idx] += eps
            minus[arg][idx] -= eps
            fd[idx] = (_loss(plus, dy) - _loss(minus, dy)) / (2 * eps)
        assert grads[gname].shape == args[arg].shape
        _, rel = report(f"{gname} vs finite differences (Lk={Lk}, options={options})",
                        grads[gname], fd)
        assert rel < 1e-8
    # Taps beyond L never touch an output.
    if Lk > L:
        assert np.all(grads["dk"][:, L:] == 0)
