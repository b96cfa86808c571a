"""One sequence across processes: sequence-parallel fftconv and SSM state passing.

Every rank of a torch.distributed process group (NCCL on GPUs, gloo on CPUs) holds one
contiguous piece of each sequence, in rank order: rank r holds positions [off_r, off_r + L_r)
of a sequence of length L = sum_r L_r, any lengths (a rank may hold a single step, or none).
Parameters (k, D, dA, dB, C) are replicated: every rank passes the same values. Outputs come
back sharded like the input, and are those of the single-process op on the whole sequence up
to rounding.

    ssm_conv(u_local, dA, dB, C, D)       an S4D (diagonal) SSM of any length; only states
                                          cross ranks (docs/distributed.md):
        1. each rank runs flashconv.state_passing.ssm_conv on its piece from a zero state and
           keeps its final state z_r (B, H, m) complex;
        2. an all_gather of the z_r, then the exclusive scan S_(r+1) = dA^(L_r) S_r + z_r on
           every rank (S_0 = 0): S_r is the true state before rank r's first step;
        3. each rank adds the correction y_j += 2 Re(sum_n C_n dA_n^(j+1) S_r,n), chunk by
           chunk with state_passing's chunk operators.
        Backward: an all_gather of the gradients of the S_r and the reverse scan.

    fftconv(u_local, k, D, g_in, g_out)  any causal kernel (H, Lk), replicated; one of:
        "halo"       rank r receives the Lk - 1 inputs x = g_in u before its piece from the
                     rank(s) that hold them (one all_to_all), convolves [halo, piece] locally
                     with flashconv.fftconv and keeps its own outputs; backward sends the
                     halo's gradient back. Chosen when Lk - 1 <= the longest piece (a rank
                     then holds at most twice the longest piece).
        "two_level"  a distributed FFT of size N = 2 P M (M >= L / P, a multiple of P): the
                     outer stage of length 2P across ranks, the inner stage of length M on
                     each rank, four all_to_all transposes per transform; two real rows
                     (channels 2i, 2i+1) travel as one complex row. Chosen otherwise.
        Gates and D act locally. explain() (and plan_fftconv() from lengths alone) says
        which scheme serves a call, why not the other, and the bytes each rank sends.

Both validate across ranks first (one all_gather of a small int64 tensor): inconsistent B, H,
dtypes, kernel or state shapes, options or requires_grad raise a ValueError naming the
argument and the rank, on every rank; bad input on one rank raises its TypeError/ValueError
there and on every other rank (naming that rank) - never a hang. A group of one rank (or no
initialised process group and group=None) calls the single-process op itself.

Gradients: the input's gradients are exact per rank. A replicated parameter's gradient on
each rank is that rank's share; their sum over the group is the gradient for the whole
sequence: reduce_gradients(module, group) adds them (a summing all_reduce), as any
sequence-parallel model must for its other replicated parameters too.

traffic() records the bytes each collective of this module sends and receives on this rank
(payload to and from other ranks; the metadata check separately as "control").
"""
import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from flashconv import problem
from flashconv import state_passing as _sp

__all__ = ["ssm_conv", "fftconv", "explain", "plan_fftconv", "plan_ssm_conv", "Plan",
           "reduce_gradients", "traffic", "Traffic", "SCHEMES"]

SCHEMES = ("halo", "two_level")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64,
           torch.complex64, torch.complex128)
_DEVICE_TYPES = ("cpu", "cuda", "meta", "xpu", "mps")


def _dtype_code(t):
    if t is None:
        return -1
    return _DTYPES.index(t.dtype) if t.dtype in _DTYPES else 99


def _dtype_text(code):
    if code == -1:
        return "None"
    if 0 <= code < len(_DTYPES):
        return str(_DTYPES[code]).replace("torch.", "")
    return "another dtype"


def _device_code(t):
    kind = t.device.type
    return _DEVICE_TYPES.index(kind) if kind in _DEVICE_TYPES else 99


def _device_text(code):
    return _DEVICE_TYPES[code] if 0 <= code < len(_DEVICE_TYPES) else "another device"


# --- traffic accounting ----------------------------------------------------------------------

@dataclass
class Traffic:
    """Bytes this rank sent to and received from other ranks inside :func:`traffic`.

    sent / received: the data collectives (states, halos, transposes), forward and backward;
    control_sent / control_received: the metadata check; phases: the same per phase name
    ("ssm state scan", "halo", "two_level transpose 1", ..., each with " (backward)" in the
    backward), as [sent, received]."""

    sent: int = 0
    received: int = 0
    control_sent: int = 0
    control_received: int = 0
    phases: dict = field(default_factory=dict)

    def _add(self, phase, sent, received, control):
        if control:
            self.control_sent += sent
            self.control_received += received
            return
        self.sent += sent
        self.received += received
        s, r = self.phases.get(phase, (0, 0))
        self.phases[phase] = [s + sent, r + received]


_RECORDERS = []


@contextlib.contextmanager
def traffic():
    """Count the bytes this module's collectives send and receive on this rank::

        with flashconv.distributed.traffic() as t:
            y = flashconv.distributed.fftconv(u_local, k)
            y.sum().backward()
        print(t.sent, t.received, t.phases)
    """
    rec = Traffic()
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:
        _RECORDERS.remove(rec)


def _count(phase, sent, received, control=False):
    for rec in _RECORDERS:
        rec._add(phase, sent, received, control)


# --- the group and its collectives -------------------------------------------------------------

def _wire(t):
    """A tensor as the collectives carry it: complex as its real view, flat, contiguous."""
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    return t.contiguous().reshape(-1)


def _unwire(flat, shape, dtype):
    if dtype.is_complex:
        return torch.view_as_complex(flat.reshape(*shape, 2))
    return flat.reshape(shape)


def _wire_dtype(dtype):
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


class _Comm:
    """A process group as this module uses it: rank, size, the device collectives run on."""

    def __init__(self, group, rank, size, device):
        self.group, self.rank, self.size, self.device = group, rank, size, device

    def all_gather(self, t, phase, control=False):
        """(P, *t.shape): every rank's t, in rank order."""
        P = self.size
        if P == 1:
            return t.unsqueeze(0)
        flat = _wire(t)
        out = [torch.empty_like(flat) for _ in range(P)]
        dist.all_gather(out, flat, group=self.group)
        nbytes = flat.numel() * flat.element_size()
        _count(phase, (P - 1) * nbytes, (P - 1) * nbytes, control)
        return torch.stack([_unwire(o, t.shape, t.dtype) for o in out])

    def all_to_all(self, pieces, recv_shapes, dtype, phase):
        """pieces[j] goes to rank j; returns the pieces every rank sent here, recv_shapes[s]
        the shape of rank s's (one all_to_all_single with per-rank sizes)."""
        P, me = self.size, self.rank
        wdt = _wire_dtype(dtype)
        per = 2 if dtype.is_complex else 1
        flat = [_wire(p) for p in pieces]
        in_splits = [f.numel() for f in flat]
        out_splits = [math.prod(s) * per for s in recv_shapes]
        if P == 1:
            got = flat
        else:
            send = torch.cat(flat) if flat else torch.empty(0, dtype=wdt, device=self.device)
            recv = torch.empty(sum(out_splits), dtype=wdt, device=send.device)
            dist.all_to_all_single(recv, send, out_splits, in_splits, group=self.group)
            got = list(torch.split(recv, out_splits))
            esize = recv.element_size()
            _count(phase, esize * (sum(in_splits) - in_splits[me]),
                   esize * (sum(out_splits) - out_splits[me]))
        return [_unwire(g, s, dtype) for g, s in zip(got, recv_shapes)]


def _resolve_group(group, who):
    """(group, rank, size); size 1 without an initialised process group and group=None."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("%s: group was given but torch.distributed is not initialised "
                             "(torch.distributed.init_process_group)" % who)
        return None, 0, 1
    try:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
    except (RuntimeError, ValueError) as exc:
        raise ValueError("%s: group is not a process group this process belongs to (%s)"
                         % (who, exc)) from None
    if rank < 0:
        raise ValueError("%s: this process (global rank %d) is not a member of group"
                         % (who, dist.get_rank()))
    return group, rank, size


def _comm_device(group, like):
    """Where the collectives' tensors live: NCCL needs CUDA tensors, gloo CPU ones."""
    backend = dist.get_backend(group) if dist.is_initialized() else "gloo"
    if str(backend).lower() == "nccl":
        if isinstance(like, torch.Tensor) and like.is_cuda:
            return like.device
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(like, torch.Tensor) and like.device.type == "cpu":
        return like.device
    return torch.device("cpu")


def _agree(comm, who, fields, error):
    """The cross-rank check: one all_gather of [ok, field values...] (int64).

    fields: [(label, value, formatter)], formatter None: gathered only. A local error (raised before by this rank's
    validation) is re-raised here on its own rank and, naming it, on every other rank; a field
    that differs from rank 0's raises a ValueError naming the field and the rank, everywhere."""
    P = comm.size
    vals = [0 if error is not None else 1] + [0 if error is not None else int(v)
                                              for _, v, _ in fields]
    t = torch.tensor(vals, dtype=torch.int64, device=comm.device)
    table = comm.all_gather(t, "metadata", control=True).tolist()
    bad = [r for r in range(P) if table[r][0] == 0]
    if bad:
        msgs = [None] * P
        mine = None if error is None else (type(error).__name__, str(error))
        if P > 1:
            dist.all_gather_object(msgs, mine, group=comm.group)
        else:
            msgs = [mine]
        if error is not None:
            raise type(error)("%s [rank %d of %d]" % (error, comm.rank, P)) from error
        r0 = bad[0]
        kind, text = msgs[r0]
        raise (TypeError if kind == "TypeError" else ValueError)(
            "%s: rank %d of %d rejected its input: %s" % (who, r0, P, text))
    for i, (label, _, fmt) in enumerate(fields, start=1):
        if fmt is None:  # gathered, not compared (the shard lengths)
            continue
        ref = table[0][i]
        for r in range(1, P):
            if table[r][i] != ref:
                raise ValueError("%s: %s differs across ranks: %s on rank 0 but %s on rank %d "
                                 "(every rank of the group must pass the same)"
                                 % (who, label, fmt(ref), fmt(table[r][i]), r))
    return [row[1:] for row in table]


def _int(v):
    return str(v)


def _flag(v):
    return "True" if v else "False"


def _present(v):
    return "given" if v else "None"


def _grad_flag(t):
    return int(t is not None and torch.is_grad_enabled() and t.requires_grad)


def _offsets(lengths):
    offs, o = [], 0
    for n in lengths:
        offs.append(o)
        o += n
    return offs


# --- plans: which scheme, and the bytes it moves -------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How a distributed call runs, from the shard lengths alone (no arrays).

    scheme: "single" (a group of one: the single-process op), "halo", "two_level" (fftconv)
    or "state_scan" (ssm_conv). reasons: [(scheme, None if it serves the call else why not)].
    sent / received: bytes per rank, forward; sent_backward / received_backward: the backward
    with every gradient wanted (u's and the kernel's). M: the two-level transform's block
    (N = 2 P M), 0 otherwise; halo: the inputs before each rank's piece it needs."""

    op: str
    scheme: str
    lengths: tuple
    B: int
    H: int
    dtype: str
    lk: int = 0
    m: int = 0
    gated: bool = False
    reasons: tuple = ()
    sent: tuple = ()
    received: tuple = ()
    sent_backward: tuple = ()
    received_backward: tuple = ()
    M: int = 0
    halo: int = 0

    @property
    def P(self):
        return len(self.lengths)

    @property
    def L(self):
        return sum(self.lengths)

    def summary(self):
        """Text: the call, each scheme with why (not), and the bytes per rank."""
        shards = " ".join(str(n) for n in self.lengths)
        what = ("k taps (Lk used %d)%s" % (self.lk, ", g_in" if self.gated else "")
                if self.op == "fftconv" else "N/2 = %d complex modes" % self.m)
        lines = ["distributed %s: %d rank%s, B=%d H=%d L=%d (shards %s), %s, %s"
                 % (self.op, self.P, "" if self.P == 1 else "s", self.B, self.H, self.L, shards,
                    self.dtype, what)]
        width = max([len(s) for s, _ in self.reasons] + [9])
        for s, why in self.reasons:
            if why is None:
                lines.append("  %-*s  <- serves it: %s" % (width, s, _DESCRIPTIONS[s]))
            else:
                lines.append("  %-*s  no: %s" % (width, s, why))
        if self.P > 1:
            lines.append("  bytes per rank (sent, rank 0..%d): forward %s; backward %s"
                         % (self.P - 1, " ".join(_mb(b) for b in self.sent),
                            " ".join(_mb(b) for b in self.sent_backward)))
        return "\n".join(lines)


_DESCRIPTIONS = {
    "single": "one rank: the single-process op itself",
    "halo": "each rank receives the Lk - 1 inputs before its piece and convolves locally",
    "two_level": "distributed FFT of size 2 P M: outer stage across ranks (all_to_all "
                 "transposes), inner stage on each rank",
    "state_scan": "local state passing from a zero state, an all_gather of the final states "
                  "and a scan, a local correction",
}


def _mb(b):
    if b >= 1 << 20:
        return "%.1fM" % (b / 2 ** 20)
    if b >= 1 << 10:
        return "%.1fK" % (b / 2 ** 10)
    return "%dB" % b


def _itemsize(dtype):
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def _dtype_name(dtype):
    """problem's dtype name (torch, numpy or text), with the short aliases bf16 ... fp64."""
    s = problem._dtype_name(dtype)
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}.get(s, s)


class _Layout:
    """The two-level transform's layout for shard lengths `lengths` on rank `me`.

    N = N1 * M, N1 = 2P, M = P * Mc >= L / P. Position n = n1 M + n2 (n1 < P holds data, n1 >= P
    the zero padding); frequency k = k1 + N1 k2. After transpose 1 rank j holds the columns
    n2 in [j Mc, (j+1) Mc) of every n1; after transpose 2 the rows k1 in rows(j) for every k2:
    rows(0) = (0, P), rows(j) = (j, 2P - j): a row and its conjugate partner (X[N - k] =
    conj X[k] for a real signal) on the same rank, so two real rows packed as one complex row
    separate locally."""

    def __init__(self, lengths, me, lk=0):
        self.lengths = tuple(int(n) for n in lengths)
        self.P = P = len(self.lengths)
        self.offsets = _offsets(self.lengths)
        self.L = sum(self.lengths)
        self.me = me
        self.lk = lk
        from flashconv._cpu import next_fast_len

        per_rank = -(-self.L // P)  # ceil(L / P)
        self.Mc = next_fast_len(max(1, -(-per_rank // P)))
        self.M = P * self.Mc
        self.N1 = 2 * P
        self.N = self.N1 * self.M

    def rows(self, j):
        return (0, self.P) if j == 0 else (j, 2 * self.P - j)

    def intervals(self, r, j):
        """[(n1, lo, hi)]: the positions of rank r's piece in column block j, in order."""
        off, n = self.offsets[r], self.lengths[r]
        out = []
        for n1 in range(self.P):
            a = n1 * self.M + j * self.Mc
            lo, hi = max(a, off), min(a + self.Mc, off + n)
            if lo < hi:
                out.append((n1, lo, hi))
        return out

    def count(self, r, j):
        return sum(hi - lo for _, lo, hi in self.intervals(r, j))

    def bytes(self, r, rows, esize):
        """(sent, received) bytes of a forward transform of `rows` complex rows (complex values
        of 2 * esize bytes) on rank r: transposes 1 and 2. The inverse transform (3 and 4)
        moves the same pieces the other way: (received, sent)."""
        P, c = self.P, 2 * esize * rows
        t1_sent = sum(self.count(r, j) for j in range(P) if j != r) * c
        t1_recv = sum(self.count(s, r) for s in range(P) if s != r) * c
        t2 = (P - 1) * 2 * self.Mc * c
        return t1_sent + t2, t1_recv + t2


def _halo_pieces(lengths, need):
    """[(source, dest, lo, hi)]: the global positions [lo, hi) of source's piece that dest
    needs (the `need` positions before dest's first one)."""
    offs = _offsets(lengths)
    out = []
    for d, od in enumerate(offs):
        if lengths[d] == 0 and need > 0:
            pass  # an empty rank still receives its halo: nothing depends on it, but it is cheap
        lo_need = max(0, od - need)
        for s in range(d):
            lo, hi = max(lo_need, offs[s]), min(od, offs[s] + lengths[s])
            if lo < hi:
                out.append((s, d, lo, hi))
    return out


def plan_fftconv(lengths, B, H, Lk, dtype="float32", *, gated=False, scheme=None):
    """The :class:`Plan` of distributed.fftconv for pieces of these lengths (rank order), B
    rows, H channels, a kernel of Lk taps, u's dtype, g_in given or not; scheme None (the
    choice below) or "halo" / "two_level" (forced). No process group needed.

    The choice: "halo" where Lk - 1 (taps used, min(Lk, L), minus one) is at most the longest
    piece: each rank then receives at most that many inputs per row and holds at most twice
    the longest piece; "two_level" otherwise."""
    lengths = tuple(int(n) for n in lengths)
    P, L = len(lengths), sum(lengths)
    dtype = _dtype_name(dtype)
    lk = min(int(Lk), L)
    need = max(0, lk - 1)
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError("scheme must be None, %s, got %r" % (" or ".join(map(repr, SCHEMES)),
                                                               scheme))
    if P == 1:
        return Plan("fftconv", "single", lengths, B, H, dtype, lk, gated=gated,
                    reasons=(("single", None),), sent=(0,), received=(0,), sent_backward=(0,),
                    received_backward=(0,))
    longest = max(lengths)
    if scheme is not None:
        choice = scheme
        why = {s: (None if s == scheme else "scheme=%r was requested" % scheme) for s in SCHEMES}
    elif need <= longest:
        choice = "halo"
        why = {"halo": None, "two_level": "not needed: Lk - 1 = %d is at most the longest "
                                          "piece (%d), so the halo serves it" % (need, longest)}
    else:
        choice = "two_level"
        why = {"halo": "Lk - 1 = %d is longer than the longest piece (%d): a rank would hold "
                       "up to %d inputs per row beyond its own" % (need, longest, need),
               "two_level": None}
    reasons = tuple((s, why[s]) for s in SCHEMES)
    cdt = "float64" if dtype == "float64" else "float32"
    esize_c = _itemsize(cdt)
    if choice == "halo":
        e_fwd = esize_c if gated else _itemsize(dtype)
        sent, recv = [0] * P, [0] * P
        for s, d, lo, hi in _halo_pieces(lengths, need):
            sent[s] += (hi - lo) * B * H
            recv[d] += (hi - lo) * B * H
        return Plan("fftconv", "halo", lengths, B, H, dtype, lk, gated=gated, reasons=reasons,
                    sent=tuple(n * e_fwd for n in sent), received=tuple(n * e_fwd for n in recv),
                    sent_backward=tuple(n * esize_c for n in recv),
                    received_backward=tuple(n * esize_c for n in sent), halo=need)
    H2 = -(-H // 2)
    fw, bw = [], []
    for r in range(P):
        lay = _Layout(lengths, r, lk)
        s1, r1 = lay.bytes(r, B * H2, esize_c)
        s2, r2 = lay.bytes(r, H2, esize_c)
        fw.append((s1 + r1, r1 + s1))          # forward transform + inverse transform
        bw.append((s1 + r1 + r2, r1 + s1 + s2))  # dz forward, du inverse, dk inverse (H rows)
    M = _Layout(lengths, 0, lk).M
    return Plan("fftconv", "two_level", lengths, B, H, dtype, lk, gated=gated, reasons=reasons,
                sent=tuple(f[0] for f in fw), received=tuple(f[1] for f in fw),
                sent_backward=tuple(b[0] for b in bw), received_backward=tuple(b[1] for b in bw),
                M=M)


def plan_ssm_conv(lengths, B, H, m, dtype="float32"):
    """The :class:`Plan` of distributed.ssm_conv: each rank sends its final state (B, H, m
    complex: complex64, complex128 for float64 u) to every other rank and receives theirs,
    forward; the same for the states' gradients backward."""
    lengths = tuple(int(n) for n in lengths)
    P = len(lengths)
    dtype = _dtype_name(dtype)
    c = 16 if dtype == "float64" else 8
    n = (P - 1) * B * H * m * c
    scheme = "single" if P == 1 else "state_scan"
    return Plan("ssm_conv", scheme, lengths, B, H, dtype, m=m, reasons=((scheme, None),),
                sent=(n,) * P, received=(n,) * P, sent_backward=(n,) * P,
                received_backward=(n,) * P)


# --- ssm_conv ----------------------------------------------------------------------------------

class _StateScan(torch.autograd.Function):
    """S_r, the state before rank r's piece, from every rank's final local state z_q (state
    after its own piece from a zero state) and the multipliers a_q = dA^(L_q):
    S_0 = 0, S_(q+1) = a_q S_q + z_q (complex128).

    Backward: the gradients G_q of every rank's S_q (all_gather), then the reverse scan
    mu_q = G_q + conj(a_q) mu_(q+1), mu_P = 0: z_r's gradient is mu_(r+1). The multipliers'
    gradient is this rank's share (through its own S_r); the shares sum to the whole."""

    @staticmethod
    def forward(ctx, z, powers, comm):
        zs = comm.all_gather(z.contiguous(), "ssm state scan").to(torch.complex128)
        S = torch.zeros(z.shape, dtype=torch.complex128, device=z.device)
        for q in range(comm.rank):
            S = powers[q] * S + zs[q]
        ctx.comm = comm
        ctx.save_for_backward(zs, powers)
        ctx.z_dtype = z.dtype
        return S

    @staticmethod
    def backward(ctx, gS):
        comm = ctx.comm
        zs, powers = ctx.saved_tensors
        r, P = comm.rank, comm.size
        gs = comm.all_gather(gS.to(ctx.z_dtype).contiguous(),
                             "ssm state scan (backward)").to(torch.complex128)
        gS = gS.to(torch.complex128)
        mu = torch.zeros_like(gS)
        for q in range(P - 1, r, -1):
            mu = gs[q] + powers[q].conj() * mu
        grad_z = mu.to(ctx.z_dtype)
        grad_p = None
        if ctx.needs_input_grad[1]:
            states = [torch.zeros_like(gS)]
            for q in range(r):
                states.append(powers[q] * states[-1] + zs[q])
            grad_p = torch.zeros_like(powers)
            lam = gS
            for q in range(r - 1, -1, -1):
                grad_p[q] = (lam * states[q].conj()).sum(0)
                lam = powers[q].conj() * lam
        return grad_z, grad_p, None


def _group_correction(S, dA, dB, C, L, T, cdt, ctype):
    """2 Re(sum_n C_n dA_n^(j+1) S_n), j < L, for a group of channels: (B, Hg, L) cdt.

    Chunk c starts from the state dA^(cT) S; inside it, state_passing's chunk operator
    M_xy (w_xy) gives the outputs, as its pass 3 does."""
    B, Hg, m = S.shape
    _, _, w_xy, logA = _sp._chunk_operators(dA, dB, C, T, cdt, ctype)
    n = -(-L // T)
    c = torch.arange(n, dtype=torch.float64, device=S.device) * float(T)
    dec = torch.exp(c[:, None, None] * logA.unsqueeze(0)).to(ctype)  # (n, Hg, m): dA^(cT)
    prev = dec.permute(1, 0, 2).unsqueeze(0) * S.unsqueeze(2)  # (B, Hg, n, m)
    corr = torch.einsum("bhcn,htn->bhct", _sp._to_real(prev), w_xy)
    return corr.reshape(B, Hg, n * T)[..., :L]


def _correction_into(y, S, dA, dB, C, T, cdt, ctype):
    """y (B, H, L) cdt += the correction of the incoming state S (B, H, m), group by group
    (checkpointed under autograd, as ssm_conv's groups are)."""
    B, H, L = (int(s) for s in y.shape)
    m = int(S.shape[-1])
    if L == 0:
        # Keeps the scan in this rank's graph: its backward is a collective every rank joins.
        return y + _sp._to_real(S).sum(-1, keepdim=True)[..., :0].to(cdt)
    T = max(1, min(T, L))
    Hg = _sp._even_split(H, _sp._VANDER_ELEMS // (m * (T + 1)))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (y, S, dA, dB, C))
    if grad:
        Hg = min(Hg, -(-H // 4))
    for h0 in range(0, H, Hg):
        h1 = min(H, h0 + Hg)
        args = (S[:, h0:h1], dA[h0:h1], dB[h0:h1], C[h0:h1], L, T, cdt, ctype)
        if grad:
            from torch.utils.checkpoint import checkpoint

            corr = checkpoint(_group_correction, *args, use_reentrant=False)
        else:
            corr = _group_correction(*args)
        y[:, h0:h1] += corr
        del corr
    return y


def ssm_conv(u_local, dA, dB, C, D=None, *, group=None, chunk=None, return_state=False):
    """flashconv.state_passing.ssm_conv over a sequence split across the ranks of a group.

    Every rank passes its piece u_local (B, H, L_r) (contiguous pieces in rank order, any
    lengths, a rank may hold none) and the same dA, dB, C (H, N/2) complex and D (H,) or None;
    it gets back its piece of the output of the whole sequence from a zero state::

        y_local = ssm_conv(u_local, dA, dB, C, D, group=group)

    equal, up to rounding, to the piece [off_r, off_r + L_r) of
    ``state_passing.ssm_conv(u_whole, dA, dB, C, D)``. Each rank runs state passing on its
    piece from a zero state, the ranks' final states are gathered (B H N/2 complex values per
    rank) and scanned, and each rank adds the output of its incoming state. Communication per
    rank: (P - 1) B H N/2 complex values sent and received forward, the same backward
    (plan_ssm_conv); the metadata check adds one small all_gather.

    Args:
        u_local: (B, H, L_r) float32, float16, bfloat16 or float64.
        dA, dB, C: (H, N/2) complex64 or complex128, the same on every rank.
        D: optional (H,) real skip term, the same on every rank.
        group: the process group (None: the default group; without an initialised
            torch.distributed, a group of one).
        chunk: state passing's chunk length T (default state_passing.DEFAULT_CHUNK).
        return_state: also return the state after this rank's piece (B, H, N/2) complex:
            on the last rank, the state after the whole sequence.

    Returns:
        y_local (B, H, L_r) in u_local's dtype (computed in float32, float64 for float64
        input), or (y_local, state). Differentiable with respect to u_local, dA, dB, C, D:
        u_local's gradient is exact; the parameters' gradients are this rank's shares
        (reduce_gradients sums them).

    Raises:
        TypeError / ValueError: as state_passing.ssm_conv, on the rank with the bad input
            and, naming that rank, on every other rank; ValueError naming the argument and
            the rank when ranks disagree on B, H, N/2, dtypes, devices, D, chunk,
            return_state or which inputs require grad.
    """
    who = "distributed.ssm_conv"
    group, rank, P = _resolve_group(group, who)
    if P == 1:
        return _sp.ssm_conv(u_local, dA, dB, C, D, chunk=chunk, return_state=return_state)
    comm = _Comm(group, rank, P, _comm_device(group, u_local))
    error, shape = None, (0, 0, 0, 0)
    try:
        B, H, L, m, _ = _sp._validate(u_local, dA, dB, C, D, chunk, None)
        shape = (B, H, L, m)
    except (TypeError, ValueError) as exc:
        error = exc
    ok = error is None
    B, H, L, m = shape
    T = _sp.DEFAULT_CHUNK if chunk is None else chunk if ok else 0
    fields = [
        ("B (u_local.shape[0])", B, _int), ("H (u_local.shape[1])", H, _int),
        ("N/2 (dA.shape[1])", m, _int),
        ("u_local's dtype", _dtype_code(u_local) if ok else 0, _dtype_text),
        ("dA's dtype", _dtype_code(dA) if ok else 0, _dtype_text),
        ("dB's dtype", _dtype_code(dB) if ok else 0, _dtype_text),
        ("C's dtype", _dtype_code(C) if ok else 0, _dtype_text),
        ("D", int(D is not None), _present),
        ("D's dtype", _dtype_code(D) if ok else 0, _dtype_text),
        ("the device type", _device_code(u_local) if ok else 0, _device_text),
        ("chunk", T, _int), ("return_state", int(bool(return_state)), _flag),
    ] + [("%s.requires_grad" % n, _grad_flag(t) if ok else 0, _flag)
         for n, t in (("u_local", u_local), ("dA", dA), ("dB", dB), ("C", C), ("D", D))]
    rows = _agree(comm, who, [("L_r", L, None)] + fields, error)
    lengths = [row[0] for row in rows]
    cdt = torch.float64 if u_local.dtype == torch.float64 else torch.float32
    ctype = torch.complex128 if cdt == torch.float64 else torch.complex64
    if B * H == 0:
        y = torch.zeros(B, H, L, dtype=u_local.dtype, device=u_local.device)
        if return_state:
            return y, torch.zeros(B, H, m, dtype=ctype, device=u_local.device)
        return y
    if L == 0:  # (u_local stays in the graph: its gradient is an empty tensor, not None)
        y_loc = u_local.to(cdt) * 0
        z = torch.zeros(B, H, m, dtype=ctype, device=u_local.device)
    else:
        y_loc, z = _sp.ssm_conv(u_local.to(cdt), dA, dB, C, D, chunk=chunk, return_state=True)
    logA = torch.log(dA.to(torch.complex128))
    lens = torch.tensor(lengths, dtype=torch.float64, device=dA.device)
    powers = torch.exp(lens[:, None, None] * logA.unsqueeze(0))  # (P, H, m): dA^(L_q)
    S = _StateScan.apply(z.to(ctype), powers, comm)
    y = _correction_into(y_loc, S.to(ctype), dA, dB, C, T, cdt, ctype).to(u_local.dtype)
    if return_state:
        return y, (powers[rank] * S + z.to(torch.complex128)).to(ctype)
    return y


# --- fftconv: the halo scheme --------------------------------------------------------------------

class _Extend(torch.autograd.Function):
    """[halo, t] in the compute dtype: the halo (the positions before this rank's piece that
    the kernel reaches) from the ranks holding them, in one all_to_all; backward sends the
    halo's gradient back to them and adds what later ranks send for this rank's piece."""

    @staticmethod
    def forward(ctx, t, comm, pieces, cdt):
        P, me = comm.size, comm.rank
        B, H, _ = t.shape
        off = sum(pieces["lengths"][:me])
        send = [t.new_empty(B, H, 0)] * P
        recv = [(B, H, 0)] * P
        for s, d, lo, hi in pieces["pieces"]:
            if s == me:
                send[d] = t[..., lo - off:hi - off]
            if d == me:
                recv[s] = (B, H, hi - lo)
        got = comm.all_to_all(send, recv, t.dtype, "halo")
        halo = [got[s] for s in range(P) if recv[s][2]]
        ctx.comm, ctx.pieces, ctx.dtype, ctx.off = comm, pieces, t.dtype, off
        ctx.h = sum(recv[s][2] for s in range(P))
        return torch.cat([g.to(cdt) for g in halo] + [t.to(cdt)], dim=-1)

    @staticmethod
    def backward(ctx, g):
        comm, me, P = ctx.comm, ctx.comm.rank, ctx.comm.size
        B, H, _ = g.shape
        h, off = ctx.h, ctx.off
        own = g[..., h:].clone()
        send = [g.new_empty(B, H, 0)] * P
        recv = [(B, H, 0)] * P
        pos = 0
        spans = []
        for s, d, lo, hi in ctx.pieces["pieces"]:
            if d == me:  # the halo's gradient goes back to its source, in source order
                send[s] = g[..., pos:pos + hi - lo]
                pos += hi - lo
            if s == me:
                recv[d] = (B, H, hi - lo)
                spans.append((d, lo - off, hi - off))
        got = comm.all_to_all(send, recv, g.dtype, "halo (backward)")
        for d, a, b in spans:
            own[..., a:b] += got[d]
        return own.to(ctx.dtype), None, None, None


# --- fftconv: the two-level scheme ---------------------------------------------------------------

def _twiddle(k1, n2, N, ctype, device, sign=-1.0):
    """exp(sign 2 pi i k1 n2 / N) for every (k1, n2): (len(k1), len(n2)), from exact integer
    products mod N in float64."""
    k1 = torch.as_tensor(k1, dtype=torch.int64, device=device)
    n2 = torch.as_tensor(n2, dtype=torch.int64, device=device)
    ang = (torch.outer(k1, n2) % N).to(torch.float64) * (sign * 2 * math.pi / N)
    return torch.polar(torch.ones_like(ang), ang).to(ctype)


def _pack(x):
    """(B, H, L) real -> (B * H2, L) complex: channels 2i and 2i+1 as one complex row (a zero
    channel added to an odd H)."""
    B, H, L = x.shape
    if H % 2:
        x = torch.cat([x, x.new_zeros(B, 1, L)], dim=1)
    c = torch.complex(x[:, 0::2], x[:, 1::2])
    return c.reshape(c.shape[0] * c.shape[1], L)


def _unpack(z, B, H):
    """The inverse of _pack: (B * H2, L) complex -> (B, H, L) real."""
    R, L = z.shape
    z = z.reshape(B, R // B, L)
    return torch.stack([z.real, z.imag], dim=2).reshape(B, 2 * (R // B), L)[:, :H]


def _partner(X, me):
    """conj(X[N - k]) aligned with X[k], for the two local rows (..., 2, M) of rank me."""
    if me == 0:
        p0 = torch.roll(X[..., 0, :].flip(-1), 1, dims=-1)  # row 0: k2 -> (M - k2) mod M
        p1 = X[..., 1, :].flip(-1)                          # row P: k2 -> M - 1 - k2
    else:
        p0 = X[..., 1, :].flip(-1)                          # rows j, 2P - j: partners
        p1 = X[..., 0, :].flip(-1)
    return torch.stack([p0, p1], dim=-2).conj()


def _dfft(c, comm, lay, phase):
    """Distributed forward DFT (size N) of complex rows c (R, L_r) sharded like the input:
    returns (R, 2, M), this rank's rows k1 in lay.rows(me), every k2."""
    P, me, M, Mc, N1 = lay.P, comm.rank, lay.M, lay.Mc, lay.N1
    R = c.shape[0]
    ctype, dev = c.dtype, c.device
    off = lay.offsets[me]
    # Transpose 1: column block j of every n1 to rank j.
    send = []
    for j in range(P):
        parts = [c[:, lo - off:hi - off] for _, lo, hi in lay.intervals(me, j)]
        send.append(torch.cat(parts, dim=1) if parts else c.new_empty(R, 0))
    got = comm.all_to_all(send, [(R, lay.count(s, me)) for s in range(P)], ctype,
                          phase + " transpose 1")
    buf = torch.zeros(R, P, Mc, dtype=ctype, device=dev)
    for s in range(P):
        pos = 0
        for n1, lo, hi in lay.intervals(s, me):
            base = n1 * M + me * Mc
            buf[:, n1, lo - base:hi - base] = got[s][:, pos:pos + hi - lo]
            pos += hi - lo
    # Outer stage (length 2P over n1, the upper half zeros), twiddles exp(-2 pi i k1 n2 / N).
    A = torch.fft.fft(buf, n=N1, dim=1)
    del buf
    A *= _twiddle(range(N1), range(me * Mc, (me + 1) * Mc), lay.N, ctype, dev)
    order = [k for j in range(P) for k in lay.rows(j)]
    A = A[:, order].view(R, P, 2, Mc)
    # Transpose 2: rows rows(j), all columns, to rank j.
    got = comm.all_to_all([A[:, j] for j in range(P)], [(R, 2, Mc)] * P, ctype,
                          phase + " transpose 2")
    del A
    Bk = torch.stack(got, dim=2).reshape(R, 2, M)
    del got
    return torch.fft.fft(Bk, dim=-1)  # inner stage, length M


def _idft(Z, comm, lay, phase):
    """Distributed inverse DFT of (R, 2, M) (this rank's rows): returns the first L outputs,
    sharded like the input, (R, L_r) complex."""
    P, me, M, Mc, N1 = lay.P, comm.rank, lay.M, lay.Mc, lay.N1
    R = Z.shape[0]
    ctype, dev = Z.dtype, Z.device
    W = torch.fft.ifft(Z, dim=-1)
    W *= _twiddle(lay.rows(me), range(M), lay.N, ctype, dev, sign=1.0).unsqueeze(0)
    got = comm.all_to_all([W[..., j * Mc:(j + 1) * Mc] for j in range(P)], [(R, 2, Mc)] * P,
                          ctype, phase + " transpose 3")
    del W
    buf = torch.empty(R, N1, Mc, dtype=ctype, device=dev)
    for s in range(P):
        buf[:, list(lay.rows(s))] = got[s]
    del got
    z = torch.fft.ifft(buf, dim=1)[:, :P]  # (R, P, Mc): positions n1 M + me Mc + c
    del buf
    # Transpose 4 (the reverse of 1): each position to the rank holding it.
    send = []
    for s in range(P):
        parts = [z[:, n1, lo - n1 * M - me * Mc:hi - n1 * M - me * Mc]
                 for n1, lo, hi in lay.intervals(s, me)]
        send.append(torch.cat(parts, dim=1) if parts else z.new_empty(R, 0))
    got = comm.all_to_all(send, [(R, lay.count(me, j)) for j in range(P)], ctype,
                          phase + " transpose 4")
    off = lay.offsets[me]
    out = torch.empty(R, lay.lengths[me], dtype=ctype, device=dev)
    for j in range(P):
        pos = 0
        for _, lo, hi in lay.intervals(me, j):
            out[:, lo - off:hi - off] = got[j][:, pos:pos + hi - lo]
            pos += hi - lo
    return out


def _kernel_rows(k, lay, me, cdt, ctype):
    """(Kp, Km), each (H2, 2, M): (K_a + K_b) / 2 and (K_a - K_b) / 2 of the channel pairs
    (2i, 2i+1) at this rank's frequency rows, from the replicated kernel's first lk taps:
    K[k1 + N1 k2] = FFT_M( exp(-2 pi i k1 n2 / N) sum_n1 exp(-2 pi i n1 k1 / N1) k[n1 M + n2] )."""
    H = int(k.shape[0])
    P, M, dev = lay.P, lay.M, k.device
    kp = torch.zeros(H, P * M, dtype=cdt, device=dev)
    kp[:, :lay.lk] = k[:, :lay.lk].to(cdt)
    kb = kp.view(H, P, M)
    rows = lay.rows(me)
    w = _twiddle(rows, range(P), lay.N1, torch.complex128, dev)  # (2, P)
    re = torch.einsum("tn,hnm->thm", w.real.to(cdt), kb)
    im = torch.einsum("tn,hnm->thm", w.imag.to(cdt), kb)
    del kp, kb
    K = torch.complex(re, im)
    del re, im
    K *= _twiddle(rows, range(M), lay.N, ctype, dev).unsqueeze(1)
    K = torch.fft.fft(K, dim=-1).permute(1, 0, 2)  # (H, 2, M)
    if H % 2:
        K = torch.cat([K, K.new_zeros(1, 2, M)])
    Ka, Kb = K[0::2], K[1::2]
    return (Ka + Kb) / 2, (Ka - Kb) / 2


class _TwoLevel(torch.autograd.Function):
    """conv(x, k) for x (B, H, L_r) in the compute dtype, by the distributed FFT.

    Per channel pair (a, b) packed as c = x_a + i x_b with spectrum C, the product
    X_a K_a + i X_b K_b is C Kp + conj(C[N - k]) Km (Kp, Km = (K_a +- K_b) / 2), local because a
    frequency row and its partner live on one rank. Backward: dx by the same transforms with
    conj(K) (the adjoint); dk (this rank's lags, [off_r, off_r + L_r)) by the inverse transform
    of sum_b conj(X) DZ over channel pairs; X is kept from the forward."""

    @staticmethod
    def forward(ctx, x, k, comm, lay):
        B, H, _ = x.shape
        me = comm.rank
        C = _dfft(_pack(x), comm, lay, "two_level")
        Kp, Km = _kernel_rows(k, lay, me, x.dtype, C.dtype)
        Cv = C.view(B, -1, 2, lay.M)
        Z = Cv * Kp + _partner(Cv, me) * Km
        del Kp, Km
        y = _unpack(_idft(Z.view(-1, 2, lay.M), comm, lay, "two_level"), B, H)
        ctx.comm, ctx.lay = comm, lay
        ctx.save_for_backward(C if ctx.needs_input_grad[1] else None, k)
        return y

    @staticmethod
    def backward(ctx, g):
        comm, lay = ctx.comm, ctx.lay
        C, k = ctx.saved_tensors
        me = comm.rank
        B, H, _ = g.shape
        cdt = g.dtype
        G = _dfft(_pack(g.contiguous()), comm, lay, "two_level (backward)")
        Gv = G.view(B, -1, 2, lay.M)
        Gp = _partner(Gv, me)
        dx = dk = None
        if ctx.needs_input_grad[0]:
            Kp, Km = _kernel_rows(k, lay, me, cdt, G.dtype)
            Zd = Gv * Kp.conj() + Gp * Km.conj()
            del Kp, Km
            dx = _unpack(_idft(Zd.view(-1, 2, lay.M), comm, lay, "two_level (backward)"), B, H)
            del Zd
        if ctx.needs_input_grad[1]:
            Cv = C.view(B, -1, 2, lay.M)
            Cp = _partner(Cv, me)
            Sa = ((Cv + Cp).conj() * (Gv + Gp)).sum(0) / 4       # sum_b conj(X_a) DZ_a
            Sb = ((Cv - Cp).conj() * (Gv - Gp)).sum(0) / 4       # sum_b conj(X_b) DZ_b
            q = _idft((Sa + 1j * Sb).reshape(-1, 2, lay.M), comm, lay,
                      "two_level dk (backward)")
            lags = _unpack(q, 1, H)[0]  # (H, L_r): the correlation at this rank's lags
            off = lay.offsets[me]
            dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
            hi = min(off + lags.shape[-1], lay.lk)
            if hi > off:
                dk[:, off:hi] = lags[:, :hi - off].to(k.dtype)
        return dx, dk, None, None


# --- fftconv -----------------------------------------------------------------------------------

def _fftconv_meta(who, u, k, D, g_in, g_out, scheme):
    """Local validation -> (error, fields) for _agree."""
    from flashconv.ops import _validate
    from flashconv.spectrum import KernelSpectrum

    error = None
    try:
        if not isinstance(u, torch.Tensor):
            raise TypeError("%s: u_local must be a torch.Tensor of shape (B, H, L_r), got %s"
                            % (who, type(u).__name__))
        if isinstance(k, KernelSpectrum):
            raise TypeError("%s: k must be the time-domain kernel (H, Lk) torch.Tensor: a "
                            "KernelSpectrum from fft_kernel is made for one length and one "
                            "device, not for a sequence split across ranks" % who)
        if scheme is not None and scheme not in SCHEMES:
            raise ValueError("%s: scheme must be None, 'halo' or 'two_level', got %r"
                             % (who, scheme))
        _validate(u, k, D, g_in, g_out, who=who)
    except (TypeError, ValueError) as exc:
        error = exc
    ok = error is None
    B, H, L = (int(s) for s in u.shape) if ok else (0, 0, 0)
    fields = [
        ("L_r", L, None),
        ("B (u_local.shape[0])", B, _int), ("H (u_local.shape[1])", H, _int),
        ("Lk (k.shape[1])", int(k.shape[1]) if ok else 0, _int),
        ("u_local's dtype", _dtype_code(u) if ok else 0, _dtype_text),
        ("k's dtype", _dtype_code(k) if ok else 0, _dtype_text),
        ("D", int(D is not None), _present),
        ("D's dtype", _dtype_code(D) if ok else 0, _dtype_text),
        ("g_in", int(g_in is not None), _present),
        ("g_in's dtype", _dtype_code(g_in) if ok else 0, _dtype_text),
        ("g_out", int(g_out is not None), _present),
        ("g_out's dtype", _dtype_code(g_out) if ok else 0, _dtype_text),
        ("the device type", _device_code(u) if ok else 0, _device_text),
        ("scheme", (SCHEMES.index(scheme) + 1 if scheme in SCHEMES else 0) if ok else 0,
         lambda v: repr(None if v == 0 else SCHEMES[v - 1])),
    ] + [("%s.requires_grad" % n, _grad_flag(t) if ok else 0, _flag)
         for n, t in (("u_local", u), ("k", k), ("D", D), ("g_in", g_in), ("g_out", g_out))]
    return error, fields


def _fftconv_setup(who, u, k, D, g_in, g_out, group, scheme):
    """(comm, plan) after the cross-rank check; comm None for a group of one."""
    group, rank, P = _resolve_group(group, who)
    if P == 1:
        return None, None
    comm = _Comm(group, rank, P, _comm_device(group, u))
    error, fields = _fftconv_meta(who, u, k, D, g_in, g_out, scheme)
    rows = _agree(comm, who, fields, error)
    lengths = [row[0] for row in rows]
    B, H = int(u.shape[0]), int(u.shape[1])
    plan = plan_fftconv(lengths, B, H, int(k.shape[1]), u.dtype, gated=g_in is not None,
                        scheme=scheme)
    return comm, plan


def fftconv(u_local, k, D=None, *, g_in=None, g_out=None, group=None, scheme=None):
    """flashconv.fftconv over a sequence split across the ranks of a group.

    ``y = g_out * (causal_conv(x, k) + D * x)``, ``x = g_in * u``, where every rank passes its
    piece u_local (B, H, L_r) and the gates' pieces (B, H, L_r) (contiguous pieces in rank
    order, any lengths), and the same kernel k (H, Lk) and D (H,); it gets back its piece of
    the output, equal up to rounding to that piece of ``flashconv.fftconv`` on the whole
    sequence. Lk < L is zero-extended, Lk > L truncated to L taps, as there.

    The scheme (plan_fftconv; explain() prints it): "halo" where Lk - 1 is at most the
    longest piece (each rank receives the Lk - 1 inputs before its piece: (Lk - 1) B H values
    per rank, in u's dtype, or float32/float64 x = g_in u when gated), "two_level" otherwise
    (a distributed FFT: about 6 (P - 1)/P B H M values of the compute dtype sent per rank
    forward, M ~ L / P). scheme="halo" or "two_level" forces one (a forced halo receives up
    to the whole sequence before a rank).

    Args:
        u_local: (B, H, L_r) float32, float16, bfloat16 or float64 torch.Tensor.
        k: (H, Lk) time-domain kernel, the same on every rank (not a KernelSpectrum).
        D: optional (H,) skip term, the same on every rank.
        g_in, g_out: optional (B, H, L_r) gates, this rank's pieces.
        group: the process group (None: the default group; without an initialised
            torch.distributed, a group of one).
        scheme: None, "halo" or "two_level".

    Returns:
        y_local (B, H, L_r) in u_local's dtype, computed in float32 (float64 for float64
        input) and rounded once. Differentiable with respect to u_local, k, D and the gates:
        u_local's and the gates' gradients are exact; k's and D's are this rank's shares
        (reduce_gradients sums them).

    The single-process op's NaN rule (a non-finite value makes its whole row NaN) holds per
    piece only here: which outputs a non-finite input reaches depends on the scheme. The
    two-level transform does not scale rows by powers of two (flashconv.fftconv's CPU
    engines do): results within float32's range, not within a quarter of bfloat16's max.

    Raises:
        TypeError / ValueError: as flashconv.fftconv (and a KernelSpectrum k), on the rank
            with the bad input and, naming that rank, on every other one; ValueError naming
            the argument and the rank when ranks disagree on B, H, Lk, dtypes, devices, which
            of D / g_in / g_out are given, scheme or which inputs require grad.
    """
    import flashconv

    who = "distributed.fftconv"
    comm, plan = _fftconv_setup(who, u_local, k, D, g_in, g_out, group, scheme)
    if comm is None:
        if scheme is not None and scheme not in SCHEMES:
            raise ValueError("%s: scheme must be None, 'halo' or 'two_level', got %r"
                             % (who, scheme))
        return flashconv.fftconv(u_local, k, D, g_in=g_in, g_out=g_out)
    B, H, L = (int(s) for s in u_local.shape)
    if B * H == 0 or plan.L == 0:
        return torch.zeros(B, H, L, dtype=u_local.dtype, device=u_local.device)
    cdt = torch.float64 if u_local.dtype == torch.float64 else torch.float32
    x = u_local if g_in is None else g_in.to(cdt) * u_local.to(cdt)
    if plan.scheme == "halo":
        pieces = {"lengths": plan.lengths, "pieces": _halo_pieces(plan.lengths, plan.halo)}
        ext = _Extend.apply(x, comm, pieces, cdt)
        h = ext.shape[-1] - L
        if plan.lk > 0:
            conv = flashconv.fftconv(ext, k)[..., h:]
        else:
            conv = torch.zeros_like(ext[..., h:])
        xo = ext[..., h:]
    else:
        xo = x.to(cdt)
        lay = _Layout(plan.lengths, comm.rank, plan.lk)
        conv = _TwoLevel.apply(xo, k, comm, lay)
    z = conv if D is None else conv + D.to(cdt).unsqueeze(-1) * xo
    y = z if g_out is None else z * g_out.to(cdt)
    return y.to(u_local.dtype)


def explain(u_local, k, D=None, *, g_in=None, g_out=None, group=None, scheme=None):
    """Which scheme distributed.fftconv would run for these arguments, why not the other, and
    the bytes each rank would send: a short text. A collective (the shard lengths come from
    every rank): call it on every rank. Validates as fftconv does; computes nothing else."""
    import flashconv

    who = "distributed.explain"
    comm, plan = _fftconv_setup(who, u_local, k, D, g_in, g_out, group, scheme)
    if comm is None:
        B, H, L = (int(s) for s in u_local.shape)
        text = plan_fftconv((L,), B, H, int(k.shape[1]), u_local.dtype,
                            gated=g_in is not None).summary()
        return text + "\n" + flashconv.explain(u_local, k, D, g_in=g_in, g_out=g_out)
    return plan.summary()


def reduce_gradients(params, group=None):
    """Sum the gradients of replicated parameters over the group (all_reduce), in place: after
    a sequence-parallel backward each rank holds its share of each parameter's gradient, and
    the sum is the gradient of the whole sequence. params: a module or an iterable of
    tensors; every rank must pass the same parameters in the same order (a missing .grad
    counts as zeros and is created). A no-op for a group of one."""
    group, _, P = _resolve_group(group, "distributed.reduce_gradients")
    ps = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
    ps = [p for p in ps if p.requires_grad]
    if P == 1 or not ps:
        return
    by_dtype = {}
    for p in ps:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for (_, _), group_ps in by_dtype.items():
        flat = torch.cat([_wire(p.grad) for p in group_ps])
        dist.all_reduce(flat, group=group)
        pos = 0
        for p in group_ps:
            n = p.grad.numel() * (2 if p.grad.is_complex() else 1)
            p.grad.copy_(_unwire(flat[pos:pos + n], p.grad.shape, p.grad.dtype))
            pos += n
