"""The forward causal convolution beyond the fused kernel's on-chip size: a two-level block FFT
N = N1 * N2 (docs/kernels.md; kernels in cuda/include/flashconv/fftconv_long.h).

  pass A  outer DFT-N1 along n1 (stride N2) of the packed pair z = x_b + i x_{b+1}, times
          w_N^(k1 n2), into a complex64 workspace (ceil(B/2), H, N1, N2), row p1 holding
          k1 = perm(N1)[p1];
  pass B  each workspace row (N2 values): inner forward block FFT, times K, inner inverse;
  pass C  times conj(w_N^(k1 n2)), inverse outer DFT along k1, t < L only, + D x, gates.

K[h, p1, p2] = FFT_N(k)[perm(N1)[p1] + N1 * perm(N2)[p2]] * 2^-k_exp[h] (long_spectrum), where
perm(n) = flashconv.plan.monarch_perm(n), the Monarch order of block_fft.h's plan for n
(any power of two, small outer factors included).

Entry points: two_level_plan(L), long_spectrum(k, L, N1, N2), fftconv_long_forward(u, k, D,
g_in, g_out) (CUDA torch tensors), fftconv_long_backward(dy, u, k, ...) (the gradients: the
forward passes with conj(K) for dx, batch-chunked torch.fft for dk), two_level_reference(...)
(numpy mirror of the passes) and reference_forward (the mirror behind the forward's signature,
for CPU tests).
"""

import numpy as np

from flashconv.plan import fused_fft_size, monarch_perm

# Largest inner size per io dtype: the fused kernel's on-chip sizes (fftconv_fwd.h kMaxFusedN):
# fp16 storage (4 bytes per complex) for bf16, fp32 storage (8 bytes) otherwise.
MAX_N2 = {"bfloat16": 32768, "float16": 16384, "float32": 16384}
BYTES_PER = {"bfloat16": 4, "float16": 8, "float32": 8}
MAX_N = 1 << 24  # outer twiddle exponents k1 * n2 < 2^24 stay exact in float32


def two_level_plan(L, max_n2=32768, n2=None):
    """(N, N1, N2) for length L: N = smallest power of two >= max(2L, 32), N2 = min(max_n2,
    N/2) (or `n2`, forced, for tests), N1 = N / N2 >= 2."""
    N = fused_fft_size(L)
    N2 = int(n2) if n2 is not None else min(int(max_n2), N // 2)
    if N2 < 16 or N2 & (N2 - 1) or N % N2 or N // N2 < 2:
        raise ValueError("two_level_plan: no two-level split of N=%d with N2=%d" % (N, N2))
    if N > MAX_N:
        raise ValueError("two_level_plan: N=%d exceeds %d (L <= %d)" % (N, MAX_N, MAX_N // 2))
    return N, N // N2, N2


def long_order(N1, N2):
    """(N1 * N2,) int64: flat position p1 * N2 + p2 of K holds frequency
    monarch_perm(N1)[p1] + N1 * monarch_perm(N2)[p2]."""
    return (monarch_perm(N1)[:, None] + N1 * monarch_perm(N2)[None, :]).reshape(-1)


def long_spectrum(k, L, N1, N2, k_rev=None, precision=None):
    """The kernels' K and k_exp for the two-level plan: FFT of k[:, :L] (plus conj(FFT(k_rev
    [:, :L])) for a bidirectional convolution) at N = N1 * N2, in long_order, scaled per channel
    by 2^-e with max |K| < 2^e; (H, N1, N2) complex64 and (H,) int32. k: numpy array (float64
    transform) or torch tensor (the result on k's device, the transform in `precision`, a torch
    float dtype, default float64; the order computed on the device: no host-to-device copy)."""
    N = N1 * N2
    if isinstance(k, np.ndarray):
        order = long_order(N1, N2)
        K = np.fft.fft(np.asarray(k[:, :L], np.float64), n=N)
        if k_rev is not None:
            K = K + np.conj(np.fft.fft(np.asarray(k_rev[:, :L], np.float64), n=N))
        K = K[:, order]
        _, e = np.frexp(np.abs(K).max(axis=1))
        K = K * np.ldexp(1.0, -e)[:, None]
        return K.astype(np.complex64).reshape(-1, N1, N2), e.astype(np.int32)
    import torch

    from flashconv.plan import device_long_order
    precision = torch.float64 if precision is None else precision
    K = torch.fft.fft(k[:, :L].detach().to(precision), n=N)
    if k_rev is not None:
        K = K + torch.fft.fft(k_rev[:, :L].detach().to(precision), n=N).conj()
    K = K.index_select(1, device_long_order(N1, N2, K.device))
    _, e = torch.frexp(K.abs().amax(dim=1))
    K = torch.ldexp(K, (-e).unsqueeze(1).to(precision))
    return (K.to(torch.complex64).reshape(-1, N1, N2).contiguous(),
            e.to(torch.int32).contiguous())


def two_level_reference(u, k, D=None, g_in=None, g_out=None, N1=None, N2=None, k_rev=None,
                        spectrum=None):
    """numpy (float64) mirror of the three passes, same orders and factorisation; returns y
    (B, H, L) float64. N1, N2 default to two_level_plan(L); spectrum: (K, k_exp) as
    long_spectrum returns (default: computed here)."""
    u = np.asarray(u, np.float64)
    B, H, L = u.shape
    if N1 is None or N2 is None:
        _, N1, N2 = two_level_plan(L)
    N = N1 * N2
    assert 2 * L <= N
    x = u * (1.0 if g_in is None else np.asarray(g_in, np.float64))
    if B % 2:
        x = np.concatenate([x, np.zeros((1, H, L))])
    z = np.zeros((x.shape[0] // 2, H, N), np.complex128)
    z[..., :L] = x[0::2] + 1j * x[1::2]
    K, kexp = spectrum if spectrum is not None else long_spectrum(k, L, N1, N2, k_rev)
    K = np.asarray(K, np.complex128).reshape(H, N1, N2)
    p1, p2 = monarch_perm(N1), monarch_perm(N2)
    k1 = p1[:, None].astype(np.float64)
    n2 = np.arange(N2)[None, :]
    tw = np.exp(-2j * np.pi * k1 * n2 / N)  # w_N^(k1 n2), rows in Monarch order p1
    # pass A: DFT along n1, rows to Monarch order, twiddle
    ws = np.fft.fft(z.reshape(-1, H, N1, N2), axis=2)[:, :, p1, :] * tw
    # pass B: per row, forward (natural n2 -> Monarch k2), times K, inverse, / N2
    spec = np.fft.fft(ws, axis=3)[..., p2] * K[None]
    nat = np.empty_like(spec)
    nat[..., p2] = spec
    ws = np.fft.ifft(nat, axis=3)
    # pass C: conjugate twiddle, rows back to natural k1, inverse DFT along k1, t < L
    ws = ws * np.conj(tw)
    nat = np.empty_like(ws)
    nat[:, :, p1, :] = ws
    out = np.fft.ifft(nat, axis=2).reshape(-1, H, N)[..., :L] * np.ldexp(1.0, kexp)[None, :, None]
    y = np.empty_like(x)
    y[0::2], y[1::2] = out.real, out.imag
    y = y[:B]
    x = x[:B]
    if D is not None:
        y = y + np.asarray(D, np.float64)[None, :, None] * x
    if g_out is not None:
        y = y * np.asarray(g_out, np.float64)
    return y


# --- CUDA entry point -------------------------------------------------------------------------

_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def long_plan_for(u, L=None, n2=None):
    """(N, N1, N2) for a CUDA tensor u: N2 as large as the dtype's on-chip limit and the
    device's opt-in shared memory allow (or `n2`, forced)."""
    from flashconv.engines import _cuda
    dname = str(u.dtype).replace("torch.", "")
    L = int(u.shape[-1]) if L is None else L
    if n2 is None:
        smem = _cuda.max_smem(u.device.index)
        max_n2 = MAX_N2[dname]
        while max_n2 * BYTES_PER[dname] + 1024 > smem and max_n2 > 16:  # + static smem
            max_n2 //= 2
        return two_level_plan(L, max_n2)
    return two_level_plan(L, n2=n2)


def long_applies(u):
    """True if fftconv_long_forward serves u: a CUDA (B, H, L) float16/bfloat16/float32
    tensor, the extension built with fftconv_long_fwd, N = fused_fft_size(L) <= 2^24
    (L <= 8M). The engine table (flashconv/engines/cuda_two_level.py) decides when it is used."""
    from flashconv import _ext
    ext = _ext.extension()
    if ext is None or not hasattr(ext, "fftconv_long_fwd") or not getattr(u, "is_cuda", False):
        return False
    if str(u.dtype).replace("torch.", "") not in _DTYPE_CODES or u.ndim != 3:
        return False
    return int(u.shape[-1]) >= 1 and fused_fft_size(int(u.shape[-1])) <= MAX_N


# Workspace per launch: (pairs, channels) chunks keep it under this many bytes.
MAX_WORKSPACE_BYTES = 1 << 30


def fftconv_long_forward(u, k, D=None, g_in=None, g_out=None, k_rev=None, spectrum=None, n2=None,
                         max_workspace_bytes=MAX_WORKSPACE_BYTES, activation=None, dropout_mask=None):
    """y = g_out * m * act(causal_conv(g_in * u, k) + D * g_in * u) with the two-level kernels, on the
    current stream. u, gates (B, H, L) CUDA float16/bfloat16/float32 (any strides); k (H, Lk)
    taps (any float dtype, same device); D (H,) or None; k_rev: the anti-causal kernel;
    spectrum: (K, k_exp) from long_spectrum for this L and plan (skips the FFT of k);
    activation (None, "gelu", "silu") and dropout_mask m ((B, H) or (B, H, L)): the fused
    epilogue, applied in fp32 by pass C (flashconv/_epilogue.py);
    n2: force the inner size (tests). The complex64 workspace (8 N bytes per pair of rows and
    channel) is allocated per chunk of channels and batch pairs, at most max_workspace_bytes
    (but at least one pair and channel). No autograd; the caller validates shapes."""
    import torch
    from flashconv import _ext
    B, H, L = (int(s) for s in u.shape)
    N, N1, N2 = long_plan_for(u, L, n2)
    y = torch.empty((B, H, L), dtype=u.dtype, device=u.device)
    if B * H * L == 0:
        return y
    if spectrum is None:
        spectrum = long_spectrum(k, L, N1, N2, k_rev)
    K, kexp = spectrum
    Kf = torch.view_as_real(K.contiguous())  # (H, N1, N2, 2) float32
    kexp = kexp.to(torch.int32).contiguous()
    Df = None if D is None else D.detach().to(torch.float32).contiguous()
    gi = None if g_in is None else g_in.detach().to(u.dtype)
    go = None if g_out is None else g_out.detach().to(u.dtype)
    from flashconv.engines.cuda_fused import ACT_CODES, mask_view
    m, m_st = mask_view(dropout_mask)  # (a chunk m[b0:b1, h0:h1] keeps these strides)
    act = ACT_CODES[activation]
    per = 8 * N  # workspace bytes per (pair, channel)
    pairs = (B + 1) // 2
    hc = max(1, min(H, max_workspace_bytes // per))
    pc = max(1, min(pairs, max_workspace_bytes // (per * hc)))
    ws = torch.empty((pc, hc, N, 2), dtype=torch.float32, device=u.device)

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    def strides(t):
        return (0, 0, 0) if t is None else tuple(int(s) for s in t.stride())

    def part(t, b0, b1, h0, h1):
        return None if t is None else t[b0:b1, h0:h1]

    stream = torch.cuda.current_stream(u.device).cuda_stream
    code = _DTYPE_CODES[str(u.dtype).replace("torch.", "")]
    ext = _ext.extension()
    for b0 in range(0, B, 2 * pc):
        b1 = min(B, b0 + 2 * pc)
        for h0 in range(0, H, hc):
            h1 = min(H, h0 + hc)
            uc, gic, goc, yc, mc = (part(t, b0, b1, h0, h1) for t in (u, gi, go, y, m))
            ext.fftconv_long_fwd(
                ptr(uc), ptr(gic), ptr(goc), ptr(yc), ptr(Kf[h0:h1]), ptr(kexp[h0:h1]),
                ptr(None if Df is None else Df[h0:h1]), ptr(ws), b1 - b0, h1 - h0, L, N1, N2,
                strides(uc), strides(gic), strides(goc), strides(yc), code, u.device.index,
                stream, act=act, mask=ptr(mc), mask_strides=m_st)
    return y


# Batch rows per torch.fft chunk of the dk correlation: at most this many bytes of spectra
# (two complex64 (rows, channels, N/2 + 1) arrays) at a time.
MAX_CORR_BYTES = 1 << 30
# Channels per backward chunk: the float32 intermediates (dz, x, dx: 12 bytes per element of
# the chunk) stay under this many bytes (at least one channel).
MAX_CHUNK_BYTES = 1 << 30


def fftconv_long_backward(dy, u, k, D=None, g_in=None, g_out=None, k_rev=None, mask=None,
                          forward=None, n2=None, max_corr_bytes=MAX_CORR_BYTES,
                          max_chunk_bytes=MAX_CHUNK_BYTES, activation=None, dropout_mask=None):
    """Gradients (du, dk, dD, dg_in, dg_out, dk_rev) of fftconv_long_forward (None where
    mask, a 6-tuple of bools, says not needed or the input is absent), for L beyond the fused
    backward kernel: flashconv.grads.compose_backward (the formulas, stated once) over chunks
    of channels (float32 intermediates under max_chunk_bytes), with these primitives:

      adjoint(dz) = forward(dz) with spectrum (conj(K), k_exp): the convolution's adjoint is a
        convolution with the conjugate spectrum (N >= 2L keeps it free of wrap-around);
      conv(x)     = forward(x) with (K, k_exp) (dg_out only);
      dk, dk_rev  = the lags s >= 0 / s <= 0 of irfft(sum_b conj(X_b) DZ_b) (torch.fft at the
        same N, over chunks of batch rows: at most max_corr_bytes of spectra at a time).

    forward: the two-level forward to use (default fftconv_long_forward, CUDA); tests pass the
    numpy mirror. Everything is computed in float32 whatever the io dtype (one rounding, at
    the end), so the inner size is the float32 one; K is transformed in float32 for 16-bit io
    and float64 for float32 io (flashconv.spectrum.spectrum_precision). The caller validates
    shapes. activation / dropout_mask: the fused epilogue (compose_backward recomputes z with
    one more conv per chunk)."""
    import torch

    from flashconv.grads import compose_backward, fft_correlate
    from flashconv.spectrum import spectrum_precision
    forward = fftconv_long_forward if forward is None else forward
    B, H, L = (int(s) for s in u.shape)
    present = (True, True, D is not None, g_in is not None, g_out is not None, k_rev is not None)
    mask = present if mask is None else tuple(bool(m) and p for m, p in zip(mask, present))
    f32 = torch.float32
    if getattr(u, "is_cuda", False):
        N, N1, N2 = long_plan_for(u.new_empty((0,), dtype=f32), L, n2)
    else:
        N, N1, N2 = two_level_plan(L, MAX_N2["float32"], n2)
    lk = min(int(k.shape[1]), L)
    lkr = 0 if k_rev is None else min(int(k_rev.shape[1]), L)
    precision = spectrum_precision(u.dtype)
    spectra = {}

    def spectrum(h):
        if h.start not in spectra:
            spectra.clear()  # one chunk of channels at a time
            spectra[h.start] = long_spectrum(k[h], L, N1, N2,
                                             None if k_rev is None else k_rev[h], precision)
        return spectra[h.start]

    def adjoint(dz, h):
        K, kexp = spectrum(h)
        return forward(dz, None, None, spectrum=(K.conj_physical(), kexp), n2=N2)

    def conv(x, h):
        return forward(x, None, None, spectrum=spectrum(h), n2=N2)

    def correlate(x, dz, h):
        hn = h.stop - h.start
        rows = int(max_corr_bytes) // (2 * 8 * hn * (N // 2 + 1))
        return fft_correlate(x, dz, N, lk if mask[1] else 0, lkr if mask[5] else 0,
                             batch_rows=max(1, rows))

    return compose_backward(dy, u, k, D, g_in, g_out, k_rev, mask, f32, conv=conv,
                            adjoint=adjoint, correlate=correlate,
                            channels_per_chunk=max(1, int(max_chunk_bytes) // max(1, 12 * B * L)),
                            activation=activation or "", dropout_mask=dropout_mask)


def reference_forward(u, k, D=None, g_in=None, g_out=None, k_rev=None, spectrum=None, n2=None):
    """fftconv_long_forward's signature on the numpy mirror (two_level_reference), for torch
    tensors on any device: the CPU stand-in tests use for the CUDA passes."""
    import torch
    B, H, L = (int(s) for s in u.shape)
    _, N1, N2 = two_level_plan(L, n2=n2)

    def np64(t):
        return None if t is None else t.detach().cpu().to(torch.float64).numpy()

    if spectrum is not None:
        spectrum = (spectrum[0].detach().cpu().numpy(), spectrum[1].detach().cpu().numpy())
    y = two_level_reference(np64(u), None if k is None else np64(k), np64(D), np64(g_in),
                            np64(g_out), N1, N2, np64(k_rev), spectrum)
    return torch.from_numpy(y).to(u.dtype)
