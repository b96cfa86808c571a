"""Overlap-save: the CPU engine's causal convolution for kernels much shorter than u.

docs/cpu-engines.md ("The convolution"). A full-length FFT convolution costs O(L log L) per row whatever
the kernel length; with lk taps, blocks of FFT size P (a few times lk) cost
O(L/(P - lk + 1) * P log P) = O(L log lk), and each block's FFT fits in cache.

Block j covers outputs [j S, (j+1) S), S = P - lk + 1, and reads the P inputs
[j S - (lk - 1), (j+1) S) (zeros before t = 0 and after t = L - 1). Its circular
convolution with k (zero-padded to P) is exact at positions lk-1 .. P-1, where no
wrap-around reaches: those are the S outputs kept ("save"); the first lk-1 are discarded.

    x = g_in u,  y[t] = g_out[t] * ( sum_{s<lk} k[s] x[t-s] + D x[t] )

Same semantics as flashconv.fftconv on numpy arrays: any real dtypes and strides in,
compute in float32 (float64 for float64 u), y in u's dtype; k longer than L is truncated.
Forward only: the engine cpu_overlap_save (flashconv/engines/) serves it where overlap_save_cheaper says so.
"""
import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from flashconv import _cpu
from flashconv._scaling import np_amax, np_exponents, np_scale

sfft = _cpu.sfft  # scipy.fft, imported on first use

__all__ = ["overlap_save", "overlap_save_cheaper", "choose_block"]

# Cost model. One rfft + irfft pair of size n, with the pointwise product and the copies
# around it, costs about
#     fft_cost(n) = n (log2 n + _C) * penalty(n)
# element-levels, where penalty rises log-linearly from 1 at n = 2^17 to _OUT_OF_CACHE at
# n = 2^19 and beyond: a transform that no longer fits in L2/L3 costs ~3x per element-level.
# Measured on the 2-core development CPU (scipy 1.17 pocketfft, float32, rfft + irfft of
# 4M elements in rows of n, min of 5; the machine was shared with other jobs: +-30%):
#     n = 1K..128K:  6-15 ns per element, ~1.0 ns per element-level (0.5-1.4)
#     n = 256K: 10 ns, 512K: 27 ns, 1M..4M: 59-61 ns per element (~2.9 per element-level)
# Decision rule (overlap_save_cheaper), per output element:
#     full FFT:      fft_cost(L) / L        (a lower bound: that path transforms
#                                            next_fast_len(L + lk - 1) >= L points)
#     overlap-save:  fft_cost(P) / S,       S = P - lk + 1 outputs kept per block
# Both sides are then monotone (the answer never flips back as L grows or lk shrinks).
# Checked against flashconv's full-length CPU path on (1, 4, L) float32 vs overlap_save
# with the default block (ms, min of 5; model's answer last):
#     L = 1M,   lk = 1 / 64 / 1024 / 16384:  288 vs 45, 329 vs 53, 388 vs 61, 388 vs 130  yes
#     L = 256K, lk = 64 / 4096 / 16384:       104 vs 7, 57 vs 33, 64 vs 55                yes
#     L = 128K, lk = 256: 27 vs 9 (yes);  lk = 4096: 33 vs 35 (no)
#     L = 64K,  lk = 64: 8.6 vs 3.0 (yes);  L = 16K, lk = 4096: 0.74 vs 2.7 (no)
#     L = 4K,   lk = 1 / 16: 0.17 vs 0.15, 0.20 vs 0.17 (yes); L = 1K, lk = 1: 0.09 vs 0.10 (no)
#     L = 256K, lk = 65536 (P = 2^18): 33 vs 109, hence _MAX_BLOCK.
_C = 3.0
_CACHE_LO, _CACHE_HI = 17, 19  # log2 n where the out-of-cache penalty starts / saturates
_OUT_OF_CACHE = 3.0
# Overlap-save must win by this factor before it is chosen: the model is rough, and a
# wrong "yes" costs more than a wrong "no" (the full path is the better-tested one).
_MARGIN = 1.25
# Blocks stay inside the cache, which is where their advantage comes from: the automatic
# block is at most _MAX_BLOCK, and overlap-save is only proposed for lk <= _MAX_BLOCK / 4.
_MIN_BLOCK = 32
_MAX_BLOCK = 1 << 16
# Below this length both paths take < 0.2 ms and per-call overheads decide: keep the full FFT.
_MIN_L = 4096

# A work item's block buffer (rows x blocks x P) targets this many bytes, like _cpu's chunks.
_ITEM_BYTES = 1 << 20


def _fft_cost(n):
    """Modelled cost of an rfft + irfft pair of size n (element-levels, see above)."""
    lg = math.log2(n)
    ramp = min(1.0, max(0.0, (lg - _CACHE_LO) / (_CACHE_HI - _CACHE_LO)))
    return n * (lg + _C) * (1.0 + (_OUT_OF_CACHE - 1.0) * ramp)


def choose_block(lk, L=None):
    """FFT block size P for lk taps: the power of two in [max(2 lk, 32), 2^16] of least
    modelled cost per kept output, fft_cost(P) / (P - lk + 1) (about 8-16 x lk), no larger
    than one block covering all L outputs needs. For lk > 2^15, the smallest power of two
    >= 2 lk (overlap-save is then not proposed: overlap_save_cheaper is False)."""
    lk = max(1, int(lk))
    P = max(_MIN_BLOCK, 1 << (2 * lk - 1).bit_length())
    best, best_cost = P, _fft_cost(P) / (P - lk + 1)
    while P < _MAX_BLOCK:
        P *= 2
        cost = _fft_cost(P) / (P - lk + 1)
        if cost >= best_cost:
            break
        best, best_cost = P, cost
    if L is not None:
        best = min(best, max(_MIN_BLOCK, 1 << max(0, int(L) + lk - 2).bit_length()))
    return best


def overlap_save_cheaper(L, lk):
    """True if overlap-save is modelled cheaper than one full-length FFT (L outputs, lk taps).

    Rule: L >= 4096, 4 lk <= min(L, 2^16) and 1.25 fft_cost(P) / (P - lk + 1) <
    fft_cost(L) / L, with P = choose_block(lk) and fft_cost(n) = n (log2 n + 3), times up
    to 3 beyond 2^17 points (out of cache); constants calibrated above. Monotone: true for
    some (L, lk) implies true for every longer L and every shorter lk. In practice: lk <= 16
    from L = 4K, lk <= 64 from L = 32K, lk <= 16K from L = 256K.
    """
    L, lk = int(L), max(1, int(lk))
    if L < _MIN_L or 4 * lk > min(L, _MAX_BLOCK):
        return False
    P = choose_block(lk)
    return _MARGIN * _fft_cost(P) / (P - lk + 1) < _fft_cost(L) / L


def _items(B, H, nb, P, itemsize):
    """(b, h0, h1, j0, j1) work items: rows h0:h1 of batch b, blocks j0:j1, ~_ITEM_BYTES each."""
    per_row = nb * P * itemsize
    if per_row >= _ITEM_BYTES:
        nbk = max(1, _ITEM_BYTES // (P * itemsize))
        return [(b, h, h + 1, j, min(nb, j + nbk)) for b in range(B) for h in range(H)
                for j in range(0, nb, nbk)]
    hc = max(1, min(H, _ITEM_BYTES // per_row))
    return [(b, h0, min(H, h0 + hc), 0, nb) for b in range(B) for h0 in range(0, H, hc)]


def _check(u, k, D, g_in, g_out):
    for name, a in (("u", u), ("k", k), ("D", D), ("g_in", g_in), ("g_out", g_out)):
        if a is None:
            continue
        if not isinstance(a, np.ndarray):
            raise TypeError("overlap_save: %s must be a numpy.ndarray, got %s" % (name, type(a).__name__))
        if a.dtype.kind != "f":
            raise TypeError("overlap_save: %s must be a real floating array, got %s" % (name, a.dtype))
    if u.ndim != 3:
        raise ValueError("overlap_save: u must have shape (B, H, L), got shape %s" % (u.shape,))
    B, H, L = u.shape
    if k.ndim != 2 or k.shape[0] != H:
        raise ValueError("overlap_save: k must have shape (H, Lk) = (%d, Lk), got shape %s"
                         % (H, k.shape))
    for name, a, want in (("D", D, (H,)), ("g_in", g_in, u.shape), ("g_out", g_out, u.shape)):
        if a is not None and a.shape != want:
            raise ValueError("overlap_save: %s must have shape %s, got shape %s" % (name, want, a.shape))


def overlap_save(u, k, D=None, g_in=None, g_out=None, block=None):
    """Gated causal convolution of u with a short kernel k by overlap-save blocks.

    Args:
        u: (B, H, L) numpy array, any real float dtype and strides.
        k: (H, Lk) kernel, time domain; taps beyond L are ignored.
        D: optional (H,) skip term.
        g_in, g_out: optional (B, H, L) gates.
        block: FFT block size P >= min(Lk, L) (default choose_block(Lk, L)); any size
            works, fast ones (powers of two) are fastest.

    Returns:
        y (B, H, L) in u's dtype, ``g_out * (causal_conv(g_in u, k) + D g_in u)``, computed
        in float32 (float64 when u is float64).
    """
    _check(u, k, D, g_in, g_out)
    B, H, L = u.shape
    dtype = np.float64 if u.dtype.itemsize == 8 else np.float32  # any byte order
    lk = min(int(k.shape[1]), L)
    if B * H * L == 0:
        return np.zeros(u.shape, u.dtype)
    if lk == 0:
        k, lk = np.zeros((H, 1), dtype), 1  # no taps: the convolution is zero
    P = choose_block(lk, L) if block is None else int(block)
    if P < lk:
        raise ValueError("overlap_save: block must be >= min(Lk, L) = %d, got %d" % (lk, P))
    S = P - lk + 1  # outputs kept per block
    nb = -(-L // S)
    # k scaled per channel by a power of two around the FFTs, as each item's rows are
    # (flashconv/_scaling.py); channels or rows holding a NaN or Inf give NaN rows.
    kk = np.array(k[:, :lk], dtype)
    ek, kbad = np_exponents(np_amax(kk))
    K = sfft.rfft(np_scale(kk, None if ek is None else -ek), n=P, axis=-1)  # (H, P//2 + 1)
    out = np.empty((B, H, L), dtype)
    itemsize = np.dtype(dtype).itemsize
    bad_rows = np.zeros((B, H), bool)

    def work(item, w):
        b, h0, h1, j0, j1 = item
        rows, nblk = h1 - h0, j1 - j0
        t0 = j0 * S  # first output of the item
        t1 = min(L, j1 * S)
        # Inputs [t0 - (lk-1), j1 S) into a zero-padded buffer: the item's windows overlap.
        a = t0 - (lk - 1)
        buf = np.zeros((rows, nblk * S + lk - 1), dtype)  # (rows, inputs of the item's blocks)
        lo = max(a, 0)
        dst = buf[:, lo - a:t1 - a]
        if g_in is None:
            dst[...] = u[b, h0:h1, lo:t1]
        else:
            np.multiply(u[b, h0:h1, lo:t1], g_in[b, h0:h1, lo:t1], out=dst)
        ex, xbad = np_exponents(np_amax(buf))
        x = buf
        if ex is not None:
            x = buf.copy() if D is not None else None
            np_scale(buf, -ex)
        if xbad is not None:
            bad_rows[b, h0:h1] |= xbad[:, 0]
        # (rows, nblk, P) windows with hop S: a view, no copy.
        win = as_strided(buf, (rows, nblk, P), (buf.strides[0], S * itemsize, itemsize), writeable=False)
        X = sfft.rfft(win, axis=-1)  # (rows, nblk, P//2 + 1)
        X *= K[h0:h1, None, :]
        z = sfft.irfft(X, n=P, axis=-1, overwrite_x=True)[..., lk - 1:]  # (rows, nblk, S): valid part
        z = z.reshape(rows, nblk * S)[:, :t1 - t0]
        e = ex if ek is None else (ek[h0:h1] if ex is None else ex + ek[h0:h1])
        np_scale(z, e)
        o = out[b, h0:h1, t0:t1]
        if D is not None:
            # D x, with x read back from the buffer (already gated).
            np.multiply(x[:, t0 - a:t1 - a], np.asarray(D[h0:h1], dtype)[:, None], out=o)
            o += z
        else:
            o[...] = z
        if g_out is not None:
            o *= g_out[b, h0:h1, t0:t1]

    _cpu._run(_items(B, H, nb, P, itemsize), work, B * H * L)
    if kbad is not None:
        bad_rows |= kbad[:, 0]
    if bad_rows.any():
        out[bad_rows] = np.nan  # the NaN rule: the whole row (docs/cpu-engines.md)
    with np.errstate(over="ignore"):
        return out.astype(u.dtype, copy=False)


# --- overlap-save on torch tensors around a block convolution (the fused CUDA kernel) -------

def gpu_block(lk, max_block):
    """Block size P for overlap-save around the fused kernel: the smallest power of two
    >= 8 lk (at most 1/8 of each block's outputs discarded) and >= 256, or None when that
    exceeds max_block (the fused kernel's largest input length)."""
    P = max(256, 1 << (8 * max(1, int(lk)) - 1).bit_length())
    return P if P <= max_block else None


def overlap_save_blocks(u, k, D, g_in, g_out, conv, block):
    """y = g_out * (causal_conv(g_in u, k) + D g_in u) for torch tensors u (B, H, L), by
    blocks of `block` inputs, each convolved by conv(u_blk, k, D, g_in_blk, g_out_blk) ->
    (nb, H, block) (a causal convolution of each block row, e.g. the fused kernel).

    Block j of batch row b reads inputs [j S - (lk - 1), j S + S) (zeros before t = 0),
    S = block - lk + 1; its outputs at positions lk - 1 .. block - 1 have their whole
    history inside the block and are kept. The blocks of a batch row are overlapping
    windows of one zero-padded copy of u (a strided view, no copy per block), and the gates
    are windowed the same way, so conv applies D, g_in and g_out itself; conv runs once per
    batch row, with the blocks as its batch."""
    import torch
    B, H, L = (int(s) for s in u.shape)
    lk = max(1, min(int(k.shape[1]), L))
    P = int(block)
    if P < lk:
        raise ValueError("overlap_save_blocks: block must be >= min(Lk, L) = %d, got %d" % (lk, P))
    S = P - lk + 1
    nb = -(-L // S)
    Lp = nb * S + lk - 1  # padded length: lk - 1 zeros in front, the tail of the last block

    def windows(t, b):
        """(nb, H, P) overlapping windows of row b of t, zero-padded (a view of one copy)."""
        if t is None:
            return None
        p = t.new_zeros((H, Lp))
        p[:, lk - 1:lk - 1 + L] = t[b]
        return p.as_strided((nb, H, P), (S, Lp, 1))

    y = torch.empty((B, H, L), dtype=u.dtype, device=u.device)
    kk = k[:, :lk]
    for b in range(B):
        yb = conv(windows(u, b), kk, D, windows(g_in, b), windows(g_out, b))  # (nb, H, P)
        y[b] = yb[:, :, lk - 1:].permute(1, 0, 2).reshape(H, nb * S)[:, :L]
    return y
