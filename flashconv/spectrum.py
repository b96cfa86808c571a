"""Kernel spectra: the prepared form of k (KernelSpectrum) and the spectrum math the engines share.

Layouts of K:
  "rfft"     (H, n//2 + 1) natural-order rfft spectrum (CPU engines, torch.fft);
  "monarch"  (H, N) complex64 in the fused kernel's Monarch order (flashconv/plan.py), scaled per
             channel by 2^-e with max |K| < 2^e, and e as (H,) int32.

On CUDA everything here runs on the caller's current stream with no host synchronisation: the
permutation comes from flashconv.plan.device_perm (computed on the device, cached per (device,
N)), the FFT of k is a device FFT, and nothing is read back.

Precision of a CUDA time-domain kernel's spectrum (monarch_spectrum): float32 transforms for
float16/bfloat16 io, float64 for float32 io. Measured with python_ref's block-FFT mirror
(blockfft_conv, K from a float32 torch.fft instead of float64; B=2, H=4, L=N/2): the output
error is unchanged for bf16 (N = 64 ... 32K: 1.655e-3 ... 1.797e-3 either way) and fp16
(2.04e-4 ... 2.07e-4), and 1.3-1.4x higher for fp32 io (N = 1K: 1.16e-7 -> 1.63e-7, output
rounding floor 2.5e-8), so float32 io keeps the float64 transform (a device op as well).
"""
from dataclasses import dataclass

from flashconv import _cpu
from flashconv.plan import device_perm

__all__ = ["KernelSpectrum", "monarch_spectrum", "natural_spectrum", "rfft_spectrum",
           "scaled_rfft_spectrum", "cuda_fft_size", "spectrum_precision"]


@dataclass(frozen=True)
class KernelSpectrum:
    """A convolution kernel prepared once for inputs of length L (see fft_kernel()).

    Holds the FFT of k (truncated to L taps and zero-padded to the FFT size `n`) in the
    layout the engine for `device` wants. A layer that calls fftconv with the same k at
    every step computes this once; gradients do not flow into a precomputed spectrum.
    With torch tensors it goes through the flashconv::fftconv operator as its tensors
    (spectrum, exponent) and its FFT size n, so it works under torch.compile too.
    """

    spectrum: object  # layout "rfft": (H, n//2 + 1) complex; "monarch": (H, n) complex64
    L: int            # sequence length it was prepared for
    lk: int           # taps kept: min(Lk, L)
    n: int            # FFT size
    dtype: str        # compute dtype: "float32" or "float64"
    kind: str         # "numpy" or "torch"
    device: str       # "cpu", "cuda:0", ...
    layout: str = "rfft"   # "monarch": the fused kernel's order, scaled by 2^-exponent
    exponent: object = None  # (H,) int32 for layout "monarch": K = spectrum * 2^exponent

    @property
    def H(self):
        return int(self.spectrum.shape[0])


def cuda_fft_size(L, lk):
    """FFT size of the torch.fft engine: a power of two >= L + lk - 1 (cuFFT's fastest)."""
    return 1 << max(0, (L + lk - 2).bit_length())


def spectrum_precision(io_dtype):
    """torch dtype of the transform of a time-domain k on CUDA for u of `io_dtype` (a name):
    float32 for 16-bit io, float64 for float32 io (see the module docstring)."""
    import torch

    return torch.float32 if str(io_dtype).replace("torch.", "") in ("float16", "bfloat16") \
        else torch.float64


def monarch_spectrum(k, lk, n, k_rev=None, precision=None):
    """The fused kernel's K for the taps k[:, :lk] (plus conj(FFT(k_rev)) for a bidirectional
    convolution; k_rev already truncated to L taps): FFT at size n in `precision` (a torch
    float dtype; default float64) on k's device, in Monarch order, scaled per channel by 2^-e
    with max |K| < 2^e. Returns ((H, n) complex64, (H,) int32), both contiguous."""
    import torch

    precision = torch.float64 if precision is None else precision
    spec = torch.fft.fft(k[:, :lk].detach().to(precision), n=n)
    if k_rev is not None:
        spec = spec + torch.fft.fft(k_rev.detach().to(precision), n=n).conj()
    spec = spec.index_select(1, device_perm(n, spec.device))
    _, e = torch.frexp(spec.abs().amax(dim=1))  # amax = m * 2^e, 0.5 <= m < 1 (e = 0 for 0)
    spec = torch.ldexp(spec, (-e).unsqueeze(1).to(precision))
    return spec.to(torch.complex64).contiguous(), e.to(torch.int32).contiguous()


def fragment_spectrum(K):
    """The bfloat16 fused forward kernel's K16 from a Monarch-order spectrum K (H, n) complex
    (scaled so that max |K| <= 1): (H, 2n) float16 on K's device, per 256-element group the
    real parts then the imaginary parts, each in flashconv.plan.fragment_positions() order (the
    order of the kernel's mma accumulators: one 16-byte read per lane and part)."""
    import torch

    from flashconv.plan import device_fragment_positions

    H, n = K.shape
    Kg = K.reshape(H, n // 256, 256).index_select(2, device_fragment_positions(K.device))
    return torch.stack([Kg.real, Kg.imag], dim=2).to(torch.float16).reshape(H, 2 * n).contiguous()


def natural_spectrum(spec, exponent, n):
    """(H, n//2 + 1) natural-order rfft spectrum from a spectrum operand: `spec` itself for
    layout "rfft" (exponent None), else unpermuted and unscaled from Monarch order."""
    import torch

    if exponent is None:
        return spec
    nat = torch.empty_like(spec)
    nat[:, device_perm(n, spec.device)] = spec
    nat = torch.ldexp(nat, exponent.unsqueeze(1).to(torch.float32))
    return nat[:, : n // 2 + 1]


def _complex_dtype(cdt):
    import torch

    return torch.complex128 if cdt == torch.float64 else torch.complex64


def rfft_spectrum(k, k_exponent, n, L, cdt, k_rev, fft_size):
    """(K (H, n//2 + 1) complex, n, lk, lk_rev) for a time-domain k (and k_rev), at FFT size
    fft_size(L, max(lk, lk_rev)), or for a spectrum operand (its own n). torch tensors, any
    device (on the CPU through the torch engine's padded buffers)."""
    from flashconv import _cpu_torch

    if k.is_complex():
        spec = natural_spectrum(k.detach(), k_exponent, n)
        return spec.to(_complex_dtype(cdt)).resolve_conj(), n, 0, 0
    lk = min(int(k.shape[1]), L)
    lkr = 0 if k_rev is None else min(int(k_rev.shape[1]), L)
    n = fft_size(L, max(lk, lkr))
    K = _cpu_torch.kernel_spectrum(k.detach(), L, n, cdt,
                                   None if k_rev is None else k_rev.detach())
    return K, n, lk, lkr


def scaled_rfft_spectrum(k, k_rev, L, n, cdt, unscale=False):
    """(K, e, bad) for the taps k[:, :L] (and k_rev[:, :L]) on any device, without host
    synchronisation: K = rfft(k 2^-e, n) (+ conj(rfft(k_rev 2^-e, n))), each channel scaled by a
    power of two (e (H, 1) int; flashconv/_scaling.py), bad (H, 1) marking channels that hold a
    NaN or Inf. unscale=True returns K times 2^e with bad channels NaN (fft_kernel under
    torch.compile)."""
    import torch

    from flashconv._scaling import t_amax, t_exponents, t_scale

    kk = k[:, :L].to(cdt)
    kr = None if k_rev is None else k_rev[:, :L].to(cdt)
    amax = t_amax(kk)
    if kr is not None:
        amax = torch.maximum(amax, t_amax(kr))
    e, bad = t_exponents(amax, sync=False)
    K = torch.fft.rfft(t_scale(kk.clone(), -e), n=n)
    if kr is not None:
        K = K + torch.fft.rfft(t_scale(kr.clone(), -e), n=n).conj()
    if unscale:
        K = torch.where(bad, torch.full_like(K, float("nan")), t_scale(K, e))
    return K, e, bad


def cpu_rfft_spectrum(k, k_exponent, n, L, cdt, k_rev=None):
    """rfft_spectrum at the CPU engines' FFT size (5-smooth, L + Lk - 1)."""
    return rfft_spectrum(k, k_exponent, n, L, cdt, k_rev, _cpu.fft_size)


def torch_rfft_spectrum(k, k_exponent, n, L, cdt, k_rev=None):
    """rfft_spectrum at the power-of-two size cuFFT prefers."""
    return rfft_spectrum(k, k_exponent, n, L, cdt, k_rev, cuda_fft_size)
