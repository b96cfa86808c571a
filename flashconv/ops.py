"""flashconv.fftconv: the one public entry point, its validation and its dispatch.

    y[b,h,t] = g_out[b,h,t] * ( sum_{s<=t} k[h,s] x[b,h,t-s] + D[h] x[b,h,t] ),
    x = g_in * u

Dispatch, by the type and device of `u`:

=====================  =====================================================
numpy.ndarray          the CPU engine (scipy.fft, flashconv/_cpu.py)
torch.Tensor on CPU    the CPU engine through zero-copy numpy views, with a
                       torch.autograd.Function for gradients
torch.Tensor on CUDA   the fused block-FFT kernel (flashconv._C) for float32,
                       float16 and bfloat16 where its FFT size fits on chip
                       (bfloat16 L <= 16K, float32/float16 L <= 8K), else torch.fft. Gradients:
                       torch.fft (the backward kernel has not landed yet).
=====================  =====================================================

torch is optional: numpy users never import it.
"""
import numbers
from dataclasses import dataclass

import numpy as np

from flashconv import _cpu, _ext
from flashconv.plan import fused_fft_size, monarch_perm

try:
    import torch
except ImportError:  # numpy-only installs
    torch = None

__all__ = ["fftconv", "fft_kernel", "KernelSpectrum"]

_TORCH_FLOATS = () if torch is None else (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY_FLOATS = (np.float16, np.float32, np.float64)


def _is_torch(x):
    return torch is not None and isinstance(x, torch.Tensor)


def _kind(x):
    if _is_torch(x):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    return None


def _type_name(x):
    return type(x).__module__ + "." + type(x).__qualname__


def _check_dtype(name, x, kind):
    if kind == "torch":
        if x.dtype not in _TORCH_FLOATS:
            raise TypeError("fftconv: %s must be a real floating tensor (float32, float16, bfloat16 "
                            "or float64), got %s" % (name, x.dtype))
    elif x.dtype.type not in _NUMPY_FLOATS:
        raise TypeError("fftconv: %s must be a real floating array (float32, float16 or float64), "
                        "got %s" % (name, x.dtype))


def _shape(x):
    return tuple(int(s) for s in x.shape)


@dataclass(frozen=True)
class KernelSpectrum:
    """A convolution kernel prepared once for inputs of length L (see fft_kernel()).

    Holds the FFT of k (truncated to L taps and zero-padded to the FFT size `n`) in the
    layout the engine for `device` wants. A layer that calls fftconv with the same k at
    every step computes this once; gradients do not flow into a precomputed spectrum.
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


def _compute_dtype_name(u):
    return "float64" if str(u.dtype).endswith("float64") else "float32"


def _cuda_fft_size(L, lk):
    # cuFFT is fastest on powers of two; the fused kernel uses the same N (DESIGN 3).
    return 1 << max(0, (L + lk - 2).bit_length())


def fft_kernel(k, L, *, dtype=None):
    """Precompute the spectrum of the kernel k (H, Lk) for inputs of length L.

    The result can be passed to fftconv() in place of k; it is valid only for inputs of
    length L on the same device and with the same compute dtype (float32, or float64
    when `dtype` is float64 / k is float64 and dtype is None).
    """
    kind = _kind(k)
    if kind is None:
        raise TypeError("fft_kernel: k must be a torch.Tensor or numpy.ndarray, got %s" % _type_name(k))
    if k.ndim != 2:
        raise ValueError("fft_kernel: k must have shape (H, Lk), got %s" % (_shape(k),))
    _check_dtype("k", k, kind)
    if not isinstance(L, numbers.Integral) or L < 0:
        raise ValueError("fft_kernel: L must be a non-negative integer, got %r" % (L,))
    L = int(L)
    dname = str(dtype).replace("torch.", "") if dtype is not None else _compute_dtype_name(k)
    if dname not in ("float32", "float64"):
        raise TypeError("fft_kernel: dtype must be float32 or float64, got %s" % dtype)
    lk = min(int(k.shape[1]), L)
    if kind == "torch" and k.is_cuda:
        if dname == "float32":
            n = fused_fft_size(L)
            spec, exp = _monarch_spectrum(k, lk, n)
            return KernelSpectrum(spec, L, lk, n, dname, kind, str(k.device), "monarch", exp)
        n = _cuda_fft_size(L, lk)
        spec = torch.fft.rfft(k[:, :lk].to(torch.float64), n=n)
        return KernelSpectrum(spec, L, lk, n, dname, kind, str(k.device))
    n = _cpu.fft_size(L, lk)
    kn = _np_view(k, getattr(torch, dname)) if kind == "torch" else k
    spec = _cpu.kernel_spectrum(kn, L, n, np.dtype(dname))
    if kind == "torch":
        spec = torch.from_numpy(spec)
    return KernelSpectrum(spec, L, lk, n, dname, kind, "cpu")


def _monarch_spectrum(k, lk, n):
    """The fused kernel's K: FFT of k[:, :lk] zero-padded to n, in Monarch order, as
    (H, n) complex64 scaled per channel by 2^-e with max |K| < 2^e, and e as (H,) int32."""
    spec = torch.fft.fft(k[:, :lk].detach().to(torch.float64), n=n)
    perm = torch.from_numpy(monarch_perm(n)).to(spec.device)
    spec = spec.index_select(1, perm)
    _, e = torch.frexp(spec.abs().amax(dim=1))  # amax = m * 2^e, 0.5 <= m < 1 (e = 0 for 0)
    spec = torch.ldexp(spec, (-e).unsqueeze(1).to(torch.float64))
    return spec.to(torch.complex64).contiguous(), e.to(torch.int32).contiguous()


def _natural_rfft(ks):
    """(H, n//2 + 1) spectrum of a KernelSpectrum in natural order (for the torch.fft path)."""
    if ks.layout == "rfft":
        return ks.spectrum
    spec = torch.empty_like(ks.spectrum)
    perm = torch.from_numpy(monarch_perm(ks.n)).to(spec.device)
    spec[:, perm] = ks.spectrum
    spec = torch.ldexp(spec, ks.exponent.unsqueeze(1).to(torch.float32))
    return spec[:, : ks.n // 2 + 1]


def _validate(u, k, D, g_in, g_out):
    """Check shapes, dtypes, array kinds and devices; raise TypeError/ValueError naming the argument."""
    kind = _kind(u)
    if kind is None:
        raise TypeError("fftconv: u must be a torch.Tensor or numpy.ndarray of shape (B, H, L), "
                        "got %s" % _type_name(u))
    if u.ndim != 3:
        raise ValueError("fftconv: u must have shape (B, H, L), got shape %s" % (_shape(u),))
    _check_dtype("u", u, kind)
    B, H, L = _shape(u)
    if isinstance(k, KernelSpectrum):
        if k.kind != kind:
            raise TypeError("fftconv: k was prepared by fft_kernel() for %s arrays but u is a %s "
                            "array" % (k.kind, kind))
        if k.L != L:
            raise ValueError("fftconv: k was prepared by fft_kernel() for L = %d but u has L = %d"
                             % (k.L, L))
        if k.H != H:
            raise ValueError("fftconv: k was prepared for H = %d channels but u has H = %d" % (k.H, H))
        if k.dtype != _compute_dtype_name(u):
            raise TypeError("fftconv: k was prepared in %s but u (%s) computes in %s"
                            % (k.dtype, u.dtype, _compute_dtype_name(u)))
    else:
        if _kind(k) != kind:
            raise TypeError("fftconv: k must be a %s like u, got %s" % (
                "torch.Tensor" if kind == "torch" else "numpy.ndarray", _type_name(k)))
        if k.ndim != 2 or int(k.shape[0]) != H:
            raise ValueError("fftconv: k must have shape (H, Lk) = (%d, Lk), got shape %s"
                             % (H, _shape(k)))
        _check_dtype("k", k, kind)
    for name, arr, want in (("D", D, (H,)), ("g_in", g_in, (B, H, L)), ("g_out", g_out, (B, H, L))):
        if arr is None:
            continue
        if _kind(arr) != kind:
            raise TypeError("fftconv: %s must be a %s like u, got %s" % (
                name, "torch.Tensor" if kind == "torch" else "numpy.ndarray", _type_name(arr)))
        if _shape(arr) != want:
            raise ValueError("fftconv: %s must have shape %s, got shape %s"
                             % (name, want, _shape(arr)))
        _check_dtype(name, arr, kind)
    if kind == "torch":
        dev = u.device
        others = [("k", k)] if not isinstance(k, KernelSpectrum) else []
        others += [(n_, a) for n_, a in (("D", D), ("g_in", g_in), ("g_out", g_out)) if a is not None]
        for name, arr in others:
            if arr.device != dev:
                raise ValueError("fftconv: %s is on %s but u is on %s; all inputs must be on one "
                                 "device" % (name, arr.device, dev))
        if isinstance(k, KernelSpectrum) and k.device != str(dev):
            raise ValueError("fftconv: k was prepared on %s but u is on %s" % (k.device, dev))
    return kind


def fftconv(u, k, D=None, *, g_in=None, g_out=None):
    """Causal (linear) convolution of u with k along the last axis, fused with skip and gates.

    ``y = g_out * (causal_conv(x, k) + D * x)`` with ``x = g_in * u``: a drop-in for the
    ``fftconv_ref(u, k, D)`` of the H3 / Hyena / S4 code bases (which is this with no gates).

    Args:
        u: (B, H, L) torch.Tensor (float32, float16, bfloat16 or float64; CPU or CUDA)
            or numpy.ndarray (float32, float16 or float64). Any strides.
        k: (H, Lk) kernel in the time domain, any real float dtype: Lk < L is zero-extended,
            Lk > L truncated to L taps. Or a KernelSpectrum from fft_kernel(k, L).
        D: optional (H,) skip term.
        g_in, g_out: optional (B, H, L) gates applied before and after the convolution.

    Returns:
        y (B, H, L) of u's dtype and array type. float16/bfloat16 inputs are computed in
        float32, float64 in float64. Torch tensors are differentiable with respect to u, k,
        D and the gates (not through a precomputed KernelSpectrum).

    Raises:
        TypeError: non-floating or complex dtypes, mixed array types.
        ValueError: wrong shapes, mixed devices, a KernelSpectrum for another L or H.
    """
    kind = _validate(u, k, D, g_in, g_out)
    if kind == "numpy":
        return _fftconv_numpy(u, k, D, g_in, g_out)
    if u.is_cuda:
        if _fused_ok(u, k):
            return _FFTConvCUDA.apply(u, k, D, g_in, g_out)
        return _fftconv_torch_fft(u, k, D, g_in, g_out)
    return _FFTConvCPU.apply(u, k, D, g_in, g_out)


def _fftconv_numpy(u, k, D, g_in, g_out):
    dtype = np.float64 if u.dtype == np.float64 else np.float32
    B, H, L = u.shape
    if B * H * L == 0:
        return np.zeros(u.shape, u.dtype)
    if isinstance(k, KernelSpectrum):
        K, n = k.spectrum, k.n
    else:
        lk = min(k.shape[1], L)
        n = _cpu.fft_size(L, lk)
        K = _cpu.kernel_spectrum(k, L, n, dtype)
    y = _cpu.conv_forward(u, K, n, D, g_in, g_out, dtype)
    return y.astype(u.dtype, copy=False)


def _np_view(t, dtype):
    """A numpy view of a CPU tensor (no copy unless t needs a dtype conversion)."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.numpy()


if torch is not None:

    class _FFTConvCPU(torch.autograd.Function):
        """The CPU engine behind autograd: forward and backward both through scipy.fft."""

        @staticmethod
        def forward(ctx, u, k, D, g_in, g_out):
            cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
            B, H, L = u.shape
            if isinstance(k, KernelSpectrum):
                K, n, lk = k.spectrum.numpy(), k.n, k.lk
                ctx.k_shape = None
            else:
                lk = min(int(k.shape[1]), L)
                n = _cpu.fft_size(L, lk)
                ctx.k_shape = (tuple(k.shape), k.dtype)
                K = _cpu.kernel_spectrum(_np_view(k, cdt), L, n, _np_dtype(cdt)) if B * H * L else None
            ctx.meta = (n, lk, cdt, [a is not None for a in (D, g_in, g_out)])
            ctx.K = K
            ctx.save_for_backward(u, D, g_in, g_out)
            if B * H * L == 0:
                return torch.zeros_like(u)
            y = _cpu.conv_forward(_np_view(u, cdt), K, n, _np_view(D, cdt), _np_view(g_in, cdt),
                                  _np_view(g_out, cdt), _np_dtype(cdt))
            return torch.from_numpy(y).to(u.dtype)

        @staticmethod
        def backward(ctx, dy):
            u, D, g_in, g_out = ctx.saved_tensors
            n, lk, cdt, _ = ctx.meta
            B, H, L = u.shape
            need_u, need_k, need_D, need_gi, need_go = ctx.needs_input_grad
            need_k = need_k and ctx.k_shape is not None
            if B * H * L == 0:
                def zero(t, need):
                    return torch.zeros_like(t) if need else None
                return (zero(u, need_u),
                        torch.zeros(ctx.k_shape[0], dtype=ctx.k_shape[1]) if need_k else None,
                        zero(D, need_D), zero(g_in, need_gi), zero(g_out, need_go))
            g = _cpu.conv_backward(
                _np_view(dy, cdt), _np_view(u, cdt), ctx.K, n, lk, _np_view(D, cdt),
                _np_view(g_in, cdt), _np_view(g_out, cdt), _np_dtype(cdt),
                need_k=need_k, need_D=need_D, need_gates=need_gi or need_go)
            du = torch.from_numpy(g["du"]).to(u.dtype) if need_u else None
            dk = None
            if need_k:
                shape, kdt = ctx.k_shape
                dk = torch.zeros(shape, dtype=kdt)
                dk[:, :lk] = torch.from_numpy(g["dk"]).to(kdt)
            dD = torch.from_numpy(g["dD"]).to(D.dtype) if need_D else None
            dgi = torch.from_numpy(g["dg_in"]).to(g_in.dtype) if need_gi else None
            dgo = torch.from_numpy(g["dg_out"]).to(g_out.dtype) if need_go else None
            return du, dk, dD, dgi, dgo


def _np_dtype(torch_dtype):
    return np.float64 if torch_dtype == torch.float64 else np.float32


def _fftconv_torch_fft(u, k, D, g_in, g_out):
    """torch.fft path (CUDA until the fused kernel lands): float32 compute, autograd native."""
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    B, H, L = u.shape
    if B * H * L == 0:
        return torch.zeros_like(u)
    x = u.to(cdt) if g_in is None else u.to(cdt) * g_in.to(cdt)
    if isinstance(k, KernelSpectrum):
        K, n = _natural_rfft(k), k.n
    else:
        lk = min(int(k.shape[1]), L)
        n = _cuda_fft_size(L, lk)
        K = torch.fft.rfft(k[:, :lk].to(cdt), n=n)
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * K, n=n)[..., :L]
    if D is not None:
        y = y + x * D.to(cdt).unsqueeze(-1)
    if g_out is not None:
        y = y * g_out.to(cdt)
    return y.to(u.dtype)


# --- the fused CUDA kernel ---------------------------------------------------------------

_DTYPE_CODES = {} if torch is None else {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _fused_ok(u, k):
    """True if the fused forward kernel serves this call (else the torch.fft path does)."""
    ext = _ext.extension()
    if ext is None or u.dtype not in _DTYPE_CODES or _ext.cuda_device_count() == 0:
        return False
    B, H, L = u.shape
    if B * H * L == 0:
        return False
    N = fused_fft_size(L)
    if isinstance(k, KernelSpectrum) and (k.layout != "monarch" or k.n != N):
        return False
    code = _DTYPE_CODES[u.dtype]
    bytes_per = 4 if u.dtype == torch.bfloat16 else 8  # complex fp16 (bf16 io) or fp32 on chip
    return N <= ext.fftconv_fwd_max_n(code) and N * bytes_per <= _max_smem(u.device.index)


_SMEM = {}


def _max_smem(device):
    if device not in _SMEM:
        _SMEM[device] = _ext.extension().max_shared_memory(device)
    return _SMEM[device]


def _strides(t):
    return (0, 0, 0) if t is None else tuple(int(s) for s in t.stride())


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _fused_forward(u, k, D, g_in, g_out):
    B, H, L = u.shape
    N = fused_fft_size(L)
    if isinstance(k, KernelSpectrum):
        K, kexp = k.spectrum, k.exponent
    else:
        K, kexp = _monarch_spectrum(k, min(int(k.shape[1]), L), N)
    Kf = torch.view_as_real(K)  # (H, N, 2) float32, contiguous
    Df = None if D is None else D.detach().to(torch.float32).contiguous()
    gi = None if g_in is None else g_in.detach().to(u.dtype)
    go = None if g_out is None else g_out.detach().to(u.dtype)
    y = torch.empty((B, H, L), dtype=u.dtype, device=u.device)
    stream = torch.cuda.current_stream(u.device).cuda_stream
    _ext.extension().fftconv_fwd(
        _ptr(u), _ptr(gi), _ptr(go), _ptr(y), _ptr(Kf), _ptr(kexp), _ptr(Df), B, H, L, N,
        _strides(u), _strides(gi), _strides(go), _strides(y), _DTYPE_CODES[u.dtype],
        u.device.index, stream)
    return y


if torch is not None:

    class _FFTConvCUDA(torch.autograd.Function):
        """Forward: the fused kernel. Backward: autograd through the torch.fft path (recomputed)."""

        @staticmethod
        def forward(ctx, u, k, D, g_in, g_out):
            ctx.k_spec = k if isinstance(k, KernelSpectrum) else None
            ctx.save_for_backward(u, None if ctx.k_spec is not None else k, D, g_in, g_out)
            return _fused_forward(u.detach(), k if ctx.k_spec is not None else k.detach(), D, g_in, g_out)

        @staticmethod
        def backward(ctx, dy):
            u, k, D, g_in, g_out = ctx.saved_tensors
            k_in = ctx.k_spec if ctx.k_spec is not None else k
            leaves = [t.detach().requires_grad_(need) if t is not None and need else t
                      for t, need in zip((u, k, D, g_in, g_out), ctx.needs_input_grad)]
            if ctx.k_spec is not None:
                leaves[1] = k_in
            with torch.enable_grad():
                y = _fftconv_torch_fft(*leaves)
                wrt = [t for t, need in zip(leaves, ctx.needs_input_grad)
                       if need and isinstance(t, torch.Tensor)]
                grads = iter(torch.autograd.grad(y, wrt, dy, allow_unused=True)) if wrt else iter(())
            return tuple(next(grads) if need and isinstance(t, torch.Tensor) else None
                         for t, need in zip(leaves, ctx.needs_input_grad))
