"""CUDA kernels run unchanged on the CPU under the SIMT emulation of flashconv/hw.h.

The proof kernels in tests/emu/kernels.h must compute what numpy computes in every build of
the driver (plain, ThreadSanitizer, AddressSanitizer + UBSan), and the broken ones must be
caught: a race by TSan, out-of-bounds accesses by ASan (and a guard zone in the plain build),
barrier misuse and oversized shared memory by the emulated launch itself.
"""
import time

import numpy as np
import pytest

from tests.emu import build as emu

pytestmark = pytest.mark.emu

VARIANTS = ["plain", "tsan", "asan"]
UNIT_ROUNDOFF = {"f16": 2.0**-11, "bf16": 2.0**-8}


def bf16_round(x):
    """float32 -> nearest bfloat16 (ties to even) as float64, by arithmetic rather than bits."""
    x = np.asarray(x, np.float64)
    out = x.copy()  # inf and nan stay
    finite = np.isfinite(x) & (x != 0)
    _, e = np.frexp(x[finite])  # |x| = m 2^e, 0.5 <= m < 1
    ulp = np.ldexp(1.0, np.maximum(e - 8, -133))  # 8 significant bits; subnormal ulp 2^-133
    q = np.round(x[finite] / ulp) * ulp  # np.round: half to even
    max_bf16 = (2 - 2.0**-7) * 2.0**127
    out[finite] = np.where(np.abs(q) > max_bf16, np.copysign(np.inf, q), q)
    return out


def bf16_bits(x):
    """Bits of values already representable in bfloat16."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def round_to(dtype, a):
    """Rounds real or complex values to the kernel's operand type, returned in float64."""
    if np.iscomplexobj(a):
        return round_to(dtype, a.real) + 1j * round_to(dtype, a.imag)
    a32 = np.asarray(a, np.float32)
    return a32.astype(np.float16).astype(np.float64) if dtype == "f16" else bf16_round(a32)


def as_operand(dtype, a):
    """numpy array the driver reads as half_t (float16) or bf16_t (raw uint16 bits)."""
    return np.asarray(a, np.float16) if dtype == "f16" else bf16_bits(bf16_round(a))


def rel_err(a, ref):
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_sum(variant):
    x = np.random.default_rng(1).standard_normal((3, 5, 1000)).astype(np.float32)  # (B, H, n)
    y = emu.run("block_sum", {"x": x}, variant).outputs["y"]
    ref = x.astype(np.float64).sum(-1)
    print(f"block_sum max abs err {np.abs(y - ref).max():.2e}")
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_warp_ops(variant):
    n = 512  # 4 blocks of 4 warps
    x = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    out = emu.run("warp_ops", {"x": x}, variant).outputs
    i = np.arange(n)
    lane, warp_base = i % 32, i - i % 32
    total = np.repeat(x.reshape(-1, 32).astype(np.float64).sum(1), 32)
    print(f"warp total max abs err {np.abs(out['total'] - total).max():.2e}")
    np.testing.assert_allclose(out["total"], total, rtol=1e-5, atol=1e-5)
    key = (warp_base + (7 * lane + 3) % 32).astype(np.uint64) * 2654435761 % 2**32
    np.testing.assert_array_equal(out["gathered"], key.astype(np.uint32))
    np.testing.assert_array_equal(out["first"], x[warp_base + (i // 32 % 4)])
    np.testing.assert_array_equal(out["neighbour"], x[i ^ 1])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_mma_tile(dtype, variant):
    rng = np.random.default_rng(3)
    a = round_to(dtype, rng.standard_normal((16, 16)))
    b = round_to(dtype, rng.standard_normal((16, 8)))
    c = rng.standard_normal((16, 8)).astype(np.float32)
    inputs = {"a": as_operand(dtype, a), "b": as_operand(dtype, b), "c": c}
    d = emu.run(f"mma_tile_{dtype}", inputs, variant).outputs["d"]
    ref = a @ b + c
    # Products of 16-bit operands are exact in fp32; only the 16 fp32 additions round.
    bound = 17 * 2.0**-24 * (np.abs(a) @ np.abs(b) + np.abs(c))
    print(f"mma {dtype}: max abs err {np.abs(d - ref).max():.2e}, max bound {bound.max():.2e}")
    assert np.all(np.abs(d - ref) <= bound)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_dft256(dtype, variant):
    rows = 8
    rng = np.random.default_rng(4)
    x = rng.standard_normal((rows, 256)) + 1j * rng.standard_normal((rows, 256))
    x = x.astype(np.complex64)
    x_pairs = x.view(np.float32).reshape(rows, 256, 2)
    out = emu.run(f"dft256_{dtype}", {"x": x_pairs}, variant).outputs
    y = out["y"][..., 0] + 1j * out["y"][..., 1]  # (rows, k1, n2)
    z = out["z"][..., 0] + 1j * out["z"][..., 1]  # (rows, k1, k2)

    j = np.arange(16)
    f16 = np.exp(-2j * np.pi * np.outer(j, j) / 16)
    twiddle = np.exp(-2j * np.pi * np.outer(j, j) / 256)
    f_op = round_to(dtype, f16)
    # Mirrors of the kernel's rounding points, so layout or rounding slips show as large errors:
    # stage 1 from rounded operands; stage 2 from the kernel's own stage 1, twiddled and rounded.
    y_ref = f_op @ round_to(dtype, x.reshape(rows, 16, 16))
    z_ref = round_to(dtype, y * twiddle) @ f_op
    # End to end against float64 FFT: z[k1][k2] = xhat[k1 + 16 k2].
    xhat = np.fft.fft(x.astype(np.complex128), axis=-1)
    err_y, err_z = rel_err(y, y_ref), rel_err(z, z_ref)
    err_fft = rel_err(z.transpose(0, 2, 1).reshape(rows, 256), xhat)
    u = UNIT_ROUNDOFF[dtype]
    print(f"dft256 {dtype}: stage 1 {err_y:.2e}, stage 2 {err_z:.2e} (vs rounding mirrors), "
          f"vs np.fft {err_fft:.2e} = {err_fft / u:.2f} u")
    assert err_y < 1e-5
    assert err_z < 0.05 * u  # a rare operand rounding flip from fp32 twiddles is ~0.01 u
    assert err_fft < 3 * u  # four operand roundings of relative size u


def f16_inputs(rng):
    every = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    pos = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid = ((pos[:-1] + pos[1:]) / 2).astype(np.float32)  # exact ties
    near = np.concatenate([mid, np.nextafter(mid, np.float32(0)),
                           np.nextafter(mid, np.float32(np.inf))])
    special = np.array([0, np.inf, np.nan, 65504, 65519.996, 65520, 65536, 2.0**-24, 2.0**-25,
                        1.5 * 2.0**-25, 3e38, 1e-45, 2.0**-14], np.float32)
    rand = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([every, near, -near, special, -special, rand])


def bf16_inputs(rng):
    every = (np.arange(2**16, dtype=np.uint32) << 16).view(np.float32)
    ties = (np.arange(2**16, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    near = np.concatenate([ties, (ties.view(np.uint32) - 1).view(np.float32),
                           (ties.view(np.uint32) + 1).view(np.float32)])
    rand = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([every, near, rand, np.array([3.4e38, 3.3961776e38, 1e-45], np.float32)])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@np.errstate(over="ignore", invalid="ignore")  # overflow to inf and signaling NaNs are the point
def test_convert(dtype, variant):
    rng = np.random.default_rng(5)
    x = f16_inputs(rng) if dtype == "f16" else bf16_inputs(rng)
    out = emu.run(f"convert_{dtype}", {"x": x}, variant).outputs
    nan = np.isnan(x)
    if dtype == "f16":
        bits = out["y"].view(np.uint16)
        want_back = x.astype(np.float16).astype(np.float32)  # numpy: nearest even, subnormals
        want_bits = want_back.astype(np.float16).view(np.uint16)
    else:
        bits = out["y"]
        want_back = bf16_round(x).astype(np.float32)
        want_bits = bf16_bits(want_back)
    wrong = np.flatnonzero((bits != want_bits) & ~nan)
    print(f"convert {dtype}: {x.size} values, {nan.sum()} NaN, {wrong.size} mismatches")
    assert wrong.size == 0, [(float(x[k]), hex(bits[k]), hex(want_bits[k])) for k in wrong[:5]]
    # NaN becomes the canonical NaN 0x7fff, as __float2half_rn / __float2bfloat16_rn return it.
    assert np.all(bits[nan] == 0x7FFF)
    back = out["back"]
    np.testing.assert_array_equal(back[~nan].view(np.uint32), want_back[~nan].view(np.uint32))
    assert np.all(np.isnan(back[nan]))


def test_race_is_reported_by_tsan():
    r = emu.run("racy", variant="tsan", check=False)
    print(r.stderr[:2000])
    assert r.returncode == 66
    assert "WARNING: ThreadSanitizer: data race" in r.stderr
    assert "proof::racy_kernel" in r.stderr


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case, message", [
    ("early_exit", "proof::early_exit_kernel(float*), block (0, 0): barrier can never complete: "
                   "threads 0-62 wait at sync_block (kernels.h:"),
    ("deadlock", "threads 16-31 wait at sync_warp (kernels.h:"),
    ("divergent_barrier", "threads meet at different barriers: sync_block"),
])
def test_barrier_misuse_fails(case, message, variant):
    start = time.perf_counter()
    r = emu.run(case, variant=variant, check=False)
    elapsed = time.perf_counter() - start
    print(f"{case} [{variant}] {elapsed:.2f}s rc {r.returncode}\n{r.stderr}")
    assert r.returncode == 3  # the launch returned ErrorLaunchFailure; nothing hung
    assert message in r.stderr
    assert "unspecified launch failure" in r.stderr
    assert "ThreadSanitizer" not in r.stderr  # the failure path itself is race-free
    if case == "early_exit":
        assert "thread 63 exited" in r.stderr


def test_global_out_of_bounds_is_reported_by_asan():
    r = emu.run("oob", variant="asan", check=False)
    print(r.stderr[:2000])
    assert r.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in r.stderr
    assert "proof::oob_kernel" in r.stderr


@pytest.mark.parametrize("variant", ["plain", "asan"])
def test_shared_memory_out_of_bounds_is_caught(variant):
    r = emu.run("smem_oob", variant=variant, check=False)
    print(r.stderr[:2000])
    if variant == "asan":
        assert r.returncode != 0
        assert "AddressSanitizer: heap-buffer-overflow" in r.stderr
        assert "proof::smem_oob_kernel" in r.stderr
    else:  # the guard zone after the block's shared memory
        assert r.returncode == 3
        assert "smem_oob_kernel(float*), block (0, 0): wrote past the end of its 256 bytes" \
            in r.stderr


@pytest.mark.parametrize("sm, nbytes, fits", [
    (80, 166912, True), (80, 166916, False), (80, 200000, False),
    (90, 200000, True), (90, 232448, True), (90, 232452, False),
])
def test_dynamic_shared_memory_limit(sm, nbytes, fits):
    r = emu.run("smem_fill", sm=sm, params={"bytes": nbytes}, check=False)
    print(f"sm_{sm}, {nbytes} bytes: rc {r.returncode} {r.stderr}")
    if fits:
        assert r.returncode == 0
        np.testing.assert_array_equal(r.outputs["out"], np.arange(nbytes // 4)[::-1])
    else:
        assert r.returncode == 3
        assert f"asks for {nbytes} bytes of dynamic shared memory" in r.stderr
        assert "invalid argument" in r.stderr


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_with_nvcc(arch):
    ptx = emu.nvcc_check(arch)
    for t in ("f16.f16", "bf16.bf16"):
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.f32" in ptx
    assert ptx.count(".entry") == 17  # every proof kernel was instantiated
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx and "movmatrix.sync" in ptx
    # The memory accessors (hw::lds, hw::ldg, ...) are plain loads under nvcc: the counters
    # kernel's 8- and 16-byte shared reads stay single vector loads.
    body = ptx[ptx.index(".entry _ZN5proof15counters_kernel"):]
    body = body[:body.index("\n}\n")]
    assert "ld.shared.v2.u32" in body and "ld.shared.v4.u32" in body
    assert "ld.global.nc.f32" in body or "ld.global.f32" in body


@pytest.mark.parametrize("variant", VARIANTS)
def test_ldmatrix_movmatrix_sync_or(variant):
    # Fragment layouts of ldmatrix (plain and .trans) and movmatrix against the PTX ISA's
    # description, computed from the matrix in numpy; and __syncthreads_or.
    m = np.arange(256, dtype=np.uint16).reshape(16, 16) * 7 + 3
    out = emu.run("ldmatrix", {"m": m}, variant).outputs
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4
    # matrix i: rows 8 (i & 1) .. +8, cols 8 (i >> 1) .. +8
    for i in range(4):
        sub = m[8 * (i & 1):8 * (i & 1) + 8, 8 * (i >> 1):8 * (i >> 1) + 8]
        plain = sub[g, 2 * t].astype(np.uint32) | (sub[g, 2 * t + 1].astype(np.uint32) << 16)
        trans = sub[2 * t, g].astype(np.uint32) | (sub[2 * t + 1, g].astype(np.uint32) << 16)
        np.testing.assert_array_equal(out["plain"][:, i], plain)
        np.testing.assert_array_equal(out["trans"][:, i], trans)
        # movmatrix of the plain fragments is the transposed fragments
        np.testing.assert_array_equal(out["moved"][:, i], trans)
    np.testing.assert_array_equal(out["any"], [0, 1, 1])
