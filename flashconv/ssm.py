"""SSM convolution kernels (S4D diagonal, shift) and their recurrences.

Every kernel here is the impulse response of a discrete linear recurrence, and the
module exposes both views so that the convolutional forward (``flashconv.fftconv``),
the O(1)-per-token decoder and state passing (docs/state-passing.md) all use the same
numbers.

S4D (diagonal, complex). The code base's convention: the state keeps N/2 complex
modes per channel and the other N/2 are their conjugates, which is why outputs carry
a factor 2 and a real part::

    s_t = dA * s_{t-1} + dB * u_t                     s: (..., H, N/2) complex
    y_t = 2 * Re(sum_n C_n s_{t,n})                   (the layer adds D * u_t)
    k_j = 2 * Re(sum_n C_n dB_n dA_n^j)               = Re(Vandermonde(dA) @ (2 C dB))

Shift SSM (H3): A is the m x m down-shift matrix and B = e1, so the state is the
last m inputs (newest first) and the kernel is C itself, a causal FIR filter::

    s_t = (u_t, u_{t-1}, ..., u_{t-m+1})              s: (..., H, m) real
    y_t = sum_i C_i s_{t,i}                           k_j = C_j for j < m, else 0

The free functions take plain tensors; the modules own the parameters and call them.
"""
import math

import torch
import torch.nn as nn

__all__ = [
    "s4d_init_A",
    "discretize",
    "s4d_kernel",
    "s4d_step",
    "s4d_state_from_inputs",
    "s4d_state_output",
    "shift_kernel",
    "shift_step",
    "shift_state_from_inputs",
    "S4DKernel",
    "ShiftKernel",
]

_INITS = ("lin", "inv")
_DISCS = ("zoh", "bilinear")


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _check_length(L):
    if isinstance(L, bool) or not isinstance(L, int):
        raise TypeError(f"L must be an int, got {type(L).__name__}")
    if L < 0:
        raise ValueError(f"L must be >= 0, got {L}")


def _complex_dtype(dtype):
    """Complex dtype that carries ``dtype``'s precision (float64 -> complex128)."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def s4d_init_A(H, d_state, init="lin", dtype=torch.float32, device=None):
    """Diagonal state matrix of S4D, one copy per channel.

    Args:
        H: number of channels.
        d_state: state size N (even); N/2 complex modes are returned.
        init: ``"lin"`` (S4D-Lin, ``A_n = -1/2 + i*pi*n``) or ``"inv"``
            (S4D-Inv, ``A_n = -1/2 + i*(N/pi)*(N/(2n+1) - 1)``).
        dtype: real dtype whose precision the complex result carries.

    Returns:
        A: (H, N/2) complex.
    """
    _check_positive_int("H", H)
    _check_positive_int("d_state", d_state)
    if d_state % 2:
        raise ValueError(f"d_state must be even (N/2 complex modes), got {d_state}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    n = torch.arange(d_state // 2, dtype=dtype, device=device)
    if init == "lin":
        imag = math.pi * n
    else:
        imag = (d_state / math.pi) * (d_state / (2 * n + 1) - 1)
    real = torch.full_like(n, -0.5)
    return torch.complex(real, imag).expand(H, -1).clone()


def discretize(A, B, dt, method="zoh"):
    """Discretise a diagonal continuous-time SSM with step ``dt``.

    Args:
        A: (H, N/2) complex, continuous-time eigenvalues (real part < 0).
        B: (H, N/2) complex, or anything broadcastable to it.
        dt: (H,) real, positive step sizes.
        method: ``"zoh"`` (``dA = exp(dt A)``, ``dB = (exp(dt A) - 1) / A * B``) or
            ``"bilinear"`` (``dA = (1 + dt A/2) / (1 - dt A/2)``,
            ``dB = dt / (1 - dt A/2) * B``).

    Returns:
        (dA, dB): both (H, N/2) complex.
    """
    if method not in _DISCS:
        raise ValueError(f"method must be one of {_DISCS}, got {method!r}")
    dtA = A * dt.unsqueeze(-1)
    if method == "zoh":
        dA = torch.exp(dtA)
        dB = _expm1(dtA) / A * B  # exp(dt A) - 1 without cancellation at small dt
    else:
        denom = 1.0 - dtA / 2
        dA = (1.0 + dtA / 2) / denom
        dB = dt.unsqueeze(-1) / denom * B
    return dA, dB


def _expm1(z):
    """exp(z) - 1 for complex z, accurate for small |z| (torch.expm1 is real-only):
    (expm1(a) cos b - 2 sin^2(b/2)) + i exp(a) sin b."""
    a, b = z.real, z.imag
    s = torch.sin(b / 2)
    return torch.complex(torch.expm1(a) * torch.cos(b) - 2 * s * s, torch.exp(a) * torch.sin(b))


def _powers(dA, exponents, log_dA=None):
    """dA^j for every j in ``exponents``: (..., N/2) -> (..., N/2, len(exponents)).

    Taken as exp(j log dA): one transcendental per entry instead of a sequential
    product, and exact in j because log's 2*pi ambiguity vanishes for integer j.
    log_dA: log dA itself where the caller has it unrounded (ZOH: dt A), as state-spaces/s4
    computes its Vandermonde matrix, exp(dt A j). log(exp(dt A)) after rounding dA loses
    the small real part's digits at small dt (dt = 1e-3: float32 dA is 1 - 5e-4 to 6e-8,
    a relative error of 1e-4 in log |dA| that j multiplies).
    """
    if log_dA is None:
        log_dA = torch.log(dA)
    return torch.exp(log_dA.unsqueeze(-1) * exponents.to(dA.real.dtype))


def s4d_kernel(dA, dB, C, L, dtA=None):
    """S4D convolution kernel ``k[h, j] = 2 Re(sum_n C[h,n] dB[h,n] dA[h,n]^j)``.

    Args:
        dA, dB, C: (H, N/2) complex (from :func:`discretize` and the layer's C).
        L: kernel length.
        dtA: (H, N/2) complex dt * A for a ZOH discretisation (dA = exp(dt A)): the
            powers are then exp(dt A j), as state-spaces/s4 computes them, instead of
            exp(j log dA) after rounding dA (at dt = 1e-3, L = 16K-64K float32 that is
            6x less accurate over the whole kernel, 29x over its last 10% of taps).
            None (bilinear, or dA from elsewhere): exp(j log dA).

    Returns:
        k: (H, L) real, the dtype matching dA's precision.
    """
    _check_length(L)
    j = torch.arange(L, device=dA.device)
    vander = _powers(dA, j, dtA)  # (H, N/2, L)
    return 2 * torch.einsum("hn,hnl->hl", C * dB, vander).real


def s4d_step(dA, dB, C, u, state):
    """One step of the S4D recurrence.

    Args:
        dA, dB, C: (H, N/2) complex.
        u: (..., H) real input at time t.
        state: (..., H, N/2) complex state after time t-1.

    Returns:
        (y, state): y (..., H) real (without the D term), the state after time t.
    """
    state = dA * state + dB * u.unsqueeze(-1)
    y = 2 * (C * state).sum(-1).real
    return y.to(u.dtype), state


def s4d_state_from_inputs(dA, dB, u, state=None):
    """State after running the recurrence over a whole chunk of inputs.

    ``s_L = dA^L s_0 + sum_j dA^(L-1-j) dB u_j``: the ``M_ux`` product of
    docs/state-passing.md, evaluated as one contraction instead of L sequential steps.

    Args:
        dA, dB: (H, N/2) complex.
        u: (..., H, L) real inputs.
        state: (..., H, N/2) complex state before the chunk, or None (zeros).

    Returns:
        (..., H, N/2) complex state after the last input.
    """
    L = u.shape[-1]
    j = torch.arange(L - 1, -1, -1, device=u.device)
    vander = _powers(dA, j)  # (H, N/2, L): dA^(L-1-j)
    out = dB * torch.einsum("...hl,hnl->...hn", u.to(dA.dtype), vander)
    if state is not None:
        out = out + dA**L * state
    return out


def s4d_state_output(dA, C, state, L):
    """Output over the next L steps due to a starting state alone (zero inputs).

    ``y_j = 2 Re(sum_n C_n dA_n^(j+1) s_n)`` for j in [0, L): the ``M_xy`` correction
    of docs/state-passing.md. Adding it to the zero-state convolution continues a
    sequence from ``state``.

    Args:
        dA, C: (H, N/2) complex.
        state: (..., H, N/2) complex.
        L: number of steps.

    Returns:
        (..., H, L) real.
    """
    _check_length(L)
    j = torch.arange(1, L + 1, device=state.device)
    vander = _powers(dA, j)  # (H, N/2, L)
    return 2 * torch.einsum("...hn,hnl->...hl", C * state, vander).real


def shift_kernel(C, L):
    """Shift-SSM kernel: the filter C, truncated or zero-padded to length L.

    Args:
        C: (H, m) real.
        L: kernel length.

    Returns:
        (H, L) real.
    """
    _check_length(L)
    m = C.shape[-1]
    if L <= m:
        return C[..., :L]
    return torch.nn.functional.pad(C, (0, L - m))


def shift_step(C, u, state):
    """One step of the shift SSM.

    Args:
        C: (H, m) real.
        u: (..., H) input at time t.
        state: (..., H, m) the last m inputs before t, newest first.

    Returns:
        (y, state): y (..., H) = sum_i C_i u_{t-i}; the state with u_t pushed in.
    """
    state = torch.cat([u.unsqueeze(-1), state[..., :-1]], dim=-1)
    return (C * state).sum(-1), state


def shift_state_from_inputs(u, m, state=None):
    """Shift-SSM state after a chunk: its last m inputs, newest first.

    Args:
        u: (..., H, L) inputs.
        m: state size.
        state: (..., H, m) state before the chunk, or None (zeros).

    Returns:
        (..., H, m).
    """
    _check_positive_int("m", m)
    if state is None:
        history = torch.nn.functional.pad(u, (m, 0))
    else:
        history = torch.cat([state.flip(-1), u], dim=-1)
    return history[..., -m:].flip(-1)


def _mark_optim(params, lr):
    """Attach S4-style optimizer hints: SSM dynamics get their own lr, no decay."""
    if lr is None:
        return
    for p in params:
        p._optim = {"lr": lr, "weight_decay": 0.0}


class S4DKernel(nn.Module):
    """S4D kernel generator: diagonal complex A, learnable log-dt and C, B = 1.

    Parameters (H = d_model, N = d_state):
        log_dt (H,): log step sizes, initialised uniformly in [log dt_min, log dt_max].
        log_A_real (H, N/2), A_imag (H, N/2): ``A = -exp(log_A_real) + i A_imag``,
            so Re A < 0 (stable) throughout training.
        C (H, N/2, 2): complex C stored as (real, imag) so ``.double()`` etc. apply.

    Args:
        d_model: channels H.
        d_state: state size N (even); N/2 complex modes are kept.
        dt_min, dt_max: range of the initial step sizes, 0 < dt_min <= dt_max.
        init: ``"lin"`` (S4D-Lin) or ``"inv"`` (S4D-Inv).
        disc: ``"zoh"`` or ``"bilinear"``.
        lr: if given, log_dt and A carry ``_optim = {"lr": lr, "weight_decay": 0}``
            for the training loop to build a parameter group from (as S4 does).

    ``forward(L)`` returns the (H, L) kernel; ``discretize()`` returns (dA, dB, C) for
    the recurrence and for state passing.
    """

    def __init__(self, d_model, d_state=64, dt_min=1e-3, dt_max=1e-1, init="lin",
                 disc="zoh", lr=None):
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("d_state", d_state)
        if d_state % 2:
            raise ValueError(f"d_state must be even (N/2 complex modes), got {d_state}")
        if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float))):
            raise TypeError("dt_min and dt_max must be numbers")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if disc not in _DISCS:
            raise ValueError(f"disc must be one of {_DISCS}, got {disc!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be positive or None, got {lr}")
        self.d_model, self.d_state, self.disc, self.init = d_model, d_state, disc, init

        A = s4d_init_A(d_model, d_state, init)
        log_dt = torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        # randn on complex draws real and imaginary parts with variance 1/2 each.
        C = torch.randn(d_model, d_state // 2, dtype=torch.complex64)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(-A.real))
        self.A_imag = nn.Parameter(A.imag.clone())
        self.C = nn.Parameter(torch.view_as_real(C).clone())
        _mark_optim([self.log_dt, self.log_A_real, self.A_imag], lr)

    def extra_repr(self):
        return (f"d_model={self.d_model}, d_state={self.d_state}, init={self.init!r}, "
                f"disc={self.disc!r}")

    def A(self):
        """Continuous-time eigenvalues, (H, N/2) complex."""
        return torch.complex(-torch.exp(self.log_A_real), self.A_imag)

    def discretize(self):
        """Discrete SSM of the current parameters: (dA, dB, C), each (H, N/2) complex."""
        A = self.A()
        dA, dB = discretize(A, torch.ones_like(A), torch.exp(self.log_dt), self.disc)
        return dA, dB, torch.view_as_complex(self.C)

    def forward(self, L):
        """Kernel (H, L), real, in the parameters' dtype. ZOH: powers exp(dt A j), as
        state-spaces/s4 computes them (s4d_kernel's dtA)."""
        dA, dB, C = self.discretize()
        dtA = self.A() * torch.exp(self.log_dt).unsqueeze(-1) if self.disc == "zoh" else None
        return s4d_kernel(dA, dB, C, L, dtA)

    def default_state(self, *batch_shape):
        """Zero state (*batch_shape, H, N/2), complex."""
        return torch.zeros(*batch_shape, self.d_model, self.d_state // 2,
                           dtype=_complex_dtype(self.log_dt.dtype), device=self.log_dt.device)

    def step(self, u, state):
        """One recurrence step: u (..., H), state (..., H, N/2) -> (y (..., H), state)."""
        dA, dB, C = self.discretize()
        return s4d_step(dA, dB, C, u, state)

    def state_from_inputs(self, u, state=None):
        """State after the inputs u (..., H, L), starting from ``state`` (or zeros)."""
        dA, dB, _ = self.discretize()
        return s4d_state_from_inputs(dA, dB, u, state)


class ShiftKernel(nn.Module):
    """Shift-SSM kernel generator (H3's ``SSM_shift``): a learnable causal filter.

    A is the shift matrix and B = e1, so the kernel is C (H, m) zero-padded to L.
    C starts like a ``Conv1d`` weight of fan-in m, uniform in [-1/sqrt(m), 1/sqrt(m)].

    Args:
        d_model: channels H.
        d_state: filter length m (the state is the last m inputs).
    """

    def __init__(self, d_model, d_state=64):
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("d_state", d_state)
        self.d_model, self.d_state = d_model, d_state
        bound = 1.0 / math.sqrt(d_state)
        self.C = nn.Parameter(torch.empty(d_model, d_state).uniform_(-bound, bound))

    def extra_repr(self):
        return f"d_model={self.d_model}, d_state={self.d_state}"

    def forward(self, L):
        """Kernel (H, L), real."""
        return shift_kernel(self.C, L)

    def default_state(self, *batch_shape):
        """Zero state (*batch_shape, H, m)."""
        return torch.zeros(*batch_shape, self.d_model, self.d_state,
                           dtype=self.C.dtype, device=self.C.device)

    def step(self, u, state):
        """One step: u (..., H), state (..., H, m) -> (y (..., H), state)."""
        return shift_step(self.C, u, state)

    def state_from_inputs(self, u, state=None):
        """State after the inputs u (..., H, L), starting from ``state`` (or zeros)."""
        return shift_state_from_inputs(u, self.d_state, state)
