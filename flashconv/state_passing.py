"""State passing: a diagonal SSM convolution of any length with no FFT longer than 2T.

docs/state-passing.md, for the S4D convention of flashconv/ssm.py (N/2 complex modes per
channel, the other N/2 their conjugates, hence the factor 2 and the real part)::

    s_t = dA * s_{t-1} + dB * u_t                      s: (B, H, N/2) complex
    y_t = 2 Re(sum_n C_n s_{t,n}) + D u_t
        = (k * u)_t + 2 Re(sum_n C_n dA_n^(t+1) s_{-1,n}) + D u_t,
    k_j = 2 Re(sum_n C_n dA_n^j dB_n)                  (the S4D kernel, ssm.s4d_kernel)

Split the sequence into chunks of length T (the last one may be shorter, r <= T). With
s_(c-1) the state after chunk c-1 (s_(-1) the initial state):

    y^(c)_j = fftconv(u^(c), k[0:T])_j + 2 Re(sum_n C_n dA_n^(j+1) s_(c-1),n) + D u^(c)_j
    s_c     = dA^T * s_(c-1) + M_ux u^(c),        M_ux[n, i] = dA_n^(T-1-i) dB_n

Three passes, each batched over many chunks at once:

1. local states z_c = M_ux u^(c): a real matmul (T x 2m per channel, m = N/2) over chunks;
2. the scan s_c = dA^T s_(c-1) + z_c over chunks, the only sequential part: log2(C)
   elementwise steps (Hillis-Steele; the chunk multiplier dA^T is the same for every
   chunk, so step d adds dA^(dT) * s_(c-d));
3. outputs: fftconv of every chunk (flashconv.fftconv: the fused kernel on CUDA) plus the
   corrections M_xy s_(c-1), M_xy[j, n] = 2 Re(C_n dA_n^(j+1) .), another real matmul.

The result equals the full-length convolution and the step-by-step recurrence up to
rounding. Work is O(L (log T + m)) per row; memory beyond input and output is
O(B*H*C*m) for the chunk states plus bounded working sets (a group of chunks for passes 1
and 3, the Vandermonde matrices for a group of channels), never a length-L temporary.
"""
import math
import numbers

import torch

from flashconv import _memory
from flashconv.ops import fftconv

__all__ = ["ssm_conv", "DEFAULT_CHUNK"]

# Default chunk length T. Per element, the chunk FFTs cost O(log T) and the two Vandermonde
# products O(m) whatever T is; the scan costs O(m/T) and building the chunk operators
# O(H m T) per call. So T only needs to be well above m, no larger than what the fused
# CUDA kernel serves from shared memory for float32 rows (L <= 8K), and small next to L.
# On the 2-core CPU (float32, m = 32, min of 4 interleaved runs, shared machine):
#     B=1, H=16, L=1M:  T = 512 / 1024 / 2048 / 4096 / 8192:  283 / 236 / 246 / 256 / 309 ms
#     B=1, H=8,  L=64K: T = 512 / 1024 / 2048 / 4096 / 8192:   14 /  14 /  17 /  23 /  35 ms
DEFAULT_CHUNK = 2048

# Working-set budgets (elements). Passes 1 and 3 handle as many chunks at once as fit in
# _GROUP_ELEMS real values per temporary (4 MB float32 on CPU: cache-friendly batches, and
# a handful of such temporaries stay small next to any input worth chunking; larger on CUDA,
# where fewer, bigger launches are what counts). The per-channel chunk
# operators (a few T x m complex matrices) are built for as many channels at once as fit
# in _VANDER_ELEMS, so a wide layer (H = 768) never holds H*m*T values.
_GROUP_ELEMS = {"cpu": 1 << 20, "cuda": 1 << 24}
_VANDER_ELEMS = 1 << 18

_REAL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPLEX = (torch.complex64, torch.complex128)


def _shape(x):
    return tuple(int(s) for s in x.shape)


def _validate(u, dA, dB, C, D, chunk, state):
    """Raise TypeError/ValueError naming the argument; return (B, H, L, m, T)."""
    if not isinstance(u, torch.Tensor):
        raise TypeError("ssm_conv: u must be a torch.Tensor of shape (B, H, L), got %s"
                        % type(u).__name__)
    for name, p in (("u", u), ("dA", dA), ("dB", dB), ("C", C), ("D", D), ("state", state)):
        if isinstance(p, torch.Tensor) and p.layout != torch.strided:
            raise TypeError("ssm_conv: %s is a %s tensor: ssm_conv needs dense (strided) tensors; "
                            "pass %s.to_dense()" % (name, str(p.layout).replace("torch.", ""), name))
    if u.ndim != 3:
        raise ValueError("ssm_conv: u must have shape (B, H, L), got shape %s" % (_shape(u),))
    if u.dtype not in _REAL:
        raise TypeError("ssm_conv: u must be float32, float16, bfloat16 or float64, got %s" % u.dtype)
    B, H, L = _shape(u)
    for name, p in (("dA", dA), ("dB", dB), ("C", C)):
        if not isinstance(p, torch.Tensor):
            raise TypeError("ssm_conv: %s must be a complex torch.Tensor of shape (H, N/2), got %s"
                            % (name, type(p).__name__))
        if p.dtype not in _COMPLEX:
            raise TypeError("ssm_conv: %s must be complex64 or complex128 of shape (H, N/2), got %s"
                            % (name, p.dtype))
    if dA.ndim != 2 or dA.shape[0] != H or dA.shape[1] < 1:
        raise ValueError("ssm_conv: dA must have shape (H, N/2) = (%d, N/2) with N/2 >= 1, got "
                         "shape %s" % (H, _shape(dA)))
    m = int(dA.shape[1])
    for name, p in (("dB", dB), ("C", C)):
        if _shape(p) != (H, m):
            raise ValueError("ssm_conv: %s must have shape (H, N/2) = %s like dA, got shape %s"
                             % (name, (H, m), _shape(p)))
    if D is not None:
        if not isinstance(D, torch.Tensor) or D.dtype not in _REAL:
            raise TypeError("ssm_conv: D must be a real floating torch.Tensor of shape (H,) = (%d,), "
                            "got %s" % (H, getattr(D, "dtype", type(D).__name__)))
        if _shape(D) != (H,):
            raise ValueError("ssm_conv: D must have shape (H,) = (%d,), got shape %s" % (H, _shape(D)))
    if state is not None:
        if not isinstance(state, torch.Tensor) or state.dtype not in _COMPLEX:
            raise TypeError("ssm_conv: state must be a complex torch.Tensor of shape (B, H, N/2) = "
                            "%s, got %s" % ((B, H, m), getattr(state, "dtype", type(state).__name__)))
        if _shape(state) != (B, H, m):
            raise ValueError("ssm_conv: state must have shape (B, H, N/2) = %s, got shape %s"
                             % ((B, H, m), _shape(state)))
    if chunk is None:
        T = DEFAULT_CHUNK
    elif isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError("ssm_conv: chunk must be a positive int (chunk length T), got %r" % (chunk,))
    else:
        T = int(chunk)
    for name, p in (("dA", dA), ("dB", dB), ("C", C), ("D", D), ("state", state)):
        if p is not None and p.device != u.device:
            raise ValueError("ssm_conv: %s is on %s but u is on %s; all inputs must be on one device"
                             % (name, p.device, u.device))
    return B, H, L, m, max(1, min(T, L))


def _even_split(n, most):
    """Group size for n items in groups of at most `most` (>= 1), as even as possible
    (16 items, most 15: two groups of 8, not 15 + 1)."""
    groups = -(-n // max(1, most))
    return -(-n // groups)


def _chunk_operators(dA, dB, C, T, cdt, ctype):
    """Everything a chunk of length T needs, for a group of channels (Hg, m).

    The powers dA^j, j = q b + r, are hi_q * lo_r with hi_q = dA^(q b) and lo_r = dA^r
    (b ~ sqrt(T)) taken as exp(. log dA) in complex128 and rounded to ctype: ~3 roundings
    of ctype in all, where exp(j log dA) in complex64 would lose ~j*eps*|log dA| (the
    rounding of log dA amplified by j), and at the cost of one complex multiply per entry
    instead of a complex128 exp. Everything is laid out (Hg, T, m) so that the real views
    need no transposed copies.

    Returns:
        k: (Hg, T) real cdt, the S4D kernel's first T taps.
        w_ux: (Hg, T, 2m) real cdt, M_ux as a real matrix: u (.., T) @ w_ux = view_as_real(z).
        w_xy: (Hg, T, 2m) real cdt, M_xy as a real matrix:
            view_as_real(s) (.., 2m) @ w_xy^T = 2 Re(sum_n C_n dA_n^(j+1) s_n).
        logA: (Hg, m) complex128, log dA (for the powers dA^(dT) of the scan and dA^r).
    """
    Hg, m = _shape(dA)
    logA = torch.log(dA.to(torch.complex128))
    b = math.isqrt(T) + 1
    nq = -(-(T + 1) // b)
    r = torch.arange(b, device=dA.device, dtype=torch.float64)
    lo = torch.exp(r[:, None] * logA.unsqueeze(1)).to(ctype)  # (Hg, b, m): dA^r
    hi = torch.exp((b * r[:nq])[:, None] * logA.unsqueeze(1)).to(ctype)  # (Hg, nq, m): dA^(q b)
    V = (hi.unsqueeze(2) * lo.unsqueeze(1)).flatten(1, 2)[:, :T + 1]  # (Hg, T+1, m): dA^j
    dB, C = dB.to(ctype).unsqueeze(1), C.to(ctype).unsqueeze(1)  # (Hg, 1, m)
    k = 2 * (V[:, :T] @ (C * dB).transpose(1, 2)).real.squeeze(-1)  # (Hg, T)
    # M_ux[i, n] = dA^(T-1-i) dB: its real view (Hg, T, m, 2) is the interleaved (re, im)
    # column order of view_as_real(z).
    w_ux = torch.view_as_real(V[:, :T].flip(1) * dB).reshape(Hg, T, 2 * m)
    # 2 Re(M s) = 2 Re(M) Re(s) - 2 Im(M) Im(s): columns (2n, 2n+1) = (2 Re, -2 Im) of
    # M_xy[j, n] = C_n dA_n^(j+1), i.e. the real view of conj(2 C dA^(j+1)).
    w_xy = torch.view_as_real((2 * C * V[:, 1:]).conj_physical()).reshape(Hg, T, 2 * m)
    return k.to(cdt), w_ux.to(cdt), w_xy.to(cdt), logA


def _to_complex(zr):
    """(..., 2m) real, interleaved (re, im) -> (..., m) complex."""
    zr = zr.unflatten(-1, (-1, 2))
    return torch.complex(zr[..., 0], zr[..., 1])


def _to_real(s):
    """(..., m) complex -> (..., 2m) real, interleaved (re, im)."""
    return torch.view_as_real(s.resolve_conj()).flatten(-2)


def _scan(z, logA, T, ctype):
    """s_c = dA^T s_(c-1) + z_c along dim 2 of z (B, Hg, C, m), s_(-1) = 0: log2(C) steps.

    After the step with offset d, s_c sums a^i z_(c-i) for i < 2d (a = dA^T); the
    multiplier a^d = exp(d T log dA) is taken in complex128 rather than by repeated
    squaring, whose relative error doubles with every squaring.
    """
    n = z.shape[2]
    d = 1
    while d < n:
        ad = torch.exp(logA * float(d * T)).to(ctype).unsqueeze(1)  # (Hg, 1, m)
        z = torch.cat([z[:, :, :d], z[:, :, d:] + ad * z[:, :, :-d]], dim=2)
        d *= 2
    return z


def _group_conv(u, dA, dB, C, D, s0, T, want_state, cdt, ctype, y=None):
    """State passing for a group of Hg channels: (y (B, Hg, L), the final state). Writes into
    y when it is given (else a new tensor).

    u (B, Hg, L) any strides, dA/dB/C (Hg, m), D (Hg,) or None, s0 (B, Hg, m) or None.
    """
    B, Hg, L = _shape(u)
    if y is None:
        y = torch.empty(B, Hg, L, dtype=u.dtype, device=u.device)
    m = int(dA.shape[1])
    k, w_ux, w_xy, logA = _chunk_operators(dA, dB, C, T, cdt, ctype)
    Df = None if D is None else D.to(cdt)
    Cf, r = divmod(L, T)  # full chunks and the tail's length (0: none); Cf >= 1 as T <= L
    budget = _GROUP_ELEMS["cuda" if u.is_cuda else "cpu"]
    if not u.is_cuda:  # float32 temporaries of at most 1/16 of the group's input each
        budget = min(budget, max(1 << 16, B * Hg * L * u.element_size() // 64))
    G = _even_split(Cf, budget // (B * Hg * T))  # chunks per batch in passes 1 and 3

    # Pass 1: local states z_c = M_ux u^(c) of the full chunks, (B, Hg, Cf, m) complex.
    z = []
    for c0 in range(0, Cf, G):
        c1 = min(Cf, c0 + G)
        uc = u[:, :, c0 * T:c1 * T].unfold(-1, T, T).to(cdt)  # (B, Hg, g, T) view unless cast
        z.append(_to_complex(torch.einsum("bhgt,htn->bhgn", uc, w_ux)))
    z = torch.cat(z, dim=2).to(ctype)
    if s0 is not None:
        z0 = z[:, :, :1] + torch.exp(logA * float(T)).to(ctype).unsqueeze(1) * s0.unsqueeze(2)
        z = torch.cat([z0, z[:, :, 1:]], dim=2)

    # Pass 2: the scan. s[:, :, c] is the state after chunk c.
    s = _scan(z, logA, T, ctype)
    del z
    first = s0 if s0 is not None else torch.zeros(B, Hg, m, dtype=ctype, device=u.device)
    prev = torch.cat([first.unsqueeze(2), s[:, :, :-1]], dim=2)  # state before chunk c
    prev_r = _to_real(prev)  # (B, Hg, C, 2m)

    # Pass 3: y^(c) = fftconv(u^(c), k) + D u^(c) + M_xy s_(c-1), G chunks per fftconv call.
    for c0 in range(0, Cf, G):
        c1 = min(Cf, c0 + G)
        g = c1 - c0
        uc = u[:, :, c0 * T:c1 * T].unfold(-1, T, T)  # (B, Hg, g, T)
        # Chunks become batch rows: (B*g, Hg, T); cast to the compute dtype first so the
        # chunk convolution is not rounded to bf16/fp16 before the correction is added.
        rows = uc.permute(0, 2, 1, 3).reshape(B * g, Hg, T).to(cdt)
        conv = fftconv(rows, k, Df).view(B, g, Hg, T).permute(0, 2, 1, 3)
        corr = torch.einsum("bhgn,htn->bhgt", prev_r[:, :, c0:c1], w_xy)
        y[:, :, c0 * T:c1 * T] = (conv + corr).reshape(B, Hg, g * T).to(y.dtype)

    last = s[:, :, Cf - 1]  # state after the last full chunk, (B, Hg, m)
    if r:
        # The tail chunk (length r < T): the first r columns of M_xy, and its state uses
        # the last r rows of M_ux (dA^(r-1-i) dB) and dA^r.
        ut = u[:, :, Cf * T:].to(cdt)  # (B, Hg, r)
        corr = torch.einsum("bhn,htn->bht", _to_real(last), w_xy[:, :r])
        y[:, :, Cf * T:] = (fftconv(ut, k, Df) + corr).to(y.dtype)
        if want_state:
            zt = _to_complex(torch.einsum("bht,htn->bhn", ut, w_ux[:, T - r:])).to(ctype)
            last = torch.exp(logA * float(r)).to(ctype) * last + zt
    return y, last


def ssm_conv(u, dA, dB, C, D=None, *, chunk=None, state=None, return_state=False):
    """Output of the diagonal (S4D) SSM over u by state passing (chunked FFT convolution).

    Computes, for every (b, h) and t < L, with s_(-1) = ``state`` (zeros if None)::

        s_t = dA * s_(t-1) + dB * u_t                 (N/2 complex modes per channel)
        y_t = 2 Re(sum_n C_n s_(t,n)) + D u_t

    which equals ``fftconv(u, k, D)`` for the S4D kernel ``k_j = 2 Re(sum_n C_n dA_n^j dB_n)``
    of length L (flashconv.ssm.s4d_kernel) when ``state`` is None, without ever forming
    k beyond its first T taps: each chunk of T steps is ``fftconv(u_chunk, k[:T])`` plus
    ``2 Re(sum_n C_n dA_n^(j+1) s_prev,n)`` from the state carried in, and the states are
    carried chunk to chunk (module docstring). Feeding a sequence in pieces, passing each
    call's returned state to the next, equals one call on the whole sequence.

    Args:
        u: (B, H, L) torch.Tensor, float32, float16, bfloat16 or float64, CPU or CUDA, any
            strides.
        dA, dB, C: (H, N/2) complex64 or complex128: the discretised SSM
            (flashconv.ssm.discretize / S4DKernel.discretize()).
        D: optional (H,) real skip term.
        chunk: chunk length T (default DEFAULT_CHUNK = 2048, clamped to L). Need not
            divide L: the last chunk is shorter.
        state: optional (B, H, N/2) complex state before u[..., 0].
        return_state: also return the state after u[..., L-1].

    Returns:
        y (B, H, L) in u's dtype, or (y, state) with state (B, H, N/2) complex64
        (complex128 for float64 u). Computed in float32/complex64, or
        float64/complex128 when u is float64 (the chunk powers dA^j are built from
        complex128 exponentials either way). Differentiable with respect to u, dA, dB, C, D and state.

    Raises:
        TypeError: u not a real floating tensor; dA, dB, C or state not complex; D not real.
        ValueError: shapes other than the above, mixed devices, chunk not a positive int.
    """
    B, H, L, m, T = _validate(u, dA, dB, C, D, chunk, state)
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    ctype = torch.complex128 if cdt == torch.float64 else torch.complex64
    s0 = None if state is None else state.to(ctype)
    if L == 0 or B == 0 or H == 0:
        y = torch.zeros(B, H, L, dtype=u.dtype, device=u.device)
        if return_state:
            # No steps taken: the state comes back unchanged.
            final = s0.clone() if s0 is not None else torch.zeros(B, H, m, dtype=ctype, device=u.device)
            return y, final
        return y
    y = torch.empty(B, H, L, dtype=u.dtype, device=u.device)
    Hg = _even_split(H, _VANDER_ELEMS // (m * (T + 1)))  # channels per Vandermonde build
    # Under autograd every group is checkpointed: its forward keeps nothing for the backward
    # (which runs it again, one group at a time), so memory beyond input and output stays a
    # few group-sized temporaries instead of copies of u for the saved chunk batches.
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, dA, dB, C, D, state))
    if grad:  # each group's output is a temporary there: at most a quarter of y
        Hg = min(Hg, -(-H // 4))
    finals = []
    for h0 in range(0, H, Hg):
        h1 = min(H, h0 + Hg)
        args = (u[:, h0:h1], dA[h0:h1], dB[h0:h1], C[h0:h1], None if D is None else D[h0:h1],
                None if s0 is None else s0[:, h0:h1], T, return_state, cdt, ctype)
        if grad:
            from torch.utils.checkpoint import checkpoint

            yg, last = checkpoint(_group_conv, *args, use_reentrant=False)
            y[:, h0:h1] = yg
            del yg
        else:
            _, last = _group_conv(*args, y=y[:, h0:h1])
        finals.append(last)
        _memory.release(not u.is_cuda)  # the group's temporaries (flashconv/_memory.py)
    if return_state:
        return y, torch.cat(finals, dim=1)
    return y
