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
  output gate) writes straight into the output through `out=`;
- memory: the kernel's spectrum is computed a group of channels at a time when all of them
  would not fit the call's budget (plan(): about 2x u's size forward, 4x backward, beyond
  inputs and outputs);
- each row and kernel channel is scaled by a power of two around its FFT
  (flashconv/_scaling.py), and a row holding a NaN or an Inf gives a NaN row;
- reproducible: work item i runs on worker i % threads (_run), and the backward's per-worker
  sums of dk are added in worker order: the same input and FLASHCONV_NUM_THREADS give the same
  bits.

Forward:  z = irfft(rfft(x) * K)[:L] + D x,  y = g_out z,  with x = g_in u.
Backward: dz = g_out dy;  dx = irfft(rfft(dz) * conj(K))[:L] + D dz  (a causal
correlation: N >= L + Lk - 1 keeps the wrap-around out of t < L);
dk = irfft(sum_b conj(X_b) * DZ_b)[:Lk];  dD = sum_{b,t} dz x.
"""
import concurrent.futures
import importlib
import os
import sys
import threading
from typing import NamedTuple

import numpy as np

from flashconv._scaling import np_amax, np_exponents, np_scale


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


_FAST_LEN = {}


def next_fast_len(n):
    """The smallest 5-smooth integer >= n >= 1: what scipy.fft.next_fast_len(n, real=True)
    returns, without importing scipy.fft. Plain integer arithmetic (torch.compile traces it:
    fft_kernel inside a compiled function), cached per n outside compiled code."""
    n = int(n)
    hit = _FAST_LEN.get(n)
    if hit is not None:
        return hit
    best = 1 << max(0, n - 1).bit_length()  # a power of two >= n
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            q = -(-n // p35)  # p35 times the smallest power of two >= q is >= n
            best = min(best, p35 << max(0, q - 1).bit_length())
            p35 *= 3
        p5 *= 5
    if not _compiling() and len(_FAST_LEN) < 1 << 14:
        _FAST_LEN[n] = best
    return best


def _compiling():
    torch = sys.modules.get("torch")  # not imported: nothing is being compiled
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


class Taps(NamedTuple):
    """A time-domain kernel for conv_forward / conv_backward: transformed there, a group of
    channels at a time."""

    k: object
    k_rev: object = None


def kernel_spectrum(k, L, n, dtype, k_rev=None):
    """rfft of k (H, Lk) truncated to L taps, zero-padded to n: (H, n//2 + 1) complex.

    With an anti-causal kernel k_rev (bidirectional convolution), rfft(k) + conj(rfft(k_rev)):
    the product with it adds sum_s k_rev[s] x[t+s] (n >= L + Lk_rev - 1 keeps it unwrapped).
    k is scaled by a power of two per channel around the transform (flashconv/_scaling.py); a
    spectrum beyond the dtype's range comes back as Inf (fft_kernel reports it).
    """
    K, e, bad = _Spectra(Taps(k, k_rev), n, L, dtype).get(0, int(np.shape(k)[0]))
    with np.errstate(over="ignore", invalid="ignore"):
        np_scale(K, e)
    if bad is not None:
        K[bad[:, 0]] = np.nan
    return K


class _Spectra:
    """The kernel's spectrum for a range of channels, scaled per channel by a power of two:
    (K (h, n//2 + 1), e (h, 1) int32 or None, bad (h, 1) bool or None); K is always a new
    array. See flashconv/_cpu_torch.py's _Spectra."""

    def __init__(self, K, n, L, dtype):
        self.K, self.n, self.L, self.dtype = K, n, L, np.dtype(dtype)

    def get(self, h0, h1):
        if not isinstance(self.K, Taps):
            K = np.array(self.K[h0:h1], dtype=np.result_type(self.dtype, np.complex64))
            e, bad = np_exponents(np_amax(K), hi=40)
            return np_scale(K, None if e is None else -e), e, bad
        k = np.asarray(self.K.k)[h0:h1, :self.L]
        kr = None if self.K.k_rev is None else np.asarray(self.K.k_rev)[h0:h1, :self.L]
        amax = np_amax(k).astype(np.float64)
        if kr is not None:
            amax = np.maximum(amax, np_amax(kr))  # NaN stays NaN: a non-finite channel
        e, bad = np_exponents(amax)
        K = _rfft_rows(k, self.n, self.dtype, e)
        if kr is not None:
            K += np.conj(_rfft_rows(kr, self.n, self.dtype, e))
        return K, e, bad


def _rfft_rows(k, n, dtype, e=None):
    """rfft of the rows of k (already truncated), times 2^-e per row, zero-padded to n, on all
    cores. Padded explicitly: scipy's own n= padding path is several times slower."""
    buf = np.zeros((k.shape[0], n), dtype)
    buf[:, : k.shape[1]] = k
    if e is not None:
        np_scale(buf, -e)
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


def plan(B, H, budget, per_row, per_channel, rows, single=0):
    """(rows in flight r, channels per group hg) for a call whose workspace may hold `budget`
    bytes: per_row bytes for each row in flight, per_channel for each channel of a group (its
    spectrum, accumulators), `single` more when only one row is in flight (a single long
    transform's own workspace). All channels at once with `rows` rows in flight (the
    speed-chosen number) when that fits; else as many rows in flight as fit with one channel
    each (at least 2 where there are two), and the channels one chunk of them spans as the
    group: every channel's spectrum is computed once either way, so a larger group would only
    hold more memory."""
    rows = max(1, int(rows))
    if H * per_channel + rows * per_row <= budget:
        return rows, H
    r = max(1, min(rows, B * H, budget // (per_row + per_channel)))
    # Never a single row where two exist: MKL transforms one long row about 3x slower per row
    # than two (2M points on 2 threads: 64 against 21 ms per row), and then needs about two
    # rows' worth of workspace of its own. Half-precision u with fewer than ~10 rows of
    # 1M points goes over the budget by that (docs/cpu-engines.md, "Memory").
    r = max(r, min(2, B * H, rows))
    return int(r), int(min(H, -(-r // B) if B else 1))


def budget(nbytes, factor, minimum):
    """Workspace budget of a call whose u takes nbytes: factor times that (times
    FLASHCONV_CPU_MEMORY / 2 when it is set), at least `minimum` bytes."""
    return max(int(minimum), int(factor * memory_scale() * nbytes))


def memory_scale():
    """FLASHCONV_CPU_MEMORY / 2 (1 when unset): the CPU engines' workspace budgets are
    2x u's size forward and 3x backward (the torch engine; 4x for scipy's per-thread sums) by
    default, this variable sets the forward one (e.g. 4 for speed where memory is plentiful:
    long rows are then transformed several at a time)."""
    env = os.environ.get("FLASHCONV_CPU_MEMORY", "").strip()
    if not env:
        return 1.0
    try:
        value = float(env)
    except ValueError:
        raise ValueError("FLASHCONV_CPU_MEMORY must be a number (the CPU engines' forward "
                         "workspace in multiples of u's size, default 2), got %r" % env) from None
    if not value > 0:
        raise ValueError("FLASHCONV_CPU_MEMORY must be positive, got %r" % env)
    return value / 2.0


# Workspace budget of one call beyond inputs and outputs, in multiples of u's size (see
# flashconv/_cpu_torch.py), and the chunk rows' padded bytes.
_FWD_BUDGET, _BWD_BUDGET, _MIN_BUDGET = 2.0, 4.0, 16 << 20


def _speed_rows(n, itemsize):
    return max(1, _CHUNK_BYTES // (n * itemsize))


def _workers(items, total_elems):
    """Threads a list of work items runs on: the calling thread and num_threads() - 1 pool
    threads, or the calling thread alone for small calls."""
    nt = min(num_threads(), len(items))
    return 1 if (nt < 2 or total_elems < _PARALLEL_MIN_ELEMS) else nt


def _run(items, fn, total_elems, workers=None, static=False):
    """fn(item, w) for every item on nt workers (the calling thread is worker 0, the others
    pool threads). static=False: each worker takes the next item as it becomes free (work
    whose items write disjoint outputs: the assignment does not change a bit of them).
    static=True: item i runs on worker w = i % nt, each worker taking its items in order:
    which worker computes what is fixed by the item list and the thread count, so per-worker
    partial sums added in worker order give the same bits on every run (a busy core then slows
    its share down rather than handing it on). Returns nt."""
    nt = _workers(items, total_elems) if workers is None else workers
    todo, lock = iter(items), threading.Lock()

    def drain(w):
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            if static:
                for it in items[w::nt]:
                    fn(it, w)
                return
            while True:
                with lock:
                    it = next(todo, None)
                if it is None:
                    return
                fn(it, w)

    if nt < 2:
        drain(0)
        return 1
    helpers = [_executor().submit(drain, w) for w in range(1, nt)]
    try:
        drain(0)
    finally:
        for f in helpers:
            f.result()  # re-raises a worker's exception
    return nt


def _rfft_padded(src, L, n, dtype, scale=None):
    """(rfft along the last axis of `src` (..., L) (times `scale` if given) zero-padded to n,
    row exponents e or None, non-finite rows or None): each row is scaled by 2^-e before the
    transform where its largest magnitude lies outside [2^-16, 2^16) (flashconv/_scaling.py)."""
    buf = _pad_buffer(src.shape[:-1] + (n,), dtype)
    x = buf[..., :L]
    if scale is None:
        x[...] = src
    else:
        np.multiply(src, scale, out=x)
    buf[..., L:] = 0
    e, bad = np_exponents(np_amax(x))
    if e is not None:
        np_scale(x, -e)
    return sfft.rfft(buf, axis=-1), e, bad


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def _or(a, b):
    if a is None:
        return b
    return a if b is None else a | b


def _finish(z, e, bad):
    """z * 2^e, rows marked bad set to NaN (in place)."""
    np_scale(z, e)
    if bad is not None:
        z[np.broadcast_to(bad, z.shape)] = np.nan
    return z


def conv_forward(u, K, n, D=None, g_in=None, g_out=None, dtype=np.float32, activation="",
                 dropout_mask=None):
    """y (B, H, L) in `dtype` from u (B, H, L) and K: a natural spectrum
    kernel_spectrum(k, L, n, dtype) or Taps(k, k_rev) (transformed here, a group of channels at
    a time). u, D and the gates may be any real dtype and any strides; they are read once.
    activation, dropout_mask: the fused epilogue, y = g_out m act(z) (flashconv/_epilogue.py)."""
    from flashconv._epilogue import active, mask3, np_apply

    epi = active(activation, dropout_mask)
    m3 = mask3(dropout_mask)
    B, H, L = u.shape
    out = np.empty((B, H, L), dtype)
    cs = np.dtype(dtype).itemsize
    R, S = n * cs, (n // 2 + 1) * 2 * cs
    nt = min(num_threads(), max(1, B * H))
    r, hg = plan(B, H, budget(u.size * u.dtype.itemsize, _FWD_BUDGET, _MIN_BUDGET), 2 * R + S,
                 S, nt * _speed_rows(n, cs))
    r = max(1, r // nt) if r >= nt else 1
    spectra = _Spectra(K, n, L, dtype)
    for g0 in range(0, H, hg):
        g1 = min(H, g0 + hg)
        Kg, ek, kbad = spectra.get(g0, g1)

        def work(item, w):
            b0, b1, h0, h1 = item
            sl = (slice(b0, b1), slice(g0 + h0, g0 + h1))
            gi = None if g_in is None else g_in[sl]
            X, ex, xbad = _rfft_padded(u[sl], L, n, dtype, gi)
            X *= Kg[h0:h1]
            z = sfft.irfft(X, n=n, axis=-1, overwrite_x=True)[..., :L]
            del X
            _finish(z, _add(ex, None if ek is None else ek[h0:h1]),
                    _or(xbad, None if kbad is None else kbad[h0:h1]))
            o = out[sl]
            if D is not None:
                # D * x with x = g_in * u, recomputed rather than stored (one more read of u).
                x = u[sl] if gi is None else u[sl] * gi
                np.multiply(x, D[sl[1], None], out=o)
                o += z
            else:
                o[...] = z
            if epi:
                np_apply(o, activation, None if m3 is None else m3[sl],
                         None if g_out is None else g_out[sl])
            elif g_out is not None:
                o *= g_out[sl]

        _run(row_chunks(B, g1 - g0, r), work, B * H * L)
        Kg = None  # (the closure's cell: dropped before the next group's spectra)
    return out


class NpAccumulator:
    """numpy version of flashconv._scaling.TorchAccumulator (one per worker), with merge():
    the workers' partial sums added in worker order."""

    def __init__(self, shape, ctype):
        self.acc = np.zeros(shape, ctype)
        self.ce = None
        self.seen = None

    def add(self, h0, h1, P, r):
        if r is None and self.ce is None:
            self.acc[h0:h1] += P.sum(axis=0)
            return
        self._scaled()
        r = np.zeros(P.shape[:2] + (1,), np.int64) if r is None else r.astype(np.int64)
        ce, seen = self.ce[h0:h1], self.seen[h0:h1]
        m = r.max(axis=0)
        new = np.where(seen, np.maximum(ce, m), m)
        shift = np.where(seen, ce - new, 0)
        if shift.any():
            np_scale(self.acc[h0:h1], np.maximum(shift, -3000))
        np_scale(P, np.maximum(r - new, -3000))
        self.acc[h0:h1] += P.sum(axis=0)
        self.ce[h0:h1] = new
        self.seen[h0:h1] = True

    def _scaled(self):
        if self.ce is None:
            self.ce = np.zeros((self.acc.shape[0], 1), np.int64)
            self.seen = np.abs(self.acc).max(axis=-1, keepdims=True) > 0

    @staticmethod
    def merge(accs):
        """(sum, exponents (h, 1) or None) of the accumulators, in list order."""
        accs = [a for a in accs if a is not None]
        if all(a.ce is None for a in accs):
            total = accs[0].acc
            for a in accs[1:]:
                total += a.acc
            return total, None
        for a in accs:
            a._scaled()
        E = np.max([np.where(a.seen, a.ce, -3000) for a in accs], axis=0)
        total = None
        for a in accs:
            part = np_scale(a.acc, np.maximum(np.where(a.seen, a.ce - E, -3000), -3000))
            total = part if total is None else total.__iadd__(part)
        return total, E


def conv_backward(dy, u, K, n, lk, D=None, g_in=None, g_out=None, dtype=np.float32,
                  need_k=True, need_D=True, need_gates=True, lk_rev=0, activation="",
                  dropout_mask=None):
    """Gradients of conv_forward: dict with du, dk (H, lk), dD, dg_in, dg_out (or None),
    and dk_rev (H, lk_rev) for a bidirectional K (lk_rev > 0): the negative lags of the
    same correlation, irfft(sum_b X conj(DZ)). K as for conv_forward.

    dk is the gradient for the first lk taps only (the caller zero-fills taps >= L). Each
    worker sums its own items' terms of dk in item order, and the workers' sums are added in
    worker order: the same input and thread count give the same bits.

    With an activation or a dropout mask (flashconv/_epilogue.py) the pre-activation z is
    recomputed from X (one more inverse FFT per row) and dz = dy g_out m act'(z).
    """
    from flashconv._epilogue import active, mask3, np_grad

    epi = active(activation, dropout_mask)
    m3 = mask3(dropout_mask)
    B, H, L = u.shape
    du = np.empty((B, H, L), dtype)
    dg_in = np.empty((B, H, L), dtype) if (need_gates and g_in is not None) else None
    dg_out = np.empty((B, H, L), dtype) if (need_gates and g_out is not None) else None
    dD_rows = np.zeros((B, H), np.float64) if (need_D and D is not None) else None
    dk = np.empty((H, lk), dtype) if need_k else None
    dk_rev = np.empty((H, lk_rev), dtype) if (need_k and lk_rev) else None
    ch_bad = np.zeros((H, 1), bool)
    cs = np.dtype(dtype).itemsize
    ctype = np.result_type(dtype, np.complex64)
    R, S = n * cs, (n // 2 + 1) * 2 * cs
    nt = min(num_threads(), max(1, B * H))
    r, hg = plan(B, H, budget(u.size * u.dtype.itemsize, _BWD_BUDGET, _MIN_BUDGET), 2 * R + 2 * S,
                 S * (1 + (dg_out is not None or epi) + nt * need_k), nt * _speed_rows(n, cs))
    r = max(1, r // nt) if r >= nt else 1
    spectra = _Spectra(K, n, L, dtype)
    for g0 in range(0, H, hg):
        g1 = min(H, g0 + hg)
        Kg, ek, kbad = spectra.get(g0, g1)
        Kc = np.conj(Kg) if (dg_out is not None or epi) else np.conj(Kg, out=Kg)
        items = row_chunks(B, g1 - g0, r)
        accs = [None] * _workers(items, B * H * L)

        def work(item, w):
            b0, b1, h0, h1 = item
            hs = slice(g0 + h0, g0 + h1)
            sl = (slice(b0, b1), hs)
            uu = u[sl]
            x = uu if g_in is None else uu * g_in[sl]
            dyb = dy[sl]
            go = None if g_out is None else g_out[sl]
            eks = None if ek is None else ek[h0:h1]
            kbs = None if kbad is None else kbad[h0:h1]
            xbad = X = ex = None
            gate = go  # dz = dy * gate: g_out, or g_out m act'(z) with the epilogue
            if need_k or dg_out is not None or epi:
                X, ex, xbad = _rfft_padded(x, L, n, dtype)
                if dg_out is not None or epi:
                    # z = conv(x, k) + D x: one more inverse FFT of X K, for dg_out = dy * z
                    # (dy m act(z) with the epilogue) and the epilogue's act'(z).
                    z = sfft.irfft(X * Kg[h0:h1], n=n, axis=-1)[..., :L]
                    _finish(z, _add(ex, eks), _or(xbad, kbs))
                    if D is not None:
                        z = z + x * D[hs, None]
                    if epi:
                        gate, gz = np_grad(z, dyb, activation, None if m3 is None else m3[sl],
                                           go, dg_out is not None, dtype)
                        if dg_out is not None:
                            dg_out[sl] = gz
                        del gz
                    else:
                        np.multiply(dyb, z, out=dg_out[sl])
                    del z
            elif dD_rows is not None:  # the NaN rule for dD needs the rows of x too
                xbad = np_exponents(np_amax(np.asarray(x, dtype)))[1]
            dz = dyb if gate is None else dyb * gate
            DZ, edz, dzbad = _rfft_padded(dz, L, n, dtype)
            if need_k:
                if accs[w] is None:
                    accs[w] = NpAccumulator((g1 - g0, n // 2 + 1), ctype)
                np.conjugate(X, out=X)
                X *= DZ
                accs[w].add(h0, h1, X, _add(ex, edz))
            del X
            rb = _or(xbad, dzbad)
            if rb is not None:
                ch_bad[hs] |= rb.any(axis=0)
            DZ *= Kc[h0:h1]
            dx = sfft.irfft(DZ, n=n, axis=-1, overwrite_x=True)[..., :L]
            del DZ
            _finish(dx, _add(edz, eks), _or(dzbad, kbs))
            if D is not None:
                dx += dz * D[hs, None]
                if dD_rows is not None:
                    dD_rows[sl] = np.einsum("bht,bht->bh", dz, x, dtype=np.float64)
            if dg_in is not None:
                np.multiply(dx, uu, out=dg_in[sl])
            if g_in is not None:
                np.multiply(dx, g_in[sl], out=du[sl])
            else:
                du[sl] = dx

        _run(items, work, B * H * L, len(accs), static=True)
        Kg = Kc = None
        if need_k:
            total, ce = NpAccumulator.merge(accs)
            with np.errstate(over="ignore", invalid="ignore"):
                dk[g0:g1] = np_scale(sfft.irfft(total, n=n, axis=-1)[:, :lk], ce)
                if dk_rev is not None:
                    dk_rev[g0:g1] = np_scale(sfft.irfft(np.conj(total, out=total), n=n,
                                                        axis=-1)[:, :lk_rev], ce)
            del total, accs
    if ch_bad.any():
        for a in (dk, dk_rev):
            if a is not None:
                a[ch_bad[:, 0]] = np.nan
    dD = None
    if dD_rows is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # an exact dD beyond the range
            dD = dD_rows.sum(axis=0).astype(dtype)
        dD[ch_bad[:, 0]] = np.nan
    return {"du": du, "dk": dk, "dD": dD, "dg_in": dg_in, "dg_out": dg_out, "dk_rev": dk_rev}
