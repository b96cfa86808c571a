"""float64 references for the gated causal convolution (docs/architecture.md).

    x[b,h,t] = g_in[b,h,t] * u[b,h,t]
    y[b,h,t] = g_out[b,h,t] * ( sum_{s<=t} k[h,s] * x[b,h,t-s]  +  D[h] * x[b,h,t] )

Shapes: u, g_in, g_out, y (B, H, L); k (H, Lk); D (H,). A kernel shorter than L is
zero-extended, a longer one is truncated to L (taps s >= L never reach an output t < L).
g_in, g_out and D are optional (None: absent, i.e. ones / zero).

Bidirectional (non-causal) convolution, as LRA models use, adds an anti-causal kernel
k_rev (H, Lk_rev) inside the bracket: ``+ sum_{s >= 0} k_rev[h,s] * x[b,h,t+s]`` (lag 0 is
counted by both kernels, as in H3's ``fftconv_ref(..., k_rev=...)``, whose spectrum is
``rfft(k) + conj(rfft(k_rev))``).

The fused epilogue (flashconv/_epilogue.py): an activation ("gelu", exact erf form, or
"silu") and a dropout mask m ((B, H), broadcast over t as H3's, or (B, H, L)) between the
bracket and the output gate: ``y = g_out * m * act(conv + D x)``. The mask is used as given
(already scaled by the caller) and gets no gradient.

Two independent computations are given so that each checks the other: a direct sum
(causal_conv_direct) and an FFT convolution (fftconv), plus the analytic gradients
(fftconv_grads) that the backward kernel must reproduce.
"""

import numpy as np
import scipy.fft

__all__ = ["causal_conv_direct", "fftconv", "fftconv_grads"]


def _kernel(name, k, H, L):
    """(H, Lk) float64 kernel truncated to min(Lk, L) taps."""
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != H or k.shape[1] < 1:
        raise ValueError(f"{name} must be (H, Lk) with H={H}, Lk >= 1, got shape {k.shape}")
    return k[:, : min(k.shape[1], L)]


def _prepare(u, k, D, g_in, g_out):
    """Validate shapes and convert to float64; returns (u, k_eff, D, g_in, g_out, x).

    k_eff is k truncated to min(Lk, L) taps; x is the gated input g_in * u.
    """
    u = np.asarray(u, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    if u.ndim != 3:
        raise ValueError(f"u must be (B, H, L), got shape {u.shape}")
    B, H, L = u.shape
    k_eff = _kernel("k", k, H, L)
    if D is not None:
        D = np.asarray(D, dtype=np.float64)
        if D.shape != (H,):
            raise ValueError(f"D must be ({H},), got shape {D.shape}")
    gates = []
    for name, g in (("g_in", g_in), ("g_out", g_out)):
        if g is not None:
            g = np.asarray(g, dtype=np.float64)
            if g.shape != u.shape:
                raise ValueError(f"{name} must have u's shape {u.shape}, got {g.shape}")
        gates.append(g)
    g_in, g_out = gates
    x = u if g_in is None else g_in * u
    return u, k_eff, D, g_in, g_out, x


ACTIVATIONS = ("gelu", "silu")


def activation_fn(name):
    """(act, act') as float64 numpy functions for name in (None, "gelu", "silu")."""
    from scipy.special import erf

    if not name:
        return (lambda z: z), (lambda z: np.ones_like(z))
    if name == "gelu":
        def cdf(z):
            return 0.5 * (1 + erf(z / np.sqrt(2)))

        def pdf(z):
            return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)

        return (lambda z: z * cdf(z)), (lambda z: cdf(z) + z * pdf(z))
    if name == "silu":
        def sig(z):
            return 0.5 * (1 + np.tanh(0.5 * z))  # no overflow warning for large |z|

        return (lambda z: z * sig(z)), (lambda z: sig(z) * (1 + z * (1 - sig(z))))
    raise ValueError(f"activation must be None, 'gelu' or 'silu', got {name!r}")


def _mask(m, shape):
    """The dropout mask as float64 broadcasting against (B, H, L), or None."""
    if m is None:
        return None
    m = np.asarray(m, dtype=np.float64)
    if m.shape == shape[:2]:
        return m[..., None]
    if m.shape != shape:
        raise ValueError(f"dropout_mask must be (B, H) = {shape[:2]} or (B, H, L) = {shape}, "
                         f"got {m.shape}")
    return m


def _finish(z, x, D, g_out, activation=None, dropout_mask=None):
    """Add the skip term, apply the epilogue and the output gate to the convolution z."""
    if D is not None:
        z = z + D[:, None] * x
    if activation:
        z = activation_fn(activation)[0](z)
    m = _mask(dropout_mask, z.shape)
    if m is not None:
        z = z * m
    if g_out is not None:
        z = g_out * z
    return z


def causal_conv_direct(u, k, D=None, g_in=None, g_out=None, k_rev=None, activation=None,
                       dropout_mask=None):
    """Direct (O(L * Lk)) float64 causal convolution; returns y (B, H, L) float64.

    Exactly the defining sum, with no transform involved: the ground truth for the
    FFT-based references on small and medium sizes. k_rev: optional anti-causal kernel.
    """
    u, k, D, g_in, g_out, x = _prepare(u, k, D, g_in, g_out)
    B, H, L = x.shape
    Lk = k.shape[1]
    if B * H < Lk:
        # Few long rows: one compiled convolution per row costs B*H Python calls.
        z = np.empty((B, H, L))  # (B, H, L) float64
        for b in range(B):
            for h in range(H):
                z[b, h] = np.convolve(x[b, h], k[h])[:L]
    else:
        # Many rows: one vectorised shifted multiply-add per tap costs Lk Python calls.
        z = np.zeros((B, H, L))  # (B, H, L) float64
        for s in range(Lk):
            z[:, :, s:] += k[None, :, s, None] * x[:, :, : L - s]
    if k_rev is not None:
        kr = _kernel("k_rev", k_rev, H, L)
        for s in range(kr.shape[1]):  # z[t] += k_rev[s] x[t + s]
            z[:, :, : L - s] += kr[None, :, s, None] * x[:, :, s:]
    return _finish(z, x, D, g_out, activation, dropout_mask)


def _fft_len(L, Lk):
    """Linear (not circular) convolution of L inputs with Lk taps needs n >= L + Lk - 1."""
    return scipy.fft.next_fast_len(L + Lk - 1, real=True)


def _spectrum(k, k_rev, n):
    """rfft of k plus, for a bidirectional convolution, conj(rfft(k_rev))."""
    K = scipy.fft.rfft(k, n)
    return K if k_rev is None else K + np.conj(scipy.fft.rfft(k_rev, n))


def fftconv(u, k, D=None, g_in=None, g_out=None, k_rev=None, activation=None,
            dropout_mask=None):
    """float64 FFT causal convolution (scipy.fft, n = next fast length >= L + min(Lk,L) - 1).

    The float64 counterpart of the H3/Hyena/S4 ``fftconv_ref``; returns y (B, H, L).
    k_rev: optional anti-causal kernel (bidirectional convolution).
    """
    u, k, D, g_in, g_out, x = _prepare(u, k, D, g_in, g_out)
    L = x.shape[-1]
    kr = None if k_rev is None else _kernel("k_rev", k_rev, x.shape[1], L)
    n = _fft_len(L, max(k.shape[1], 0 if kr is None else kr.shape[1]))
    z = scipy.fft.irfft(scipy.fft.rfft(x, n) * _spectrum(k, kr, n), n)[..., :L]  # (B, H, L)
    return _finish(z, x, D, g_out, activation, dropout_mask)


def fftconv_grads(u, k, dy, D=None, g_in=None, g_out=None, k_rev=None, activation=None,
                  dropout_mask=None):
    """Analytic float64 gradients of y = fftconv(u, k, D, g_in, g_out) given dL/dy = dy.

    With z = conv(k, x) + D * x (the convolution before the output gate) and
    dz = dy * g_out:

      du[b,h,t]    = g_in * dx,  dx[b,h,t] = sum_s k[h,s] dz[b,h,t+s] + D[h] dz[b,h,t]
                     (the causal correlation of dz with k: the adjoint of the convolution)
      dk[h,s]      = sum_b sum_t dz[b,h,t] x[b,h,t-s]    (zero for s >= L when Lk > L)
      dD[h]        = sum_b sum_t dz[b,h,t] x[b,h,t]
      dg_in[b,h,t] = dx * u,   dg_out[b,h,t] = dy * z

    With k_rev, dx also gets sum_s k_rev[h,s] dz[b,h,t-s] and
      dk_rev[h,s]  = sum_b sum_t dz[b,h,t] x[b,h,t+s].

    With the epilogue y = g_out * m * act(z): dz = dy * g_out * m * act'(z) and
    dg_out = dy * m * act(z) (no gradient for the mask m).

    Returns a dict with keys du, dk (shape (H, Lk) of the k given), dD, dg_in, dg_out
    (and dk_rev when k_rev is given); an entry is None where its input is None.
    """
    Lk_full = np.shape(k)[-1]
    u, k, D, g_in, g_out, x = _prepare(u, k, D, g_in, g_out)
    kr = None if k_rev is None else _kernel("k_rev", k_rev, x.shape[1], x.shape[2])
    dy = np.asarray(dy, dtype=np.float64)
    if dy.shape != u.shape:
        raise ValueError(f"dy must have u's shape {u.shape}, got {dy.shape}")
    H, L = x.shape[1], x.shape[2]
    Lk = k.shape[1]
    # Correlations are products with conjugated spectra; n >= L + Lk - 1 keeps every
    # lag t + s < n, so nothing wraps around the circular transform.
    n = _fft_len(L, max(Lk, 0 if kr is None else kr.shape[1]))
    X = scipy.fft.rfft(x, n)  # (B, H, n//2+1) complex128
    Kf = _spectrum(k, kr, n)  # (H, n//2+1) complex128
    z = scipy.fft.irfft(X * Kf, n)[..., :L]  # (B, H, L): conv before skip and gate
    if D is not None:
        z = z + D[:, None] * x
    act, dact = activation_fn(activation)
    m = _mask(dropout_mask, z.shape)
    dz = dy if g_out is None else dy * g_out
    if m is not None:
        dz = dz * m
    if activation:
        dz = dz * dact(z)
    w = act(z) if m is None else act(z) * m  # what g_out multiplies
    DZ = scipy.fft.rfft(dz, n)  # (B, H, n//2+1) complex128
    dx = scipy.fft.irfft(DZ * np.conj(Kf), n)[..., :L]  # (B, H, L)
    if D is not None:
        dx = dx + D[:, None] * dz
    dk = np.zeros((H, Lk_full))  # (H, Lk): taps beyond L get no gradient
    dk[:, :Lk] = scipy.fft.irfft(DZ * np.conj(X), n)[..., :Lk].sum(axis=0)
    extra = {}
    if k_rev is not None:
        dk_rev = np.zeros((H, np.shape(k_rev)[-1]))  # (H, Lk_rev)
        dk_rev[:, : kr.shape[1]] = scipy.fft.irfft(np.conj(DZ) * X, n)[..., : kr.shape[1]].sum(axis=0)
        extra["dk_rev"] = dk_rev
    return {**extra,
        "du": dx if g_in is None else dx * g_in,
        "dk": dk,
        "dD": None if D is None else (dz * x).sum(axis=(0, 2)),
        "dg_in": None if g_in is None else dx * u,
        "dg_out": None if g_out is None else dy * w,
    }
