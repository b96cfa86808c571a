"""The fused epilogue of fftconv: an activation and a dropout mask between D x and g_out.

    z = conv(x, k) + D x          (x = g_in u; the pre-activation value)
    y = g_out * m * act(z)        act: identity, "gelu" (exact, erf form: torch's F.gelu
                                  default) or "silu"; m: the dropout mask, (B, H) broadcast
                                  over t (H3's convention) or (B, H, L)

Everything is computed in the compute dtype (float32, float64 for float64 u) before the
output is rounded. The mask is used as given (H3: ``F.dropout(ones(B, H), p)``, already
scaled by 1 / (1 - p) by the caller); it receives no gradient.

Backward (dy given):

    dz     = dy * g_out * m * act'(z)
    dg_out = dy * m * act(z)

and everything else follows from dz as without the epilogue (flashconv/grads.py). The
engines recompute z in the backward from the transform of x they already take (one more
inverse FFT per row, the one dg_out needs anyway) rather than storing it.

Helpers for torch tensors (t_*) and numpy arrays (np_*), in place where the name says so.
"""
import math

ACTIVATIONS = ("gelu", "silu")

__all__ = ["ACTIVATIONS", "mask3", "t_apply", "t_grad", "np_apply", "np_grad", "active"]


def active(activation, dropout_mask):
    """Whether the epilogue does anything beyond the gates."""
    return bool(activation) or dropout_mask is not None


def mask3(m):
    """The mask as a 3-d view that broadcasts against (B, H, L): (B, H) -> (B, H, 1)."""
    if m is None:
        return None
    return m[..., None] if m.ndim == 2 else m


# --- torch ------------------------------------------------------------------------------------

def t_act(z, activation):
    """act(z), a new tensor (z itself for no activation)."""
    import torch

    if not activation:
        return z
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    return torch.nn.functional.silu(z)


def t_dact(z, activation):
    """act'(z), a new tensor."""
    import torch

    if activation == "gelu":
        cdf = torch.special.erf(z * (1 / math.sqrt(2))).add_(1).mul_(0.5)
        pdf = torch.exp(z * z * -0.5).mul_(1 / math.sqrt(2 * math.pi))
        return cdf.add_(pdf.mul_(z))
    s = torch.sigmoid(z)
    # silu'(z) = s (1 + z (1 - s))
    return s * (1 + z * (1 - s))


def t_apply(z, activation, m, g_out):
    """y = g_out * m * act(z) (m, g_out: chunks broadcasting against z, or None); z itself is
    modified in place and returned when there is no activation."""
    y = t_act(z, activation)
    if m is not None:
        y.mul_(m)
    if g_out is not None:
        y.mul_(g_out)
    return y


def t_grad(z, dy, activation, m, g_out, need_gout):
    """(gate, dg_out): dz = dy * gate with gate = g_out * m * act'(z) (None: no factor at
    all), and dg_out = dy * m * act(z) when need_gout (else None). z is not modified."""
    import torch

    gate = t_dact(z, activation) if activation else None
    for f in (m, g_out):
        if f is None:
            continue
        if gate is None:
            gate = torch.empty_like(z).copy_(f)
        else:
            gate.mul_(f)
    dgo = None
    if need_gout:
        a = t_act(z, activation)
        dgo = a * dy if a is z else a.mul_(dy)
        if m is not None:
            dgo.mul_(m)
    return gate, dgo


# --- numpy ------------------------------------------------------------------------------------

def np_act(z, activation):
    """act(z), a new array (z itself for no activation)."""
    import numpy as np

    if not activation:
        return z
    if activation == "gelu":
        from scipy.special import erf

        return z * ((1 + erf(z * (1 / math.sqrt(2)))) * 0.5).astype(z.dtype, copy=False)
    with np.errstate(over="ignore"):
        return (z / (1 + np.exp(-z))).astype(z.dtype, copy=False)


def np_dact(z, activation):
    import numpy as np

    if activation == "gelu":
        from scipy.special import erf

        cdf = (1 + erf(z * (1 / math.sqrt(2)))) * 0.5
        with np.errstate(under="ignore", over="ignore"):
            pdf = np.exp(z * z * -0.5) * (1 / math.sqrt(2 * math.pi))
        return (cdf + z * pdf).astype(z.dtype, copy=False)
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-z))
    return (s * (1 + z * (1 - s))).astype(z.dtype, copy=False)


def np_apply(z, activation, m, g_out, out=None):
    """g_out * m * act(z) written into out (default: z itself)."""
    import numpy as np

    out = z if out is None else out
    a = np_act(z, activation)
    if m is not None:
        np.multiply(a, m, out=out)
    elif a is not out:
        out[...] = a
    if g_out is not None:
        out *= g_out
    return out


def np_grad(z, dy, activation, m, g_out, need_gout, dtype):
    """numpy t_grad: (gate (or None), dg_out (or None)) in dtype."""
    import numpy as np

    gate = np_dact(z, activation) if activation else None
    for f in (m, g_out):
        if f is not None:
            gate = np.asarray(f, dtype) if gate is None else gate * f
    if gate is not None:
        gate = np.ascontiguousarray(np.broadcast_to(gate, z.shape), dtype)
    dgo = None
    if need_gout:
        dgo = np_act(z, activation) * dy
        if m is not None:
            dgo = dgo * m
        dgo = dgo.astype(dtype, copy=False)
    return gate, dgo
