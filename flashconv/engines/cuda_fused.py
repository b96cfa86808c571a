"""Engine cuda_fused: the fused block-FFT kernels (flashconv._C; cuda/include/flashconv/
fftconv_fwd.h and fftconv_bwd.h), forward and backward, one CTA per channel, FFT -> product ->
inverse FFT on chip.

Serves CUDA torch tensors of float32, float16 and bfloat16 whose FFT size N = fused_fft_size(L)
fits the kernel on the device (forward: bfloat16 N <= 32K, float32/float16 N <= 16K; backward:
half of that; less where the device's opt-in shared memory is smaller), with k as taps or as a
Monarch-order spectrum of fft_kernel for this N.

With an activation or a dropout mask the forward kernel applies the fused epilogue itself; the
backward recomputes z with a z-only forward launch and hands the backward kernel the float32
factor g_out * m * act'(z) (epilogue_gate; docs/compat.md).

Host path: no host synchronisation. K comes from spectrum.monarch_spectrum (device FFT, device
permutation), outputs are allocated with torch, and the launch goes to the caller's current
stream.
"""
from flashconv.engines import _cuda
from flashconv.plan import fused_fft_size
from flashconv.problem import KERNEL_DTYPES

NAME = "cuda_fused"
DESCRIPTION = "fused block-FFT CUDA kernel (FFT, product and inverse FFT in one kernel)"


def available():
    """Why this engine cannot run on this machine at all ("" if it can)."""
    return _cuda.unavailable_reason()


def cuda_reason(p):
    """The reason shared by the CUDA engines, or "": not CUDA, extension or device unusable,
    not a kernel dtype."""
    if p.device_type != "cuda":
        return "u is on %s, not a CUDA device" % p.device
    why = _cuda.unavailable_reason()
    if why:
        return why
    if p.dtype not in KERNEL_DTYPES:
        return "%s is not a kernel dtype (float32, float16, bfloat16)" % p.dtype
    return ""


def check(p):
    """None if the fused kernel serves the call, else why not."""
    why = cuda_reason(p)
    if why:
        return why
    N = fused_fft_size(p.L)
    if p.k_form == "rfft":
        return "k is a natural-order spectrum; the kernel needs fft_kernel's Monarch order"
    if p.k_form == "monarch" and p.n != N:
        return "k was prepared for FFT size %d, the kernel uses %d" % (p.n, N)
    max_n = _cuda.fused_max_n(p.dtype, p.device_index, p.backward)
    if N > max_n:
        return ("L = %d needs FFT size %d; the %s kernel holds at most %d for %s on this "
                "device (%d KB opt-in shared memory)"
                % (p.L, N, p.direction, max_n, p.dtype,
                   _cuda.max_smem(p.device_index) // 1024))
    return None


def strides(t):
    return (0, 0, 0) if t is None else tuple(int(s) for s in t.stride())


def ptr(t):
    return 0 if t is None else t.data_ptr()


def stream(device):
    import torch

    return torch.cuda.current_stream(device).cuda_stream


def kernel_spectrum(k, k_exponent, L, N, k_rev, io_dtype):
    """(K as (H, N, 2) float32, k_exp (H,) int32) for the fused kernels: the operand itself
    for a Monarch spectrum, else computed on the device."""
    import torch

    from flashconv.spectrum import monarch_spectrum, spectrum_precision

    if k.is_complex():
        K, kexp = k.contiguous(), k_exponent.to(torch.int32).contiguous()
    else:
        K, kexp = monarch_spectrum(k, min(int(k.shape[1]), L), N,
                                   None if k_rev is None else k_rev[:, :L],
                                   precision=spectrum_precision(io_dtype))
    return torch.view_as_real(K), kexp


def fragment_k(Kf, dtype):
    """The bfloat16 tensor-core kernels' K16 (spectrum.fragment_spectrum of the (H, N, 2) float32
    K, made on the device: 4N bytes per channel); None for the other dtypes."""
    import torch

    from flashconv.spectrum import fragment_spectrum

    return fragment_spectrum(torch.view_as_complex(Kf)) if dtype == torch.bfloat16 else None


# Activation codes of the kernels' fused epilogue (cuda/include/flashconv/fftconv_params.h).
ACT_CODES = {None: 0, "": 0, "gelu": 1, "silu": 2}


def mask_view(m):
    """(float32 tensor, its (B, H, L) strides) of a dropout mask for the kernels: a (B, H) mask
    is read with stride 0 along L (no copy); another dtype is converted to float32 once."""
    import torch

    if m is None:
        return None, (0, 0, 0)
    m = m.detach().to(torch.float32)
    st = tuple(int(s) for s in m.stride())
    return m, (st if m.ndim == 3 else st + (0,))


def launch_forward(u, Kf, kexp, D, g_in, g_out, activation=None, dropout_mask=None, z=None):
    """The fused forward kernel for a prepared (H, N, 2) float32 K: y = g_out * m * act(conv +
    D x) (B, H, L), the epilogue in fp32 before the rounding to u's dtype. With z (a float32
    (B, H, L) tensor) the kernel writes the pre-activation conv + D x there instead, and no y
    (the backward's recompute; returns z). bfloat16 io reads K as fp16 in the tensor-core
    kernel's fragment order (spectrum.fragment_spectrum, made here on the device: 4N bytes per
    channel)."""
    import torch

    from flashconv import _ext

    B, H, L = u.shape
    N = int(Kf.shape[1])
    K16 = fragment_k(Kf, u.dtype)
    Df = None if D is None else D.detach().to(torch.float32).contiguous()
    gi = None if g_in is None else g_in.detach().to(u.dtype)
    go = None if g_out is None else g_out.detach().to(u.dtype)
    m, m_st = mask_view(dropout_mask)
    y = None if z is not None else torch.empty((B, H, L), dtype=u.dtype, device=u.device)
    _ext.extension().fftconv_fwd(
        ptr(u), ptr(gi), ptr(go), ptr(y), ptr(Kf), ptr(K16), ptr(kexp), ptr(Df), B, H, L, N,
        strides(u), strides(gi), strides(go), strides(y), _cuda.DTYPE_CODES[_name(u.dtype)],
        u.device.index, stream(u.device), act=ACT_CODES[activation], mask=ptr(m),
        mask_strides=m_st, z=ptr(z), z_strides=strides(z))
    return z if z is not None else y


def _name(dtype):
    return str(dtype).replace("torch.", "")


def forward(p, a):
    N = fused_fft_size(p.L)
    Kf, kexp = kernel_spectrum(a.k, a.k_exponent, p.L, N, a.k_rev, p.dtype)
    return launch_forward(a.u, Kf, kexp, a.D, a.g_in, a.g_out, a.activation, a.dropout_mask)


def epilogue_gate(u, Kf, kexp, D, g_in, g_out, dy, activation, dropout_mask, need_go):
    """The fused epilogue's backward factors, in float32: (gate, dg_out) with gate = g_out * m *
    act'(z) (B, H, L) and dg_out = dy * m * act(z) (u's dtype, or None). z = conv + D x is
    recomputed by one more fused forward launch with a float32 z output (4 bytes per element,
    freed here), then the factors by torch elementwise in float32 (flashconv/_epilogue.py):
    transient memory about 12 bytes per element, the gate's 4 kept for the backward launch."""
    import torch

    from flashconv._epilogue import mask3, t_grad

    z = torch.empty(u.shape, dtype=torch.float32, device=u.device)
    launch_forward(u, Kf, kexp, D, g_in, None, z=z)
    gate, gz = t_grad(z, dy, activation, mask3(dropout_mask), g_out, need_go)
    del z
    return gate.contiguous(), (None if gz is None else gz.to(u.dtype))


def backward(p, a, dy, mask):
    """The fused backward kernel: (du, dk, dD, dg_in, dg_out, dk_rev). With the fused epilogue
    (an activation or a dropout mask): epilogue_gate, then the kernel with that float32 gate
    in g_out's place (dz = dy * gate formed in fp32 on chip) and dg_out from epilogue_gate."""
    import torch

    from flashconv import _ext
    from flashconv._epilogue import active
    from flashconv.grads import kernel_grad

    u, k, D, g_in, g_out, k_rev = a.u, a.k, a.D, a.g_in, a.g_out, a.k_rev
    need_u, need_k, need_D, need_gi, need_go, need_kr = mask
    B, H, L = u.shape
    N = fused_fft_size(L)
    Kf, kexp = kernel_spectrum(k, a.k_exponent, L, N, k_rev, p.dtype)
    lk = 0 if k.is_complex() else min(int(k.shape[1]), L)
    lkr = min(int(k_rev.shape[1]), L) if need_kr else 0
    dev = u.device
    du = torch.empty((B, H, L), dtype=u.dtype, device=dev)  # the kernel always writes du
    dgi = torch.empty((B, H, L), dtype=u.dtype, device=dev) if need_gi else None
    epi = active(a.activation, a.dropout_mask)
    dgo = torch.empty((B, H, L), dtype=u.dtype, device=dev) if need_go and not epi else None
    dk_acc = torch.zeros((H, lk), dtype=torch.float32, device=dev)  # accumulated (+=) in fp32
    dD_acc = torch.zeros((H,), dtype=torch.float32, device=dev) if need_D else None
    dkr_acc = torch.zeros((H, lkr), dtype=torch.float32, device=dev) if need_kr else None
    Df = None if D is None else D.detach().to(torch.float32).contiguous()
    gi = None if g_in is None else g_in.detach().to(u.dtype)
    go = None if g_out is None else g_out.detach().to(u.dtype)
    dy = dy.to(u.dtype)
    dgo_epi = None
    if epi:
        go, dgo_epi = epilogue_gate(u, Kf, kexp, D, gi, go, dy, a.activation, a.dropout_mask,
                                    need_go)
    K16 = fragment_k(Kf, u.dtype)
    _ext.extension().fftconv_bwd(
        ptr(u), ptr(gi), ptr(go), ptr(dy), ptr(du), ptr(dgi), ptr(dgo), ptr(Kf), ptr(K16),
        ptr(kexp), ptr(Df), ptr(dk_acc), ptr(dD_acc), ptr(dkr_acc), B, H, L, N, lk, lkr,
        strides(u), strides(gi), strides(go), strides(dy), strides(du), strides(dgi),
        strides(dgo), _cuda.DTYPE_CODES[p.dtype], dev.index, stream(dev), g_out_f32=epi)
    if epi:
        dgo = dgo_epi
    return (du if need_u else None,
            kernel_grad(k, lk, dk_acc) if need_k else None,
            dD_acc.to(D.dtype) if need_D else None,
            dgi, dgo,
            kernel_grad(k_rev, lkr, dkr_acc) if need_kr else None)
