"""Exact emulation of the narrow floating-point formats the kernel stores and multiplies.

Every function takes any array-like (real or complex, float64 or narrower) and returns a
float64 (or complex128) array whose values are exactly representable in the target format:
the value the GPU would hold after converting to that format with round-to-nearest-even
(RNE), overflow to +-inf and gradual underflow (subnormals), as CUDA's
``__float2half_rn`` / ``__float2bfloat16_rn`` and PTX ``cvt.rn`` do.

Complex inputs round the real and imaginary parts separately, which is what happens to a
complex value held as two real registers or two real tensor-core operands.

Why float64 -> float32 goes through round-to-odd: rounding float64 to float32 with RNE and
then float32 to fp16/bf16 with RNE ("double rounding") is wrong when the first rounding lands
exactly on a tie of the second, e.g. 1 + 2**-8 + 2**-30 would become 1.0 in bf16 instead of
1 + 2**-7. Rounding to float32 with round-to-odd first (truncate, then set the last bit when
inexact) keeps the "was it above or below the tie" information, and a second RNE rounding to
any format with at least two fewer significant bits than float32 is then exactly the direct
rounding. For values already representable in float32 (everything the kernel converts: fp32
accumulators, fp32 inputs) the first step is the identity, so this is the kernel's conversion.
"""

import numpy as np

__all__ = ["round_fp32", "round_fp16", "round_bf16", "round_to", "ROUNDINGS"]

# Names accepted by round_to(): 'fp64' is the identity (the unrounded float64 reference).
ROUNDINGS = ("fp64", "fp32", "fp16", "bf16")


def _split_complex(fn, x):
    """Apply a real rounding function to the real and imaginary parts of a complex array."""
    out = np.empty(x.shape, dtype=np.complex128)  # (x.shape) complex128
    # Assigned part by part: fn(re) + 1j * fn(im) would turn an infinite part into NaN.
    out.real = fn(x.real)
    out.imag = fn(x.imag)
    return out


def _round_to_odd_fp32(x):
    """float64 array -> float32 array rounded to odd (see module docstring), NaN kept."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)  # (x.shape) float32, RNE; overflow gives +-inf
    back = f.astype(np.float64)
    nan = np.isnan(x)
    inexact = (back != x) & ~nan
    bits = f.view(np.uint32).copy()  # (x.shape) uint32, sign-magnitude bit patterns
    # RNE may have rounded away from zero; stepping the magnitude down one unit in the last
    # place (bits - 1 in sign-magnitude) turns it into truncation toward zero. It also turns
    # an overflow to inf back into FLT_MAX, so huge values still overflow in the next step.
    away = inexact & (np.abs(back) > np.abs(x))
    bits[away] -= np.uint32(1)
    bits[inexact] |= np.uint32(1)
    return bits.view(np.float32)


def round_fp32(x):
    """Round to IEEE binary32 (RNE, overflow to inf, subnormals kept).

    Returns float64 (complex128 for complex input).
    """
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return _split_complex(round_fp32, x)
    with np.errstate(over="ignore"):
        # A single hardware float64 -> float32 conversion is already a correct RNE rounding.
        return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def round_fp16(x):
    """Round to IEEE binary16 (half): RNE, overflow to inf, subnormals down to 2**-24.

    Largest finite value 65504; anything >= 65520 (the tie with 2**16) becomes inf.
    Returns float64 (complex128 for complex input).
    """
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return _split_complex(round_fp16, x)
    with np.errstate(over="ignore", invalid="ignore"):
        # numpy's float32 -> float16 cast is a correct RNE conversion (F16C or bit code).
        return _round_to_odd_fp32(x).astype(np.float16).astype(np.float64)


def round_bf16(x):
    """Round to bfloat16 (8 significant bits, float32's exponent range): RNE, overflow to inf.

    Done on the float32 bit pattern exactly as the hardware conversion does: keep the upper
    16 bits, adding 0x7FFF plus the lowest kept bit first so that ties go to even. NaN is
    kept as a (quiet) NaN of the same sign rather than passed through the addition, which
    could otherwise carry a NaN with a small payload into inf. Largest finite value
    (2 - 2**-7) * 2**127; subnormals (down to 2**-133) are kept.
    Returns float64 (complex128 for complex input).
    """
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return _split_complex(round_bf16, x)
    f = _round_to_odd_fp32(x)
    bits = f.view(np.uint32).astype(np.uint64)  # (x.shape) uint64: headroom for the carry
    keep_lsb = (bits >> np.uint64(16)) & np.uint64(1)
    upper = (bits + np.uint64(0x7FFF) + keep_lsb) >> np.uint64(16)
    quiet_nan = (bits >> np.uint64(16)) | np.uint64(0x0040)
    upper = np.where(np.isnan(f), quiet_nan, upper)
    out = np.asarray(upper << np.uint64(16)).astype(np.uint32)  # (x.shape) float32 patterns
    return out.view(np.float32).astype(np.float64)


_ROUNDERS = {"fp32": round_fp32, "fp16": round_fp16, "bf16": round_bf16}


def round_to(x, fmt):
    """Round ``x`` to the format named ``fmt`` ('fp64' (identity), 'fp32', 'fp16', 'bf16').

    Always returns a new float64 (complex128 for complex input) array.
    """
    if fmt == "fp64":
        x = np.asarray(x)
        return np.array(x, dtype=np.complex128 if np.iscomplexobj(x) else np.float64)
    if fmt not in _ROUNDERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {ROUNDINGS}")
    return _ROUNDERS[fmt](x)
