"""Engine cuda_two_level: long sequences on CUDA beyond the fused kernel's on-chip size, by a
two-level block FFT N = N1 * N2 (flashconv/_long.py; cuda/include/flashconv/fftconv_long.h):
forward by the two-level kernel (with the fused activation/dropout epilogue in its last pass); backward composed by flashconv/grads.py from it (dx: the
kernel with the conjugate spectrum) and batch-chunked torch.fft (dk).

Serves CUDA float32/float16/bfloat16 tensors with k as taps, up to L = 8M (N <= 2^24), where
the extension was built with fftconv_long_fwd. Host path: the spectrum and its order are
computed on the device (spectrum.spectrum_precision), no host synchronisation.
"""
from flashconv import _long
from flashconv.engines import _cuda, cuda_fused
from flashconv.plan import fused_fft_size

NAME = "cuda_two_level"
DESCRIPTION = "two-level block-FFT CUDA kernel (N = N1 * N2, sequences beyond the fused size)"


def available():
    why = _cuda.unavailable_reason()
    if why:
        return why
    if not _cuda.has("fftconv_long_fwd"):
        return "flashconv._C was built without fftconv_long_fwd (rebuild the extension)"
    return ""


def check(p):
    why = cuda_fused.cuda_reason(p)
    if why:
        return why
    if not _cuda.has("fftconv_long_fwd"):
        return "flashconv._C was built without fftconv_long_fwd (rebuild the extension)"
    if p.k_form != "taps":
        return "k is a precomputed spectrum (needs the taps)"
    if p.L < 1 or fused_fft_size(p.L) > _long.MAX_N:
        return "L = %d is beyond the two-level plan (L <= %d)" % (p.L, _long.MAX_N // 2)
    return None


def _spectrum(p, a, u_plan):
    from flashconv.spectrum import spectrum_precision

    _, N1, N2 = _long.long_plan_for(u_plan, p.L)
    return _long.long_spectrum(a.k, p.L, N1, N2, a.k_rev, precision=spectrum_precision(p.dtype))


def forward(p, a):
    spec = _spectrum(p, a, a.u)
    return _long.fftconv_long_forward(a.u, a.k, a.D, a.g_in, a.g_out, a.k_rev, spectrum=spec,
                                      activation=a.activation, dropout_mask=a.dropout_mask)


def backward(p, a, dy, mask):
    return _long.fftconv_long_backward(dy, a.u, a.k, a.D, a.g_in, a.g_out, a.k_rev, mask,
                                       activation=a.activation, dropout_mask=a.dropout_mask)
