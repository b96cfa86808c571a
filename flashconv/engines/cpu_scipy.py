"""Engine cpu_scipy: the scipy.fft CPU engine on numpy arrays (flashconv/_cpu.py): cache-sized
chunks over a thread pool (FLASHCONV_NUM_THREADS), reused padded buffers, in-place products;
forward and backward (the formulas of flashconv/grads.py, fused per chunk).

Serves numpy arrays where cpu_torch cannot: numpy-only installs, and arrays torch cannot view
(negative strides, non-native byte order).
"""
import numpy as np

from flashconv import _cpu

NAME = "cpu_scipy"
DESCRIPTION = "scipy.fft CPU engine for numpy arrays (thread pool, cache-sized chunks)"


def available():
    return ""


def check(p):
    if p.kind != "numpy":
        return "serves numpy arrays only"
    return None


def _spectrum(p, a, dtype):
    """(K, n, lk, lk_rev): the spectrum operand as it is, or the taps (transformed by _cpu a
    group of channels at a time)."""
    if a.k.dtype.kind == "c":
        return a.k, a.n, 0, 0
    n = _cpu.fft_size(p.L, max(p.lk, p.lk_rev))
    return _cpu.Taps(a.k, a.k_rev), n, p.lk, p.lk_rev


def _dtype(p):
    return np.float64 if p.compute_dtype == "float64" else np.float32


def forward(p, a):
    with np.errstate(over="ignore", invalid="ignore"):  # casts of values beyond the range
        return _forward(p, a)


def backward(p, a, dy, mask):
    with np.errstate(over="ignore", invalid="ignore"):
        return _backward(p, a, dy, mask)


def _forward(p, a):
    dtype = _dtype(p)
    K, n, _, _ = _spectrum(p, a, dtype)
    y = _cpu.conv_forward(a.u, K, n, a.D, a.g_in, a.g_out, dtype, a.activation, a.dropout_mask)
    return y.astype(a.u.dtype, copy=False)


def _backward(p, a, dy, mask):
    dtype = _dtype(p)
    K, n, lk, lkr = _spectrum(p, a, dtype)
    need_u, need_k, need_D, need_gi, need_go, need_kr = mask
    g = _cpu.conv_backward(dy, a.u, K, n, lk, a.D, a.g_in, a.g_out, dtype,
                           need_k=need_k or need_kr, need_D=need_D,
                           need_gates=need_gi or need_go, lk_rev=lkr if need_kr else 0,
                           activation=a.activation, dropout_mask=a.dropout_mask)
    out = [None] * 6
    if need_u:
        out[0] = g["du"].astype(a.u.dtype, copy=False)
    if need_k:
        out[1] = np.zeros(a.k.shape, a.k.dtype)  # taps >= L get no gradient
        out[1][:, :lk] = g["dk"]
    if need_kr:
        out[5] = np.zeros(a.k_rev.shape, a.k_rev.dtype)
        out[5][:, :lkr] = g["dk_rev"]
    for i, key, arr in ((2, "dD", a.D), (3, "dg_in", a.g_in), (4, "dg_out", a.g_out)):
        if mask[i]:
            out[i] = g[key].astype(arr.dtype, copy=False)
    return tuple(out)
