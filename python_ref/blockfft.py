"""Stage-by-stage mirror of the kernel's block (Monarch) FFT convolution (docs/kernels.md).

Everything here is numpy float64; with ``precision='fp64'`` nothing is rounded and the
results equal numpy.fft / the direct convolution to float64 round-off. The other precisions
round at exactly the points listed below, which are the points where the CUDA kernel
converts; a kernel that rounds elsewhere will not match this emulation's error.

Plan
----
``plan(N)`` factors N = 2**m (32 <= N <= 2**22) into radices applied in order, first radix
first: m = 4q + t gives, when t > 0, ONE radix 2**t (2, 4 or 8) in the FIRST position,
followed by q radices of 16. The odd radix is the outermost factor: the first forward stage
and the last inverse stage, so every radix-16 stage has stride 1 or a multiple of 16.
Examples: 32 -> (2, 16), 256 -> (16, 16), 512 -> (2, 16, 16), 2**22 -> (4, 16, 16, 16, 16, 16). Every function also accepts an explicit plan (any tuple of
powers of two >= 2 whose product is N), e.g. (32, 16) or (2, 16, 16).

Forward stages (block_fft_stages)
---------------------------------
The data is a row of N complex values. Before stage s it is viewed as (A, r, M) with
r = plan[s], A = prod(plan[:s]) independent sub-FFTs (one per already-produced frequency
digit) and M = prod(plan[s+1:]): within a sub-FFT of size r*M, X[n1][n2] = x[n1*M + n2].
Stage s computes, for every sub-FFT,

    Y = F_r @ X            # DFT along n1: a dense (r x r) @ (r x M) complex matmul
    Y = Y * T_(r,M)        # twiddles T[k1][n2] = w_(r*M)^(k1*n2), skipped when M == 1

and stage s+1 continues on each row k1 of Y. After the last stage position i of the row
holds the DFT at frequency monarch_perm(N, plan)[i] = k0 + r0*k1 + r0*r1*k2 + ...
(Monarch / digit-reversed order, never permuted back).

Inverse stages (block_ifft_stages) undo the forward stages in reverse order: for
s = m-1, ..., 0: multiply by conj(T_(r,M)) (skipped when M == 1), then conj(F_r) @ Y. The
result is the unnormalised inverse DFT in natural order; block_ifft multiplies by 1/N.

Rounding points (precision in {'fp32', 'fp16', 'bf16'}; 'fp64' rounds nowhere)
-----------------------------------------------------------------------------
 R0  The input row is rounded to fp32 (the value held on chip).
 R1  (scaling='row' only) Immediately before R2, each row is multiplied by 2**(15 - E)
     where 2**(E-1) <= max(|Re|, |Im|) over the row's values about to be read < 2**E:
     the row max lands in [2**14, 2**15), below fp16's 65504. Exact; E is accumulated
     per row and undone at the end.
 R2  The data operand of every DFT matmul is rounded to `precision` (real and imaginary
     parts separately), as are the DFT matrix operand F_r * 2**-c (conj(F_r) * 2**-c in
     the inverse). c is the stage scale exponent (below), so the scaled matrix is exact.
 R3  The matmul's products are exact and summed in float64, and the sum is rounded to fp32
     once (the fp32 tensor-core accumulator, modelled as exact accumulation).
 R4  Twiddles are rounded to fp32; the complex product data * twiddle is computed in
     float64 and each part rounded to fp32 (fp32 CUDA-core arithmetic).
 R5  (convolution) The pointwise product with K (fp32, see kernel_spectrum) is computed in
     float64 and each part rounded to fp32.
 R6  (convolution) The exponent undo (a power of two), + D*x, * g_out are each rounded to
     fp32; the output is rounded to io_dtype last.
An operand or accumulator rounding that turns a finite value into inf raises
FloatingPointError (an overflow must never pass silently).

Not modelled (a kernel doing these differs from this emulation by less than the R2 error):
the order of fp32 additions inside the accumulator (R3 rounds an exact sum once), FMA in
the complex products of R4/R5, and the Gauss 3-multiplication complex product (which
would round the operand sums Re+Im separately and so needs its own emulation).

Skips
-----
Zero half (block_fft_stages(nonzero_len=L)): with causal zero padding only the first
ceil(L / M0) rows of the first stage's (r0, M0) view are read, multiplied by the same
number of leading columns of F_r0. Discarded half (block_ifft_stages(keep=L)): the last
inverse stage computes only the first ceil(L / M0) rows of its output with the leading
rows of conj(F_r0). For L <= N/2 and r0 = 16 both are r0/2 = 8 rows.

Overflow control (scaling)
--------------------------
'stage' (default): the DFT matrix of a radix-r stage is multiplied by 2**-c,
c = floor(log2(r) / 2), i.e. 1/sqrt(r) rounded to a power of two (16 -> 1/4, 8 -> 1/2,
4 -> 1/2, 2 -> 1, 32 -> 1/4). Random data then keeps its magnitude through a stage; constant
data still grows by r * 2**-c. 'row': R1 at every stage, no stage scale; safe for any data.
'none': no scaling. In every mode the values are scaled copies of the true ones by a power
of two, tracked as an integer exponent and undone exactly (block_fft/block_ifft undo it
at the end; blockfft_conv folds the static part into K and applies the rest, if any, at R6).
"""

import functools
import math

import numpy as np
import scipy.fft

from .conv import fftconv
from .rounding import round_fp32, round_to

__all__ = [
    "PRECISIONS",
    "SCALINGS",
    "ROW_NORM_EXP",
    "plan",
    "fft_size",
    "dft_matrix",
    "twiddles",
    "stage_shift",
    "monarch_perm",
    "monarch_negation_index",
    "block_fft_stages",
    "block_ifft_stages",
    "block_fft",
    "block_ifft",
    "pack_rows",
    "unpack_spectrum",
    "unpack_spectrum_monarch",
    "kernel_spectrum",
    "blockfft_conv",
    "relative_error",
    "emulated_error",
]

PRECISIONS = ("fp64", "fp32", "fp16", "bf16")
SCALINGS = ("none", "stage", "row")
IO_DTYPES = (None, "fp64", "fp32", "fp16", "bf16")
# R1 target: the row max lies in [2**(ROW_NORM_EXP-1), 2**ROW_NORM_EXP), as high as fp16
# allows (max 65504 < 2**16) so that small entries stay clear of fp16's subnormal range.
ROW_NORM_EXP = 15
MIN_N = 32
MAX_N = 2**22
# Twiddle tables of sub-FFTs up to this size are cached; larger ones are rebuilt per call
# (a 2**22 table is 64 MB).
_CACHE_MAX_SIZE = 2**16


# ---------------------------------------------------------------------------------------
# Plan, DFT matrices, twiddles, permutation


def plan(N):
    """Default radix plan for N = 2**m, 32 <= N <= 2**22: one 2/4/8 FIRST if needed, then 16s.

    m = 4q + t -> ((2**t,) if t else ()) + (16,)*q. E.g. 512 -> (2, 16, 16).
    """
    N = int(N)
    if N < MIN_N or N > MAX_N or N & (N - 1):
        raise ValueError(f"N must be a power of two in [{MIN_N}, {MAX_N}], got {N}")
    q, t = divmod(N.bit_length() - 1, 4)
    return ((2**t,) if t else ()) + (16,) * q


def _resolve_plan(N, radices):
    """The default plan for N when radices is None, else radices validated against N."""
    if radices is None:
        return plan(N)
    radices = tuple(int(r) for r in radices)
    if not radices or any(r < 2 or r & (r - 1) for r in radices):
        raise ValueError(f"a plan is a non-empty tuple of powers of two >= 2, got {radices}")
    if math.prod(radices) != N:
        raise ValueError(f"plan {radices} has product {math.prod(radices)}, expected N = {N}")
    return radices


def fft_size(L, Lk):
    """Kernel FFT size: smallest power of two >= L + min(Lk, L) - 1, at least 32."""
    n = L + min(Lk, L) - 1
    return max(MIN_N, 1 << (n - 1).bit_length())


def _unit_roots(j, n, inverse=False):
    """exp(-+2*pi*i * j / n) for an integer array j (sign + for inverse).

    Exponents are reduced to (-n/2, n/2] so that w^-j == conj(w^j) exactly, and multiples
    of a quarter turn are exact (0, +-1), so e.g. F_2 and F_4 contain no round-off at all.
    """
    j = np.mod(np.asarray(j, dtype=np.int64), n)
    j = np.where(2 * j > n, j - n, j)
    theta = (2.0 * np.pi) * (j / n)
    sign = 1.0 if inverse else -1.0
    w = np.empty(j.shape, dtype=np.complex128)  # (j.shape) complex128
    w.real = np.cos(theta)
    w.imag = sign * np.sin(theta)
    quarter = (4 * j) % n == 0
    q = (4 * j[quarter]) // n  # in {-1, 0, 1, 2}
    w.real[quarter] = np.array([0.0, 1.0, 0.0, -1.0])[q + 1]
    w.imag[quarter] = sign * np.array([-1.0, 0.0, 1.0, 0.0])[q + 1]
    return w


def dft_matrix(r, inverse=False):
    """(r, r) DFT matrix F[k, n] = w_r^(k*n), w_r = exp(-2*pi*i/r); conjugate for inverse.

    No 1/r factor in either direction (block_ifft applies 1/N once at the end).
    """
    n = np.arange(r)
    return _unit_roots(np.outer(n, n), r, inverse)


def twiddles(N1, N2, inverse=False):
    """(N1, N2) twiddles T[k1, n2] = w_N^(k1*n2), N = N1*N2 (conjugate for inverse)."""
    return _unit_roots(np.outer(np.arange(N1), np.arange(N2)), N1 * N2, inverse)


def stage_shift(r, scaling="stage"):
    """Stage scale exponent c: the radix-r DFT matrix is used as F_r * 2**-c.

    c = floor(log2(r) / 2) with scaling='stage' (1/sqrt(r) rounded to a power of two),
    0 otherwise.
    """
    return (r.bit_length() - 1) // 2 if scaling == "stage" else 0


def monarch_perm(N, plan=None):
    """p (N,) int64 with block_fft(x)[..., i] == numpy.fft.fft(x)[..., p[i]].

    Position i = ((k0*r1 + k1)*r2 + k2)... holds frequency k0 + r0*k1 + r0*r1*k2 + ...
    For a two-level plan (N1, N2): p[k1*N2 + k2] = k1 + N1*k2.
    """
    radices = _resolve_plan(N, plan)
    p = np.zeros((), dtype=np.int64)
    stride = 1
    for r in radices:
        # Each stage appends its output digit as a new, faster-varying axis.
        p = p[..., None] + stride * np.arange(r, dtype=np.int64)
        stride *= r
    return p.reshape(-1)


def monarch_negation_index(N, plan=None):
    """q (N,) int64: in a Monarch-order spectrum Zm, Zm[q[i]] is the value at frequency -f_i.

    f_i = monarch_perm(N, plan)[i]. This is the gather the kernel performs to unpack
    a two-row packed spectrum without returning to natural order.
    """
    p = monarch_perm(N, plan)
    inv = np.empty_like(p)  # (N,) int64: inv[p[i]] = i
    inv[p] = np.arange(N)
    return inv[(-p) % N]


# ---------------------------------------------------------------------------------------
# Rounding helpers (the R-points of the module docstring)


def _check_modes(precision, scaling):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")


def _acc_format(precision):
    """Accumulator / CUDA-core format: fp32 unless the whole computation is float64."""
    return "fp64" if precision == "fp64" else "fp32"


def _round_checked(z, fmt, where):
    """round_to(z, fmt), raising FloatingPointError if a finite value overflowed to inf.

    With fmt 'fp64' z is returned as it is (no copy: the float64 path must stay fast).
    """
    if fmt == "fp64":
        return z
    out = round_to(z, fmt)
    overflow = ~np.isfinite(out) & np.isfinite(z)
    if np.any(overflow):
        raise FloatingPointError(
            f"{fmt} overflow at {where}: {np.count_nonzero(overflow)} values exceed the "
            f"format's range; use scaling='row' or scale the inputs"
        )
    return out


def _dft(F, X):
    """F @ X along axis -2 of X (..., A, r_in, M) with F (r_out, r_in) -> (..., A, r_out, M).

    Mathematically np.matmul(F, X); done as ONE (r_out x r_in) @ (r_in x everything) product
    because a stack of many medium-sized BLAS calls can be dramatically slow on a shared,
    oversubscribed CPU (threaded BLAS waking its threads for every call).
    """
    r_in = X.shape[-2]
    Xt = np.moveaxis(X, -2, 0).reshape(r_in, -1)  # (r_in, ...*A*M) contiguous copy
    Y = (F @ Xt).reshape((F.shape[0],) + X.shape[:-2] + X.shape[-1:])  # (r_out, ..., A, M)
    return np.moveaxis(Y, 0, -2)


def _ldexp(z, e):
    """z * 2**e for complex z (..., n) and integer e (...,): exact barring over/underflow."""
    out = np.empty(z.shape, dtype=np.complex128)  # (..., n) complex128
    e = np.asarray(e)[..., None]
    out.real = np.ldexp(z.real, e)
    out.imag = np.ldexp(z.imag, e)
    return out


@functools.lru_cache(maxsize=None)
def _dft_operand(r, inverse, c, precision):
    """R2: (conj) F_r * 2**-c rounded to the operand precision, read-only, cached."""
    F = round_to(dft_matrix(r, inverse) * 2.0**-c, precision)  # (r, r) complex128
    F.flags.writeable = False
    return F


def _make_twiddle_operand(r, M, inverse, precision):
    """R4: twiddles (r, M) rounded to fp32 (float64 when precision is fp64)."""
    return round_to(twiddles(r, M, inverse), _acc_format(precision))


@functools.lru_cache(maxsize=None)
def _cached_twiddle_operand(r, M, inverse, precision):
    T = _make_twiddle_operand(r, M, inverse, precision)
    T.flags.writeable = False
    return T


def _twiddle_operand(r, M, inverse, precision):
    """Twiddle operand of a stage with sub-FFT size r*M, cached when small."""
    if r * M <= _CACHE_MAX_SIZE:
        return _cached_twiddle_operand(r, M, inverse, precision)
    return _make_twiddle_operand(r, M, inverse, precision)


def _normalise_rows(V, e):
    """R1: scale each row of V (lead + (A, rows, M)) so its max part is in [2**14, 2**15).

    e (lead) is the running exponent (true value = V * 2**e); returns the updated (V, e).
    """
    lead = e.shape
    flat = V.reshape(lead + (-1,))
    peak = np.maximum(np.abs(flat.real), np.abs(flat.imag)).max(axis=-1, initial=0.0)
    E = np.frexp(peak)[1]
    shift = np.where(peak > 0, ROW_NORM_EXP - E, 0).astype(np.int64)  # (lead) int64
    V = _ldexp(flat, shift).reshape(V.shape)
    return V, e - shift


# ---------------------------------------------------------------------------------------
# Block FFT


def block_fft_stages(x, plan=None, *, precision="fp64", scaling="stage", nonzero_len=None):
    """Forward block-FFT stages exactly as the kernel runs them; returns (V, e).

    x: (..., N) real or complex. Returns V (..., N) complex128 in Monarch order and an int64
    exponent e (...) with V * 2**e == FFT(x) (up to the emulated rounding); e is the
    constant sum of stage shifts for scaling='stage', per-row for 'row', 0 for 'none'.

    nonzero_len (zero-half skip): promise that x[..., nonzero_len:] == 0. The first stage
    then reads only rows n0 < ceil(nonzero_len / M0) of its (r0, M0) view (M0 = N / r0),
    i.e. only the first half of the row when nonzero_len <= N/2, and multiplies by the
    matching columns of F_r0. Entries from ceil(nonzero_len / M0) * M0 on are never read.
    """
    x = np.asarray(x)
    N = x.shape[-1]
    radices = _resolve_plan(N, plan)
    _check_modes(precision, scaling)
    lead = x.shape[:-1]
    acc = _acc_format(precision)
    V = _round_checked(x.astype(np.complex128), acc, "input (R0)")  # (..., N) complex128
    e = np.zeros(lead, dtype=np.int64)  # (...) int64
    A = 1
    for s, r in enumerate(radices):
        M = N // (A * r)
        V = V.reshape(lead + (A, r, M))
        rows = r
        if s == 0 and nonzero_len is not None:
            if not 1 <= nonzero_len <= N:
                raise ValueError(f"nonzero_len must be in [1, {N}], got {nonzero_len}")
            rows = -(-nonzero_len // M)
            V = V[..., :rows, :]
        if scaling == "row":
            V, e = _normalise_rows(V, e)
        c = stage_shift(r, scaling)
        # X = F_r X   (only the columns of F_r that meet rows actually read)
        F = _dft_operand(r, False, c, precision)[:, :rows]
        X = _round_checked(V, precision, f"forward stage {s} data operand (R2)")
        V = _round_checked(_dft(F, X), acc, f"forward stage {s} accumulator (R3)")
        e = e + c
        if M > 1:
            # X = X * tw
            T = _twiddle_operand(r, M, False, precision)
            V = _round_checked(V * T, acc, f"forward stage {s} twiddle (R4)")
        A *= r
    return V.reshape(lead + (N,)), e


def block_ifft_stages(X, plan=None, *, precision="fp64", scaling="stage", keep=None):
    """Inverse block-FFT stages exactly as the kernel runs them; returns (V, e).

    X: (..., N) complex spectrum in Monarch order. Returns V (..., keep or N) complex128 in
    natural order and an int64 exponent e (...) with V * 2**e == N * IFFT(X), the
    unnormalised inverse DFT.

    keep (discarded-half skip): only outputs n < keep are wanted. The last inverse stage
    then computes only rows n0 < ceil(keep / M0) of its (r0, M0) output (M0 = N / r0), i.e.
    only the first half when keep <= N/2, using the matching rows of conj(F_r0).
    """
    X = np.asarray(X)
    N = X.shape[-1]
    radices = _resolve_plan(N, plan)
    _check_modes(precision, scaling)
    if keep is not None and not 1 <= keep <= N:
        raise ValueError(f"keep must be in [1, {N}], got {keep}")
    lead = X.shape[:-1]
    acc = _acc_format(precision)
    V = _round_checked(X.astype(np.complex128), acc, "inverse input (R0)")  # (..., N)
    e = np.zeros(lead, dtype=np.int64)  # (...) int64
    for s in reversed(range(len(radices))):
        r = radices[s]
        A = math.prod(radices[:s])
        M = N // (A * r)
        V = V.reshape(lead + (A, r, M))
        if M > 1:
            # X = X * conj(tw)
            T = _twiddle_operand(r, M, True, precision)
            V = _round_checked(V * T, acc, f"inverse stage {s} twiddle (R4)")
        rows = r
        if s == 0 and keep is not None:
            rows = -(-keep // M)
        if scaling == "row":
            V, e = _normalise_rows(V, e)
        c = stage_shift(r, scaling)
        # X = conj(F_r) X   (only the rows of the output that are kept)
        F = _dft_operand(r, True, c, precision)[:rows, :]
        Y = _round_checked(V, precision, f"inverse stage {s} data operand (R2)")
        V = _round_checked(_dft(F, Y), acc, f"inverse stage {s} accumulator (R3)")
        e = e + c
    V = V.reshape(lead + (-1,))
    return (V if keep is None else V[..., :keep]), e


def block_fft(x, plan=None, *, precision="fp64", scaling="stage", nonzero_len=None):
    """Forward FFT along the last axis, left in Monarch order: (..., N) -> (..., N) complex.

    block_fft(x)[..., i] == numpy.fft.fft(x)[..., monarch_perm(N, plan)[i]]. The stage
    scale exponent is undone exactly at the end. See block_fft_stages for nonzero_len.
    """
    V, e = block_fft_stages(
        x, plan, precision=precision, scaling=scaling, nonzero_len=nonzero_len
    )
    return _round_checked(_ldexp(V, e), _acc_format(precision), "forward exponent undo")


def block_ifft(X, plan=None, *, precision="fp64", scaling="stage", keep=None):
    """Inverse of block_fft: Monarch-order spectrum (..., N) -> natural-order signal.

    Includes the 1/N (a power of two, applied with the stage scale exponent), so
    block_ifft(block_fft(x)) == x. Returns (..., keep or N) complex128.
    """
    V, e = block_ifft_stages(X, plan, precision=precision, scaling=scaling, keep=keep)
    log2n = np.shape(X)[-1].bit_length() - 1
    return _round_checked(_ldexp(V, e - log2n), _acc_format(precision), "inverse 1/N")


# ---------------------------------------------------------------------------------------
# Two-row packing


def pack_rows(u1, u2):
    """Pack two real rows of the same channel into one complex row: u1 + i*u2."""
    u1 = np.asarray(u1, dtype=np.float64)
    u2 = np.asarray(u2, dtype=np.float64)
    z = np.empty(np.broadcast_shapes(u1.shape, u2.shape), dtype=np.complex128)  # (..., L)
    z.real = u1
    z.imag = u2
    return z


def unpack_spectrum(Z):
    """Split the natural-order spectrum Z = FFT(u1 + i*u2) (..., N) into (U1, U2).

    U1[f] = (Z[f] + conj(Z[-f])) / 2,  U2[f] = (Z[f] - conj(Z[-f])) / (2i), indices mod N.
    """
    Z = np.asarray(Z, dtype=np.complex128)
    Zneg = np.roll(Z[..., ::-1], 1, axis=-1)  # (..., N): Zneg[f] = Z[-f mod N]
    return (Z + np.conj(Zneg)) / 2, (Z - np.conj(Zneg)) / 2j


def unpack_spectrum_monarch(Zm, plan=None):
    """unpack_spectrum for a Monarch-order spectrum (..., N); results stay in Monarch order.

    Uses the gather monarch_negation_index(N, plan) instead of permuting to natural order.
    """
    Zm = np.asarray(Zm, dtype=np.complex128)
    Zneg = Zm[..., monarch_negation_index(Zm.shape[-1], plan)]  # (..., N) at -f
    return (Zm + np.conj(Zneg)) / 2, (Zm - np.conj(Zneg)) / 2j


# ---------------------------------------------------------------------------------------
# The fused convolution


def kernel_spectrum(k, N, plan=None, *, scale_exp=0, precision="fp64"):
    """K for the kernel: FFT of k (H, Lk <= N) zero-padded to N, in Monarch order.

    Computed in float64, multiplied by 2**scale_exp (blockfft_conv folds 1/N and the stage
    scales into K this way), then rounded ONCE to fp32 (unless precision is 'fp64').
    Returns (H, N) complex128.
    """
    k = np.asarray(k, dtype=np.float64)
    K = scipy.fft.fft(k, n=N, axis=-1)[..., monarch_perm(N, plan)]  # (H, N) Monarch order
    return _round_checked(np.ldexp(1.0, scale_exp) * K, _acc_format(precision), "K (fp32)")


def blockfft_conv(
    u,
    k,
    D=None,
    g_in=None,
    g_out=None,
    precision="fp64",
    io_dtype=None,
    plan=None,
    *,
    scaling="stage",
):
    """The fused block-FFT convolution exactly as the kernel computes it; returns y (B, H, L).

    Arguments as python_ref.conv.fftconv. precision: tensor-core operand precision
    ('fp64' = no rounding anywhere); io_dtype: storage format of u, g_in, g_out and y
    ('fp32', 'fp16', 'bf16'; None = float64); plan: radices for N = fft_size(L, Lk).

    Steps (rounding points as in the module docstring):
      1. u, g_in, g_out rounded to io_dtype (they arrive in that format); D rounded to fp32;
         x = g_in * u computed in fp32 registers (rounded to fp32, not to io_dtype: the
         kernel never stores x).
      2. Rows b = 2j and 2j+1 of the same channel are packed as x[2j] + i*x[2j+1]; with odd
         B the last row pairs with zeros. Each packed row is zero-padded to N.
      3. Forward stages with nonzero_len = L (zero-half skip) -> Monarch order.
      4. Pointwise product with K = kernel_spectrum(k[:, :L], N, scale_exp=c_total - log2 N)
         where c_total = 2 * sum(stage_shift(r)) (forward + inverse stage scales): the whole
         static power of two is folded into K, so with scaling 'stage' or 'none' nothing is
         left to undo. R5.
      5. Inverse stages with keep = L (discarded-half skip) -> first L outputs.
      6. Only with scaling='row': multiply by 2**(e_fwd + e_inv), rounded to fp32.
      7. Real part -> row 2j, imaginary part -> row 2j+1; + D*x; * g_out (each fp32);
         round to io_dtype.
    """
    _check_modes(precision, scaling)
    if io_dtype not in IO_DTYPES:
        raise ValueError(f"io_dtype must be one of {IO_DTYPES}, got {io_dtype!r}")
    io = "fp64" if io_dtype is None else io_dtype
    acc = _acc_format(precision)
    u = round_to(u, io)
    k = np.asarray(k, dtype=np.float64)
    if u.ndim != 3 or k.ndim != 2 or k.shape[0] != u.shape[1]:
        raise ValueError(f"expected u (B, H, L) and k (H, Lk), got {u.shape} and {k.shape}")
    B, H, L = u.shape
    N = fft_size(L, k.shape[1])
    radices = _resolve_plan(N, plan)
    g_in = None if g_in is None else round_to(g_in, io)
    g_out = None if g_out is None else round_to(g_out, io)
    D = None if D is None else round_to(D, acc)
    x = round_to(u if g_in is None else g_in * u, acc)  # (B, H, L)

    c_total = 2 * sum(stage_shift(r, scaling) for r in radices)
    log2n = N.bit_length() - 1
    K = kernel_spectrum(
        k[:, :L], N, radices, scale_exp=c_total - log2n, precision=precision
    )  # (H, N) Monarch order

    Bp = -(-B // 2)
    xe = np.zeros((2 * Bp, H, L))  # (2*Bp, H, L): odd B pads one zero row
    xe[:B] = x
    z = np.zeros((Bp, H, N), dtype=np.complex128)  # (Bp, H, N) packed, zero-padded rows
    z[..., :L] = pack_rows(xe[0::2], xe[1::2])

    V, e_fwd = block_fft_stages(
        z, radices, precision=precision, scaling=scaling, nonzero_len=L
    )
    V = _round_checked(V * K, acc, "pointwise product with K (R5)")
    W, e_inv = block_ifft_stages(V, radices, precision=precision, scaling=scaling, keep=L)
    if scaling == "row":
        W = _round_checked(_ldexp(W, e_fwd + e_inv - c_total), acc, "row exponent undo")

    y = np.empty((2 * Bp, H, L))  # (2*Bp, H, L) unpacked rows
    y[0::2] = W.real
    y[1::2] = W.imag
    y = y[:B]
    if D is not None:
        y = round_to(y + round_to(D[:, None] * x, acc), acc)
    if g_out is not None:
        y = round_to(g_out * y, acc)
    return round_to(y, io)


# ---------------------------------------------------------------------------------------
# Error measurement


def relative_error(y, y_ref):
    """||y - y_ref||_2 / ||y_ref||_2 over all elements.

    0 when both are zero, inf when only y_ref is.
    """
    y = np.asarray(y)
    y_ref = np.asarray(y_ref)
    num = np.linalg.norm((y - y_ref).ravel())
    den = np.linalg.norm(y_ref.ravel())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return float(num / den)


def emulated_error(N, precision, io_dtype, *, B=2, H=4, scaling="stage", plan=None, seed=0):
    """Relative error of the emulated kernel at FFT size N against the float64 result.

    L = Lk = N/2, u ~ N(0, 1) rounded to io_dtype, k ~ N(0, 1/L) rounded to fp32 (so y is
    O(1)), no D or gates (the FFT path alone). The reference is the float64 convolution of
    the same rounded inputs. Returns a dict: error, floor (the relative error of rounding
    the exact y to io_dtype, which no kernel storing y in io_dtype can beat), ratio
    (error / floor) and max_abs (max |y - y_ref|).
    """
    rng = np.random.default_rng(seed)
    L = N // 2
    io = "fp64" if io_dtype is None else io_dtype
    u = round_to(rng.standard_normal((B, H, L)), io)  # (B, H, L)
    k = round_fp32(rng.standard_normal((H, L)) / np.sqrt(L))  # (H, L)
    y_ref = fftconv(u, k)
    y = blockfft_conv(u, k, precision=precision, io_dtype=io_dtype, plan=plan, scaling=scaling)
    error = relative_error(y, y_ref)
    floor = relative_error(round_to(y_ref, io), y_ref)
    return {
        "error": error,
        "floor": floor,
        "ratio": error / floor if floor > 0 else math.inf,
        "max_abs": float(np.max(np.abs(y - y_ref))),
    }
