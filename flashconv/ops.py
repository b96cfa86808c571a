"""flashconv.fftconv's front ends: numpy, torch and DLPack calls, validated and described once.

    y[b,h,t] = g_out[b,h,t] * ( sum_{s<=t} k[h,s] x[b,h,t-s] + D[h] x[b,h,t] ),
    x = g_in * u

A call goes: front end (this module: validation, a Problem, the Operands) -> the engine
table (flashconv/dispatch.py, flashconv/engines/): the first engine whose check says yes.

=====================  =====================================================
numpy.ndarray          validated here, then dispatch.run_forward / run_backward
torch.Tensor           validated here, then the operator torch.ops.flashconv.fftconv
                       (flashconv/_torch_op.py: fake implementation, autograd formula), whose
                       implementation runs the same table
anything else with     (CuPy, JAX, ...) seen as torch tensors through torch.from_dlpack,
__dlpack__ and         zero-copy, on the caller's current CuPy stream; the result is
__dlpack_device__      handed back as the caller's array type (its from_dlpack)
=====================  =====================================================

``explain(u, k, D, ...)`` describes a call the same way and reports, engine by engine, what
dispatch would do. torch is optional: numpy users never import it.
"""
import contextlib
import numbers
import os
import sys
import warnings

import numpy as np

from flashconv import _cpu, dispatch
from flashconv.problem import Operands, _dtype_name, from_arrays
from flashconv.plan import fused_fft_size
from flashconv.spectrum import KernelSpectrum

try:
    import torch
except ImportError:  # numpy-only installs
    torch = None

__all__ = ["fftconv", "fftconv_backward", "fft_kernel", "KernelSpectrum", "explain"]

_TORCH_FLOATS = () if torch is None else (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY_FLOATS = (np.float16, np.float32, np.float64)
_GRAD_KEYS = ("du", "dk", "dD", "dg_in", "dg_out", "dk_rev")


if torch is not None:
    from flashconv import _torch_op as _op_module  # registers torch.ops.flashconv.*
else:
    _op_module = None


def _torch_op():
    """The operator module (flashconv/_torch_op.py)."""
    return _op_module


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


def _check_dense(name, x, kind, who):
    """Masked arrays and sparse tensors are refused: fftconv would ignore the mask, and a
    sparse tensor has no strided storage to read."""
    if kind == "numpy" and isinstance(x, np.ma.MaskedArray):
        raise TypeError("%s: %s is a numpy.ma.MaskedArray: fftconv does not apply masks (the "
                        "mask would be ignored); pass %s.filled(0) (masked values as zeros) or "
                        "np.asarray(%s)" % (who, name, name, name))
    if kind == "torch" and x.layout != torch.strided:
        raise TypeError("%s: %s is a %s tensor: fftconv needs a dense (strided) tensor; pass "
                        "%s.to_dense()" % (who, name, str(x.layout).replace("torch.", ""), name))


def _check_dtype(name, x, kind, who="fftconv"):
    _check_dense(name, x, kind, who)
    if kind == "torch":
        if x.dtype not in _TORCH_FLOATS:
            raise TypeError("%s: %s must be a real floating tensor (float32, float16, bfloat16 "
                            "or float64), got %s" % (who, name, x.dtype))
    elif x.dtype.type not in _NUMPY_FLOATS:
        raise TypeError("%s: %s must be a real floating array (float32, float16 or float64), "
                        "got %s" % (who, name, x.dtype))


def _shape(x):
    return tuple(int(s) for s in x.shape)


def _compute_dtype_name(u):
    """float64 for float64 u (any byte order: numpy's '>f8' too), else float32."""
    return "float64" if _dtype_name(u.dtype) == "float64" else "float32"


def fft_kernel(k, L, *, dtype=None, k_rev=None):
    """Precompute the spectrum of the kernel k (H, Lk) for inputs of length L.

    k_rev: the anti-causal kernel of a bidirectional convolution (same array type and
    device as k), folded into the spectrum: pass the result without k_rev to fftconv.

    dtype: the compute dtype, float32 or float64 (a numpy or torch dtype, or its name);
    default float64 for a float64 k, else float32.

    The result can be passed to fftconv() in place of k; it is valid only for inputs of
    length L on the same device and with the same compute dtype. A DLPack array (CuPy, ...)
    k gives a torch-kind spectrum, computed on the caller's current stream, that fftconv
    accepts with u of the same array type. No gradient flows into a precomputed spectrum: a
    k that requires grad is detached (flashconv warns once); pass k itself to fftconv to
    train it.

    Raises:
        TypeError: k (or k_rev) not a real floating array, a masked array or sparse tensor;
            dtype not float32 / float64.
        ValueError: k not (H, Lk); L not a non-negative int; the spectrum of a finite k
            overflows the compute dtype; L so large that the spectrum alone would exceed this
            machine's memory.
        MemoryError: the spectrum could not be allocated (the message names L).
    """
    if _is_dlpack(k):
        with _caller_stream(k):
            return fft_kernel(_to_torch("fft_kernel", "k", k, k), L, dtype=dtype,
                              k_rev=_to_torch("fft_kernel", "k_rev", k_rev, k))
    kind = _kind(k)
    if kind is None:
        raise TypeError("fft_kernel: k must be a torch.Tensor or numpy.ndarray of shape (H, Lk), "
                        "got %s" % _type_name(k))
    _check_dense("k", k, kind, "fft_kernel")
    if k.ndim != 2:
        raise ValueError("fft_kernel: k must have shape (H, Lk), got %s" % (_shape(k),))
    _check_dtype("k", k, kind, "fft_kernel")
    if k_rev is not None:
        _check_kernel("k_rev", k_rev, kind, int(k.shape[0]), "fft_kernel")
        if kind == "torch" and k_rev.device != k.device:
            raise ValueError("fft_kernel: k_rev is on %s but k is on %s" % (k_rev.device, k.device))
    if isinstance(L, bool) or not isinstance(L, numbers.Integral) or L < 0:
        raise ValueError("fft_kernel: L must be a non-negative int (the input length), got %r"
                         % (L,))
    L = int(L)
    dname = _compute_dtype_name(k) if dtype is None else _dtype_name(dtype)
    if dname not in ("float32", "float64"):
        raise TypeError("fft_kernel: dtype must be float32 or float64 (a numpy or torch dtype, "
                        "or its name), got %r" % (dtype,))
    if kind == "torch":
        _warn_detached(k, k_rev)
    H = int(k.shape[0])
    lk = min(int(k.shape[1]), L)
    lkr = 0 if k_rev is None else min(int(k_rev.shape[1]), L)
    cuda = kind == "torch" and k.is_cuda
    n = (fused_fft_size(L) if dname == "float32" else None) if cuda else None
    if n is None:
        from flashconv.spectrum import cuda_fft_size

        n = (cuda_fft_size if cuda else _cpu.fft_size)(L, max(lk, lkr))
    _check_size(H, L, n, dname)
    try:
        spec = _spectrum(k, k_rev, kind, cuda, H, L, lk, n, dname)
    except MemoryError as exc:
        raise MemoryError("fft_kernel: L = %d needs an FFT of %d points per channel: the "
                          "spectrum of H = %d channels could not be allocated (%s)"
                          % (L, n, H, exc)) from None
    return spec


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


_PHYSICAL_MEMORY = _physical_memory()  # bytes (0: unknown); read once (torch.compile traces
                                       # fft_kernel, and cannot trace os.sysconf)


def _check_size(H, L, n, dname):
    """ValueError naming L when the spectrum alone would exceed this machine's memory."""
    need = H * (n // 2 + 1) * (16 if dname == "float64" else 8)
    have = _PHYSICAL_MEMORY
    if need > have > 0:
        raise ValueError("fft_kernel: L = %d is too large: its FFT of %d points per channel makes "
                         "the spectrum of H = %d channels %.3g GB, more than this machine's %.3g GB "
                         "of memory" % (L, n, H, need / 1e9, have / 1e9))


_detach_warned = []


def _warn_detached(k, k_rev):
    """Warn once per process that fft_kernel detaches a k that requires grad."""
    if _detach_warned or not (k.requires_grad or (k_rev is not None and k_rev.requires_grad)):
        return
    if torch.compiler.is_compiling():
        return
    _detach_warned.append(True)
    warnings.warn("fft_kernel: %s requires grad, but a precomputed spectrum carries no gradient: "
                  "it is detached, and training will not update it through this KernelSpectrum. "
                  "Pass the kernel itself to fftconv to train it (this warning is shown once)."
                  % ("k" if k.requires_grad else "k_rev"), UserWarning, stacklevel=3)


def _spectrum(k, k_rev, kind, cuda, H, L, lk, n, dname):
    """The KernelSpectrum of fft_kernel's validated arguments."""
    from flashconv import spectrum as sp

    if cuda:
        if dname == "float32":
            # The fused kernel's Monarch order, transformed in float64 (it is computed once
            # and serves every io dtype), on the device: no host synchronisation.
            spec, exp = sp.monarch_spectrum(k, lk, n, None if k_rev is None else k_rev[:, :L],
                                            precision=torch.float64)
            return KernelSpectrum(spec, L, lk, n, dname, kind, str(k.device), "monarch", exp)
        spec, n, _, _ = sp.torch_rfft_spectrum(k.detach(), None, 0, L, torch.float64, k_rev)
        return KernelSpectrum(spec, L, lk, n, dname, kind, str(k.device))
    if H == 0:  # nothing to transform (MKL refuses an empty batch)
        if kind == "torch":
            ctype = torch.complex128 if dname == "float64" else torch.complex64
            spec = torch.zeros((0, n // 2 + 1), dtype=ctype)
        else:
            spec = np.zeros((0, n // 2 + 1), np.complex128 if dname == "float64" else np.complex64)
        return KernelSpectrum(spec, L, lk, n, dname, kind, "cpu")
    if kind == "torch":
        cdt = getattr(torch, dname)
        kd = k.detach()
        krd = None if k_rev is None else k_rev.detach()
        if torch.compiler.is_compiling():
            # Traced (fullgraph): the scaled transform without host synchronisation.
            spec = sp.scaled_rfft_spectrum(kd, krd, L, n, cdt, unscale=True)[0]
        else:
            try:
                spec = sp.cpu_rfft_spectrum(kd, None, 0, L, cdt, krd)[0]
            except RuntimeError as exc:
                if "alloc" not in str(exc):
                    raise
                raise MemoryError(str(exc)) from None
            _check_finite(spec, k, k_rev, dname)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            spec = _cpu.kernel_spectrum(k, L, n, np.dtype(dname), k_rev)
        _check_finite(spec, k, k_rev, dname)
    return KernelSpectrum(spec, L, lk, n, dname, kind, "cpu")


def _check_finite(spec, k, k_rev, dname):
    """ValueError when the spectrum of a finite k overflowed the compute dtype."""
    if _kind(spec) == "torch":
        finite = bool(torch.isfinite(spec).all())
        k_finite = bool(torch.isfinite(k).all()) and (k_rev is None or
                                                      bool(torch.isfinite(k_rev).all()))
    else:
        finite = bool(np.isfinite(spec).all())
        k_finite = bool(np.isfinite(k).all()) and (k_rev is None or
                                                   bool(np.isfinite(k_rev).all()))
    if k_finite and not finite:
        raise ValueError("fft_kernel: the spectrum of k overflows %s (its taps sum beyond the "
                         "dtype's range); pass k itself to fftconv, which scales each channel "
                         "around its transforms, or use dtype=float64" % dname)


def _check_kernel(name, k, kind, H, who):
    """A time-domain kernel: (H, Lk) real float array of kind `kind`."""
    if _kind(k) != kind:
        raise TypeError("%s: %s must be a %s like u, got %s" % (
            who, name, "torch.Tensor" if kind == "torch" else "numpy.ndarray", _type_name(k)))
    if k.ndim != 2 or int(k.shape[0]) != H:
        raise ValueError("%s: %s must have shape (H, Lk) = (%d, Lk), got shape %s"
                         % (who, name, H, _shape(k)))
    _check_dtype(name, k, kind, who)


def _activation(activation, who):
    """The activation's canonical name: "" (none), "gelu" or "silu"."""
    from flashconv._epilogue import ACTIVATIONS

    if activation is None or activation == "":
        return ""
    if not isinstance(activation, str):
        raise TypeError("%s: activation must be None, 'gelu' or 'silu' (a string), got %s"
                        % (who, _type_name(activation)))
    name = activation.lower()
    if name not in ACTIVATIONS:
        raise ValueError("%s: activation must be None, 'gelu' or 'silu', got %r"
                         % (who, activation))
    return name


def _check_mask(m, u, kind, who):
    """dropout_mask: (B, H) or (B, H, L), a real float array of u's kind and device."""
    if m is None:
        return
    B, H, L = _shape(u)
    want = "(B, H) = %s or (B, H, L) = %s" % ((B, H), (B, H, L))
    if _kind(m) != kind:
        raise TypeError("%s: dropout_mask must be a %s like u, of shape %s, got %s" % (
            who, "torch.Tensor" if kind == "torch" else "numpy.ndarray", want, _type_name(m)))
    if _shape(m) not in ((B, H), (B, H, L)):
        raise ValueError("%s: dropout_mask must have shape %s, got shape %s"
                         % (who, want, _shape(m)))
    _check_dtype("dropout_mask", m, kind, who)
    if kind == "torch" and m.device != u.device:
        raise ValueError("%s: dropout_mask is on %s but u is on %s; all inputs must be on one "
                         "device" % (who, m.device, u.device))


def _validate(u, k, D, g_in, g_out, who="fftconv", k_rev=None, dropout_mask=None):
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
    _check_mask(dropout_mask, u, kind, who)
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


def fftconv(u, k, D=None, *, g_in=None, g_out=None, k_rev=None, activation=None,
            dropout_mask=None):
    """Causal (linear) convolution of u with k along the last axis, fused with skip and gates.

    ``y = g_out * (causal_conv(x, k) + D * x)`` with ``x = g_in * u``; with the epilogue
    ``y = g_out * dropout_mask * act(causal_conv(x, k) + D * x)``. With Lk <= L this is the
    ``fftconv_ref(u, k, D, dropout_mask, gelu)`` of H3 / safari (no gates); their exact
    signature, long-k wrap-around and dtype rules are in flashconv.compat.

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
        activation: None, "gelu" (exact, erf form, as torch's F.gelu) or "silu", applied to
            conv + D x in float32 (float64 for float64 u) before the output is rounded.
        dropout_mask: optional (B, H) mask (H3's convention: broadcast over t) or (B, H, L),
            multiplied after the activation as given (scale it by 1 / (1 - p) yourself, as
            ``F.dropout(torch.ones(B, H), p)`` does). It gets no gradient.
        k, D, the gates, k_rev and dropout_mask are arrays of the same type as u (and on its
        device).

    Returns:
        y (B, H, L) of u's dtype and array type. float16/bfloat16 inputs are computed in
        float32, float64 in float64. Torch tensors are differentiable with respect to u, k,
        D, the gates and k_rev (not through a precomputed KernelSpectrum).

    Numerics (CPU engines and the torch.fft fallback; docs/cpu-engines.md): rows and kernel
    channels are scaled by powers of two around the FFTs, so a finite exact result within
    about a quarter of the dtype's largest value stays finite and accurate. NaN and Inf: a
    NaN or Inf anywhere in a row of x = g_in * u makes that whole row of y NaN (every t, also
    before it), a non-finite tap of k[h] or k_rev[h] every row of channel h; D and the gates
    act elementwise; gradients follow the same rule (dk, dk_rev and dD per channel); no
    warnings. The same input and thread count give the same bits.

    Dispatch: the call becomes one flashconv.problem.Problem and the first engine of
    flashconv.engines.TABLE whose check says yes serves it (``flashconv.explain`` says which
    and why the ones before it do not; ``flashconv.use_engines`` restricts the choice).
    numpy arrays go to the table directly; torch tensors through the registered operator
    ``torch.ops.flashconv.fftconv`` (gradients through ``flashconv::fftconv_bwd``), which
    has a fake (meta) implementation and an autograd formula, so
    ``torch.compile(fullgraph=True)`` traces through this function with torch inputs.
    Other DLPack arrays (CuPy) are seen as torch tensors with ``torch.from_dlpack``
    (zero-copy), computed on the caller's current CuPy stream, and returned through the
    caller's ``from_dlpack`` (``cupy.from_dlpack`` for CuPy; a torch tensor where the
    caller's library has none). They carry no autograd: use fftconv_backward().

    Raises:
        TypeError: non-floating or complex dtypes, mixed array types.
        ValueError: wrong shapes, mixed devices, a KernelSpectrum for another L or H, an
            unknown activation, a dropout_mask not (B, H) or (B, H, L).
        flashconv.NoEngineError: no engine of a restricted set (use_engines,
            FLASHCONV_ENGINES) serves the call.
    """
    activation = _activation(activation, "fftconv")
    if _is_dlpack(u):
        return _fftconv_dlpack(u, k, D, g_in, g_out, k_rev, dropout_mask, activation)
    kind = _validate(u, k, D, g_in, g_out, k_rev=k_rev, dropout_mask=dropout_mask)
    if kind == "numpy":
        p, a = _numpy_problem(u, k, D, g_in, g_out, k_rev, dropout_mask=dropout_mask,
                              activation=activation)
        return dispatch.run_forward(p, a)
    k, k_exponent, n = _op_kernel(k)
    return _torch_op().fftconv(*_op_args(u, k, D, g_in, g_out, k_exponent, n, k_rev,
                                         dropout_mask, activation))


def _op_args(u, k, D, g_in, g_out, k_exponent, n, k_rev, dropout_mask, activation):
    """The forward operator's arguments, trailing defaults left off (keeps the traced graph
    free of unused arguments)."""
    args = (u, k, D, g_in, g_out, k_exponent, n)
    if activation:
        return args + (k_rev, dropout_mask, activation)
    if dropout_mask is not None:
        return args + (k_rev, dropout_mask)
    return args if k_rev is None else args + (k_rev,)


def fftconv_backward(dy, u, k, D=None, g_in=None, g_out=None, k_rev=None, *, activation=None,
                     dropout_mask=None):
    """Gradients of ``y = fftconv(u, k, D, g_in=g_in, g_out=g_out, k_rev=k_rev,
    activation=activation, dropout_mask=dropout_mask)`` for an upstream dy.

    The functional backward, for array types without autograd (numpy, CuPy and other
    DLPack arrays) and for torch tensors outside autograd. dy has u's shape and array
    type; the other arguments are those of the forward call.

    Returns:
        dict with keys "du", "dk", "dD", "dg_in", "dg_out" and "dk_rev" (the keys of
        python_ref.conv.fftconv_grads): each gradient has its input's shape, dtype and
        array type; None where the input is None, and "dk" is None when k is a
        KernelSpectrum. dk (and dk_rev) is zero for taps >= L. The dropout mask gets no
        gradient (no key). With an activation or a mask the pre-activation value is
        recomputed from the transform of x the backward takes anyway (one more inverse FFT
        per row when dg_out is not wanted; none more when it is).

    numpy arrays go to the engine table directly; torch tensors call the operator
    ``torch.ops.flashconv.fftconv_bwd`` (not differentiable again), which runs the same table;
    DLPack arrays run it zero-copy on the caller's current CuPy stream, as fftconv() does.
    """
    activation = _activation(activation, "fftconv_backward")
    if _is_dlpack(u):
        return _backward_dlpack(dy, u, k, D, g_in, g_out, k_rev, dropout_mask, activation)
    kind = _validate(u, k, D, g_in, g_out, who="fftconv_backward", k_rev=k_rev,
                     dropout_mask=dropout_mask)
    _validate_dy(dy, u, kind, "fftconv_backward")
    if kind == "numpy":
        p, a = _numpy_problem(u, k, D, g_in, g_out, k_rev, "backward", dropout_mask, activation)
        grads = dispatch.run_backward(p, a, dy)
        return dict(zip(_GRAD_KEYS, grads))
    return _backward_torch(dy, u, k, D, g_in, g_out, k_rev, dropout_mask, activation)


def explain(u, k, D=None, *, g_in=None, g_out=None, k_rev=None, activation=None,
            dropout_mask=None, direction=None, assume_gpu=False):
    """Which engine would serve ``fftconv(u, k, D, g_in=..., g_out=..., k_rev=...)`` (and its
    backward), and for each engine before it in the table why not: a short text.

    The arguments are validated as fftconv validates them (the same errors); nothing is
    computed. direction: "forward", "backward" or None (both). assume_gpu: for CUDA tensors
    on a machine whose extension cannot use the device, answer as if an H100/H200-class GPU
    (227 KB shared memory) were usable (an int: that many bytes of shared memory). The
    current restriction (use_engines, FLASHCONV_ENGINES) applies. From a shape alone:
    ``python -m flashconv explain B H L --dtype bf16 --device cuda``.
    """
    activation = _activation(activation, "explain")
    if _is_dlpack(u):
        with _caller_stream(u):
            tu, tk, tD, tgi, tgo, _, tkr = _dlpack_args("explain", u, k, D, g_in, g_out,
                                                       k_rev=k_rev)
            tm = _to_torch("explain", "dropout_mask", dropout_mask, u)
            with _dlpack_errors(u):
                _validate(tu, tk, tD, tgi, tgo, who="explain", k_rev=tkr, dropout_mask=tm)
            p = _torch_problem(tu, tk, tD, tgi, tgo, tkr, origin=_library(u), dropout_mask=tm,
                               activation=activation)
    else:
        kind = _validate(u, k, D, g_in, g_out, who="explain", k_rev=k_rev,
                         dropout_mask=dropout_mask)
        if kind == "numpy":
            p, _ = _numpy_problem(u, k, D, g_in, g_out, k_rev, dropout_mask=dropout_mask,
                                  activation=activation)
        else:
            p = _torch_problem(u, k, D, g_in, g_out, k_rev, dropout_mask=dropout_mask,
                               activation=activation)
    return explain_problem(p, direction, assume_gpu)


def explain_problem(p, direction=None, assume_gpu=False):
    """explain() for a flashconv.problem.Problem (e.g. problem.from_shape(...))."""
    from flashconv.engines import _cuda

    directions = ("forward", "backward") if direction is None else (direction,)
    if direction not in (None, "forward", "backward"):
        raise ValueError("explain: direction must be 'forward', 'backward' or None, got %r"
                         % (direction,))
    if assume_gpu and p.device_type == "cuda":
        smem = _cuda.ASSUMED_SMEM if assume_gpu is True else int(assume_gpu)
        with _cuda.assume_gpu(smem):
            text = dispatch.explain_problem(p, directions)
        return text + "\n(assumed: a usable GPU with %d KB opt-in shared memory)" % (smem // 1024)
    return dispatch.explain_problem(p, directions)


def _torch_problem(u, k, D, g_in, g_out, k_rev, origin="torch", dropout_mask=None,
                   activation=""):
    k, k_exponent, n = _op_kernel(k)
    a = Operands(u, k, D, g_in, g_out, k_rev, k_exponent, n, dropout_mask, activation)
    return from_arrays(a, "forward", kind="torch", origin=origin)


def _viewable(*arrays):
    """True if torch is installed and can view every array zero-copy (torch.from_numpy:
    native byte order, non-negative strides)."""
    if torch is None:
        return False
    return all(a is None or (a.dtype.isnative and all(st >= 0 for st in a.strides))
               for a in arrays)


def _numpy_problem(u, k, D, g_in, g_out, k_rev, direction="forward", dropout_mask=None,
                   activation=""):
    """(Problem, Operands) of a validated numpy call; a KernelSpectrum k becomes its
    spectrum array and FFT size."""
    spectrum = isinstance(k, KernelSpectrum)
    a = Operands(u, k.spectrum if spectrum else k, D, g_in, g_out, k_rev, None,
                 k.n if spectrum else 0, dropout_mask, activation)
    viewable = _viewable(u, a.k, D, g_in, g_out, k_rev, dropout_mask)
    return from_arrays(a, direction, kind="numpy", torch_viewable=viewable), a


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


def _fftconv_dlpack(u, k, D, g_in, g_out, k_rev=None, dropout_mask=None, activation=""):
    with _caller_stream(u):
        tu, tk, tD, tgi, tgo, _, tkr = _dlpack_args("fftconv", u, k, D, g_in, g_out, k_rev=k_rev)
        tm = _to_torch("fftconv", "dropout_mask", dropout_mask, u)
        with _dlpack_errors(u):
            _validate(tu, tk, tD, tgi, tgo, k_rev=tkr, dropout_mask=tm)
        tk, k_exponent, n = _op_kernel(tk)
        y = _torch_op().fftconv(tu, tk, tD, tgi, tgo, k_exponent, n, tkr, tm, activation)
        return _to_caller(y, u)


def _backward_dlpack(dy, u, k, D, g_in, g_out, k_rev=None, dropout_mask=None, activation=""):
    who = "fftconv_backward"
    with _caller_stream(u):
        tu, tk, tD, tgi, tgo, tdy, tkr = _dlpack_args(who, u, k, D, g_in, g_out, dy, k_rev)
        tm = _to_torch(who, "dropout_mask", dropout_mask, u)
        with _dlpack_errors(u):
            _validate(tu, tk, tD, tgi, tgo, who=who, k_rev=tkr, dropout_mask=tm)
            _validate_dy(tdy, tu, "torch", who)
        grads = _backward_torch(tdy, tu, tk, tD, tgi, tgo, tkr, tm, activation)
        return {key: _to_caller(g, u) for key, g in grads.items()}


# --- the torch operators -------------------------------------------------------------------

def _op_kernel(k):
    """(k, k_exponent, n) operator arguments for a time-domain k or a KernelSpectrum."""
    if isinstance(k, KernelSpectrum):
        return k.spectrum.detach(), k.exponent, k.n
    return k, None, 0


def _backward_torch(dy, u, k, D, g_in, g_out, k_rev=None, dropout_mask=None, activation=""):
    """fftconv_backward for torch tensors: the backward operator, as a dict."""
    top = _torch_op()
    k, k_exponent, n = _op_kernel(k)
    dy, u, k, D, g_in, g_out, k_rev, m = (None if t is None else t.detach()
                                          for t in (dy, u, k, D, g_in, g_out, k_rev,
                                                    dropout_mask))
    if m is None and not activation:
        grads = top.fftconv_bwd(dy, u, k, D, g_in, g_out, k_exponent, n, None, k_rev)
    else:
        grads = top.fftconv_bwd(dy, u, k, D, g_in, g_out, k_exponent, n, None, k_rev, m,
                                activation)
    mask = top.grad_mask(k, D, g_in, g_out, None, k_rev)
    return {key: g if m else None for key, g, m in zip(_GRAD_KEYS, grads, mask)}
