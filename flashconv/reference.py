"""The baselines flashconv is measured against (bench/) and judged by (tests/).

``fftconv_ref`` is the torch.fft convolution found, in this form, in the H3, Hyena and
S4 code bases: rfft of size 2L, pointwise product, irfft, keep the first L, add D*u. It is
re-implemented here from that description so benchmarks and tests need no other
package. ``scipy_fftconv`` is the plain scipy.fft pipeline a CPU user would write.
"""
import scipy.fft as sfft


def fftconv_ref(u, k, D):
    """torch.fft causal convolution: u (B, H, L), k (H, L), D (H,) -> (B, H, L) in u's dtype.

    Computes in k's dtype (float32 for a float32 kernel), as the original does.
    """
    import torch

    L = u.shape[-1]
    n = 2 * L
    k_f = torch.fft.rfft(k, n=n) / n
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=n)
    y = torch.fft.irfft(u_f * k_f, n=n, norm="forward")[..., :L]
    out = y + u * D.unsqueeze(-1)
    return out.to(dtype=u.dtype)


def scipy_fftconv(u, k, D, workers=-1):
    """scipy.fft causal convolution on numpy arrays: FFT size next_fast_len(2L - 1)."""
    L = u.shape[-1]
    n = sfft.next_fast_len(2 * L - 1, real=True)
    K = sfft.rfft(k, n=n, workers=workers)
    U = sfft.rfft(u, n=n, workers=workers)
    return sfft.irfft(U * K, n=n, workers=workers)[..., :L] + u * D[:, None]
