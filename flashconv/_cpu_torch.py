"""The CPU engine on torch tensors: causal FFT convolution with torch.fft (MKL) in chunks.

Same formulas as the scipy engine (flashconv/_cpu.py), which stays the engine of
numpy-only installs. On this project's 2-core x86 machines torch's CPU FFT (MKL in the
x86 wheels) measured 1.4-1.8x faster than scipy's pocketfft per transform (B*H = 512 rows
of 2048 points: rfft 1.05 vs 1.44 ms, irfft 0.79 vs 1.44 ms, 2 threads each), and
running the pipeline on torch tensors needs no numpy round trip. What it does, and why
(numbers in bench/results/sweep_*_cpu_*.json):

- the FFT size is L + Lk - 1 rounded up to a 5-smooth length, not 2L;
- the kernel spectrum is computed once per call (or passed in precomputed);
- the (B, H, L) problem is cut into chunks of whole rows whose padded real buffer holds
  about _CHUNK_BYTES, so a chunk's rfft -> product -> irfft -> epilogue stays in cache;
  the chunks run one after the other on the calling thread, and torch's intra-op
  threads (all cores) work inside each transform and each elementwise pass;
- inputs are copied (cast, gated) into a reused per-thread buffer whose zero tail is
  written once: an FFT of a padded buffer is much faster than torch.fft's ``n=`` path;
- products and the epilogue (+ D x, output gate) are in place; one copy (and cast)
  writes each output chunk.

Forward:  z = irfft(rfft(x) K)[:L] + D x,  y = g_out z,  x = g_in u.
Backward: dz = g_out dy;  dx = irfft(rfft(dz) conj(K))[:L] + D dz;
dk = irfft(sum_b conj(X_b) DZ_b)[:Lk] (dk_rev: the negative lags, irfft of the conjugate);
dD = sum_{b,t} dz x;  dg_in = dx u;  dg_out = dy z.
Everything is computed in float32 (float64 for float64 u), whatever the storage dtypes.
"""
import threading

import torch

from flashconv import _cpu

# A chunk's padded real buffer targets _CHUNK_BYTES. Measured on the 2-core dev machine
# (B*H*L = 0.5M-4M float32, min of 11 interleaved runs): for rows of n <= 16K points, 2 MB
# beats 256 KB by 1.3-2.3x (per-call overheads) and 8-128 MB by 0-15% (out of L2). Rows of
# _LONG_ROW_BYTES and more do not fit in L2 anyway; there fewer, larger batches win (1 x 32
# x 64K: 36.7 ms in 2 MB chunks, 28.4 ms in 32 MB), so chunks grow to _LONG_CHUNK_BYTES.
_CHUNK_BYTES = 2 << 20
_LONG_ROW_BYTES = 128 << 10
_LONG_CHUNK_BYTES = 32 << 20
_KEEP_BYTES = 4 << 20

_tls = threading.local()


def _padded(name, src, n, cdt, gate=None):
    """src (b, h, L) (times gate) in cdt, written into the first L columns of a per-thread
    (b, h, n) buffer whose columns L..n-1 are zero. The buffer is reused across calls and
    its zero tail written only when it is created or L changes: torch.fft's own ``n=``
    padding path measured 1.8x slower than an FFT of an already padded buffer (256 rows of
    1024 -> 2048 points: 2.0 vs 1.1 ms)."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    L = src.shape[-1]
    shape = tuple(src.shape[:-1]) + (n,)
    entry = bufs.get(name)
    if entry is None or entry[0].shape != shape or entry[0].dtype != cdt:
        entry = bufs[name] = [torch.empty(shape, dtype=cdt), -1]
    buf, tail = entry
    if tail != L:
        buf[..., L:].zero_()
        entry[1] = L
    x = buf[..., :L]
    x.copy_(src)
    if gate is not None:
        x.mul_(gate)  # in cdt: a bfloat16 gate is promoted, the product is not rounded
    return buf, x


def release_workspaces():
    """Free this thread's workspaces (they are otherwise kept for the next call)."""
    _tls.bufs = {}


def _trim():
    """At the end of a call: drop this thread's workspaces above _KEEP_BYTES (long-row
    chunks, up to _LONG_CHUNK_BYTES), keep the small ones for the next call."""
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
    threads = torch.get_num_threads() if threads is None else threads
    row = n * itemsize
    rows = (_LONG_CHUNK_BYTES if row >= _LONG_ROW_BYTES else _CHUNK_BYTES) // row
    return _cpu.row_chunks(B, H, max(rows, 2 * threads))


def _as(t, cdt):
    return t if t.dtype == cdt else t.to(cdt)


def kernel_spectrum(k, L, n, cdt, k_rev=None):
    """rfft of the first min(Lk, L) taps of k (H, Lk), zero-padded to n: (H, n//2 + 1); with
    an anti-causal k_rev, rfft(k) + conj(rfft(k_rev)) (n >= L + Lk_rev - 1 keeps it unwrapped).
    Any device (the torch.fft path on CUDA uses it too); on the CPU through a padded buffer."""
    def rfft(t):
        if t.device.type == "cpu":  # the padded buffer (see _padded); any device else
            return torch.fft.rfft(_padded("k", t[:, :L], n, cdt)[0])
        return torch.fft.rfft(_as(t[:, :L], cdt), n=n)

    try:
        K = rfft(k)
        if k_rev is not None:
            K += rfft(k_rev).conj_physical()
    finally:
        _trim()
    return K


def conv_forward(u, K, n, D=None, g_in=None, g_out=None):
    """y (B, H, L) in u's dtype from u and K = kernel_spectrum(k, L, n, cdt); any strides."""
    try:
        return _conv_forward(u, K, n, D, g_in, g_out)
    finally:
        _trim()


def _conv_forward(u, K, n, D, g_in, g_out):
    B, H, L = u.shape
    cdt = K.real.dtype
    out = torch.empty(u.shape, dtype=u.dtype)
    Dc = None if D is None else _as(D, cdt).unsqueeze(-1)
    for b0, b1, h0, h1 in chunks(B, H, n, cdt.itemsize):
        sl = (slice(b0, b1), slice(h0, h1))
        xp, x = _padded("x", u[sl], n, cdt, None if g_in is None else g_in[sl])
        # rfft/irfft allocate their results: their out= variants measured slower (irfft
        # of 256 x 2048 points: 1.57 vs 0.89 ms), and the product is in place.
        X = torch.fft.rfft(xp)
        X.mul_(K[h0:h1])
        z = torch.fft.irfft(X, n=n)[..., :L]
        if Dc is not None:
            z.addcmul_(x, Dc[h0:h1])
        if g_out is not None:
            z.mul_(g_out[sl])
        out[sl].copy_(z)
    return out


def conv_backward(dy, u, K, n, lk, D=None, g_in=None, g_out=None, need_u=True, need_k=True,
                  need_D=True, need_gin=True, need_gout=True, lk_rev=0):
    """Gradients of conv_forward: (du, dk (H, lk), dD, dg_in, dg_out, dk_rev (H, lk_rev)),
    None where not asked for or absent; du/dg_* in their input's dtype, dk/dk_rev/dD in the
    compute dtype (the caller casts and zero-fills taps >= L)."""
    try:
        return _conv_backward(dy, u, K, n, lk, D, g_in, g_out, need_u, need_k, need_D,
                              need_gin, need_gout, lk_rev)
    finally:
        _trim()


def _conv_backward(dy, u, K, n, lk, D, g_in, g_out, need_u, need_k, need_D, need_gin,
                   need_gout, lk_rev):
    B, H, L = u.shape
    cdt = K.real.dtype
    need_gin = need_gin and g_in is not None
    need_gout = need_gout and g_out is not None
    need_D = need_D and D is not None
    need_corr = need_k or lk_rev > 0
    need_dx = need_u or need_gin
    du = torch.empty(u.shape, dtype=u.dtype) if need_u else None
    dgi = torch.empty(g_in.shape, dtype=g_in.dtype) if need_gin else None
    dgo = torch.empty(g_out.shape, dtype=g_out.dtype) if need_gout else None
    dD_rows = torch.zeros((B, H), dtype=torch.float64) if need_D else None
    corr = torch.zeros(K.shape, dtype=K.dtype) if need_corr else None
    Kc = K.conj_physical()
    Dc = None if D is None else _as(D, cdt).unsqueeze(-1)
    for b0, b1, h0, h1 in chunks(B, H, n, cdt.itemsize):
        sl = (slice(b0, b1), slice(h0, h1))
        xp, x = _padded("x", u[sl], n, cdt, None if g_in is None else g_in[sl])
        dzp, dz = _padded("dz", dy[sl], n, cdt, None if g_out is None else g_out[sl])
        if need_D:
            dD_rows[sl] = torch.sum(dz * x, dim=-1, dtype=torch.float64)
        if need_corr or need_gout:
            X = torch.fft.rfft(xp)
            if need_gout:
                # dg_out = dy * z, z = conv(x, k) + D x: one more inverse FFT, of X K.
                z = torch.fft.irfft(X * K[h0:h1], n=n)[..., :L]
                if Dc is not None:
                    z.addcmul_(x, Dc[h0:h1])
                dgo[sl].copy_(z.mul_(dy[sl]))
        if need_corr or need_dx:
            DZ = torch.fft.rfft(dzp)
        if need_corr:
            X.conj_physical_()
            X.mul_(DZ)
            corr[h0:h1] += X.sum(0)
        if need_dx:
            DZ.mul_(Kc[h0:h1])
            dx = torch.fft.irfft(DZ, n=n)[..., :L]
            if Dc is not None:
                dx.addcmul_(dz, Dc[h0:h1])
            if need_gin:
                dgi[sl].copy_(dx * u[sl])
            if need_u:
                if g_in is not None:
                    dx.mul_(g_in[sl])
                du[sl].copy_(dx)
    dk = dk_rev = None
    if need_k:
        dk = torch.fft.irfft(corr, n=n)[:, :lk]
    if lk_rev > 0:
        dk_rev = torch.fft.irfft(corr.conj_physical(), n=n)[:, :lk_rev]
    dD = dD_rows.sum(0).to(cdt) if need_D else None
    return du, dk, dD, dgi, dgo, dk_rev
