"""Thin sequence-model layers on top of ``flashconv.fftconv``: S4D and H3.

Both take and return (B, L, d_model) like the S4/H3 code bases and transpose to the
(B, H, L) layout of ``fftconv`` inside. Each layer also decodes one token at a time::

    state = layer.allocate_state(batch)          # or: y, state = layer.prefill(prompt)
    y_t, state = layer.step(u_t, state)          # u_t, y_t: (B, d_model)

and the recurrence reproduces the convolutional forward up to rounding, because both
use the same discretised SSM (see ``flashconv.ssm``).

``S4D(..., bidirectional=True)`` is the non-causal layer the Long Range Arena models
use: a second, anti-causal kernel k_rev adds ``sum_{s>=0} k_rev[h,s] u[t+s]`` (H3's
convention, lag 0 counted by both kernels). It has no ``step()``: an output depends on
inputs that a decoder has not seen yet.

Sequence parallel: ``S4D(..., group=g)`` and ``H3(..., group=g)`` (or ``layer.group = g``)
take each rank's piece of the sequences, (B, L_r, d_model), contiguous pieces in rank order
over the torch.distributed group g, and return that piece of the output of the whole
sequences (flashconv.distributed: the diagonal SSM by state passing with a scan of the
ranks' states, H3's shift SSM by a halo of d_state - 1 inputs). Parameter gradients are then
each rank's share: ``flashconv.distributed.reduce_gradients(layer, g)`` sums them.
"""
from typing import NamedTuple

import torch
import torch.nn as nn

import flashconv
from flashconv.ssm import S4DKernel, ShiftKernel, _check_positive_int

__all__ = ["S4D", "H3", "H3State"]


def _check_input(u, d_model, ndim=3):
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a torch.Tensor, got {type(u).__name__}")
    if u.layout != torch.strided:
        raise TypeError(f"u is a {str(u.layout).replace('torch.', '')} tensor: pass a dense "
                        f"(strided) tensor (u.to_dense())")
    if not u.is_floating_point():
        raise TypeError(f"u must be a floating tensor (float32, float16, bfloat16 or float64), "
                        f"got {u.dtype}")
    shape = "(B, L, d_model)" if ndim == 3 else "(B, d_model)"
    if u.dim() != ndim or u.shape[-1] != d_model:
        raise ValueError(f"u must have shape {shape} with d_model={d_model}, "
                         f"got {tuple(u.shape)}")


def _check_whole(layer, what):
    if getattr(layer, "group", None) is not None:
        raise RuntimeError(f"{type(layer).__name__}.{what}() runs on whole sequences: set "
                           f"layer.group = None for it (the layer is sequence parallel)")


class S4D(nn.Module):
    """S4D layer: ``y = OutLinear(Dropout(GELU(conv(u, k) + D u)))``.

    The kernel k is :class:`flashconv.ssm.S4DKernel`; the output mixing is a linear
    map to 2*d_model followed by a GLU (as the S4D reference), or a plain linear map
    when ``glu=False``.

    Bidirectional (``bidirectional=True``), as S4 does it: one S4DKernel of 2*d_model
    channels whose first half is the causal kernel k and second half the anti-causal
    kernel k_rev, so ``conv(u, k)`` becomes
    ``sum_{s>=0} k[h,s] u[t-s] + sum_{s>=0} k_rev[h,s] u[t+s]`` (H3's convention: lag 0
    is counted by both kernels). Decoding (``step``, ``prefill``, ``allocate_state``)
    raises for such a layer.

    Under ``torch.autocast`` the convolution reads and writes the autocast dtype:
    fftconv accumulates in float32 internally, so, like a matmul, it only rounds its
    input and output, and a half-precision input is what selects the fused CUDA kernel
    for the longest sequences.

    Args:
        d_model: channels H.
        d_state: SSM state size N (even; N/2 complex modes per channel).
        dropout: dropout probability after the activation.
        glu: use the Linear(H, 2H) + GLU output; otherwise Linear(H, H).
        dt_min, dt_max, init, disc, lr: passed to :class:`~flashconv.ssm.S4DKernel`.
        bidirectional: add the anti-causal kernel k_rev (non-causal layer, no decoding).
        group: a torch.distributed process group to run sequence parallel over: forward
            takes this rank's piece (B, L_r, d_model) of the sequences (module docstring);
            None (default): whole sequences. Causal layers only.

    Shapes:
        forward: u (B, L, d_model) -> y (B, L, d_model).
        step: u_t (B, d_model), state (B, d_model, N/2) complex -> (y_t, state).
    """

    def __init__(self, d_model, d_state=64, dropout=0.0, glu=True, dt_min=1e-3,
                 dt_max=1e-1, init="lin", disc="zoh", lr=None, bidirectional=False,
                 group=None):
        super().__init__()
        if bidirectional and group is not None:
            raise ValueError("S4D: a bidirectional layer cannot run sequence parallel (group=): "
                             "its anti-causal kernel needs the inputs after each rank's piece")
        self.group = group
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
        _check_positive_int("d_model", d_model)  # before doubling it for the kernel
        self.bidirectional = bidirectional
        # (2H) channels when bidirectional: rows [0, H) give k, rows [H, 2H) give k_rev.
        channels = 2 * d_model if bidirectional else d_model
        self.kernel = S4DKernel(channels, d_state, dt_min, dt_max, init, disc, lr)
        self.d_model = d_model
        self.D = nn.Parameter(torch.randn(d_model))
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if glu:
            self.output_linear = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GLU(dim=-1))
        else:
            self.output_linear = nn.Linear(d_model, d_model)

    def _mix(self, y):
        """Pointwise part after the SSM: (..., d_model) -> (..., d_model)."""
        return self.output_linear(self.dropout(self.activation(y)))

    def extra_repr(self):
        return f"d_model={self.d_model}, bidirectional={self.bidirectional}"

    def kernels(self, L):
        """Convolution kernels for length L: (k, k_rev), each (H, L); k_rev is None
        unless the layer is bidirectional."""
        k = self.kernel(L)
        if not self.bidirectional:
            return k, None
        return k[: self.d_model], k[self.d_model:]

    def conv(self, x, k, k_rev):
        """The SSM convolution with skip term: x (B, H, L) -> conv(x, k) + D x (+ k_rev term).

        The one place the layer calls fftconv: benchmarks subclass S4D and override this
        to time another implementation inside the same model.
        """
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        if k_rev is None:
            return flashconv.fftconv(x, k, self.D)
        # One call: fftconv multiplies by the spectrum rfft(k) + conj(rfft(k_rev)).
        return flashconv.fftconv(x, k, self.D, k_rev=k_rev)

    def forward(self, u):
        """u (B, L, d_model) -> (B, L, d_model); with ``group``, this rank's piece of L."""
        _check_input(u, self.d_model)
        if self.group is not None:
            y = self._conv_sequence_parallel(u.transpose(1, 2))
        else:
            y = self.conv(u.transpose(1, 2), *self.kernels(u.shape[1]))
        return self._mix(y.transpose(1, 2))

    def _conv_sequence_parallel(self, x):
        """conv(x, k) + D x for this rank's piece x (B, H, L_r) of sequences split over
        self.group: state passing with the ranks' states scanned (no length-L kernel)."""
        from flashconv import distributed

        if self.bidirectional:
            raise RuntimeError("S4D: a bidirectional layer cannot run sequence parallel "
                               "(group is set)")
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        dA, dB, C = self.kernel.discretize()
        return distributed.ssm_conv(x, dA, dB, C, self.D, group=self.group)

    def _check_causal(self, what):
        if self.bidirectional:
            raise RuntimeError(
                f"S4D.{what}() is undefined for a bidirectional layer: its output at time t "
                "depends on the inputs after t (the anti-causal kernel k_rev), which a "
                "decoder has not seen yet. Run forward() on the whole sequence instead.")

    def allocate_state(self, batch):
        """Zero decoding state: (batch, d_model, d_state/2) complex."""
        self._check_causal("allocate_state")
        return self.kernel.default_state(batch)

    def prefill(self, u):
        """Run a prompt u (B, L, d_model): returns (forward(u), state after u)."""
        self._check_causal("prefill")
        _check_whole(self, "prefill")
        return self.forward(u), self.kernel.state_from_inputs(u.transpose(1, 2))

    def step(self, u, state):
        """Decode one token: u (B, d_model), state -> (y (B, d_model), new state)."""
        self._check_causal("step")
        _check_input(u, self.d_model, ndim=2)
        y, state = self.kernel.step(u, state)
        return self._mix(y + self.D * u), state


class H3State(NamedTuple):
    """Decoding state of an :class:`H3` layer.

    shift: (B, d_model, m) the last m keys, newest first.
    diag: (B, head_dim, head_dim, n_heads, d_state/2) complex, one diagonal SSM state
        per entry of every head's K V^T.
    """

    shift: torch.Tensor
    diag: torch.Tensor


class H3(nn.Module):
    """H3 layer (Fu, Dao et al. 2022, Algorithm 1).

    ``Q, K, V = u Wq, u Wk, u Wv``; ``K = SSM_shift(K)``; per head
    ``KV = SSM_diag(K V^T)`` (head_dim x head_dim); ``O = Q . KV`` (contracted over
    the K index); ``out = O Wo``. Channel ``h*head_dim + i`` of Q/K/V is entry i of
    head h. Both SSMs have a D skip term, as in the H3 code base.

    With head_dim 1 the diagonal SSM and both multiplicative interactions are one
    gated ``fftconv(V, k_diag, D, g_in=K_shifted, g_out=Q)``; with larger heads the
    K V^T products form ``d_model * head_dim`` channels that share their head's kernel.

    Args:
        d_model: model width.
        d_state: state size of both SSMs (shift filter length m and diagonal N).
        head_dim: head size d; must divide d_model.
        dt_min, dt_max, init, disc, lr: for the diagonal SSM's
            :class:`~flashconv.ssm.S4DKernel`.
        group: a torch.distributed process group to run sequence parallel over: forward
            takes this rank's piece (B, L_r, d_model) of the sequences (module docstring);
            None (default): whole sequences.

    Shapes:
        forward: u (B, L, d_model) -> (B, L, d_model).
        step: u_t (B, d_model), :class:`H3State` -> (y_t (B, d_model), H3State).
    """

    def __init__(self, d_model, d_state=64, head_dim=1, dt_min=1e-3, dt_max=1e-1,
                 init="lin", disc="zoh", lr=None, group=None):
        super().__init__()
        self.group = group
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise TypeError(f"head_dim must be an int, got {type(head_dim).__name__}")
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if isinstance(d_model, int) and d_model % head_dim:
            raise ValueError(f"head_dim={head_dim} must divide d_model={d_model}")
        self.shift_kernel = ShiftKernel(d_model, d_state)
        self.d_model, self.head_dim = d_model, head_dim
        self.n_heads = d_model // head_dim
        self.kernel = S4DKernel(self.n_heads, d_state, dt_min, dt_max, init, disc, lr)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.D_shift = nn.Parameter(torch.randn(d_model))
        self.D = nn.Parameter(torch.randn(self.n_heads))
        self.output_linear = nn.Linear(d_model, d_model)

    def _forward(self, u):
        """Shared by forward and prefill: returns (y, k before the shift SSM, K V^T)."""
        _check_input(u, self.d_model)
        B, L, _ = u.shape
        H, d = self.n_heads, self.head_dim
        # (B, d_model, L) each: fftconv's layout.
        q, k, v = (proj(u).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.group is not None:
            return self._forward_sequence_parallel(q, k, v)
        k_shift = flashconv.fftconv(k, self.shift_kernel(L), self.D_shift)
        k_diag = self.kernel(L)  # (H, L)
        if d == 1:
            y = flashconv.fftconv(v, k_diag, self.D, g_in=k_shift, g_out=q)
            kv = None
        else:
            # (B, d1, d2, H, L): K_i V_j per head; flattened, the channel index is
            # (i*d + j)*H + h, so the H kernels tile d*d times.
            kv = (k_shift.view(B, H, d, 1, L).permute(0, 2, 3, 1, 4)
                  * v.view(B, H, 1, d, L).permute(0, 2, 3, 1, 4))
            y = flashconv.fftconv(kv.reshape(B, d * d * H, L), k_diag.repeat(d * d, 1),
                                  self.D.repeat(d * d))
            y = y.view(B, d, d, H, L)
            # O[h, j] = sum_i Q[h, i] * KV[i, j, h]
            y = torch.einsum("bhil,bijhl->bhjl", q.view(B, H, d, L), y).reshape(B, H * d, L)
        return self.output_linear(y.transpose(1, 2)), k, (k_shift, v, kv)

    def _forward_sequence_parallel(self, q, k, v):
        """_forward for this rank's piece of sequences split over self.group: the shift SSM
        by distributed.fftconv (a halo of d_state - 1 keys), the diagonal SSM by
        distributed.ssm_conv (states scanned across ranks)."""
        from flashconv import distributed

        B, _, L = q.shape
        H, d = self.n_heads, self.head_dim
        k_shift = distributed.fftconv(k, self.shift_kernel.C, self.D_shift, group=self.group)
        dA, dB, C = self.kernel.discretize()
        if d == 1:
            y = q * distributed.ssm_conv(k_shift * v, dA, dB, C, self.D, group=self.group)
        else:
            kv = (k_shift.view(B, H, d, 1, L).permute(0, 2, 3, 1, 4)
                  * v.view(B, H, 1, d, L).permute(0, 2, 3, 1, 4))
            n = d * d
            y = distributed.ssm_conv(kv.reshape(B, n * H, L), dA.repeat(n, 1), dB.repeat(n, 1),
                                     C.repeat(n, 1), self.D.repeat(n), group=self.group)
            y = y.view(B, d, d, H, L)
            y = torch.einsum("bhil,bijhl->bhjl", q.view(B, H, d, L), y).reshape(B, H * d, L)
        return self.output_linear(y.transpose(1, 2)), k, None

    def forward(self, u):
        """u (B, L, d_model) -> (B, L, d_model); with ``group``, this rank's piece of L."""
        return self._forward(u)[0]

    def allocate_state(self, batch):
        """Zero :class:`H3State` for ``batch`` sequences."""
        d = self.head_dim
        return H3State(self.shift_kernel.default_state(batch),
                       self.kernel.default_state(batch, d, d))

    def prefill(self, u):
        """Run a prompt u (B, L, d_model): returns (forward(u), H3State after u)."""
        _check_whole(self, "prefill")
        y, k, (k_shift, v, kv) = self._forward(u)
        B, L, _ = u.shape
        if kv is None:
            kv = (k_shift * v).reshape(B, 1, 1, self.n_heads, L)
        shift = self.shift_kernel.state_from_inputs(k)
        diag = self.kernel.state_from_inputs(kv)
        return y, H3State(shift, diag)

    def step(self, u, state):
        """Decode one token: u (B, d_model), :class:`H3State` -> (y (B, d_model), state)."""
        _check_input(u, self.d_model, ndim=2)
        if not isinstance(state, H3State):
            raise TypeError(f"state must be an H3State, got {type(state).__name__}")
        B = u.shape[0]
        H, d = self.n_heads, self.head_dim
        q, k, v = self.q_proj(u), self.k_proj(u), self.v_proj(u)
        k_shift, shift = self.shift_kernel.step(k, state.shift)
        k_shift = k_shift + self.D_shift * k
        kv = torch.einsum("bhi,bhj->bijh", k_shift.view(B, H, d), v.view(B, H, d))
        y, diag = self.kernel.step(kv, state.diag)
        y = y + self.D * kv
        o = torch.einsum("bhi,bijh->bhj", q.view(B, H, d), y).reshape(B, H * d)
        return self.output_linear(o), H3State(shift, diag)
