"""The fused kernel's FFT plan and the Monarch order its spectra live in (DESIGN.md section 3).

N = 16^n16 * r (r in 1, 2, 4, 8): n16 radix-16 stages, then one radix-r stage (the same rule
as python_ref.blockfft.plan and the comment table in cuda/include/flashconv/fftconv_fwd.h).
After the forward stages, position i of a row holds frequency monarch_perm(N)[i]; the kernel
spectrum K is prepared in that order so the pointwise product needs no permutation.
"""
import functools

import numpy as np


def fused_fft_size(L):
    """FFT size of the fused kernel for length L: smallest power of two >= max(2L, 32).

    2L (not L + Lk - 1) so that L <= N/2 always holds: the kernel skips the zero half of
    its first stage and the discarded half of its last one.
    """
    return max(32, 1 << max(0, (2 * int(L) - 1).bit_length()))


def fft_plan(N):
    """Radices of the plan for a power of two N >= 2, first stage first (the fused kernel
    uses N >= 32; the two-level kernel's outer factor may be smaller)."""
    if N < 2 or N & (N - 1):
        raise ValueError("fft_plan: N must be a power of two >= 2, got %r" % (N,))
    radices = []
    while N >= 16:
        radices.append(16)
        N //= 16
    if N > 1:
        radices.append(N)
    return tuple(radices)


@functools.lru_cache(maxsize=64)
def monarch_perm(N):
    """int64 array p: position i of the forward block FFT holds natural frequency p[i].

    For radices (r0, r1, ...): position ((k0 * r1 + k1) * r2 + k2) ... holds frequency
    k0 + r0 * k1 + r0 * r1 * k2 + ...
    """
    radices = fft_plan(N)
    digits = np.indices(radices).reshape(len(radices), -1)  # digit k_j of each position
    freq = np.zeros(N, np.int64)
    weight = 1
    for j, r in enumerate(radices):
        freq += digits[j] * weight
        weight *= r
    freq.setflags(write=False)
    return freq
