"""python_ref: float64 numpy/scipy references for flashconv (no torch anywhere).

It is the ground truth for every test in the project and the stage-by-stage specification
of the CUDA kernel (docs/kernels.md; the tolerance rule: docs/testing.md):

- conv: the gated causal convolution computed directly and by FFT in float64, and its
  analytic gradients.
- rounding: exact fp32 / fp16 / bf16 round-to-nearest-even emulation.
- blockfft: the kernel's block (Monarch) FFT and fused convolution, with the same radix plan,
  stage order, twiddles, Monarch output order, two-row packing, zero-half and
  discarded-half skips, overflow scaling and rounding points as the kernel, so its
  emulated fp16/bf16 error predicts what the GPU must achieve.

``python -m python_ref`` prints the table of emulated errors.
"""

from .blockfft import (
    PRECISIONS,
    ROW_NORM_EXP,
    SCALINGS,
    block_fft,
    block_fft_stages,
    block_ifft,
    block_ifft_stages,
    blockfft_conv,
    dft_matrix,
    emulated_error,
    fft_size,
    kernel_spectrum,
    monarch_negation_index,
    monarch_perm,
    pack_rows,
    plan,
    relative_error,
    stage_shift,
    twiddles,
    unpack_spectrum,
    unpack_spectrum_monarch,
)
from .conv import causal_conv_direct, fftconv, fftconv_grads
from .rounding import ROUNDINGS, round_bf16, round_fp16, round_fp32, round_to
from .ssm import ssm_kernel, ssm_recurrence, state_passing

__all__ = [
    "PRECISIONS",
    "ROUNDINGS",
    "ROW_NORM_EXP",
    "SCALINGS",
    "block_fft",
    "block_fft_stages",
    "block_ifft",
    "block_ifft_stages",
    "blockfft_conv",
    "causal_conv_direct",
    "dft_matrix",
    "emulated_error",
    "fft_size",
    "fftconv",
    "fftconv_grads",
    "kernel_spectrum",
    "monarch_negation_index",
    "monarch_perm",
    "pack_rows",
    "plan",
    "relative_error",
    "round_bf16",
    "round_fp16",
    "round_fp32",
    "round_to",
    "ssm_kernel",
    "ssm_recurrence",
    "stage_shift",
    "state_passing",
    "twiddles",
    "unpack_spectrum",
    "unpack_spectrum_monarch",
]
