"""Engine cpu_overlap_save: a short kernel on a long input on the CPU, by overlap-save blocks
(flashconv/_overlap.py: scipy.fft in cache-sized blocks, cost growing as L log Lk instead of
L log L). Forward only; numpy arrays and CPU torch tensors.

Serves taps k (not a spectrum), no k_rev, where the cost model (_overlap.overlap_save_cheaper)
says the blocks beat one full-length FFT: in practice Lk <= 16 from L = 4K, Lk <= 64 from
L = 32K, Lk <= 16K from L = 256K.
"""
from flashconv import _overlap

NAME = "cpu_overlap_save"
DESCRIPTION = "overlap-save blocks with scipy.fft on the CPU (short kernels, long inputs)"


def available():
    return ""


def check(p):
    if p.device_type != "cpu":
        return "u is on %s, not the CPU" % p.device
    if p.backward:
        return "forward only"
    if p.k_form != "taps":
        return "k is a precomputed spectrum (needs the taps)"
    if p.has_k_rev:
        return "k_rev (bidirectional) is not supported"
    if not _overlap.overlap_save_cheaper(p.L, p.lk):
        return ("the cost model prefers one full-length FFT for L = %d, Lk = %d "
                "(_overlap.overlap_save_cheaper)" % (p.L, p.lk))
    return None


def _np_view(t, dtype):
    """A numpy view of a CPU tensor (no copy unless t needs a dtype conversion)."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.numpy()


def forward(p, a):
    if p.has_epilogue:
        return _forward_epilogue(p, a)
    if p.kind == "numpy":
        return _overlap.overlap_save(a.u, a.k, a.D, a.g_in, a.g_out)
    import torch

    cdt = torch.float64 if p.compute_dtype == "float64" else torch.float32
    y = _overlap.overlap_save(*(_np_view(t, cdt) for t in (a.u, a.k, a.D, a.g_in, a.g_out)))
    return torch.from_numpy(y).to(a.u.dtype)


def _forward_epilogue(p, a):
    """With an activation or a dropout mask: z = conv + D x in the compute dtype (u passed
    in it, so overlap_save returns it unrounded), then y = g_out m act(z), rounded once."""
    import numpy as np

    from flashconv._epilogue import mask3, np_apply

    cdt = np.float64 if p.compute_dtype == "float64" else np.float32
    if p.kind == "numpy":
        z = _overlap.overlap_save(np.asarray(a.u, cdt), a.k, a.D, a.g_in, None)
        y = np_apply(z, p.activation, mask3(a.dropout_mask), a.g_out)
        with np.errstate(over="ignore"):
            return y.astype(a.u.dtype, copy=False)
    import torch

    tcdt = torch.float64 if cdt is np.float64 else torch.float32
    z = _overlap.overlap_save(*(_np_view(t, tcdt) for t in (a.u, a.k, a.D, a.g_in)))
    y = np_apply(z, p.activation, mask3(_np_view(a.dropout_mask, tcdt)), _np_view(a.g_out, tcdt))
    return torch.from_numpy(y).to(a.u.dtype)


backward = None
