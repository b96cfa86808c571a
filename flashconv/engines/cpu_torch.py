"""Engine cpu_torch: the CPU engine on torch.fft (MKL), flashconv/_cpu_torch.py: chunks of
whole rows sized for the cache, a reused zero-tailed padded buffer, in-place products, the
epilogue writing the output; forward and backward (the formulas of flashconv/grads.py, fused
per chunk).

Serves CPU torch tensors, and numpy arrays when torch is installed and can view every operand
zero-copy (native byte order, non-negative strides): measured 1.4-1.8x faster per transform
than scipy's pocketfft on this project's machines.
"""
NAME = "cpu_torch"
DESCRIPTION = "torch.fft (MKL) CPU engine: cache-sized chunks, reused padded buffers"


def available():
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return "torch is not installed (%s)" % exc
    return ""


def check(p):
    if p.device_type != "cpu":
        return "u is on %s, not the CPU" % p.device
    if p.kind == "numpy":
        why = available()
        if why:
            return why
        if not p.torch_viewable:
            return ("an operand torch cannot view zero-copy (negative strides or non-native "
                    "byte order)")
    return None


def _views(a):
    """The operands as CPU tensors (zero-copy views of numpy arrays)."""
    import torch

    return a._replace(**{f: torch.from_numpy(getattr(a, f)) for f in
                         ("u", "k", "D", "g_in", "g_out", "k_rev", "dropout_mask")
                         if getattr(a, f) is not None})


def _cdt(p):
    import torch

    return torch.float64 if p.compute_dtype == "float64" else torch.float32


def _kernel(p, t):
    """(K, n, lk, lk_rev) for _cpu_torch: Taps of a time-domain k (transformed there, a group of
    channels at a time) or the natural spectrum of a precomputed one."""
    from flashconv import _cpu, _cpu_torch
    from flashconv.spectrum import natural_spectrum

    if t.k.is_complex():
        cdt = _cdt(p)
        ctype = torch_complex(cdt)
        return natural_spectrum(t.k.detach(), t.k_exponent, t.n).to(ctype).resolve_conj(), t.n, 0, 0
    n = _cpu.fft_size(p.L, max(p.lk, p.lk_rev))
    kr = None if t.k_rev is None else t.k_rev.detach()
    return _cpu_torch.Taps(t.k.detach(), kr), n, p.lk, p.lk_rev


def torch_complex(cdt):
    import torch

    return torch.complex128 if cdt == torch.float64 else torch.complex64


def forward(p, a):
    from flashconv import _cpu_torch

    t = _views(a) if p.kind == "numpy" else a
    K, n, _, _ = _kernel(p, t)
    u, D, g_in, g_out, m = (None if x is None else x.detach()
                            for x in (t.u, t.D, t.g_in, t.g_out, t.dropout_mask))
    y = _cpu_torch.conv_forward(u, K, n, D, g_in, g_out, cdt=_cdt(p), activation=t.activation,
                                dropout_mask=m)
    return y.numpy() if p.kind == "numpy" else y


def backward(p, a, dy, mask):
    import torch

    from flashconv import _cpu_torch
    from flashconv.grads import kernel_grad

    if p.kind == "numpy":
        a, dy = _views(a), torch.from_numpy(dy)
    need_u, need_k, need_D, need_gi, need_go, need_kr = mask
    # K is recomputed from k (H FFTs, against the B*H of the backward itself) rather than
    # saved by the forward: the operator's only output is y.
    K, n, lk, lkr = _kernel(p, a)
    dy, u, D, g_in, g_out, m = (None if x is None else x.detach()
                                for x in (dy, a.u, a.D, a.g_in, a.g_out, a.dropout_mask))
    du, dk, dD, dgi, dgo, dkr = _cpu_torch.conv_backward(
        dy, u, K, n, lk, D, g_in, g_out, need_u=need_u, need_k=need_k, need_D=need_D,
        need_gin=need_gi, need_gout=need_go, lk_rev=lkr if need_kr else 0, cdt=_cdt(p),
        kdtypes=(a.k.dtype, None if a.k_rev is None else a.k_rev.dtype),
        activation=a.activation, dropout_mask=m)
    dk = kernel_grad(a.k, lk, dk) if need_k else None
    dkr = kernel_grad(a.k_rev, lkr, dkr) if need_kr else None
    dD = dD.to(D.dtype) if need_D else None
    grads = (du, dk, dD, dgi, dgo, dkr)
    if p.kind == "numpy":
        grads = tuple(None if g is None else g.numpy() for g in grads)
    return grads
