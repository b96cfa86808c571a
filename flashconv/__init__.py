"""flashconv: fused block-FFT causal convolution for long-sequence models.

FlashConv from the H3 paper (Fu, Dao et al., "Hungry Hungry Hippos", arXiv 2212.14052,
section 4): FFT -> pointwise product -> inverse FFT fused in one GPU kernel whose FFTs are
16x16 DFT matrix products on tensor cores, plus state passing for sequences longer than
on-chip memory. The public entry point is :func:`fftconv`. Every call is served by the first
engine of a table (flashconv/engines/) whose check says yes: :func:`explain` says which and
why not the others, :func:`use_engines` (or FLASHCONV_ENGINES) restricts the table, and
``python -m flashconv`` lists the engines available on this machine.
"""
from flashconv._version import __version__
from flashconv.dispatch import KernelFallbackWarning, NoEngineError, use_engines
from flashconv.ops import KernelSpectrum, explain, fft_kernel, fftconv, fftconv_backward

__all__ = ["__version__", "fftconv", "fftconv_backward", "fft_kernel", "KernelSpectrum", "explain",
           "use_engines", "engine_names", "NoEngineError", "KernelFallbackWarning", "info"]


def engine_names():
    """The engine names in table order (the first whose check says yes serves a call); the
    engines themselves are the modules of flashconv.engines.TABLE."""
    from flashconv.engines import NAMES

    return list(NAMES)


def info():
    """What this installation can use: a dict (see ``python -m flashconv``)."""
    from flashconv.__main__ import collect

    return collect()
