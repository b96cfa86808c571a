"""The one description of a convolution call that every engine decides on.

The front ends (flashconv/ops.py: numpy, torch, DLPack) validate a call and turn it into a
:class:`Problem` (shapes, dtypes, device, the form of k, which optional inputs are present,
which gradients are wanted) plus the :class:`Operands` themselves. Engines
(flashconv/engines/) look only at the Problem to say whether they serve the call, so
``flashconv.explain`` and ``python -m flashconv explain B H L ...`` can ask them about a
call that was never allocated (:func:`from_shape`).
"""
from dataclasses import dataclass, replace
from typing import NamedTuple

__all__ = ["Problem", "Operands", "from_arrays", "from_shape", "GRAD_NAMES"]

GRAD_NAMES = ("du", "dk", "dD", "dg_in", "dg_out", "dk_rev")
KERNEL_DTYPES = ("float32", "float16", "bfloat16")  # the CUDA kernels' io dtypes


def _dtype_name(dtype):
    """'float32', 'bfloat16', ...: a torch dtype's name, or a numpy dtype's by kind and item
    size whatever its byte order (numpy's '>f8' is 'float64')."""
    s = str(dtype)
    if s.startswith("torch."):
        return s[len("torch."):]
    try:
        import numpy as np

        return np.dtype(dtype).name
    except TypeError:  # not a numpy dtype ("bfloat16", an alias)
        return s


@dataclass(frozen=True)
class Problem:
    """What an engine needs to know to decide whether it serves a call (no arrays)."""

    direction: str          # "forward" or "backward"
    kind: str               # "numpy" or "torch": the arrays the engines receive
    B: int
    H: int
    L: int
    dtype: str              # u's dtype: "float32", "float16", "bfloat16" or "float64"
    device: str = "cpu"     # "cpu", "cuda:0", "meta", ...
    k_form: str = "taps"    # "taps" (time domain), "rfft" (natural spectrum), "monarch"
    lk: int = 0             # taps of k used, min(Lk, L); 0 for a spectrum
    n: int = 0              # a spectrum's FFT size; 0 for taps
    lk_rev: int = 0         # taps of k_rev used, min(Lk_rev, L)
    has_k_rev: bool = False
    has_D: bool = False
    has_g_in: bool = False
    has_g_out: bool = False
    # backward: which of GRAD_NAMES are wanted (and present)
    mask: tuple = (False,) * 6
    # numpy: torch is installed and can view every operand zero-copy (native byte order,
    # non-negative strides)
    torch_viewable: bool = False
    origin: str = ""        # the caller's array library: "numpy", "torch", "cupy", ...
    # the fused epilogue (flashconv/_epilogue.py): y = g_out * m * act(conv + D x)
    activation: str = ""    # "", "gelu" or "silu"
    mask_form: str = ""     # the dropout mask m: "" (none), "BH" ((B, H)) or "BHL" ((B, H, L))

    @property
    def device_type(self):
        return self.device.partition(":")[0]

    @property
    def device_index(self):
        idx = self.device.partition(":")[2]
        return int(idx) if idx else 0

    @property
    def has_dropout_mask(self):
        return bool(self.mask_form)

    @property
    def has_epilogue(self):
        """An activation or a dropout mask (the fused epilogue)."""
        return bool(self.activation or self.mask_form)

    @property
    def numel(self):
        return self.B * self.H * self.L

    @property
    def compute_dtype(self):
        return "float64" if self.dtype == "float64" else "float32"

    @property
    def backward(self):
        return self.direction == "backward"

    def with_direction(self, direction, mask=None):
        """The same call in the other direction (backward: mask defaults to every present
        input's gradient)."""
        if direction == "backward" and mask is None:
            mask = (True, self.k_form == "taps", self.has_D, self.has_g_in, self.has_g_out,
                    self.has_k_rev)
        return replace(self, direction=direction, mask=tuple(mask or (False,) * 6))

    def summary(self):
        """One line: 'forward: torch bfloat16 on cuda:0, B=8 H=64 L=4096, k taps (Lk 4096), D'."""
        k = {"taps": "k taps (Lk used %d)" % self.lk,
             "rfft": "k spectrum (rfft, n=%d)" % self.n,
             "monarch": "k spectrum (Monarch order, n=%d)" % self.n}[self.k_form]
        extras = [name for name, on in (("k_rev (Lk used %d)" % self.lk_rev, self.has_k_rev),
                                        ("D", self.has_D), ("g_in", self.has_g_in),
                                        ("g_out", self.has_g_out),
                                        (self.activation, bool(self.activation)),
                                        ("dropout_mask (%s)" % (
                                            "B, H" if self.mask_form == "BH" else "B, H, L"),
                                         self.has_dropout_mask)) if on]
        s = "%s: %s %s on %s, B=%d H=%d L=%d, %s" % (
            self.direction, self.origin or self.kind, self.dtype, self.device, self.B, self.H,
            self.L, ", ".join([k] + extras))
        if self.backward:
            wanted = [g for g, m in zip(GRAD_NAMES, self.mask) if m]
            s += "; gradients: " + (", ".join(wanted) or "none")
        return s


class Operands(NamedTuple):
    """The arrays of a call, of the Problem's kind. k is the time-domain kernel, or a
    spectrum with its FFT size n (and k_exponent for the fused kernel's Monarch order)."""

    u: object
    k: object
    D: object = None
    g_in: object = None
    g_out: object = None
    k_rev: object = None
    k_exponent: object = None
    n: int = 0
    dropout_mask: object = None   # (B, H) or (B, H, L), or None
    activation: str = ""          # "", "gelu" or "silu"


def _is_complex(k):
    if hasattr(k, "is_complex") and callable(k.is_complex):
        return bool(k.is_complex())
    return getattr(getattr(k, "dtype", None), "kind", "") == "c"


def from_arrays(a: Operands, direction="forward", mask=None, kind=None, origin=None,
                torch_viewable=False):
    """The Problem of validated operands (torch tensors or numpy arrays). No checking here:
    the front ends validate; the torch operators call this with the operator's arguments."""
    u, k = a.u, a.k
    B, H, L = (int(s) for s in u.shape)
    if kind is None:
        kind = "numpy" if type(u).__module__ == "numpy" else "torch"
    spectrum = _is_complex(k)
    if spectrum:
        k_form = "monarch" if a.k_exponent is not None else "rfft"
        lk = 0
    else:
        k_form, lk = "taps", min(int(k.shape[1]), L)
    device = str(u.device) if kind == "torch" else "cpu"
    lk_rev = 0 if a.k_rev is None else min(int(a.k_rev.shape[1]), L)
    present = (True, not spectrum, a.D is not None, a.g_in is not None, a.g_out is not None,
               a.k_rev is not None)
    if direction == "backward":
        mask = present if mask is None else tuple(bool(m) and p for m, p in zip(mask, present))
    else:
        mask = (False,) * 6
    return Problem(direction, kind, B, H, L, _dtype_name(u.dtype), device, k_form, lk,
                   int(a.n) if spectrum else 0, lk_rev, a.k_rev is not None, a.D is not None,
                   a.g_in is not None, a.g_out is not None, tuple(mask),
                   bool(torch_viewable), origin or kind, a.activation or "",
                   _mask_form(a.dropout_mask))


def _mask_form(m):
    if m is None:
        return ""
    return "BH" if len(m.shape) == 2 else "BHL"


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "f16": "float16",
                  "fp32": "float32", "f32": "float32", "float": "float32", "fp64": "float64",
                  "f64": "float64", "double": "float64"}


def from_shape(B, H, L, dtype="float32", device="cpu", Lk=None, *, kind=None, D=True,
               g_in=False, g_out=False, Lk_rev=None, direction="forward", spectrum=None,
               activation=None, dropout_mask=None):
    """A Problem for a call of this shape that was never allocated (flashconv.explain's CLI).

    dtype: torch dtype name or alias ("bf16", "fp16", "fp32", "fp64"); device: "cpu",
    "cuda", "cuda:1", ...; Lk: kernel taps (default L); kind: "torch" (default) or "numpy";
    spectrum: None (taps), "rfft" or "monarch" (a KernelSpectrum of fft_kernel);
    activation: None, "gelu" or "silu"; dropout_mask: None, "BH" or "BHL" (its form)."""
    dtype = _DTYPE_ALIASES.get(str(dtype).lower(), _dtype_name(dtype))
    if dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise ValueError("dtype must be float32, float16, bfloat16 or float64, got %r" % dtype)
    for name, v in (("B", B), ("H", H), ("L", L)):
        if int(v) < 0:
            raise ValueError("%s must be >= 0, got %r" % (name, v))
    device = str(device)
    if device == "cuda":
        device = "cuda:0"
    kind = kind or "torch"
    if kind == "numpy" and (dtype == "bfloat16" or device != "cpu"):
        raise ValueError("numpy arrays are CPU float16/float32/float64")
    L = int(L)
    lk = min(L if Lk is None else int(Lk), L)
    n = 0
    if spectrum is not None:
        from flashconv.plan import fused_fft_size
        n = fused_fft_size(L) if spectrum == "monarch" else 1 << max(0, (2 * L - 2).bit_length())
        lk = 0
    p = Problem("forward", kind, int(B), int(H), L, dtype, device, spectrum or "taps", lk, n,
                0 if Lk_rev is None else min(int(Lk_rev), L), Lk_rev is not None, bool(D),
                bool(g_in), bool(g_out), (False,) * 6, kind == "numpy", kind, activation or "",
                dropout_mask or "")
    return p.with_direction("backward") if direction == "backward" else p
