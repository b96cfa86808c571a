"""The scipy CPU engine: causal FFT convolution on numpy arrays with scipy.fft.

Used where torch is not installed, or for numpy arrays torch cannot view (negative
strides, non-native byte order); torch tensors and other numpy arrays go through the
torch.fft engine (flashconv/_cpu_torch.py), measured faster on this project's machines.
fft_size() and the thread pool here are shared with the other CPU paths.

Everything runs in the compute dtype (float32, or float64 for float64 inputs) on
rows of the (B, H, L) input, in cache-sized chunks spread over a thread pool
(scipy.fft and numpy release the GIL). What makes it faster than the usual
torch.fft `fftconv_ref` (measured in bench/sweep.py):

- the FFT size is L + Lk - 1 rounded up to a 5-smooth length, not 2L;
- the kernel spectrum is computed once per call (or passed in precomputed), never
  per batch row;
- rows are zero-padded into a reused per-thread buffer: scipy's own `n=` padding
  path is several times slower than an FFT of an already padded buffer, and a fresh
  buffer per call costs page faults;
- the product with K and the inverse FFT work in place, and the epilogue (+ D*x,
  output gate) writes straight into the output through `out=`.

Forward:  z = irfft(rfft(x) * K)[:L] + D x,  y = g_out z,  with x = g_in u.
Backward: dz = g_out dy;  dx = irfft(rfft(dz) * conj(K))[:L] + D dz  (a causal
correlation: N >= L + Lk - 1 keeps the wrap-around out of t < L);
dk = irfft(sum_b conj(X_b) * DZ_b)[:Lk];  dD = sum_{b,t} dz x.
"""
import bisect
import concurrent.futures
import functools
import importlib
import os
import threading

import numpy as np


class _LazyModule:
    """A module imported on first attribute access: scipy.fft costs ~0.5 s to import (it
    pulls in scipy.special and numpy.f2py), and torch users of the CPU engine never need it."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


sfft = _LazyModule("scipy.fft")

# A chunk's padded real buffer targets this many bytes: small enough that the
# rfft -> product -> irfft sequence of a chunk stays in L2.
_CHUNK_BYTES = 1 << 20
# Below this many output elements the thread pool costs more than it saves.
_PARALLEL_MIN_ELEMS = 1 << 16

_tls = threading.local()
_pool_lock = threading.Lock()
_pool = None


def num_threads():
    """Worker threads used by the CPU engine (FLASHCONV_NUM_THREADS overrides)."""
    env = os.environ.get("FLASHCONV_NUM_THREADS", "").strip()
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _executor():
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != num_threads():
            _pool = concurrent.futures.ThreadPoolExecutor(num_threads(), "flashconv-cpu")
        return _pool


def fft_size(L, lk):
    """FFT length for a causal linear convolution of L outputs with lk taps (lk = 0: none):
    the smallest 5-smooth length >= L + lk - 1 (scipy.fft.next_fast_len(n, real=True))."""
    return next_fast_len(max(L + max(lk, 1) - 1, 1))


@functools.lru_cache(maxsize=None)
def _smooth_numbers(limit_bits):
    """Sorted 2^a 3^b 5^c <= 2^limit_bits."""
    top = 1 << limit_bits
    out = []
    p5 = 1
    while p5 <= top:
        p35 = p5
        while p35 <= top:
            v = p35
            while v <= top:
                out.append(v)
                v *= 2
            p35 *= 3
        p5 *= 5
    return sorted(out)


def next_fast_len(n):
    """The smallest 5-smooth integer >= n >= 1: what scipy.fft.next_fast_len(n, real=True)
    returns, without importing scipy.fft."""
    n = int(n)
    table = _smooth_numbers(max(8, n.bit_length() + 1))
    return table[bisect.bisect_left(table, n)]


def kernel_spectrum(k, L, n, dtype, k_rev=None):
    """rfft of k (H, Lk) truncated to L taps, zero-padded to n: (H, n//2 + 1) complex.

    With an anti-causal kernel k_rev (bidirectional convolution), rfft(k) + conj(rfft(k_rev)):
    the product with it adds sum_s k_rev[s] x[t+s] (n >= L + Lk_rev - 1 keeps it unwrapped).
    """
    K = _rfft_rows(k, L, n, dtype)
    if k_rev is not None:
        K += np.conj(_rfft_rows(k_rev, L, n, dtype))
    return K


def _rfft_rows(k, L, n, dtype):
    """rfft of the first min(Lk, L) taps of each row of k, zero-padded to n, on all cores.

    Padded explicitly: scipy's own n= padding path is several times slower.
    """
    k = np.asarray(k)[:, :L]
    buf = np.zeros((k.shape[0], n), dtype)
    buf[:, : k.shape[1]] = k
    return sfft.rfft(buf, axis=-1, workers=num_threads())


def _pad_buffer(shape, dtype):
    """A per-thread buffer of `shape`, reused across calls; the caller fills all of it."""
    key = (shape, np.dtype(dtype).str)
    buf = getattr(_tls, "buffers", {}).get(key)
    if buf is None:
        _tls.buffers = {key: np.empty(shape, dtype)}  # keep one: bounded memory
        buf = _tls.buffers[key]
    return buf


def row_chunks(B, H, rows):
    """Work items (b0, b1, h0, h1) of about `rows` (B, H) rows each: several whole batch rows
    when H <= rows, else ranges of `rows` channels of one batch row."""
    rows = max(1, int(rows))
    if H <= rows:
        bc = max(1, rows // H)
        return [(b, min(B, b + bc), 0, H) for b in range(0, B, bc)]
    return [(b, b + 1, h0, min(H, h0 + rows)) for b in range(B) for h0 in range(0, H, rows)]


def _chunks(B, H, n, itemsize):
    """Work items (b0, b1, h0, h1) whose padded buffers hold about _CHUNK_BYTES."""
    return row_chunks(B, H, _CHUNK_BYTES // (n * itemsize))


def _run(items, fn, total_elems):
    """fn(item) for every item: on the calling thread and num_threads() - 1 pool threads,
    each taking the next item as it becomes free."""
    nt = min(num_threads(), len(items))
    if nt < 2 or total_elems < _PARALLEL_MIN_ELEMS:
        for it in items:
            fn(it)
        return
    todo = iter(items)
    lock = threading.Lock()

    def drain():
        while True:
            with lock:
                it = next(todo, None)
            if it is None:
                return
            fn(it)

    helpers = [_executor().submit(drain) for _ in range(nt - 1)]
    drain()
    for f in helpers:
        f.result()  # re-raises a worker's exception


def _rfft_padded(src, L, n, dtype, scale=None):
    """rfft along the last axis of `src` (..., L) (times `scale` if given) zero-padded to n."""
    buf = _pad_buffer(src.shape[:-1] + (n,), dtype)
    if scale is None:
        buf[..., :L] = src
    else:
        np.multiply(src, scale, out=buf[..., :L])
    buf[..., L:] = 0
    return sfft.rfft(buf, axis=-1)


def conv_forward(u, K, n, D=None, g_in=None, g_out=None, dtype=np.float32):
    """y (B, H, L) in `dtype` from u (B, H, L) and K = kernel_spectrum(k, L, n, dtype).

    u, D and the gates may be any real dtype and any strides; they are read once.
    """
    B, H, L = u.shape
    out = np.empty((B, H, L), dtype)

    def work(item):
        b0, b1, h0, h1 = item
        sl = (slice(b0, b1), slice(h0, h1))
        gi = None if g_in is None else g_in[sl]
        X = _rfft_padded(u[sl], L, n, dtype, gi)
        X *= K[h0:h1]
        z = sfft.irfft(X, n=n, axis=-1, overwrite_x=True)[..., :L]
        o = out[sl]
        if D is not None:
            # D * x with x = g_in * u, recomputed rather than stored (one more read of u).
            x = u[sl] if gi is None else u[sl] * gi
            np.multiply(x, D[h0:h1, None], out=o)
            o += z
        else:
            o[...] = z
        if g_out is not None:
            o *= g_out[sl]

    _run(_chunks(B, H, n, np.dtype(dtype).itemsize), work, B * H * L)
    return out


def conv_backward(dy, u, K, n, lk, D=None, g_in=None, g_out=None, dtype=np.float32,
                  need_k=True, need_D=True, need_gates=True, lk_rev=0):
    """Gradients of conv_forward: dict with du, dk (H, lk), dD, dg_in, dg_out (or None),
    and dk_rev (H, lk_rev) for a bidirectional K (lk_rev > 0): the negative lags of the
    same correlation, irfft(sum_b X conj(DZ)).

    dk is the gradient for the first lk taps only (the caller zero-fills taps >= L).
    """
    B, H, L = u.shape
    du = np.empty((B, H, L), dtype)
    dg_in = np.empty((B, H, L), dtype) if (need_gates and g_in is not None) else None
    dg_out = np.empty((B, H, L), dtype) if (need_gates and g_out is not None) else None
    dD_rows = np.zeros((B, H), np.float64) if (need_D and D is not None) else None
    Kc = np.conj(K)
    accs = {}  # thread id -> (H, n//2+1) partial sum over batch rows of conj(X) DZ

    def work(item):
        b0, b1, h0, h1 = item
        sl = (slice(b0, b1), slice(h0, h1))
        uu = u[sl]
        x = uu if g_in is None else uu * g_in[sl]
        dyb = dy[sl]
        dz = dyb if g_out is None else dyb * g_out[sl]
        DZ = _rfft_padded(dz, L, n, dtype)
        if need_k:
            X = _rfft_padded(x, L, n, dtype)
            acc = accs.get(threading.get_ident())
            if acc is None:
                acc = accs.setdefault(threading.get_ident(),
                                      np.zeros((H, n // 2 + 1), DZ.dtype))
            np.conjugate(X, out=X)
            X *= DZ
            acc[h0:h1] += X.sum(axis=0)
        if dg_out is not None:
            # dg_out = dy * z, z = conv(x, k) + D x: one more inverse FFT of X K.
            Xf = _rfft_padded(x, L, n, dtype)
            Xf *= K[h0:h1]
            z = sfft.irfft(Xf, n=n, axis=-1, overwrite_x=True)[..., :L]
            if D is not None:
                z = z + x * D[h0:h1, None]
            np.multiply(dyb, z, out=dg_out[sl])
        DZ *= Kc[h0:h1]
        dx = sfft.irfft(DZ, n=n, axis=-1, overwrite_x=True)[..., :L]
        if D is not None:
            dx += dz * D[h0:h1, None]
            if dD_rows is not None:
                dD_rows[sl] = np.einsum("bht,bht->bh", dz, x, dtype=np.float64)
        if dg_in is not None:
            np.multiply(dx, uu, out=dg_in[sl])
        if g_in is not None:
            np.multiply(dx, g_in[sl], out=du[sl])
        else:
            du[sl] = dx

    _run(_chunks(B, H, n, np.dtype(dtype).itemsize), work, B * H * L)
    dk = dk_rev = None
    if need_k:
        total = sum(accs.values()) if accs else np.zeros((H, n // 2 + 1), np.result_type(dtype, np.complex64))
        dk = sfft.irfft(total, n=n, axis=-1)[:, :lk].astype(dtype, copy=False)
        if lk_rev:
            dk_rev = sfft.irfft(np.conj(total), n=n, axis=-1)[:, :lk_rev].astype(dtype, copy=False)
    dD = dD_rows.sum(axis=0).astype(dtype) if dD_rows is not None else None
    return {"du": du, "dk": dk, "dD": dD, "dg_in": dg_in, "dg_out": dg_out, "dk_rev": dk_rev}
