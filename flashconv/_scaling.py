"""Powers of two around the CPU engines' FFTs, and the row rule for non-finite values.

Overflow and underflow. The FFT of a row of L values near the dtype's largest (or smallest)
magnitude overflows (or underflows) although the convolution itself would not: the transform's
bins are sums of up to n values, the product with the kernel's spectrum multiplies two such
sums. So, as the fused GPU kernel does, every engine on the CPU scales each row of
x = g_in * u by 2^-e_x (|x| * 2^-e_x < 1, e_x from the row's largest magnitude) and each
channel of the kernel by 2^-e_k on the way in, and the convolution by 2^(e_x + e_k) on the way
out. Multiplying by a power of two is exact (away from subnormals), so nothing is lost; a row
whose largest magnitude lies within [2^-SAFE_EXP, 2^SAFE_EXP) keeps e = 0 and is not touched
(the common case costs one max-reduction per row). With SAFE_EXP = 16, an unscaled product of
two transforms stays below 2^(2*16 + 3*24) = 2^104 for n <= 2^24, far from float32's 2^128.
The D x term and the gates multiply the unscaled values, as the definition does. A finite exact
result within about a quarter of the dtype's largest value therefore stays finite and keeps its
float32 (float64) accuracy (tests/test_numerics.py checks every engine near each dtype's max).

Non-finite values (docs/cpu-engines.md, "NaN and Inf"): the convolution of a row of x that holds
a NaN or an Inf, or of a channel whose kernel (k or k_rev) does, is NaN over the whole row: every
engine sets it so explicitly, because what an FFT library leaves in such a row is not defined
(MKL leaves part of it finite). The same rule covers the adjoint in the backward (a row of dz)
and the kernel gradient (every row of the channel).
"""
import numpy as np

SAFE_EXP = 16
_BIG = 1 << 20  # "no contribution yet" exponent of an accumulator


def _needs(e, finite, nonzero, hi=SAFE_EXP):
    return finite & nonzero & ((e > hi) | (e < -SAFE_EXP))


# --- numpy ------------------------------------------------------------------------------------

def np_exponents(amax, hi=SAFE_EXP):
    """(e, bad) for row maxima amax (any shape, >= 0 or NaN/Inf): e (int32) with
    amax * 2^-e in [0.5, 1) for rows outside [2^-SAFE_EXP, 2^SAFE_EXP), 0 elsewhere (and for
    zero or non-finite rows; spectra pass hi=40: their bins are sums of up to n taps); bad
    marks the non-finite rows. Either is None when all-zero /
    all-False (the common case)."""
    if amax.size:
        lo, top = float(amax.min()), float(amax.max())  # the common case in one check
        if lo >= 2.0 ** (-SAFE_EXP - 1) and top < 2.0 ** hi:
            return None, None
    finite = np.isfinite(amax)
    with np.errstate(invalid="ignore"):
        _, e = np.frexp(np.where(finite, amax, 0))
    e = np.where(_needs(e, finite, amax > 0, hi), e, 0).astype(np.int32)
    bad = ~finite
    return (e if e.any() else None), (bad if bad.any() else None)


def np_amax(x):
    """Largest magnitude along the last axis, keepdims (NaN where a NaN is present); real x
    without a temporary of its size (the larger of max and -min)."""
    if not x.shape[-1]:
        return np.zeros(x.shape[:-1] + (1,), np.float64)
    with np.errstate(invalid="ignore"):
        if np.iscomplexobj(x):
            return np.max(np.abs(x), axis=-1, keepdims=True)
        top = np.maximum.reduce(x, axis=-1, keepdims=True)
        return np.maximum(top, np.negative(np.minimum.reduce(x, axis=-1, keepdims=True)), out=top)


def np_scale(x, e):
    """x * 2^e in place (exact up to subnormals); e broadcasts against x. Returns x."""
    if e is not None:
        if np.iscomplexobj(x):
            np.ldexp(x.real, e, out=x.real)
            np.ldexp(x.imag, e, out=x.imag)
        else:
            np.ldexp(x, e, out=x)
    return x


# --- torch ------------------------------------------------------------------------------------

def t_amax(x):
    """Largest magnitude along the last dim, keepdim (NaN where a NaN is present). Real x: the
    larger of amax and -amin (two vectorised passes, no temporary; vector_norm(x, inf)
    measured 13x slower, abs().amax 2x and a temporary of x's size)."""
    import torch

    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1] + (1,), dtype=x.real.dtype if x.is_complex() else None)
    if x.is_complex():
        return x.abs().amax(-1, keepdim=True)
    return torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_())


def t_exponents(amax, sync=True, hi=SAFE_EXP):
    """torch version of np_exponents: (e int32, bad bool). With sync=True (CPU engines) each is
    None when it is all-zero / all-False; with sync=False both are always tensors (no host
    synchronisation, for the torch.fft engine on any device)."""
    import torch

    if sync and amax.numel():
        # The common case in one check: every row within [2^-17, 2^hi), none NaN or Inf.
        lo, top = (float(v) for v in torch.aminmax(amax))
        if lo >= 2.0 ** (-SAFE_EXP - 1) and top < 2.0 ** hi:
            return None, None
    finite = torch.isfinite(amax)
    _, e = torch.frexp(torch.where(finite, amax, torch.zeros_like(amax)))
    e = torch.where(_needs(e, finite, amax > 0, hi), e, torch.zeros_like(e))
    bad = ~finite
    if not sync:
        return e, bad
    return (e if bool(e.any()) else None), (bad if bool(bad.any()) else None)


def _pow2(e, dtype):
    """2^e exactly, e an integer tensor within the normal range of dtype (float32/float64)."""
    import torch

    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def t_scale(x, e, parts=None):
    """x * 2^e in place, exact (up to subnormals); e an integer tensor broadcasting against x
    (None: nothing to do). float32 / complex64 data are multiplied once by a float64 2^e
    (exact, rounded once into x's dtype), float64 / complex128 data in `parts` steps of the
    same sign (default 3: |e| <= 3 * 1022), whose partial products lie between x and the result.
    No host synchronisation. Returns x."""
    import torch

    if e is None:
        return x
    real = x.real.dtype if x.is_complex() else x.dtype
    e = e.to(torch.int64)
    if real != torch.float64:
        return x.mul_(_pow2(e.clamp(-1022, 1023), torch.float64))
    parts = parts or 3
    lo = 0
    for i in range(1, parts + 1):
        hi = torch.div(e * i, parts, rounding_mode="floor")
        x.mul_(_pow2((hi - lo).clamp(-1022, 1023), torch.float64))
        lo = hi
    return x


class TorchAccumulator:
    """sum over rows of per-row products P_b * 2^(r_b), kept as acc * 2^(ce) per channel (rows of
    `shape[0]` channels): the kernel gradient's correlation sum when its terms were computed from
    rows scaled by powers of two. Terms are added in call order (deterministic)."""

    def __init__(self, shape, dtype):
        import torch

        self.acc = torch.zeros(shape, dtype=dtype)
        self.ce = None  # (channels, 1) int64 exponents, None while every term had r = 0

    def add(self, h0, h1, P, r):
        """Add P (b, h1-h0, S) whose rows carry exponents r ((b, h1-h0, 1) ints, or None)."""
        import torch

        if r is None and self.ce is None:
            self.acc[h0:h1] += P[0] if P.shape[0] == 1 else P.sum(0)
            return
        if self.ce is None:
            # Channels with terms so far had exponent 0; the others none yet.
            self.ce = torch.zeros((self.acc.shape[0], 1), dtype=torch.int64)
            self.seen = torch.zeros((self.acc.shape[0], 1), dtype=torch.bool)
            self.seen[:] = self.acc.abs().amax(-1, keepdim=True) > 0
        r = torch.zeros(P.shape[:2] + (1,), dtype=torch.int64) if r is None else r.to(torch.int64)
        ce, seen = self.ce[h0:h1], self.seen[h0:h1]
        m = r.amax(0)
        new = torch.where(seen, torch.maximum(ce, m), m)
        shift = torch.where(seen, ce - new, torch.zeros_like(new))
        if bool(shift.any()):
            t_scale(self.acc[h0:h1], shift.clamp_min(-3000))
        t_scale(P, (r - new).clamp_min(-3000))
        self.acc[h0:h1] += P[0] if P.shape[0] == 1 else P.sum(0)
        self.ce[h0:h1] = new
        self.seen[h0:h1] = True

    def exponents(self):
        """(channels, 1) int64 exponents of acc, or None (all zero)."""
        return self.ce
