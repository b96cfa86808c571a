"""flashconv: fused block-FFT causal convolution for long-sequence models.

FlashConv from the H3 paper (Fu, Dao et al., "Hungry Hungry Hippos", arXiv 2212.14052,
section 4): FFT -> pointwise product -> inverse FFT fused in one GPU kernel whose FFTs are
16x16 DFT matrix products on tensor cores, plus state passing for sequences longer than
on-chip memory. The public entry point is :func:`fftconv`; ``python -m flashconv`` says
which backends are available on this machine.
"""
from flashconv._version import __version__
from flashconv.ops import KernelSpectrum, fft_kernel, fftconv, fftconv_backward

__all__ = ["__version__", "fftconv", "fftconv_backward", "fft_kernel", "KernelSpectrum", "info"]


def info():
    """What this installation can use: a dict (see ``python -m flashconv``)."""
    from flashconv.__main__ import collect

    return collect()
