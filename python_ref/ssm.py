"""float64 references for the diagonal (S4D) SSM and state passing (docs/state-passing.md).

The S4D convention of flashconv/ssm.py: N/2 complex modes per channel, the other N/2
their conjugates, hence the factor 2 and the real part::

    s_t = dA * s_{t-1} + dB * u_t                    s: (B, H, m) complex, m = N/2
    y_t = 2 Re(sum_n C_n s_{t,n}) + D u_t
    k_j = 2 Re(sum_n C_n dA_n^j dB_n)                (the convolution kernel)

Three independent computations of the same y, so that each checks the others and the
torch implementation (flashconv.state_passing.ssm_conv):

- ssm_recurrence: the recurrence itself, one step at a time;
- ssm_kernel + python_ref.conv.fftconv: the full-length convolution;
- state_passing: the chunked algorithm, written as plainly as possible (one chunk at a
  time, the scan as a loop).

Shapes: u (B, H, L) real; dA, dB, C (H, m) complex; D (H,) real or None;
state (B, H, m) complex or None (zeros).
"""

import numpy as np
import scipy.signal

from .conv import fftconv

__all__ = ["ssm_kernel", "ssm_recurrence", "state_passing"]


def _prepare(u, dA, dB, C, D, state):
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 3:
        raise ValueError(f"u must be (B, H, L), got shape {u.shape}")
    B, H, _ = u.shape
    dA, dB, C = (np.asarray(p, dtype=np.complex128) for p in (dA, dB, C))
    if dA.ndim != 2 or dA.shape[0] != H or dB.shape != dA.shape or C.shape != dA.shape:
        raise ValueError(f"dA, dB, C must all be (H, m) with H={H}, got {dA.shape}, {dB.shape}, "
                         f"{C.shape}")
    m = dA.shape[1]
    if D is not None:
        D = np.asarray(D, dtype=np.float64)
        if D.shape != (H,):
            raise ValueError(f"D must be ({H},), got shape {D.shape}")
    if state is None:
        state = np.zeros((B, H, m), np.complex128)
    else:
        state = np.asarray(state, dtype=np.complex128)
        if state.shape != (B, H, m):
            raise ValueError(f"state must be {(B, H, m)}, got shape {state.shape}")
    return u, dA, dB, C, D, state


def _powers(dA, exponents):
    """dA^j, (H, m) -> (H, m, len(exponents)), as exp(j log dA) (exact in j: no 2 pi ambiguity)."""
    return np.exp(np.log(dA)[..., None] * np.asarray(exponents, np.float64))


def ssm_kernel(dA, dB, C, L):
    """S4D kernel k (H, L) float64, k[h, j] = 2 Re(sum_n C[h,n] dA[h,n]^j dB[h,n]).

    Accumulated one mode at a time, so memory is O(H L) rather than O(H m L).
    """
    dA, dB, C = (np.asarray(p, dtype=np.complex128) for p in (dA, dB, C))
    j = np.arange(L, dtype=np.float64)
    k = np.zeros((dA.shape[0], L))  # (H, L)
    for n in range(dA.shape[1]):
        k += 2 * (C[:, n, None] * dB[:, n, None] * _powers(dA[:, n], j)).real
    return k


def ssm_recurrence(u, dA, dB, C, D=None, state=None, method="lfilter"):
    """The recurrence, step by step: returns (y (B, H, L) float64, final state (B, H, m)).

    method "lfilter" runs each mode's first-order recurrence s_t = dA s_(t-1) + dB u_t
    through scipy.signal.lfilter (the same sequential loop, in C; zi carries the initial
    state); "loop" is the literal Python loop over t, for small L.
    """
    u, dA, dB, C, D, state = _prepare(u, dA, dB, C, D, state)
    B, H, L = u.shape
    m = dA.shape[1]
    y = np.zeros((B, H, L))  # (B, H, L)
    final = state.copy()  # (B, H, m) complex
    if method == "loop":
        s = state.copy()
        for t in range(L):
            s = dA * s + dB * u[:, :, t, None]
            y[:, :, t] = 2 * np.einsum("hn,bhn->bh", C, s).real
        final = s
    elif method == "lfilter":
        for h in range(H):
            for n in range(m):
                # s_t - dA s_(t-1) = dB u_t; lfilter's zi is the state of its direct form II
                # transposed: zi = dA s_(-1) gives s_0 = dB u_0 + dA s_(-1).
                s, _ = scipy.signal.lfilter([dB[h, n]], [1.0, -dA[h, n]], u[:, h].astype(np.complex128),
                                            axis=-1, zi=(dA[h, n] * state[:, h, n])[:, None])
                y[:, h] += 2 * (C[h, n] * s).real
                if L:
                    final[:, h, n] = s[:, -1]
    else:
        raise ValueError(f"method must be 'lfilter' or 'loop', got {method!r}")
    if D is not None:
        y += D[:, None] * u
    return y, final


def state_passing(u, dA, dB, C, D=None, chunk=2048, state=None):
    """The chunked algorithm of docs/state-passing.md in float64: returns (y, final state).

    For chunk c (length T, the last one possibly shorter, r taps) with s_(c-1) the state
    after chunk c-1::

        y^(c)_j = fftconv(u^(c), k[0:T])_j + 2 Re(sum_n C_n dA_n^(j+1) s_(c-1),n) + D u^(c)_j
        s_c     = dA^T s_(c-1) + M_ux u^(c),    M_ux[n, i] = dA_n^(T-1-i) dB_n

    All chunks' local states M_ux u^(c) are one matmul, then the scan over chunks runs as
    a loop, then all corrections are one matmul (the torch version runs the same scan in
    log2(C) steps and batches the chunks in groups).
    """
    u, dA, dB, C, D, state = _prepare(u, dA, dB, C, D, state)
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    B, H, L = u.shape
    if L == 0:
        return np.zeros((B, H, 0)), state.copy()
    T = min(int(chunk), L)
    nc = -(-L // T)  # chunks, the last of length r
    r = L - (nc - 1) * T
    k = ssm_kernel(dA, dB, C, T)  # (H, T)
    V = _powers(dA, np.arange(T + 1))  # (H, m, T+1): dA^j
    M_ux = V[..., :T][..., ::-1] * dB[..., None]  # (H, m, T)
    M_xy = C[..., None] * V[..., 1:]  # (H, m, T): C dA^(j+1)

    # Local states of every chunk, the last one zero-padded at its start: a chunk of r
    # inputs padded in front by T - r zeros has the state dA^(r-1-i) dB u_i.
    up = np.zeros((B, H, nc * T))
    up[..., : (nc - 1) * T] = u[..., : (nc - 1) * T]
    up[..., nc * T - r:] = u[..., (nc - 1) * T:]
    z = np.einsum("bhct,hnt->bhcn", up.reshape(B, H, nc, T), M_ux)  # (B, H, nc, m)

    # The scan: prev[:, :, c] = state before chunk c.
    prev = np.empty((B, H, nc, dA.shape[1]), np.complex128)  # (B, H, nc, m)
    s = state
    for c in range(nc):
        prev[:, :, c] = s
        decay = V[..., T] if c < nc - 1 else V[..., r]  # dA^T, or dA^r for the last chunk
        s = decay * s + z[:, :, c]

    corr = 2 * np.einsum("bhcn,hnt->bhct", prev, M_xy).real  # (B, H, nc, T)
    y = np.empty((B, H, L))
    for c in range(nc):
        a, b = c * T, min(L, (c + 1) * T)
        y[..., a:b] = fftconv(u[..., a:b], k, D) + corr[:, :, c, : b - a]
    return y, s
