"""Engine torch_fft: torch.fft on any torch device, the fallback: rfft at a power-of-two size
>= L + Lk - 1, product, irfft; backward composed by flashconv/grads.py with torch.fft
primitives. Computes in float32 (float64 for float64 u).

On CUDA it serves what the kernels do not: float64, a natural-order spectrum, sizes beyond
the kernels, or a machine where the extension cannot use the device (then flashconv warns
once, and FLASHCONV_REQUIRE_KERNEL=1 makes it an error: flashconv/dispatch.py).
"""
NAME = "torch_fft"
DESCRIPTION = "torch.fft on the tensors' device (the fallback)"


def available():
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return "torch is not installed (%s)" % exc
    return ""


def check(p):
    if p.kind != "torch":
        return "serves torch tensors only"
    if p.device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "torch sees no CUDA device (%s)" % (
                "CPU-only torch build" if torch.version.cuda is None else "no GPU visible")
    return None


def _cdt(p):
    import torch

    return torch.float64 if p.compute_dtype == "float64" else torch.float32


def _spectrum(p, a, cdt):
    """(K, n, lk, lk_rev, ek, kbad): the natural spectrum scaled per channel by 2^-ek (ek (H, 1)
    int, kbad (H, 1) bool: a channel holding a NaN or Inf), flashconv/_scaling.py. No host
    synchronisation."""
    import torch

    from flashconv._scaling import t_amax, t_exponents, t_scale
    from flashconv.spectrum import cuda_fft_size, natural_spectrum, scaled_rfft_spectrum

    ctype = torch.complex128 if cdt == torch.float64 else torch.complex64
    L = p.L
    if a.k.is_complex():
        K = natural_spectrum(a.k.detach(), a.k_exponent, a.n).to(ctype)
        K = K.clone() if K.data_ptr() == a.k.data_ptr() else K.resolve_conj()
        ek, kbad = t_exponents(t_amax(K).to(cdt), sync=False, hi=40)
        return t_scale(K, -ek), a.n, 0, 0, ek, kbad
    lk = min(int(a.k.shape[1]), L)
    lkr = 0 if a.k_rev is None else min(int(a.k_rev.shape[1]), L)
    n = cuda_fft_size(L, max(lk, lkr))
    K, ek, kbad = scaled_rfft_spectrum(a.k.detach(), None if a.k_rev is None else
                                       a.k_rev.detach(), L, n, cdt)
    return K, n, lk, lkr, ek, kbad


def _rows(x):
    """(x scaled by 2^-e per row (a new tensor), e, bad rows)."""
    from flashconv._scaling import t_amax, t_exponents, t_scale

    e, bad = t_exponents(t_amax(x), sync=False)
    return t_scale(x.clone(), -e), e, bad


def _nan_rows(z, bad):
    import torch

    return torch.where(bad, torch.full_like(z, float("nan")), z)


def forward(p, a):
    import torch

    from flashconv._scaling import t_scale

    cdt = _cdt(p)
    u, L = a.u, p.L
    x = u.to(cdt) if a.g_in is None else u.to(cdt) * a.g_in.to(cdt)
    K, n, _, _, ek, kbad = _spectrum(p, a, cdt)
    xs, ex, xbad = _rows(x)
    y = torch.fft.irfft(torch.fft.rfft(xs, n=n) * K, n=n)[..., :L]
    del xs
    y = _nan_rows(t_scale(y, ex + ek), xbad | kbad)
    if a.D is not None:
        y = y + x * a.D.to(cdt).unsqueeze(-1)
    from flashconv._epilogue import active, mask3, t_apply

    if active(a.activation, a.dropout_mask):
        return t_apply(y, a.activation, mask3(a.dropout_mask), a.g_out).to(u.dtype).contiguous()
    if a.g_out is not None:
        y = y * a.g_out.to(cdt)
    return y.to(u.dtype).contiguous()


def backward(p, a, dy, mask):
    import torch

    from flashconv._scaling import t_scale
    from flashconv.grads import compose_backward

    cdt = _cdt(p)
    L = p.L
    K, n, lk, lkr, ek, kbad = _spectrum(p, a, cdt)
    Kc = K.conj()

    def through(v, h, spec):
        vs, e, bad = _rows(v)
        out = torch.fft.irfft(torch.fft.rfft(vs, n=n) * spec[h], n=n)[..., :L]
        return _nan_rows(t_scale(out, e + ek[h]), bad | kbad[h])

    def conv(x, h):
        return through(x, h, K)

    def adjoint(dz, h):
        return through(dz, h, Kc)

    def correlate(x, dz, h):
        return scaled_correlate(x, dz, n, lk if mask[1] else 0, lkr if mask[5] else 0)

    return compose_backward(dy, a.u, a.k, a.D, a.g_in, a.g_out, a.k_rev, mask, cdt,
                            conv=conv, adjoint=adjoint, correlate=correlate,
                            activation=a.activation, dropout_mask=a.dropout_mask)


def scaled_correlate(x, dz, n, lk, lk_rev):
    """grads.fft_correlate with each row of x and dz scaled by a power of two (the terms of a
    channel's sum brought to its largest exponent), and channels with a non-finite row NaN.
    No host synchronisation."""
    import torch

    from flashconv._scaling import t_scale

    xs, ex, xbad = _rows(x)
    dzs, edz, dzbad = _rows(dz)
    r = (ex + edz).to(torch.int64)  # (B, h, 1)
    E = r.amax(0)  # (h, 1)
    X = torch.fft.rfft(xs, n=n)
    del xs
    X.conj_physical_()
    X *= torch.fft.rfft(dzs, n=n)
    del dzs
    corr = t_scale(X, (r - E).clamp_min(-3000)).sum(0)
    del X
    bad = (xbad | dzbad).any(0)  # (h, 1)
    dk = _nan_rows(t_scale(torch.fft.irfft(corr, n=n)[:, :lk], E), bad) if lk else \
        corr.real.new_zeros((corr.shape[0], 0))
    dkr = (_nan_rows(t_scale(torch.fft.irfft(corr.conj_physical(), n=n)[:, :lk_rev], E), bad)
           if lk_rev else None)
    return dk, dkr
