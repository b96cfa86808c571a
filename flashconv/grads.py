"""The gradient formulas of fftconv, stated once.

    forward:   x = g_in u,   z = conv(x, k) + D x,   y = g_out z
               (with the fused epilogue: y = g_out m act(z), flashconv/_epilogue.py; then
                dz = dy g_out m act'(z) and dg_out = dy m act(z) below, z recomputed)
               conv(x, k)[t] = sum_{s>=0} k[s] x[t-s]  (+ sum_{s>=0} k_rev[s] x[t+s])

    backward:  dz = g_out dy
               dx = adjoint(dz) + D dz      adjoint(dz)[t] = sum_s k[s] dz[t+s] (+ k_rev's lags):
                                            the convolution with the conjugate spectrum
               du = g_in dx,   dg_in = u dx,   dg_out = dy z,   dD = sum_{b,t} dz x
               dk[s] = sum_{b,t} dz[t] x[t-s],   dk_rev[s] = sum_{b,t} dz[t] x[t+s]
                                            (the lags s >= 0 and s <= 0 of one correlation)

Every quantity is computed in float32 (float64 for float64 u) and rounded once into its
input's dtype; taps of k (k_rev) beyond L get a zero gradient.

:func:`compose_backward` evaluates these formulas from three primitives an engine supplies
(the forward convolution, its adjoint, and the correlation giving dk / dk_rev) over chunks of
channels; the torch.fft engine (engines/torch_fft.py) and the two-level CUDA engine
(engines/cuda_two_level.py via flashconv._long.fftconv_long_backward) are built this way. The
CPU engines (flashconv/_cpu_torch.py, flashconv/_cpu.py) and the fused backward kernel
(cuda/include/flashconv/fftconv_bwd.h) evaluate the same formulas in one fused pass over
cache- or chip-sized pieces; tests check all of them against python_ref.conv.fftconv_grads.
"""

__all__ = ["compose_backward", "kernel_grad", "zero_grads"]


def kernel_grad(k, lk, g):
    """(H, Lk) gradient of a time-domain kernel from the (H, lk) gradient of its used taps."""
    if lk == int(k.shape[1]):  # every tap used: no zero tail, no second (H, Lk) array
        return g.to(k.dtype).contiguous()
    dk = k.new_zeros(k.shape)  # taps >= L get no gradient
    dk[:, :lk] = g.to(k.dtype)
    return dk


def zero_grads(u, k, D, g_in, g_out, mask, k_rev=None):
    """Gradients of an empty problem (B * H * L == 0): zeros where wanted."""
    return tuple(x.new_zeros(x.shape) if m else None
                 for x, m in zip((u, k, D, g_in, g_out, k_rev), mask))


def compose_backward(dy, u, k, D, g_in, g_out, k_rev, mask, cdt, *, conv, adjoint, correlate,
                     channels_per_chunk=None, activation="", dropout_mask=None):
    """(du, dk, dD, dg_in, dg_out, dk_rev) by the formulas above (None where mask is False).

    Primitives, each on the channels h (a slice) of (B, h, L) tensors in the compute dtype
    cdt, returning cdt:
      conv(x, h)           the forward convolution of x with k (and k_rev), no D, no gates
      adjoint(dz, h)       its adjoint: sum_s k[s] dz[t+s] (+ k_rev's lags)
      correlate(x, dz, h)  (dk (h, lk), dk_rev (h, lk_rev) or None): the used taps' gradients
                           (dk_rev only when k_rev is given and wanted)
    channels_per_chunk bounds the float32 intermediates (None: all channels at once).

    activation / dropout_mask: the fused epilogue (flashconv/_epilogue.py), y = g_out * m *
    act(z): z is recomputed (one more conv per row) and dz = dy g_out m act'(z),
    dg_out = dy m act(z)."""
    import torch

    from flashconv._epilogue import active, mask3, t_grad

    epi = active(activation, dropout_mask)
    m3 = mask3(dropout_mask)
    need_u, need_k, need_D, need_gi, need_go, need_kr = mask
    B, H, L = (int(s) for s in u.shape)

    def new(t, want):
        return t.new_empty(t.shape) if want else None

    du, dgi, dgo = new(u, need_u), new(g_in, need_gi), new(g_out, need_go)
    dD = new(D, need_D)
    lk = min(int(k.shape[1]), L) if need_k else 0
    lkr = min(int(k_rev.shape[1]), L) if need_kr else 0
    dk_used = torch.empty((H, lk), dtype=cdt, device=u.device) if need_k else None
    dkr_used = torch.empty((H, lkr), dtype=cdt, device=u.device) if need_kr else None
    hc = H if not channels_per_chunk else max(1, min(H, int(channels_per_chunk)))
    for h0 in range(0, H, hc):
        h = slice(h0, min(H, h0 + hc))
        rows = (slice(None), h)
        x = u[rows].to(cdt) if g_in is None else u[rows].to(cdt) * g_in[rows].to(cdt)
        Dc = None if D is None else D[h].to(cdt).unsqueeze(-1)
        if epi:
            z = conv(x, h)
            if Dc is not None:
                z = z + x * Dc
            gate, gz = t_grad(z, dy[rows], activation, None if m3 is None else m3[rows],
                              None if g_out is None else g_out[rows], need_go)
            del z
            dz = dy[rows].to(cdt) if gate is None else gate.mul_(dy[rows])
            if need_go:
                dgo[rows] = gz
            del gate, gz
        else:
            dz = dy[rows].to(cdt) if g_out is None else dy[rows].to(cdt) * g_out[rows].to(cdt)
        if need_u or need_gi:
            dx = adjoint(dz, h)
            if Dc is not None:
                dx = dx + dz * Dc
            if need_u:
                du[rows] = dx if g_in is None else dx * g_in[rows].to(cdt)
            if need_gi:
                dgi[rows] = dx * u[rows].to(cdt)
            del dx
        if need_go and not epi:
            z = conv(x, h)
            if Dc is not None:
                z = z + x * Dc
            dgo[rows] = dy[rows].to(cdt) * z
            del z
        if need_D:
            # The NaN rule (docs/cpu-engines.md): a channel with a non-finite row of x or dz
            # gets a NaN dD, as its dk does.
            finite = (torch.isfinite(x).all(-1) & torch.isfinite(dz).all(-1)).all(0)
            dD[h] = torch.where(finite, (dz * x).sum(dim=(0, 2)),
                                torch.full((), float("nan"), dtype=cdt, device=x.device))
        if need_k or need_kr:
            gk, gkr = correlate(x, dz, h)
            if need_k:
                dk_used[h] = gk
            if need_kr:
                dkr_used[h] = gkr
        del x, dz
    dk = kernel_grad(k, lk, dk_used) if need_k else None
    dkr = kernel_grad(k_rev, lkr, dkr_used) if need_kr else None
    return du, dk, dD, dgi, dgo, dkr


def fft_correlate(x, dz, n, lk, lk_rev, batch_rows=None):
    """The correlate primitive by torch.fft at size n >= L + max(lk, lk_rev) - 1: irfft of
    sum_b conj(X_b) DZ_b, lags >= 0 for dk (first lk), lags <= 0 for dk_rev (first lk_rev);
    batch_rows bounds the spectra held at once. Returns (dk, dk_rev or None)."""
    import torch

    B = int(x.shape[0])
    bc = B if not batch_rows else max(1, int(batch_rows))
    corr = None
    for b0 in range(0, B, bc):
        X = torch.fft.rfft(x[b0:b0 + bc], n=n)
        X.conj_physical_()
        X *= torch.fft.rfft(dz[b0:b0 + bc], n=n)
        part = X.sum(0)
        corr = part if corr is None else corr.add_(part)
        del X
    dk = torch.fft.irfft(corr, n=n)[:, :lk] if lk else corr.real.new_zeros((corr.shape[0], 0))
    dkr = torch.fft.irfft(corr.conj_physical(), n=n)[:, :lk_rev] if lk_rev else None
    return dk, dkr
