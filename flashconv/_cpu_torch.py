"""The CPU engine on torch tensors: causal FFT convolution with torch.fft (MKL) in chunks.

Same formulas as the scipy engine (flashconv/_cpu.py), which stays the engine of
numpy-only installs. On this project's 2-core x86 machines torch's CPU FFT (MKL in the
x86 wheels) measured 1.4-1.8x faster than scipy's pocketfft per transform (B*H = 512 rows
of 2048 points: rfft 1.05 vs 1.44 ms, irfft 0.79 vs 1.44 ms, 2 threads each), and
running the pipeline on torch tensors needs no numpy round trip. What it does, and why
(numbers in bench/results/sweep_*_cpu_*.json and docs/cpu-engines.md):

- the FFT size is L + Lk - 1 rounded up to a 5-smooth length, not 2L;
- the kernel spectrum is computed once per call (or passed in precomputed), for a group of
  channels at a time when all of them would not fit the memory budget (below);
- the (B, H, L) problem is cut into chunks of whole rows whose padded real buffer holds
  about _CHUNK_BYTES, so a chunk's rfft -> product -> irfft -> epilogue stays in cache;
  the chunks run one after the other on the calling thread, and torch's intra-op
  threads (all cores) work inside each transform and each elementwise pass;
- inputs are copied (cast, gated) into a reused per-thread buffer whose zero tail is
  written once: an FFT of a padded buffer is much faster than torch.fft's ``n=`` path;
- products and the epilogue (+ D x, output gate) are in place; one copy (and cast)
  writes each output chunk;
- memory: beyond its inputs and outputs a call holds at most about _FWD_BUDGET (forward) or
  _BWD_BUDGET (backward) times u's size (FLASHCONV_CPU_MEMORY sets the forward factor), or
  _MIN_BUDGET bytes for small calls: spectra of a group of channels, the rows in flight and
  their transforms (plan()). At least two rows are in flight where two exist: MKL transforms a
  single long row about 3x slower per row than two (half-precision u with fewer than ~10 rows
  of 1M points goes over the budget by that);
- each row is scaled by a power of two around its FFT (flashconv/_scaling.py), so
  intermediates never overflow or underflow; a row holding a NaN or an Inf gives a NaN row;
- everything is computed in a fixed order on the calling thread: the same input and thread
  count give the same bits.

Forward:  z = irfft(rfft(x) K)[:L] + D x,  y = g_out z,  x = g_in u.
Backward: dz = g_out dy;  dx = irfft(rfft(dz) conj(K))[:L] + D dz;
dk = irfft(sum_b conj(X_b) DZ_b)[:Lk] (dk_rev: the negative lags, irfft of the conjugate);
dD = sum_{b,t} dz x;  dg_in = dx u;  dg_out = dy z.
Everything is computed in float32 (float64 for float64 u), whatever the storage dtypes.
"""
import threading
from typing import NamedTuple

import torch

from flashconv import _cpu, _memory
from flashconv._scaling import TorchAccumulator, t_amax, t_exponents, t_scale

# A chunk's padded real buffer targets _CHUNK_BYTES. Measured on the 2-core dev machine
# (B*H*L = 0.5M-4M float32, min of 11 interleaved runs): for rows of n <= 16K points, 2 MB
# beats 256 KB by 1.3-2.3x (per-call overheads) and 8-128 MB by 0-15% (out of L2). Rows of
# _LONG_ROW_BYTES and more do not fit in L2 anyway; there fewer, larger batches win (1 x 32
# x 64K: 36.7 ms in 2 MB chunks, 28.4 ms in 32 MB), so chunks grow to _LONG_CHUNK_BYTES,
# as far as the memory budget allows.
_CHUNK_BYTES = 2 << 20
_LONG_ROW_BYTES = 128 << 10
_LONG_CHUNK_BYTES = 32 << 20
_KEEP_BYTES = 4 << 20
# Memory budget of one call beyond its inputs and outputs: this many times u's size (or
# _MIN_BUDGET bytes, whichever is larger). The goals are 2.5x (forward) and 5x
# (forward + backward); the rest is left for the allocator, thread stacks and the like.
_FWD_BUDGET = 2.0
_BWD_BUDGET = 3.0
_MIN_BUDGET = 16 << 20

_tls = threading.local()


class Taps(NamedTuple):
    """A time-domain kernel for conv_forward / conv_backward: its spectrum is computed there,
    a group of channels at a time."""

    k: torch.Tensor
    k_rev: object = None


_TRIM_ROW_BYTES = 4 << 20  # rows of 1M float32 points and more: see _release


def _trims(row_bytes):
    """Whether a call with padded rows of row_bytes hands freed pages back (_release): rows of
    _TRIM_ROW_BYTES and more, unless FLASHCONV_CPU_MEMORY raised the budget (speed first)."""
    return row_bytes >= _TRIM_ROW_BYTES and _cpu.memory_scale() <= 1.0


def _release(trim=True):
    """Freed long-row temporaries back to the system (flashconv/_memory.py): only for rows of
    _TRIM_ROW_BYTES and more, where the pages faulting in again cost a few percent of the
    transforms (measured 2x slower calls for rows of 128K points)."""
    _memory.release(trim)


def _buffer(name, rows, n, cdt):
    """(buf, tail): a per-thread flat (>= rows, n) buffer in cdt, reused across calls, and the
    column from which every row of it is known to be zero."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    entry = bufs.get(name)
    if entry is None or entry[0].shape[0] < rows or entry[0].shape[1] != n or entry[0].dtype != cdt:
        entry = bufs[name] = [torch.empty((rows, n), dtype=cdt), n]
    return entry


def _padded(name, src, n, cdt, gate=None):
    """See _padded_into; long rows (a padded row of _LONG_ROW_BYTES or more) get a fresh
    buffer instead, which the caller drops right after its transform: a kept buffer would add
    its size to the transforms' own at the call's peak."""
    if n * cdt.itemsize >= _LONG_ROW_BYTES:
        w = int(src.shape[-1])
        buf = torch.empty(tuple(src.shape[:-1]) + (n,), dtype=cdt)
        buf[..., w:].zero_()
        x = buf[..., :w]
        x.copy_(src)
        if gate is not None:
            x.mul_(gate)
        return buf, x
    return _padded_into(name, src, n, cdt, gate)


def _padded_into(name, src, n, cdt, gate=None):
    """src (b, h, w) (times gate) in cdt, written into the first w columns of a per-thread
    (b, h, n) buffer whose columns w..n-1 are zero. The buffer is reused across calls and its
    zero tail written only where it holds old data: torch.fft's own ``n=`` padding path
    measured 1.8x slower than an FFT of an already padded buffer (256 rows of 1024 -> 2048
    points: 2.0 vs 1.1 ms). Returns (buf view (b, h, n), the view of its first w columns)."""
    lead = tuple(src.shape[:-1])
    rows = 1
    for s in lead:
        rows *= int(s)
    w = int(src.shape[-1])
    entry = _buffer(name, rows, n, cdt)
    buf, tail = entry
    if tail > w:
        buf[:, w:tail].zero_()
    entry[1] = w
    view = buf[:rows].view(lead + (n,))
    x = view[..., :w]
    x.copy_(src)
    if gate is not None:
        x.mul_(gate)  # in cdt: a bfloat16 gate is promoted, the product is not rounded
    return view, x


def release_workspaces():
    """Free this thread's workspaces (they are otherwise kept for the next call)."""
    _tls.bufs = {}


def _trim():
    """At the end of a call: drop this thread's workspaces above _KEEP_BYTES (long-row
    chunks), keep the small ones for the next call."""
    bufs = getattr(_tls, "bufs", {})
    for name in [k for k, e in bufs.items() if e[0].nbytes > _KEEP_BYTES]:
        del bufs[name]


def chunks(B, H, n, itemsize, threads=None):
    """(b0, b1, h0, h1) work items whose padded buffers hold about _CHUNK_BYTES: several
    whole batch rows when a row of H channels is small, else a range of channels of one.

    A chunk holds at least 2 rows per intra-op thread: MKL parallelises a batch of
    transforms across rows, and a single long transform poorly (8 rows of 512K points one
    at a time: 2x slower than 4 at a time on 2 threads).
    """
    return _cpu.row_chunks(B, H, _speed_rows(n, itemsize, threads))


def _speed_rows(n, itemsize, threads=None):
    threads = torch.get_num_threads() if threads is None else threads
    row = n * itemsize
    rows = (_LONG_CHUNK_BYTES if row >= _LONG_ROW_BYTES else _CHUNK_BYTES) // row
    return max(rows, 2 * threads)


def plan(B, H, n, itemsize, budget, per_row, per_channel, threads=None, single=0):
    """(rows per chunk r, channels per group hg) for a call whose workspace may hold `budget`
    bytes: per_row bytes for each row in flight (padded buffers, transforms), per_channel for
    each channel of a group (its spectrum, accumulators), and `single` more when one row at a
    time is all that fits (MKL's workspace for a single long transform): flashconv._cpu.plan
    with the speed-chosen chunk rows of chunks()."""
    return _cpu.plan(B, H, budget, per_row, per_channel, _speed_rows(n, itemsize, threads),
                     single)


def _budget(u, factor):
    return _cpu.budget(u.numel() * u.element_size(), factor, _MIN_BUDGET)


class _Spectra:
    """The kernel's spectrum for a range of channels, scaled per channel by a power of two:
    (K (h, n//2 + 1), e (h, 1) int or None, bad (h, 1) bool or None, fresh). Taps are
    transformed here through the padded buffer "x" (k scaled so its largest tap is in
    [0.5, 1) where it lies outside [2^-16, 2^16)); a precomputed spectrum is sliced (and
    rescaled where its largest bin lies outside [2^-16, 2^40]). `fresh`: K is a new tensor
    the caller may modify."""

    def __init__(self, K, n, L, cdt, rows):
        self.K, self.n, self.L, self.cdt, self.rows = K, n, L, cdt, max(1, rows)
        self.long = _trims(n * cdt.itemsize)
        self.ctype = torch.complex128 if cdt == torch.float64 else torch.complex64

    def get(self, h0, h1):
        if not isinstance(self.K, Taps):
            K = self.K[h0:h1]
            e, bad = t_exponents(t_amax(K).to(self.cdt), hi=40)
            if e is not None:
                K = t_scale(K.clone(), -e)
            return K, e, bad, e is not None
        k = self.K.k[h0:h1, :self.L]
        kr = None if self.K.k_rev is None else self.K.k_rev[h0:h1, :self.L]
        amax = t_amax(k).to(self.cdt)
        if kr is not None:
            amax = torch.maximum(amax, t_amax(kr).to(self.cdt))
        e, bad = t_exponents(amax)
        parts = []
        for i0 in range(0, h1 - h0, self.rows):  # at most `rows` padded rows at a time
            i1 = min(h1 - h0, i0 + self.rows)
            Ki = None
            for part in (k, kr):
                if part is None:
                    continue
                buf, x = _padded("x", part[i0:i1], self.n, self.cdt)
                if e is not None:
                    t_scale(x, -e[i0:i1])
                spec = torch.fft.rfft(buf)
                del buf, x
                _release(self.long)
                Ki = spec if Ki is None else Ki.add_(spec.conj_physical_())
                del spec
            parts.append(Ki)
        K = parts[0] if len(parts) == 1 else torch.cat(parts)
        return K, e, bad, True


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def _or(a, b):
    if a is None:
        return b
    return a if b is None else a | b


def kernel_spectrum(k, L, n, cdt, k_rev=None):
    """rfft of the first min(Lk, L) taps of k (H, Lk), zero-padded to n: (H, n//2 + 1); with
    an anti-causal k_rev, rfft(k) + conj(rfft(k_rev)) (n >= L + Lk_rev - 1 keeps it unwrapped).
    Any device (the torch.fft path on CUDA uses it too); on the CPU through a padded buffer,
    with k scaled by a power of two around the transform (a spectrum beyond the dtype's range
    comes back as Inf: fft_kernel reports it)."""
    if k.device.type != "cpu":
        K = torch.fft.rfft(_as(k[:, :L], cdt), n=n)
        if k_rev is not None:
            K += torch.fft.rfft(_as(k_rev[:, :L], cdt), n=n).conj_physical()
        return K
    try:
        H = int(k.shape[0])
        K, e, bad, _ = _Spectra(Taps(k, k_rev), n, L, cdt, _speed_rows(n, cdt.itemsize)).get(0, H)
        t_scale(K, e)
        if bad is not None:
            K.masked_fill_(bad, float("nan"))
        return K
    finally:
        _trim()


def _as(t, cdt):
    return t if t.dtype == cdt else t.to(cdt)


def conv_forward(u, K, n, D=None, g_in=None, g_out=None, cdt=None, activation="",
                 dropout_mask=None):
    """y (B, H, L) in u's dtype from u and K: a natural spectrum (H, n//2 + 1) (e.g.
    kernel_spectrum(k, L, n, cdt)) or Taps(k, k_rev) (transformed here, a group of channels
    at a time); cdt: the compute dtype (default: K's). Any strides. activation and
    dropout_mask: the fused epilogue (flashconv/_epilogue.py), y = g_out m act(z)."""
    try:
        return _conv_forward(u, K, n, D, g_in, g_out, cdt, activation, dropout_mask)
    finally:
        _trim()


def _x_again(u, g_in, sl, cdt):
    """x = g_in u of a chunk in cdt, formed again (long rows drop their padded buffer)."""
    if g_in is None:
        return u[sl].to(cdt)
    return u[sl].to(cdt, copy=True).mul_(g_in[sl])  # (a copy: u itself must not change)


def _dz_again(dy, sl, gate, cdt):
    """dz = dy * gate of a chunk in cdt, formed again (long rows drop their padded buffer)."""
    if gate is None:
        return dy[sl].to(cdt)
    return dy[sl].to(cdt, copy=True).mul_(gate)


def _conv_forward(u, K, n, D, g_in, g_out, cdt, activation="", dropout_mask=None):
    from flashconv._epilogue import active, mask3, t_apply

    B, H, L = u.shape
    epi = active(activation, dropout_mask)
    m3 = mask3(dropout_mask)
    cdt = cdt or K.real.dtype
    cs = cdt.itemsize
    R, S = n * cs, (n // 2 + 1) * 2 * cs
    long = R >= _LONG_ROW_BYTES
    trim = _trims(R)
    # A row in flight holds two of (padded row, its transform, the inverse transform); a
    # single long row also MKL's workspace of a single transform (measured: 2 rows' worth).
    r, hg = plan(B, H, n, cs, _budget(u, _FWD_BUDGET), R + S, S if isinstance(K, Taps) else 0,
                 single=2 * R if long else 0)
    spectra = _Spectra(K, n, L, cdt, r)
    out = torch.empty(u.shape, dtype=u.dtype)
    Dc = None if D is None else _as(D, cdt).unsqueeze(-1)
    nan = float("nan")
    for g0 in range(0, H, hg):
        g1 = min(H, g0 + hg)
        Kg, ek, kbad, _ = spectra.get(g0, g1)
        items = _cpu.row_chunks(B, g1 - g0, r)
        for i, (b0, b1, h0, h1) in enumerate(items):
            sl = (slice(b0, b1), slice(g0 + h0, g0 + h1))
            xp, x = _padded("x", u[sl], n, cdt, None if g_in is None else g_in[sl])
            ex, xbad = t_exponents(t_amax(x))
            x0 = None if long else x
            if ex is not None:
                x0 = x.clone() if (Dc is not None and not long) else None
                t_scale(x, -ex)
            # rfft/irfft allocate their results: their out= variants measured slower (irfft
            # of 256 x 2048 points: 1.57 vs 0.89 ms), and the product is in place.
            X = torch.fft.rfft(xp)
            del xp, x
            _release(trim)
            X.mul_(Kg[h0:h1])
            e = _add(ex, None if ek is None else ek[h0:h1])
            bad = _or(xbad, None if kbad is None else kbad[h0:h1])
            if i == len(items) - 1:
                Kg = None  # the group's spectra are done: not alive beside the last irfft
            z = torch.fft.irfft(X, n=n)[..., :L]
            del X
            _release(trim)
            t_scale(z, e)
            if bad is not None:
                z.masked_fill_(bad, nan)
            if Dc is not None:
                z.addcmul_(_x_again(u, g_in, sl, cdt) if x0 is None else x0, Dc[sl[1]])
            if epi:
                z = t_apply(z, activation, None if m3 is None else m3[sl],
                            None if g_out is None else g_out[sl])
            elif g_out is not None:
                z.mul_(g_out[sl])
            out[sl].copy_(z)
            del z, x0
            _release(trim)
    return out


def conv_backward(dy, u, K, n, lk, D=None, g_in=None, g_out=None, need_u=True, need_k=True,
                  need_D=True, need_gin=True, need_gout=True, lk_rev=0, cdt=None,
                  kdtypes=(None, None), activation="", dropout_mask=None):
    """Gradients of conv_forward: (du, dk (H, lk), dD, dg_in, dg_out, dk_rev (H, lk_rev)),
    None where not asked for or absent; du/dg_* in their input's dtype, dD in the compute
    dtype, dk/dk_rev in kdtypes (default: the compute dtype; each group's rows are rounded
    into them as they are done, so no (H, lk) compute-dtype copy is held). The caller
    zero-fills taps >= L. K as for conv_forward. With an activation or a dropout mask the
    pre-activation z is recomputed from the rows' transform (one more inverse FFT per row,
    the one dg_out takes anyway) and dz = dy g_out m act'(z)."""
    try:
        return _conv_backward(dy, u, K, n, lk, D, g_in, g_out, need_u, need_k, need_D,
                              need_gin, need_gout, lk_rev, cdt, kdtypes, activation,
                              dropout_mask)
    finally:
        _trim()


def _conv_backward(dy, u, K, n, lk, D, g_in, g_out, need_u, need_k, need_D, need_gin,
                   need_gout, lk_rev, cdt, kdtypes, activation="", dropout_mask=None):
    from flashconv._epilogue import active, mask3, t_grad

    B, H, L = u.shape
    epi = active(activation, dropout_mask)
    m3 = mask3(dropout_mask)
    cdt = cdt or K.real.dtype
    ctype = torch.complex128 if cdt == torch.float64 else torch.complex64
    cs = cdt.itemsize
    need_gin = need_gin and g_in is not None
    need_gout = need_gout and g_out is not None
    need_D = need_D and D is not None
    need_corr = need_k or lk_rev > 0
    need_dx = need_u or need_gin
    need_z = need_gout or epi  # the pre-activation z (recomputed: one more inverse FFT)
    R, S = n * cs, (n // 2 + 1) * 2 * cs
    long = R >= _LONG_ROW_BYTES
    late = long or epi  # dz formed after X (and z): the epilogue's dz needs z
    trim = _trims(R)
    # A row in flight holds at most three of (padded row, transforms, inverse transform): X
    # beside DZ and the padded dz row, or beside X K and its inverse; a group's channels hold
    # the correlation sum, conj(K) and (for dg_out) K.
    per_row = R + 2 * S
    per_channel = S * (need_corr + need_dx + need_z)
    r, hg = plan(B, H, n, cs, _budget(u, _BWD_BUDGET), per_row, per_channel,
                 single=2 * R if long else 0)
    spectra = _Spectra(K, n, L, cdt, r)
    du = torch.empty(u.shape, dtype=u.dtype) if need_u else None
    dgi = torch.empty(g_in.shape, dtype=g_in.dtype) if need_gin else None
    dgo = torch.empty(g_out.shape, dtype=g_out.dtype) if need_gout else None
    dD_rows = torch.zeros((B, H), dtype=torch.float64) if need_D else None
    dk = torch.empty((H, lk), dtype=kdtypes[0] or cdt) if need_k else None
    dk_rev = torch.empty((H, lk_rev), dtype=kdtypes[1] or cdt) if lk_rev > 0 else None
    ch_bad = torch.zeros((H, 1), dtype=torch.bool)  # channels with a non-finite x or dz row
    Dc = None if D is None else _as(D, cdt).unsqueeze(-1)
    nan = float("nan")
    for g0 in range(0, H, hg):
        g1 = min(H, g0 + hg)
        Kg = Kc = ek = kbad = None
        if need_dx or need_z:
            Kg, ek, kbad, fresh = spectra.get(g0, g1)
            if need_dx:
                Kc = Kg.conj_physical_() if (fresh and not need_z) else Kg.conj_physical()
            if not need_z:
                Kg = None
        acc = TorchAccumulator((g1 - g0, n // 2 + 1), ctype) if need_corr else None
        for b0, b1, h0, h1 in _cpu.row_chunks(B, g1 - g0, r):
            hs = slice(g0 + h0, g0 + h1)
            sl = (slice(b0, b1), hs)
            eks = None if ek is None else ek[h0:h1]
            kbs = None if kbad is None else kbad[h0:h1]
            gi = None if g_in is None else g_in[sl]
            go = None if g_out is None else g_out[sl]
            mk = None if m3 is None else m3[sl]
            dzg = go  # the factor of dy in dz (g_out, or g_out m act'(z) with the epilogue)
            # Short rows: both padded rows in the kept buffers, read again for D x, D dz, dD.
            # Long rows: fresh buffers, each dropped after its transform; x and dz formed
            # again where needed.
            xp, x = _padded("x", u[sl], n, cdt, gi)
            dzp = dz = None
            if not late:
                dzp, dz = _padded("dz", dy[sl], n, cdt, go)
                if need_D:
                    dD_rows[sl] = torch.sum(dz * x, dim=-1, dtype=torch.float64)
            ex, xbad = t_exponents(t_amax(x))
            x0 = None if long else x
            if ex is not None:
                if not long and need_z and Dc is not None:
                    x0 = x.clone()
                t_scale(x, -ex)
            X = torch.fft.rfft(xp) if (need_corr or need_z) else None
            del xp, x
            _release(trim)
            if need_z:
                # z = conv(x, k) + D x: one more inverse FFT, of X K. dg_out = dy * z, or
                # with the epilogue dy m act(z), and dz's factor g_out m act'(z).
                z = torch.fft.irfft(X * Kg[h0:h1], n=n)[..., :L]
                t_scale(z, _add(ex, eks))
                bad = _or(xbad, kbs)
                if bad is not None:
                    z.masked_fill_(bad, nan)
                if Dc is not None:
                    z.addcmul_(_x_again(u, g_in, sl, cdt) if x0 is None else x0, Dc[hs])
                if epi:
                    dzg, gz = t_grad(z, dy[sl], activation, mk, go, need_gout)
                    if need_gout:
                        dgo[sl].copy_(gz)
                    del gz
                else:
                    dgo[sl].copy_(z.mul_(dy[sl]))
                del z
                _release(trim)
            if late:
                dzp, dz = _padded("dz", dy[sl], n, cdt, dzg)
                if need_D:
                    dD_rows[sl] = torch.sum(dz * _x_again(u, g_in, sl, cdt), dim=-1,
                                            dtype=torch.float64)
            edz, dzbad = t_exponents(t_amax(dz))
            dz0 = None if long else dz
            if edz is not None:
                if not long and need_dx and Dc is not None:
                    dz0 = dz.clone()
                t_scale(dz, -edz)
            rb = _or(xbad, dzbad)
            if rb is not None:
                ch_bad[hs] |= rb.any(0)
            DZ = torch.fft.rfft(dzp) if (need_corr or need_dx) else None
            del dzp, dz
            _release(trim)
            if need_corr:
                X.conj_physical_()
                X.mul_(DZ)
                acc.add(h0, h1, X, _add(ex, edz))
            X = None
            _release(trim)
            if need_dx:
                DZ.mul_(Kc[h0:h1])
                dx = torch.fft.irfft(DZ, n=n)[..., :L]
                DZ = None
                _release(trim)
                t_scale(dx, _add(edz, eks))
                bad = _or(dzbad, kbs)
                if bad is not None:
                    dx.masked_fill_(bad, nan)
                if Dc is not None:
                    dx.addcmul_(_dz_again(dy, sl, dzg, cdt) if dz0 is None else dz0, Dc[hs])
                if need_gin:
                    dgi[sl].copy_(dx * u[sl])
                if need_u:
                    if g_in is not None:
                        dx.mul_(gi)
                    du[sl].copy_(dx)
                del dx
            del DZ, x0, dz0, dzg
            _release(trim)
        Kg = Kc = None
        if need_corr:
            ce = acc.exponents()
            for out, m in ((dk, lk), (dk_rev, lk_rev)):
                if out is None:
                    continue
                if out is dk_rev:
                    acc.acc.conj_physical_()  # the negative lags: irfft of the conjugate
                g = torch.fft.irfft(acc.acc, n=n)[:, :m]
                t_scale(g, ce)
                out[g0:g1] = g
                del g
                _release(trim)
            acc = None
    if bool(ch_bad.any()):
        for out in (dk, dk_rev):
            if out is not None:
                out.masked_fill_(ch_bad, nan)
    dD = None
    if need_D:
        dD = dD_rows.sum(0).to(cdt)
        dD.masked_fill_(ch_bad[:, 0], nan)
    return du, dk, dD, dgi, dgo, dk_rev
