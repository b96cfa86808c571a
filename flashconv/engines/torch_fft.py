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


def forward(p, a):
    import torch

    from flashconv.spectrum import torch_rfft_spectrum

    cdt = _cdt(p)
    u, L = a.u, p.L
    x = u.to(cdt) if a.g_in is None else u.to(cdt) * a.g_in.to(cdt)
    K, n, _, _ = torch_rfft_spectrum(a.k, a.k_exponent, a.n, L, cdt, a.k_rev)
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * K, n=n)[..., :L]
    if a.D is not None:
        y = y + x * a.D.to(cdt).unsqueeze(-1)
    if a.g_out is not None:
        y = y * a.g_out.to(cdt)
    return y.to(u.dtype).contiguous()


def backward(p, a, dy, mask):
    import torch

    from flashconv.grads import compose_backward, fft_correlate
    from flashconv.spectrum import torch_rfft_spectrum

    cdt = _cdt(p)
    L = p.L
    K, n, lk, lkr = torch_rfft_spectrum(a.k, a.k_exponent, a.n, L, cdt, a.k_rev)
    Kc = K.conj()

    def conv(x, h):
        return torch.fft.irfft(torch.fft.rfft(x, n=n) * K[h], n=n)[..., :L]

    def adjoint(dz, h):
        return torch.fft.irfft(torch.fft.rfft(dz, n=n) * Kc[h], n=n)[..., :L]

    def correlate(x, dz, h):
        return fft_correlate(x, dz, n, lk if mask[1] else 0, lkr if mask[5] else 0)

    return compose_backward(dy, a.u, a.k, a.D, a.g_in, a.g_out, a.k_rev, mask, cdt,
                            conv=conv, adjoint=adjoint, correlate=correlate)
