"""The torch operators flashconv::fftconv and flashconv::fftconv_bwd, calling the engine table.

Registered with torch.library's low-level API (Library.define + impl, register_fake,
register_autograd) rather than the torch.library.custom_op decorator: custom_op wraps every
kernel in a Dynamo-disable shim that imports torch._dynamo on the first call (about 2 s on a
2-core machine), for a guarantee this operator does not need. The schemas, the fake (shape
only) implementations and the autograd formula are the same; torch.compile(fullgraph=True)
traces through them and keeps the convolution as one opaque node::

    flashconv::fftconv(Tensor u, Tensor k, Tensor? D=None, Tensor? g_in=None,
                       Tensor? g_out=None, Tensor? k_exponent=None, SymInt n=0,
                       Tensor? k_rev=None, Tensor? dropout_mask=None, str activation="")
                       -> Tensor
    flashconv::fftconv_bwd(Tensor dy, Tensor u, Tensor k, Tensor? D=None, Tensor? g_in=None,
                           Tensor? g_out=None, Tensor? k_exponent=None, SymInt n=0,
                           bool[]? output_mask=None, Tensor? k_rev=None,
                           Tensor? dropout_mask=None, str activation="")
                           -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)

`k` is either the real (H, Lk) kernel (n = 0) or the complex spectrum of a KernelSpectrum
(n = its FFT size; k_exponent its per-channel scale when the spectrum is in the fused
kernel's Monarch order, None for a natural-order rfft spectrum). k_rev is the anti-causal
kernel of a bidirectional convolution (a spectrum already includes it). dropout_mask ((B, H) or
(B, H, L)) and activation ("", "gelu", "silu") are the fused epilogue y = g_out * m * act(z)
(flashconv/_epilogue.py); the mask gets no gradient. fftconv_bwd returns
(du, dk, dD, dg_in, dg_out, dk_rev); an entry whose input is absent (None), is a spectrum
(dk), or is masked out by output_mask (6 entries; None: every present input) is an empty
(0,) tensor of u's dtype, every other entry has its input's shape and dtype. The op pair is
first order: double backward through it is not supported.

Both implementations build a flashconv.problem.Problem from their arguments and run
flashconv.dispatch (the engine table), on every device (CompositeExplicitAutograd).
"""
import torch

from flashconv import dispatch
from flashconv.problem import Operands, from_arrays

FWD_SCHEMA = ("fftconv(Tensor u, Tensor k, Tensor? D=None, Tensor? g_in=None, "
              "Tensor? g_out=None, Tensor? k_exponent=None, SymInt n=0, Tensor? k_rev=None, "
              "Tensor? dropout_mask=None, str activation=\"\") -> Tensor")
BWD_SCHEMA = ("fftconv_bwd(Tensor dy, Tensor u, Tensor k, Tensor? D=None, Tensor? g_in=None, "
              "Tensor? g_out=None, Tensor? k_exponent=None, SymInt n=0, "
              "bool[]? output_mask=None, Tensor? k_rev=None, Tensor? dropout_mask=None, "
              "str activation=\"\") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

_lib = torch.library.Library("flashconv", "DEF")
_lib.define(FWD_SCHEMA)
_lib.define(BWD_SCHEMA)


def grad_mask(k, D, g_in, g_out, output_mask, k_rev=None):
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


def _fftconv_impl(u, k, D=None, g_in=None, g_out=None, k_exponent=None, n=0, k_rev=None,
                  dropout_mask=None, activation=""):
    a = Operands(u, k, D, g_in, g_out, k_rev, k_exponent, n, dropout_mask, activation)
    return dispatch.run_forward(from_arrays(a, "forward", kind="torch"), a)


def _fftconv_bwd_impl(dy, u, k, D=None, g_in=None, g_out=None, k_exponent=None, n=0,
                      output_mask=None, k_rev=None, dropout_mask=None, activation=""):
    mask = grad_mask(k, D, g_in, g_out, output_mask, k_rev)
    a = Operands(u, k, D, g_in, g_out, k_rev, k_exponent, n, dropout_mask, activation)
    grads = dispatch.run_backward(from_arrays(a, "backward", mask, kind="torch"), a, dy)
    return tuple(u.new_empty((0,)) if g is None else g.contiguous() for g in grads)


_lib.impl("fftconv", _fftconv_impl, "CompositeExplicitAutograd")
_lib.impl("fftconv_bwd", _fftconv_bwd_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("flashconv::fftconv", lib=_lib)
def _fftconv_fake(u, k, D=None, g_in=None, g_out=None, k_exponent=None, n=0, k_rev=None,
                  dropout_mask=None, activation=""):
    return u.new_empty(u.shape)


@torch.library.register_fake("flashconv::fftconv_bwd", lib=_lib)
def _fftconv_bwd_fake(dy, u, k, D=None, g_in=None, g_out=None, k_exponent=None, n=0,
                      output_mask=None, k_rev=None, dropout_mask=None, activation=""):
    mask = grad_mask(k, D, g_in, g_out, output_mask, k_rev)
    return tuple(x.new_empty(x.shape) if m else u.new_empty((0,))
                 for x, m in zip((u, k, D, g_in, g_out, k_rev), mask))


def _setup_context(ctx, inputs, output):
    u, k, D, g_in, g_out, k_exponent, n = inputs[:7]
    k_rev = inputs[7] if len(inputs) > 7 else None
    dropout_mask = inputs[8] if len(inputs) > 8 else None
    ctx.save_for_backward(u, k, D, g_in, g_out, k_exponent, k_rev, dropout_mask)
    ctx.n = n
    ctx.activation = inputs[9] if len(inputs) > 9 else ""


def _autograd(ctx, dy):
    u, k, D, g_in, g_out, k_exponent, k_rev, dropout_mask = ctx.saved_tensors
    # needs_input_grad covers the arguments passed: trailing defaults may be left off.
    needs = (tuple(ctx.needs_input_grad) + (False,) * 10)[:10]
    mask = grad_mask(k, D, g_in, g_out, needs[:5] + needs[7:8], k_rev)
    if dropout_mask is None and not ctx.activation:
        grads = fftconv_bwd(dy, u, k, D, g_in, g_out, k_exponent, ctx.n, list(mask), k_rev)
    else:
        grads = fftconv_bwd(dy, u, k, D, g_in, g_out, k_exponent, ctx.n, list(mask), k_rev,
                            dropout_mask, ctx.activation)
    g = [gr if m else None for gr, m in zip(grads, mask)]
    # No gradient for a spectrum k, k_exponent, n, the dropout mask (H3's mask is not a
    # learned tensor) and the activation's name.
    return tuple(g[:5]) + (None, None, g[5], None, None)


torch.library.register_autograd("flashconv::fftconv", _autograd, setup_context=_setup_context,
                                lib=_lib)

fftconv = torch.ops.flashconv.fftconv
fftconv_bwd = torch.ops.flashconv.fftconv_bwd
