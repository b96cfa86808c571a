"""Engine cuda_overlap_save: a short kernel on a long input on CUDA, as overlap-save blocks of
P >= 8 Lk inputs, each block one row of a fused-kernel call (flashconv/_overlap.py,
overlap_save_blocks). Forward only: the backward of such a call goes to cuda_two_level.

Serves what cuda_fused serves except L: L beyond one block, with 8 Lk <= the fused kernel's
largest input (so at most 1/8 of each block is recomputed). There the alternative is the
two-level path (three passes over an 8N-byte workspace) and overlap-save is one fused pass over
about 1.14x the input: cheaper by construction; the crossover has not been measured on a GPU.
"""
from flashconv import _overlap
from flashconv.engines import _cuda, cuda_fused
from flashconv.plan import fused_fft_size

NAME = "cuda_overlap_save"
DESCRIPTION = "overlap-save blocks through the fused CUDA kernel (short kernels, long inputs)"


def available():
    return _cuda.unavailable_reason()


def block(p):
    """Block size P (inputs per block), or None when the kernel is too long for it."""
    return _overlap.gpu_block(max(1, p.lk), _cuda.fused_max_n(p.dtype, p.device_index) // 2)


def check(p):
    why = cuda_fused.cuda_reason(p)
    if why:
        return why
    if p.backward:
        return "forward only"
    if p.has_epilogue:
        return ("the overlap-save blocks have no activation/dropout epilogue (the fused and "
                "two-level kernels do)")
    if p.k_form != "taps":
        return "k is a precomputed spectrum (needs the taps)"
    if p.has_k_rev:
        return "k_rev (bidirectional) is not supported"
    P = block(p)
    if P is None:
        return ("Lk = %d is too long: blocks need 8 Lk <= %d, the fused kernel's largest input"
                % (p.lk, _cuda.fused_max_n(p.dtype, p.device_index) // 2))
    if p.L <= P:
        return "L = %d fits one block of %d (the fused kernel serves it whole)" % (p.L, P)
    return None


def forward(p, a):
    from flashconv.spectrum import monarch_spectrum, spectrum_precision

    P = block(p)
    spec, exp = monarch_spectrum(a.k, min(int(a.k.shape[1]), P), fused_fft_size(P),
                                 precision=spectrum_precision(p.dtype))
    import torch

    Kf = torch.view_as_real(spec)
    return _overlap.overlap_save_blocks(
        a.u, a.k, a.D, a.g_in, a.g_out,
        lambda ub, _k, Db, gib, gob: cuda_fused.launch_forward(ub, Kf, exp, Db, gib, gob), P)


backward = None
