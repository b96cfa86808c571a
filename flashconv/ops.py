"""flashconv.fftconv: the one public entry point, its validation and its dispatch.

    y[b,h,t] = g_out[b,h,t] * ( sum_{s<=t} k[h,s] x[b,h,t-s] + D[h] x[b,h,t] ),
    x = g_in * u

Dispatch, by the type and device of `u`:

=====================  =====================================================
numpy.ndarray          the CPU engine: torch.fft on zero-copy views when torch is installed
                       (below), else scipy.fft (flashconv/_cpu.py)
torch.Tensor           the torch operator ``torch.ops.flashconv.fftconv`` (below), which
                       dispatches by device in _forward_impl / _backward_impl:
  on CPU               the torch.fft CPU engine (flashconv/_cpu_torch.py: chunked, MKL,
                       reused workspaces), forward and backward (
                       a short kernel's forward by overlap-save blocks, flashconv/_overlap.py)
  on CUDA              the fused block-FFT kernel (flashconv._C) for float32, float16 and
                       bfloat16 where its FFT size fits on chip (bfloat16 L <= 16K,
                       float32/float16 L <= 8K); longer L: overlap-save blocks through
                       it for a short kernel (8 Lk <= its largest L), else the two-level kernel
                       (flashconv/_long.py, N = N1 * N2, up to L = 8M); else torch.fft. Backward: the fused
                       backward kernel (bfloat16 L <= 8K, float32/float16 L <= 4K), else
                       the two-level backward (_long.fftconv_long_backward: the two-level
                       kernel with the conjugate spectrum for dx, batch-chunked torch.fft
                       for dk), else torch.fft.
  elsewhere            torch.fft, forward and backward
anything else with     (CuPy, JAX, ...) seen as torch tensors through torch.from_dlpack,
__dlpack__ and         zero-copy, on the caller's current CuPy stream; the result is
__dlpack_device__      handed back as the caller's array type (its from_dlpack)
=====================  =====================================================

The torch operator is registered with torch.library (custom_op + register_fake +
register_autograd), so ``torch.compile(fullgraph=True)`` traces through ``fftconv`` and
keeps the convolution as one opaque node; gradients come from a second operator,
``flashconv::fftconv_bwd``, that returns the five input gradients at once::

    flashconv::fftconv(Tensor u, Tensor k, Tensor? D=None, Tensor? g_in=None,
                       Tensor? g_out=None, Tensor? k_exponent=None, SymInt n=0,
                       Tensor? k_rev=None) -> Tensor
    flashconv::fftconv_bwd(Tensor dy, Tensor u, Tensor k, Tensor? D=None, Tensor? g_in=None,
                           Tensor? g_out=None, Tensor? k_exponent=None, SymInt n=0,
                           bool[]? output_mask=None, Tensor? k_rev=None)
                           -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)

`k` is either the real (H, Lk) kernel (n = 0) or the complex spectrum of a KernelSpectrum
(n = its FFT size; k_exponent its per-channel scale when the spectrum is in the fused
kernel's Monarch order, None for a natural-order rfft spectrum). k_rev is the anti-causal
kernel of a bidirectional convolution (a spectrum already includes it). fftconv_bwd returns
(du, dk, dD, dg_in, dg_out, dk_rev); an entry whose input is absent (None), is a spectrum
(dk), or is masked out by output_mask (6 entries; None: every present input) is an empty
(0,) tensor of u's dtype, every other entry has its input's shape and dtype. The op pair is first order:
double backward through it is not supported.

torch is optional: numpy users never import it.
"""
import contextlib
import numbers
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from flashconv import _cpu, _ext, _overlap
from flashconv.plan import fused_fft_size, monarch_perm

try:
    import torch

    from flashconv import _cpu_torch
except ImportError:  # numpy-only installs
    torch = None

__all__ = ["fftconv", "fftconv_backward", "fft_kernel", "KernelSpectrum"]

_TORCH_FLOATS = () if torch is None else (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY_FLOATS = (np.float16, np.float32, np.float64)
_GRAD_KEYS = ("du", "dk", "dD", "dg_in", "dg_out", "dk_rev")


def _is_torch(x):
    return torch is not None and isinstance(x, torch.Tensor)


def _kind(x):
    if _is_torch(x):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    return None


def _is_dlpack(x):
    """A foreign array (CuPy, JAX, ...): DLPack producer that is neither torch nor numpy."""
    return _kind(x) is None and hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")


def _type_name(x):
    return type(x).__module__ + "." + type(x).__qualname__


def _check_dtype(name, x, kind, who="fftconv"):
    if kind == "torch":
        if x.dtype not in _TORCH_FLOATS:
            raise TypeError("%s: %s must be a real floating tensor (float32, float16, bfloat16 "
                            "or float64), got %s" % (who, name, x.dtype))
    elif x.dtype.type not in _NUMPY_FLOATS:
        raise TypeError("%s: %s must be a real floating array (float32, float16 or float64), "
                        "got %s" % (who, name, x.dtype))


def _shape(x):
    return tuple(int(s) for s in x.shape)


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


def _compute_dtype_name(u):
    return "float64" if str(u.dtype).endswith("float64") else "float32"


def _cuda_fft_size(L, lk):
    # cuFFT is fastest on powers of two; the fused kernel uses the same N (DESIGN 3).
    return 1 << max(0, (L + lk - 2).bit_length())


def fft_kernel(k, L, *, dtype=None, k_rev=None):
    """Precompute the spectrum of the kernel k (H, Lk) for inputs of length L.

    k_rev: the anti-causal kernel of a bidirectional convolution (same array type and
    device as k), folded into the spectrum: pass the result without k_rev to fftconv.

    The result can be passed to fftconv() in place of k; it is valid only for inputs of
    length L on the same device and with the same compute dtype (float32, or float64
    when `dtype` is float64 / k is float64 and dtype is None). A DLPack array (CuPy, ...)
    k gives a torch-kind spectrum, computed on the caller's current stream, that fftconv
    accepts with u of the same array type.
    """
    if _is_dlpack(k):
        with _caller_stream(k):
            return fft_kernel(_to_torch("fft_kernel", "k", k, k), L, dtype=dtype,
                              k_rev=_to_torch("fft_kernel", "k_rev", k_rev, k))
    kind = _kind(k)
    if kind is None:
        raise TypeError("fft_kernel: k must be a torch.Tensor or numpy.ndarray, got %s" % _type_name(k))
    if k.ndim != 2:
        raise ValueError("fft_kernel: k must have shape (H, Lk), got %s" % (_shape(k),))
    _check_dtype("k", k, kind)
    if k_rev is not None:
        _check_kernel("k_rev", k_rev, kind, int(k.shape[0]), "fft_kernel")
        if kind == "torch" and k_rev.device != k.device:
            raise ValueError("fft_kernel: k_rev is on %s but k is on %s" % (k_rev.device, k.device))
    if not isinstance(L, numbers.Integral) or L < 0:
        raise ValueError("fft_kernel: L must be a non-negative integer, got %r" % (L,))
    L = int(L)
    dname = str(dtype).replace("torch.", "") if dtype is not None else _compute_dtype_name(k)
    if dname not in ("float32", "float64"):
        raise TypeError("fft_kernel: dtype must be float32 or float64, got %s" % dtype)
    lk = min(int(k.shape[1]), L)
    lkr = 0 if k_rev is None else min(int(k_rev.shape[1]), L)
    if kind == "torch" and k.is_cuda:
        if dname == "float32":
            n = fused_fft_size(L)
            spec, exp = _monarch_spectrum(k, lk, n, None if k_rev is None else k_rev[:, :L])
            return KernelSpectrum(spec, L, lk, n, dname, kind, str(k.device), "monarch", exp)
        spec, n, _, _ = _torch_spectrum(k.detach(), None, 0, L, torch.float64, k_rev)
        return KernelSpectrum(spec, L, lk, n, dname, kind, str(k.device))
    if kind == "torch":
        spec, n, _, _ = _cpu_spectrum(k, None, 0, L, getattr(torch, dname), k_rev)
    else:
        n = _cpu.fft_size(L, max(lk, lkr))
        spec = _cpu.kernel_spectrum(k, L, n, np.dtype(dname), k_rev)
    return KernelSpectrum(spec, L, lk, n, dname, kind, "cpu")


def _monarch_spectrum(k, lk, n, k_rev=None):
    """The fused kernel's K: FFT of k[:, :lk] zero-padded to n (plus conj(FFT(k_rev)) for a
    bidirectional convolution; k_rev already truncated to L taps), in Monarch order, as (H, n) complex64 scaled per channel by
    2^-e with max |K| < 2^e, and e as (H,) int32."""
    spec = torch.fft.fft(k[:, :lk].detach().to(torch.float64), n=n)
    if k_rev is not None:
        spec = spec + torch.fft.fft(k_rev.detach().to(torch.float64), n=n).conj()
    perm = torch.tensor(monarch_perm(n), device=spec.device)  # a copy: the cached plan is read-only
    spec = spec.index_select(1, perm)
    _, e = torch.frexp(spec.abs().amax(dim=1))  # amax = m * 2^e, 0.5 <= m < 1 (e = 0 for 0)
    spec = torch.ldexp(spec, (-e).unsqueeze(1).to(torch.float64))
    return spec.to(torch.complex64).contiguous(), e.to(torch.int32).contiguous()


def _natural_spectrum(spec, exponent, n):
    """(H, n//2 + 1) natural-order rfft spectrum from a KernelSpectrum's tensors: `spec`
    itself for layout "rfft" (exponent None), else unpermuted and unscaled from Monarch order."""
    if exponent is None:
        return spec
    nat = torch.empty_like(spec)
    perm = torch.tensor(monarch_perm(n), device=spec.device)  # a copy: the cached plan is read-only
    nat[:, perm] = spec
    nat = torch.ldexp(nat, exponent.unsqueeze(1).to(torch.float32))
    return nat[:, : n // 2 + 1]


def _check_kernel(name, k, kind, H, who):
    """A time-domain kernel: (H, Lk) real float array of kind `kind`."""
    if _kind(k) != kind:
        raise TypeError("%s: %s must be a %s like u, got %s" % (
            who, name, "torch.Tensor" if kind == "torch" else "numpy.ndarray", _type_name(k)))
    if k.ndim != 2 or int(k.shape[0]) != H:
        raise ValueError("%s: %s must have shape (H, Lk) = (%d, Lk), got shape %s"
                         % (who, name, H, _shape(k)))
    _check_dtype(name, k, kind, who)


def _validate(u, k, D, g_in, g_out, who="fftconv", k_rev=None):
    """Check shapes, dtypes, array kinds and devices; raise TypeError/ValueError naming the argument."""
    kind = _kind(u)
    if kind is None:
        raise TypeError("%s: u must be a torch.Tensor or numpy.ndarray of shape (B, H, L), "
                        "got %s" % (who, _type_name(u)))
    if u.ndim != 3:
        raise ValueError("%s: u must have shape (B, H, L), got shape %s" % (who, _shape(u),))
    _check_dtype("u", u, kind, who)
    B, H, L = _shape(u)
    if isinstance(k, KernelSpectrum):
        if k.kind != kind:
            raise TypeError("%s: k was prepared by fft_kernel() for %s arrays but u is a %s "
                            "array" % (who, k.kind, kind))
        if k.L != L:
            raise ValueError("%s: k was prepared by fft_kernel() for L = %d but u has L = %d"
                             % (who, k.L, L))
        if k.H != H:
            raise ValueError("%s: k was prepared for H = %d channels but u has H = %d"
                             % (who, k.H, H))
        if k.dtype != _compute_dtype_name(u):
            raise TypeError("%s: k was prepared in %s but u (%s) computes in %s"
                            % (who, k.dtype, u.dtype, _compute_dtype_name(u)))
        if k_rev is not None:
            raise ValueError("%s: k_rev cannot be combined with a precomputed spectrum k: pass "
                             "it to fft_kernel(k, L, k_rev=k_rev) instead" % who)
    else:
        _check_kernel("k", k, kind, H, who)
    if k_rev is not None and not isinstance(k, KernelSpectrum):
        _check_kernel("k_rev", k_rev, kind, H, who)
    for name, arr, want in (("D", D, (H,)), ("g_in", g_in, (B, H, L)), ("g_out", g_out, (B, H, L))):
        if arr is None:
            continue
        if _kind(arr) != kind:
            raise TypeError("%s: %s must be a %s like u, got %s" % (
                who, name, "torch.Tensor" if kind == "torch" else "numpy.ndarray", _type_name(arr)))
        if _shape(arr) != want:
            raise ValueError("%s: %s must have shape %s, got shape %s"
                             % (who, name, want, _shape(arr)))
        _check_dtype(name, arr, kind, who)
    if kind == "torch":
        dev = u.device
        others = [("k", k)] if not isinstance(k, KernelSpectrum) else []
        others += [(n_, a) for n_, a in (("D", D), ("g_in", g_in), ("g_out", g_out), ("k_rev", k_rev))
                   if a is not None]
        for name, arr in others:
            if arr.device != dev:
                raise ValueError("%s: %s is on %s but u is on %s; all inputs must be on one "
                                 "device" % (who, name, arr.device, dev))
        if isinstance(k, KernelSpectrum) and k.device != str(dev):
            raise ValueError("%s: k was prepared on %s but u is on %s" % (who, k.device, dev))
    return kind


def _validate_dy(dy, u, kind, who):
    if _kind(dy) != kind:
        raise TypeError("%s: dy must be a %s like u, got %s" % (
            who, "torch.Tensor" if kind == "torch" else "numpy.ndarray", _type_name(dy)))
    if _shape(dy) != _shape(u):
        raise ValueError("%s: dy must have u's shape %s, got shape %s" % (who, _shape(u), _shape(dy)))
    _check_dtype("dy", dy, kind, who)
    if kind == "torch" and dy.device != u.device:
        raise ValueError("%s: dy is on %s but u is on %s; all inputs must be on one device"
                         % (who, dy.device, u.device))


def fftconv(u, k, D=None, *, g_in=None, g_out=None, k_rev=None):
    """Causal (linear) convolution of u with k along the last axis, fused with skip and gates.

    ``y = g_out * (causal_conv(x, k) + D * x)`` with ``x = g_in * u``: a drop-in for the
    ``fftconv_ref(u, k, D)`` of the H3 / Hyena / S4 code bases (which is this with no gates).

    Args:
        u: (B, H, L) torch.Tensor (float32, float16, bfloat16 or float64; CPU or CUDA)
            or numpy.ndarray (float32, float16 or float64), or any other array with
            ``__dlpack__`` and ``__dlpack_device__`` (CuPy, ...). Any strides.
        k: (H, Lk) kernel in the time domain, any real float dtype: Lk < L is zero-extended,
            Lk > L truncated to L taps. Or a KernelSpectrum from fft_kernel(k, L).
        D: optional (H,) skip term.
        g_in, g_out: optional (B, H, L) gates applied before and after the convolution.
        k_rev: optional (H, Lk_rev) anti-causal kernel: a bidirectional (non-causal)
            convolution, as LRA models use, adds sum_{s>=0} k_rev[h,s] x[b,h,t+s] inside
            the bracket (H3's fftconv_ref k_rev: spectrum rfft(k) + conj(rfft(k_rev))).
        k, D, the gates and k_rev are arrays of the same type as u (and on its device).

    Returns:
        y (B, H, L) of u's dtype and array type. float16/bfloat16 inputs are computed in
        float32, float64 in float64. Torch tensors are differentiable with respect to u, k,
        D, the gates and k_rev (not through a precomputed KernelSpectrum).

    Dispatch: numpy arrays run the CPU engine directly (torch.fft on zero-copy views when
    torch is installed, else scipy.fft). Torch tensors go through the registered operator
    ``torch.ops.flashconv.fftconv`` (gradients through ``flashconv::fftconv_bwd``), which
    picks the engine by device: the torch.fft CPU engine on CPU; on CUDA the fused kernel,
    beyond its size overlap-save blocks through it (short kernels) or the two-level kernel,
    else torch.fft. The operator
    has a fake (meta) implementation and an autograd formula, so
    ``torch.compile(fullgraph=True)`` traces through this function with torch inputs.
    Other DLPack arrays (CuPy) are seen as torch tensors with ``torch.from_dlpack``
    (zero-copy), computed on the caller's current CuPy stream, and returned through the
    caller's ``from_dlpack`` (``cupy.from_dlpack`` for CuPy; a torch tensor where the
    caller's library has none). They carry no autograd: use fftconv_backward().

    Raises:
        TypeError: non-floating or complex dtypes, mixed array types.
        ValueError: wrong shapes, mixed devices, a KernelSpectrum for another L or H.
    """
    if _is_dlpack(u):
        return _fftconv_dlpack(u, k, D, g_in, g_out, k_rev)
    kind = _validate(u, k, D, g_in, g_out, k_rev=k_rev)
    if kind == "numpy":
        return _fftconv_numpy(u, k, D, g_in, g_out, k_rev)
    k, k_exponent, n = _op_kernel(k)
    if k_rev is None:  # (keeps the traced graph free of an unused argument)
        return _fftconv_op(u, k, D, g_in, g_out, k_exponent, n)
    return _fftconv_op(u, k, D, g_in, g_out, k_exponent, n, k_rev)


def fftconv_backward(dy, u, k, D=None, g_in=None, g_out=None, k_rev=None):
    """Gradients of ``y = fftconv(u, k, D, g_in=g_in, g_out=g_out)`` for an upstream dy.

    The functional backward, for array types without autograd (numpy, CuPy and other
    DLPack arrays) and for torch tensors outside autograd. dy has u's shape and array
    type; the other arguments are those of the forward call.

    Returns:
        dict with keys "du", "dk", "dD", "dg_in", "dg_out" and "dk_rev" (the keys of
        python_ref.conv.fftconv_grads): each gradient has its input's shape, dtype and
        array type; None where the input is None, and "dk" is None when k is a
        KernelSpectrum. dk (and dk_rev) is zero for taps >= L.

    Numpy arrays use the CPU engine's conv_backward; torch tensors call the operator
    ``torch.ops.flashconv.fftconv_bwd`` (not differentiable again); DLPack arrays run it
    zero-copy on the caller's current CuPy stream, as fftconv() does.
    """
    if _is_dlpack(u):
        return _backward_dlpack(dy, u, k, D, g_in, g_out, k_rev)
    kind = _validate(u, k, D, g_in, g_out, who="fftconv_backward", k_rev=k_rev)
    _validate_dy(dy, u, kind, "fftconv_backward")
    if kind == "numpy":
        return _backward_numpy(dy, u, k, D, g_in, g_out, k_rev)
    return _backward_torch(dy, u, k, D, g_in, g_out, k_rev)


def _numpy_spectrum(k, k_rev, L, dtype):
    """(K, n, lk, lk_rev) of the CPU engine for numpy k (and k_rev) or a KernelSpectrum."""
    if isinstance(k, KernelSpectrum):
        return k.spectrum, k.n, k.lk, 0
    lk = min(k.shape[1], L)
    lkr = 0 if k_rev is None else min(k_rev.shape[1], L)
    n = _cpu.fft_size(L, max(lk, lkr))
    return _cpu.kernel_spectrum(k, L, n, dtype, k_rev), n, lk, lkr


def _use_overlap_save(k, k_rev, L):
    """Forward on the CPU by overlap-save blocks: a short time-domain kernel (cost model in
    flashconv/_overlap.py: the total then grows as L log Lk, not L log L)."""
    if isinstance(k, KernelSpectrum) or k_rev is not None or (_is_torch(k) and k.is_complex()):
        return False
    return _overlap.overlap_save_cheaper(L, min(int(k.shape[1]), L))


def _torch_views(*arrays):
    """Zero-copy CPU tensors of numpy arrays (None stays None), or None when torch is not
    installed or an array cannot be viewed (negative strides, non-native byte order)."""
    if torch is None:
        return None
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only arrays: only read here
        for a in arrays:
            if a is None:
                out.append(None)
                continue
            if not a.dtype.isnative or any(st < 0 for st in a.strides):
                return None
            try:
                out.append(torch.from_numpy(a))
            except (TypeError, ValueError, RuntimeError):
                return None
    return out


def _numpy_operands(u, k, D, g_in, g_out, k_rev):
    """(u, k, D, g_in, g_out, k_rev, n) as torch views for the torch CPU engine (k: the
    spectrum of a KernelSpectrum, n its FFT size; else n = 0), or None (see _torch_views)."""
    spectrum = isinstance(k, KernelSpectrum)
    views = _torch_views(u, k.spectrum if spectrum else k, D, g_in, g_out, k_rev)
    if views is None:
        return None
    return views + [k.n if spectrum else 0]


def _fftconv_numpy(u, k, D, g_in, g_out, k_rev=None):
    dtype = np.float64 if u.dtype == np.float64 else np.float32
    B, H, L = u.shape
    if B * H * L == 0:
        return np.zeros(u.shape, u.dtype)
    if _use_overlap_save(k, k_rev, L):
        return _overlap.overlap_save(u, k, D, g_in, g_out)
    ops = _numpy_operands(u, k, D, g_in, g_out, k_rev)
    if ops is not None:  # the torch.fft engine, zero-copy (faster than scipy's; see _cpu_torch)
        ut, kt, Dt, git, got, krt, n = ops
        return _forward_cpu(ut, kt, Dt, git, got, None, n, krt).numpy()
    K, n, _, _ = _numpy_spectrum(k, k_rev, L, dtype)
    y = _cpu.conv_forward(u, K, n, D, g_in, g_out, dtype)
    return y.astype(u.dtype, copy=False)


def _backward_numpy(dy, u, k, D, g_in, g_out, k_rev=None):
    B, H, L = u.shape
    spectrum = isinstance(k, KernelSpectrum)
    ops = _numpy_operands(u, k, D, g_in, g_out, k_rev) if B * H * L else None
    dyt = None if ops is None else _torch_views(dy)
    if dyt is not None:  # the torch.fft engine, zero-copy
        ut, kt, Dt, git, got, krt, n = ops
        mask = (True, not spectrum, D is not None, g_in is not None, g_out is not None,
                k_rev is not None)
        grads = _backward_cpu(dyt[0], ut, kt, Dt, git, got, None, n, mask, krt)
        return {key: None if g is None else g.numpy() for key, g in zip(_GRAD_KEYS, grads)}
    dtype = np.float64 if u.dtype == np.float64 else np.float32
    K, n, lk, lkr = _numpy_spectrum(k, k_rev, L, dtype)
    if B * H * L == 0:
        g = {"du": np.zeros(u.shape, dtype), "dk": np.zeros((H, lk), dtype),
             "dD": np.zeros((H,), dtype), "dg_in": np.zeros(u.shape, dtype),
             "dg_out": np.zeros(u.shape, dtype), "dk_rev": np.zeros((H, lkr), dtype)}
    else:
        g = _cpu.conv_backward(dy, u, K, n, lk, D, g_in, g_out, dtype,
                               need_k=not spectrum, need_D=D is not None, need_gates=True,
                               lk_rev=lkr)
    out = dict.fromkeys(_GRAD_KEYS)
    out["du"] = g["du"].astype(u.dtype, copy=False)
    if not spectrum:
        out["dk"] = np.zeros(k.shape, k.dtype)  # taps >= L get no gradient
        out["dk"][:, :lk] = g["dk"]
    if k_rev is not None:
        out["dk_rev"] = np.zeros(k_rev.shape, k_rev.dtype)
        out["dk_rev"][:, :lkr] = g["dk_rev"]
    for key, arr in (("dD", D), ("dg_in", g_in), ("dg_out", g_out)):
        if arr is not None:
            out[key] = g[key].astype(arr.dtype, copy=False)
    return out


def _np_view(t, dtype):
    """A numpy view of a CPU tensor (no copy unless t needs a dtype conversion)."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.numpy()


# --- DLPack interop (CuPy and other array libraries) -------------------------------------

_DL_CUDA, _DL_ROCM = 2, 10  # DLDeviceType codes of __dlpack_device__()


def _library(x):
    """Top-level module of x's type: "cupy", "jax", ..."""
    return type(x).__module__.partition(".")[0]


def _caller_stream(x):
    """Context making the caller's current stream torch's current stream (CUDA arrays).

    For CuPy that is cupy.cuda.get_current_stream() on x's device, wrapped as a
    torch.cuda.ExternalStream; torch.from_dlpack then passes that same stream to
    __dlpack__, so the producer needs no synchronisation, and the result is ready in
    stream order for the caller. Other libraries keep torch's current stream (the DLPack
    stream argument still orders the hand-over).
    """
    stack = contextlib.ExitStack()
    dev_type, dev_id = (int(v) for v in x.__dlpack_device__())
    if dev_type not in (_DL_CUDA, _DL_ROCM) or torch is None or not torch.cuda.is_available():
        return stack
    device = torch.device("cuda", dev_id)
    stack.enter_context(torch.cuda.device(device))
    if _library(x) == "cupy":
        import cupy

        with cupy.cuda.Device(dev_id):
            ptr = cupy.cuda.get_current_stream().ptr
        stream = (torch.cuda.default_stream(device) if ptr == 0
                  else torch.cuda.ExternalStream(ptr, device=device))
        stack.enter_context(torch.cuda.stream(stream))
    return stack


def _to_torch(who, name, x, like):
    """torch.from_dlpack(x) (zero-copy) for an array of the same library as `like`."""
    if x is None:
        return None
    if not _is_dlpack(x) or _library(x) != _library(like):
        raise TypeError("%s: %s must be a %s array like u (%s), got %s"
                        % (who, name, _library(like), _type_name(like), _type_name(x)))
    if torch is None:
        raise TypeError("%s: %s is a %s array: flashconv needs torch to read it "
                        "(torch.from_dlpack)" % (who, name, _type_name(x)))
    try:
        return torch.from_dlpack(x)
    except Exception as exc:  # unsupported dtype or device, a producer error
        raise TypeError("%s: %s (%s) could not be read with torch.from_dlpack: %s"
                        % (who, name, _type_name(x), exc)) from exc


def _to_caller(y, like):
    """y as `like`'s array type, zero-copy (its library's from_dlpack); y if none exists."""
    if y is None:
        return None
    namespace = getattr(like, "__array_namespace__", None)
    ns = namespace() if callable(namespace) else None
    from_dlpack = getattr(ns, "from_dlpack", None) or getattr(
        sys.modules.get(_library(like)), "from_dlpack", None)
    return y if from_dlpack is None else from_dlpack(y)


def _dlpack_args(who, u, k, D, g_in, g_out, dy=None, k_rev=None):
    """Everything seen as torch tensors; k may stay a KernelSpectrum."""
    names = ("u", "D", "g_in", "g_out", "dy", "k_rev")
    tu, tD, tgi, tgo, tdy, tkr = (_to_torch(who, n_, a, u)
                                  for n_, a in zip(names, (u, D, g_in, g_out, dy, k_rev)))
    tk = k if isinstance(k, KernelSpectrum) else _to_torch(who, "k", k, u)
    return tu, tk, tD, tgi, tgo, tdy, tkr


@contextlib.contextmanager
def _dlpack_errors(u):
    """Validation errors of converted inputs say what the caller passed."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        raise type(exc)("%s (u is a %s, read as a torch.Tensor through torch.from_dlpack)"
                        % (exc, _type_name(u))) from None


def _fftconv_dlpack(u, k, D, g_in, g_out, k_rev=None):
    with _caller_stream(u):
        tu, tk, tD, tgi, tgo, _, tkr = _dlpack_args("fftconv", u, k, D, g_in, g_out, k_rev=k_rev)
        with _dlpack_errors(u):
            _validate(tu, tk, tD, tgi, tgo, k_rev=tkr)
        tk, k_exponent, n = _op_kernel(tk)
        y = _fftconv_op(tu, tk, tD, tgi, tgo, k_exponent, n, tkr)
        return _to_caller(y, u)


def _backward_dlpack(dy, u, k, D, g_in, g_out, k_rev=None):
    who = "fftconv_backward"
    with _caller_stream(u):
        tu, tk, tD, tgi, tgo, tdy, tkr = _dlpack_args(who, u, k, D, g_in, g_out, dy, k_rev)
        with _dlpack_errors(u):
            _validate(tu, tk, tD, tgi, tgo, who=who, k_rev=tkr)
            _validate_dy(tdy, tu, "torch", who)
        grads = _backward_torch(tdy, tu, tk, tD, tgi, tgo, tkr)
        return {key: _to_caller(g, u) for key, g in grads.items()}


# --- the torch operators -------------------------------------------------------------------
#
# One place dispatches each direction by device: _forward_impl and _backward_impl. The
# operators, their fake implementations and their autograd formula only marshal arguments.

def _op_kernel(k):
    """(k, k_exponent, n) operator arguments for a time-domain k or a KernelSpectrum."""
    if isinstance(k, KernelSpectrum):
        return k.spectrum.detach(), k.exponent, k.n
    return k, None, 0


def _grad_mask(k, D, g_in, g_out, output_mask, k_rev=None):
    """Which of (du, dk, dD, dg_in, dg_out, dk_rev) to compute: requested, present, not a
    spectrum."""
    present = (True, not k.is_complex(), D is not None, g_in is not None, g_out is not None,
               k_rev is not None)
    if output_mask is None:
        return present
    if len(output_mask) != 6:
        raise ValueError("fftconv_bwd: output_mask must have 6 entries (du, dk, dD, dg_in, "
                         "dg_out, dk_rev), got %d" % len(output_mask))
    return tuple(bool(m) and p for m, p in zip(output_mask, present))


def _backward_torch(dy, u, k, D, g_in, g_out, k_rev=None):
    """fftconv_backward for torch tensors: the backward operator, as a dict."""
    k, k_exponent, n = _op_kernel(k)
    dy, u, k, D, g_in, g_out, k_rev = (None if t is None else t.detach()
                                       for t in (dy, u, k, D, g_in, g_out, k_rev))
    grads = _fftconv_bwd_op(dy, u, k, D, g_in, g_out, k_exponent, n, None, k_rev)
    mask = _grad_mask(k, D, g_in, g_out, None, k_rev)
    return {key: g if m else None for key, g, m in zip(_GRAD_KEYS, grads, mask)}


def _forward_impl(u, k, D, g_in, g_out, k_exponent, n, k_rev=None):
    """The forward, by device (see the module docstring)."""
    if u.device.type == "cpu":
        return _forward_cpu(u, k, D, g_in, g_out, k_exponent, n, k_rev)
    if u.device.type == "cuda" and _fused_ok(u, k, k_exponent, n):
        return _fused_forward(u, k, D, g_in, g_out, k_exponent, k_rev)
    P = _cuda_overlap_block(u, k, k_rev)
    if P:  # short kernel: overlap-save blocks of P inputs through the fused kernel
        spec, exp = _monarch_spectrum(k, min(int(k.shape[1]), P), fused_fft_size(P))
        return _overlap.overlap_save_blocks(
            u, k, D, g_in, g_out,
            lambda ub, _k, Db, gib, gob: _fused_forward(ub, spec, Db, gib, gob, exp), P)
    if u.device.type == "cuda" and not k.is_complex() and _ext.cuda_device_count() > 0:
        from flashconv import _long  # two-level fused FFT: L beyond the on-chip kernel

        if _long.long_applies(u):
            return _long.fftconv_long_forward(u, k, D, g_in, g_out, k_rev)
    return _forward_torch_fft(u, k, D, g_in, g_out, k_exponent, n, k_rev)


def _cuda_overlap_block(u, k, k_rev):
    """Block size for overlap-save around the fused kernel on CUDA, or 0: a short time-domain
    kernel (8 Lk <= the fused kernel's largest input length, so at most 1/8 of each block is
    recomputed) with L beyond the fused kernel. There the alternative is the two-level path
    (three passes over an 8N-byte workspace) and overlap-save is one fused pass over about
    1.14x the input: cheaper by construction; the crossover has not been measured on a GPU."""
    if u.device.type != "cuda" or k.is_complex() or k_rev is not None:
        return 0
    L = int(u.shape[-1])
    P = _overlap.gpu_block(min(int(k.shape[1]), L), _fused_max_n(u) // 2)
    return P if P is not None and L > P else 0


def _backward_impl(dy, u, k, D, g_in, g_out, k_exponent, n, mask, k_rev=None):
    """The backward, by device: a 6-tuple of gradients, None where `mask` is False."""
    if u.device.type == "cpu":
        return _backward_cpu(dy, u, k, D, g_in, g_out, k_exponent, n, mask, k_rev)
    if u.device.type == "cuda" and _fused_ok(u, k, k_exponent, n, backward=True):
        return _fused_backward(dy, u, k, D, g_in, g_out, k_exponent, mask, k_rev)
    if u.device.type == "cuda" and not k.is_complex() and _ext.cuda_device_count() > 0:
        from flashconv import _long

        if _long.long_applies(u):  # dx by the two-level kernel with conj(K); dk by chunks
            return _long.fftconv_long_backward(dy, u, k, D, g_in, g_out, k_rev, mask)
    return _backward_torch_fft(dy, u, k, D, g_in, g_out, k_exponent, n, mask, k_rev)


def _compute_dtype(u):
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _complex_dtype(cdt):
    return torch.complex128 if cdt == torch.float64 else torch.complex64


def _zero_grads(u, k, D, g_in, g_out, mask, k_rev=None):
    """Gradients of an empty problem (B * H * L == 0): zeros."""
    return tuple(x.new_zeros(x.shape) if m else None
                 for x, m in zip((u, k, D, g_in, g_out, k_rev), mask))


def _kernel_grad(k, lk, g):
    """(H, Lk) gradient of a time-domain kernel from the (H, lk) gradient of its used taps."""
    dk = k.new_zeros(k.shape)  # taps >= L get no gradient
    dk[:, :lk] = g.to(k.dtype)
    return dk


# --- CPU: the torch.fft engine (flashconv/_cpu_torch.py) ------------------------------------

def _spectrum(k, k_exponent, n, L, cdt, k_rev, fft_size):
    """(K (H, n//2 + 1) complex, n, lk, lk_rev) for a time-domain k (and k_rev), at FFT size
    fft_size(L, max(lk, lk_rev)), or for a spectrum (its own n)."""
    if k.is_complex():
        spec = _natural_spectrum(k.detach(), k_exponent, n)
        return spec.to(_complex_dtype(cdt)).resolve_conj(), n, 0, 0
    lk = min(int(k.shape[1]), L)
    lkr = 0 if k_rev is None else min(int(k_rev.shape[1]), L)
    n = fft_size(L, max(lk, lkr))
    K = _cpu_torch.kernel_spectrum(k.detach(), L, n, cdt,
                                   None if k_rev is None else k_rev.detach())
    return K, n, lk, lkr


def _cpu_spectrum(k, k_exponent, n, L, cdt, k_rev=None):
    """_spectrum at the CPU engine's FFT size (5-smooth)."""
    return _spectrum(k, k_exponent, n, L, cdt, k_rev, _cpu.fft_size)


def _forward_cpu(u, k, D, g_in, g_out, k_exponent, n, k_rev=None):
    cdt = _compute_dtype(u)
    B, H, L = u.shape
    if B * H * L == 0:
        return u.new_zeros(u.shape)
    if _use_overlap_save(k, k_rev, L):
        y = _overlap.overlap_save(*(_np_view(t, cdt) for t in (u, k, D, g_in, g_out)))
        return torch.from_numpy(y).to(u.dtype)
    K, n, _, _ = _cpu_spectrum(k, k_exponent, n, L, cdt, k_rev)
    u, D, g_in, g_out = (None if t is None else t.detach() for t in (u, D, g_in, g_out))
    return _cpu_torch.conv_forward(u, K, n, D, g_in, g_out)


def _backward_cpu(dy, u, k, D, g_in, g_out, k_exponent, n, mask, k_rev=None):
    need_u, need_k, need_D, need_gi, need_go, need_kr = mask
    B, H, L = u.shape
    if B * H * L == 0:
        return _zero_grads(u, k, D, g_in, g_out, mask, k_rev)
    cdt = _compute_dtype(u)
    # K is recomputed from k (H FFTs, against the B*H of the backward itself) rather than
    # saved by the forward: the operator's only output is y.
    K, n, lk, lkr = _cpu_spectrum(k, k_exponent, n, L, cdt, k_rev)
    dy, u, D, g_in, g_out = (None if t is None else t.detach() for t in (dy, u, D, g_in, g_out))
    du, dk, dD, dgi, dgo, dkr = _cpu_torch.conv_backward(
        dy, u, K, n, lk, D, g_in, g_out, need_u=need_u, need_k=need_k, need_D=need_D,
        need_gin=need_gi, need_gout=need_go, lk_rev=lkr if need_kr else 0)
    dk = _kernel_grad(k, lk, dk) if need_k else None
    dkr = _kernel_grad(k_rev, lkr, dkr) if need_kr else None
    dD = dD.to(D.dtype) if need_D else None
    return du, dk, dD, dgi, dgo, dkr


# --- torch.fft: CUDA where the fused kernel does not apply, the CUDA backward, other devices

def _torch_spectrum(k, k_exponent, n, L, cdt, k_rev=None):
    """_spectrum at the power-of-two size cuFFT prefers."""
    return _spectrum(k, k_exponent, n, L, cdt, k_rev, _cuda_fft_size)


def _forward_torch_fft(u, k, D, g_in, g_out, k_exponent, n, k_rev=None):
    cdt = _compute_dtype(u)
    B, H, L = u.shape
    if B * H * L == 0:
        return u.new_zeros(u.shape)
    x = u.to(cdt) if g_in is None else u.to(cdt) * g_in.to(cdt)
    K, n, _, _ = _torch_spectrum(k, k_exponent, n, L, cdt, k_rev)
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * K, n=n)[..., :L]
    if D is not None:
        y = y + x * D.to(cdt).unsqueeze(-1)
    if g_out is not None:
        y = y * g_out.to(cdt)
    return y.to(u.dtype).contiguous()


def _backward_torch_fft(dy, u, k, D, g_in, g_out, k_exponent, n, mask, k_rev=None):
    """The formulas of flashconv/_cpu.py's conv_backward, in torch.fft."""
    need_u, need_k, need_D, need_gi, need_go, need_kr = mask
    B, H, L = u.shape
    if B * H * L == 0:
        return _zero_grads(u, k, D, g_in, g_out, mask, k_rev)
    cdt = _compute_dtype(u)
    K, n, lk, lkr = _torch_spectrum(k, k_exponent, n, L, cdt, k_rev)
    x = u.to(cdt) if g_in is None else u.to(cdt) * g_in.to(cdt)
    Dc = None if D is None else D.to(cdt).unsqueeze(-1)
    dz = dy.to(cdt) if g_out is None else dy.to(cdt) * g_out.to(cdt)
    DZ = torch.fft.rfft(dz, n=n)  # (B, H, n//2 + 1)
    du = dk = dD = dgi = dgo = dkr = None
    if need_u or need_gi:
        # dx: the causal correlation of dz with k (the adjoint of the convolution) + D dz
        dx = torch.fft.irfft(DZ * K.conj(), n=n)[..., :L]
        if Dc is not None:
            dx = dx + dz * Dc
        if need_u:
            du = (dx if g_in is None else dx * g_in.to(cdt)).to(u.dtype)
        if need_gi:
            dgi = (dx * u.to(cdt)).to(g_in.dtype)
    if need_k or need_go or need_kr:
        X = torch.fft.rfft(x, n=n)
        if need_k or need_kr:
            corr = (X.conj() * DZ).sum(0)  # (H, n//2 + 1): lags s >= 0 give dk, -s dk_rev
            if need_k:
                dk = _kernel_grad(k, lk, torch.fft.irfft(corr, n=n)[:, :lk])
            if need_kr:
                dkr = _kernel_grad(k_rev, lkr, torch.fft.irfft(corr.conj(), n=n)[:, :lkr])
        if need_go:
            z = torch.fft.irfft(X * K, n=n)[..., :L]
            if Dc is not None:
                z = z + x * Dc
            dgo = (dy.to(cdt) * z).to(g_out.dtype)
    if need_D:
        dD = (dz * x).sum(dim=(0, 2)).to(D.dtype)
    return du, dk, dD, dgi, dgo, dkr


if torch is not None:
    Tensor = torch.Tensor

    @torch.library.custom_op("flashconv::fftconv", mutates_args=())
    def _fftconv_op(u: Tensor, k: Tensor, D: Optional[Tensor] = None, g_in: Optional[Tensor] = None,
                    g_out: Optional[Tensor] = None, k_exponent: Optional[Tensor] = None,
                    n: int = 0, k_rev: Optional[Tensor] = None) -> Tensor:
        """y = g_out * (causal_conv(g_in * u, k) + D * g_in * u); k: taps, or a spectrum (n > 0)."""
        return _forward_impl(u, k, D, g_in, g_out, k_exponent, n, k_rev)

    @_fftconv_op.register_fake
    def _fftconv_fake(u, k, D=None, g_in=None, g_out=None, k_exponent=None, n=0, k_rev=None):
        return u.new_empty(u.shape)

    @torch.library.custom_op("flashconv::fftconv_bwd", mutates_args=())
    def _fftconv_bwd_op(dy: Tensor, u: Tensor, k: Tensor, D: Optional[Tensor] = None,
                        g_in: Optional[Tensor] = None, g_out: Optional[Tensor] = None,
                        k_exponent: Optional[Tensor] = None, n: int = 0,
                        output_mask: Optional[Sequence[bool]] = None,
                        k_rev: Optional[Tensor] = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(du, dk, dD, dg_in, dg_out, dk_rev); an empty (0,) tensor where not computed."""
        mask = _grad_mask(k, D, g_in, g_out, output_mask, k_rev)
        grads = _backward_impl(dy, u, k, D, g_in, g_out, k_exponent, n, mask, k_rev)
        return tuple(u.new_empty((0,)) if g is None else g.contiguous() for g in grads)

    @_fftconv_bwd_op.register_fake
    def _fftconv_bwd_fake(dy, u, k, D=None, g_in=None, g_out=None, k_exponent=None, n=0,
                          output_mask=None, k_rev=None):
        mask = _grad_mask(k, D, g_in, g_out, output_mask, k_rev)
        return tuple(x.new_empty(x.shape) if m else u.new_empty((0,))
                     for x, m in zip((u, k, D, g_in, g_out, k_rev), mask))

    def _fftconv_setup_context(ctx, inputs, output):
        u, k, D, g_in, g_out, k_exponent, n = inputs[:7]
        k_rev = inputs[7] if len(inputs) > 7 else None
        ctx.save_for_backward(u, k, D, g_in, g_out, k_exponent, k_rev)
        ctx.n = n

    def _fftconv_autograd(ctx, dy):
        u, k, D, g_in, g_out, k_exponent, k_rev = ctx.saved_tensors
        # needs_input_grad covers the arguments passed: trailing defaults may be left off.
        needs = (tuple(ctx.needs_input_grad) + (False,) * 8)[:8]
        mask = _grad_mask(k, D, g_in, g_out, needs[:5] + needs[7:8], k_rev)
        grads = _fftconv_bwd_op(dy, u, k, D, g_in, g_out, k_exponent, ctx.n, list(mask), k_rev)
        g = [gr if m else None for gr, m in zip(grads, mask)]
        # No gradient for a spectrum k, k_exponent and n.
        return tuple(g[:5]) + (None, None, g[5])

    _fftconv_op.register_autograd(_fftconv_autograd, setup_context=_fftconv_setup_context)


# --- the fused CUDA kernel ---------------------------------------------------------------

_DTYPE_CODES = {} if torch is None else {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _fused_ok(u, k, k_exponent=None, n=0, backward=False):
    """True if the fused forward (or backward) kernel serves this call (else torch.fft does).

    k: the time-domain taps, or a spectrum with its k_exponent and n (operator arguments),
    or a KernelSpectrum.
    """
    if isinstance(k, KernelSpectrum):
        k, k_exponent, n = _op_kernel(k)
    B, H, L = u.shape
    if B * H * L == 0:
        return False
    N = fused_fft_size(L)
    if k.is_complex() and (k_exponent is None or n != N):  # only a Monarch-order spectrum
        return False
    return N <= _fused_max_n(u, backward)


def _fused_max_n(u, backward=False):
    """The largest FFT size the fused forward (backward) kernel runs for u's dtype on u's
    device: the kernel's own limit, halved until its rows fit in the opt-in shared memory;
    0 where the extension, a GPU or the dtype is missing."""
    ext = _ext.extension()
    if ext is None or u.dtype not in _DTYPE_CODES or _ext.cuda_device_count() == 0:
        return 0
    code = _DTYPE_CODES[u.dtype]
    bytes_per = 4 if u.dtype == torch.bfloat16 else 8  # complex fp16 (bf16 io) or fp32 on chip
    rows = 2 if backward else 1  # the backward keeps two rows on chip
    max_n = ext.fftconv_bwd_max_n(code) if backward else ext.fftconv_fwd_max_n(code)
    while max_n and rows * max_n * bytes_per > _max_smem(u.device.index):
        max_n //= 2
    return max_n


_SMEM = {}


def _max_smem(device):
    if device not in _SMEM:
        _SMEM[device] = _ext.extension().max_shared_memory(device)
    return _SMEM[device]


def _strides(t):
    return (0, 0, 0) if t is None else tuple(int(s) for s in t.stride())


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _fused_spectrum(k, k_exponent, L, N, k_rev):
    """(K as (H, N, 2) float32, k_exp (H,) int32) for the fused kernels."""
    if k.is_complex():
        K, kexp = k.contiguous(), k_exponent.to(torch.int32).contiguous()
    else:
        K, kexp = _monarch_spectrum(k, min(int(k.shape[1]), L), N,
                                    None if k_rev is None else k_rev[:, :L])
    return torch.view_as_real(K), kexp


def _fused_forward(u, k, D, g_in, g_out, k_exponent=None, k_rev=None):
    """The fused kernel on the current stream; k: taps, or a Monarch spectrum with k_exponent."""
    B, H, L = u.shape
    N = fused_fft_size(L)
    Kf, kexp = _fused_spectrum(k, k_exponent, L, N, k_rev)  # (H, N, 2) float32, contiguous
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


def _fused_backward(dy, u, k, D, g_in, g_out, k_exponent, mask, k_rev=None):
    """The fused backward kernel on the current stream: (du, dk, dD, dg_in, dg_out, dk_rev)."""
    need_u, need_k, need_D, need_gi, need_go, need_kr = mask
    B, H, L = u.shape
    N = fused_fft_size(L)
    Kf, kexp = _fused_spectrum(k, k_exponent, L, N, k_rev)
    lk = 0 if k.is_complex() else min(int(k.shape[1]), L)
    lkr = min(int(k_rev.shape[1]), L) if need_kr else 0
    dev = u.device
    du = torch.empty((B, H, L), dtype=u.dtype, device=dev)  # the kernel always writes du
    dgi = torch.empty((B, H, L), dtype=u.dtype, device=dev) if need_gi else None
    dgo = torch.empty((B, H, L), dtype=u.dtype, device=dev) if need_go else None
    dk_acc = torch.zeros((H, lk), dtype=torch.float32, device=dev)  # accumulated (+=) in fp32
    dD_acc = torch.zeros((H,), dtype=torch.float32, device=dev) if need_D else None
    dkr_acc = torch.zeros((H, lkr), dtype=torch.float32, device=dev) if need_kr else None
    Df = None if D is None else D.detach().to(torch.float32).contiguous()
    gi = None if g_in is None else g_in.detach().to(u.dtype)
    go = None if g_out is None else g_out.detach().to(u.dtype)
    dy = dy.to(u.dtype)
    stream = torch.cuda.current_stream(dev).cuda_stream
    _ext.extension().fftconv_bwd(
        _ptr(u), _ptr(gi), _ptr(go), _ptr(dy), _ptr(du), _ptr(dgi), _ptr(dgo), _ptr(Kf),
        _ptr(kexp), _ptr(Df), _ptr(dk_acc), _ptr(dD_acc), _ptr(dkr_acc), B, H, L, N, lk, lkr,
        _strides(u), _strides(gi), _strides(go), _strides(dy), _strides(du), _strides(dgi),
        _strides(dgo), _DTYPE_CODES[u.dtype], dev.index, stream)
    return (du if need_u else None,
            _kernel_grad(k, lk, dk_acc) if need_k else None,
            dD_acc.to(D.dtype) if need_D else None,
            dgi, dgo,
            _kernel_grad(k_rev, lkr, dkr_acc) if need_kr else None)
