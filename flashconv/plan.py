"""The fused kernel's FFT plan and the Monarch order its spectra live in (docs/kernels.md).

N = r * 16^n16 (r in 1, 2, 4, 8): one radix-r stage first (if r > 1), then n16 radix-16
stages (the same rule as python_ref.blockfft.plan and cuda/include/flashconv/block_fft.h).
The radix-r stage comes first so that every radix-16 stage has a stride of 1 or a multiple
of 16: its 16-element vectors, or 8 consecutive vectors, are then contiguous in memory.
After the forward stages, position i of a row holds frequency monarch_perm(N)[i]; the kernel
spectrum K is prepared in that order so the pointwise product needs no permutation.
"""
import functools

import numpy as np


MIN_FUSED_N = 256  # the bfloat16 kernel's smallest size (one 256-point group per pair)


def fused_fft_size(L):
    """FFT size of the fused kernel for length L: smallest power of two >= max(2L, 256).

    2L (not L + Lk - 1) so that L <= N/2 always holds: the kernel skips the zero half of
    its first stage and the discarded half of its last one.
    """
    return max(MIN_FUSED_N, 1 << max(0, (2 * int(L) - 1).bit_length()))


def fft_plan(N):
    """Radices of the plan for a power of two N >= 2, first stage first (the fused kernel
    uses N >= 32; the two-level kernel's outer factor may be smaller)."""
    if N < 2 or N & (N - 1):
        raise ValueError("fft_plan: N must be a power of two >= 2, got %r" % (N,))
    n16 = (N.bit_length() - 1) // 4
    r = N >> (4 * n16)
    return ((r,) if r > 1 else ()) + (16,) * n16


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


@functools.lru_cache(maxsize=1)
def fragment_positions():
    """int64 (256,): the order in which the bfloat16 forward kernel reads one 256-element
    group of K (cuda/include/flashconv/fwd_tc.h, group256): entry 8 * lane + j holds the
    group position 16 * k1 + k2 of the mma accumulator element j = 4 * nt + e of `lane`
    (g = lane // 4, t = lane % 4, k1 = g + 8 * (e // 2), k2 = 2 t + e % 2 + 8 nt)."""
    lane, j = np.divmod(np.arange(256), 8)
    g, t = np.divmod(lane, 4)
    nt, e = np.divmod(j, 4)
    pos = 16 * (g + 8 * (e // 2)) + 2 * t + e % 2 + 8 * nt
    pos.setflags(write=False)
    return pos


def fragment_spectrum(K):
    """The bfloat16 forward kernel's K16 from a Monarch-order spectrum K (H, N) (numpy complex,
    already scaled so that max |K| <= 1): (H, 2N) float16, per 256-element group the real parts
    then the imaginary parts, each in fragment_positions() order."""
    H, N = K.shape
    Kg = np.asarray(K).reshape(H, N // 256, 256)[:, :, fragment_positions()]
    return np.stack([Kg.real, Kg.imag], axis=2).astype(np.float16).reshape(H, 2 * N)


# --- plan data on a device ------------------------------------------------------------------
#
# The CUDA host path must not copy from pageable host memory on every call (a synchronisation,
# and an error under CUDA graph capture). The permutations are therefore computed on the
# device from torch.arange (digit arithmetic, no host data) and cached per (device, N).

_DEVICE_PLANS = {}


def _perm_from_positions(i, N):
    """monarch_perm(N)[i] by digit arithmetic on a torch tensor of positions i."""
    radices = fft_plan(N)
    freq = i.new_zeros(i.shape)
    rest = i
    weights = []
    w = 1
    for r in radices:
        weights.append(w)
        w *= r
    for r, w in zip(reversed(radices), reversed(weights)):  # last digit is least significant
        freq += (rest % r) * w
        rest = rest // r
    return freq


def _capturing(device):
    import torch

    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_perm(N, device):
    """monarch_perm(N) as an int64 tensor on `device`, computed there (no host-to-device copy)
    and cached per (device, N); read-only by convention. While the current CUDA stream is
    being captured into a graph the result is computed into the graph and not cached (its
    values exist only once the graph is replayed)."""
    import torch

    device = torch.device(device)
    key = ("perm", str(device), int(N))
    t = _DEVICE_PLANS.get(key)
    if t is None:
        t = _perm_from_positions(torch.arange(int(N), device=device), int(N))
        if not _capturing(device):
            _DEVICE_PLANS[key] = t
    return t


def device_fragment_positions(device):
    """fragment_positions() as an int64 tensor on `device`, computed there (cached per device)."""
    import torch

    device = torch.device(device)
    key = ("frag", str(device))
    t = _DEVICE_PLANS.get(key)
    if t is None:
        i = torch.arange(256, device=device)
        lane, j = i // 8, i % 8
        g, t4, nt, e = lane // 4, lane % 4, j // 4, j % 4
        t = 16 * (g + 8 * (e // 2)) + 2 * t4 + e % 2 + 8 * nt
        if not _capturing(device):
            _DEVICE_PLANS[key] = t
    return t


def device_long_order(N1, N2, device):
    """flashconv._long.long_order(N1, N2) as an int64 tensor on `device` (see device_perm)."""
    import torch

    device = torch.device(device)
    key = ("long", str(device), int(N1), int(N2))
    t = _DEVICE_PLANS.get(key)
    if t is None:
        t = (device_perm(N1, device)[:, None] + N1 * device_perm(N2, device)[None, :]).reshape(-1)
        if not _capturing(device):
            _DEVICE_PLANS[key] = t
    return t
