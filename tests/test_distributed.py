"""flashconv.distributed on the CPU: gloo process groups of 2, 3 and 4 ranks.

One world of 4 ranks is started once (torch.multiprocessing, forked from this process so that
torch need not be imported again: seconds per process on 2 cores; a file:// rendezvous); the
groups of 2 and 3 ranks are its first ranks (new_group), and every rank of each group runs
every case below; a case computes the single-process result on the whole sequence itself
(the same seeded inputs on every rank) and reports squared errors and norms, which the tests
here add over ranks and judge:

- float64 relative error <= 1e-12, float32 <= 1e-6 against the single-process op;
- bfloat16 / float16: error against a float64 reference <= 2x the single-process op's own;
- gradients: u's pieces against the pieces of the single-process gradient, the parameters'
  after reduce_gradients (the sum of the ranks' shares) against the single-process gradient;
- bytes counted by traffic() equal to plan_fftconv / plan_ssm_conv's;
- validation: every rank raises, naming the argument and the rank; the group still works.

Shards are uneven and include a one-step shard (and, with 4 ranks, an empty one), so that a
short kernel's halo spans several ranks.
"""
import datetime
import json
import math
import os
import re
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

import flashconv
from flashconv import distributed
from flashconv.state_passing import ssm_conv as ssm_conv_single

WORLDS = (2, 3, 4)
# Shard lengths per world size: uneven; a one-step shard with three and four ranks, and an
# empty one with four.
LENGTHS = {2: [45, 26], 3: [50, 1, 64], 4: [40, 0, 1, 75]}
B, H, M_STATE = 2, 3, 4  # M_STATE: N/2 complex modes
TOL = {"float64": 1e-12, "float32": 1e-6}
SPAWN_TIMEOUT_S = 240       # the whole multi-process run
COLLECTIVE_TIMEOUT_S = 180  # gloo's: ranks 2 and 3 wait while the smaller groups run


# --- what every rank runs ----------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ssm_params(seed, H, m, ctype=torch.complex128):
    g = _gen(seed)
    A = torch.complex(torch.full((H, m), -0.5, dtype=torch.float64),
                      math.pi * torch.arange(m, dtype=torch.float64).expand(H, m))
    dt = torch.empty(H, 1, dtype=torch.float64).uniform_(0.01, 0.1, generator=g)
    dA = torch.exp(dt * A)
    dB = (dA - 1) / A
    C = torch.randn(H, m, dtype=torch.complex128, generator=g)
    D = torch.randn(H, dtype=torch.float64, generator=g)
    return [t.to(ctype) for t in (dA, dB, C)] + [D]


class _Report:
    """Squared errors and norms: 'shard' quantities are added over ranks by the parent,
    'full' ones (replicated after reduce_gradients) are judged per rank."""

    def __init__(self):
        self.d = {}

    def cmp(self, name, got, ref, kind="shard"):
        got = torch.as_tensor(got).detach().to(torch.complex128 if torch.as_tensor(ref).is_complex()
                                                else torch.float64)
        ref = torch.as_tensor(ref).detach().to(got.dtype)
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        self.d["%s:%s" % (kind, name)] = [float((got - ref).abs().pow(2).sum()),
                                         float(ref.abs().pow(2).sum())]

    def put(self, name, value):
        self.d[name] = value


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def case_ssm(rank, P, group, dtype, chunk=16):
    """distributed.ssm_conv against state_passing.ssm_conv on the whole sequence: output, du,
    the state after the sequence (last rank) and the parameters' gradients after
    reduce_gradients; bytes against plan_ssm_conv."""
    rep = _Report()
    lengths = LENGTHS[P]
    L, off, n = sum(lengths), sum(lengths[:rank]), lengths[rank]
    dt = getattr(torch, dtype)
    ctype = torch.complex128 if dt == torch.float64 else torch.complex64
    g = _gen(1)
    u64 = torch.randn(B, H, L, dtype=torch.float64, generator=g)
    dy64 = torch.randn(B, H, L, dtype=torch.float64, generator=g)
    p64 = _ssm_params(2, H, M_STATE)

    def run(u, params, dy, dist_call):
        u = _leaf(u)
        ps = [_leaf(p) for p in params]
        if dist_call:
            with distributed.traffic() as t:
                y, state = distributed.ssm_conv(u, *ps, chunk=chunk, return_state=True,
                                                group=group)
                (y.to(dy.dtype) * dy).sum().backward()
            distributed.reduce_gradients(ps, group)
            rep.put("traffic_ssm_%s" % dtype, [t.sent, t.received])
        else:
            y, state = ssm_conv_single(u, *ps, chunk=chunk, return_state=True)
            (y.to(dy.dtype) * dy).sum().backward()
        return y, u.grad, [p.grad for p in ps], state

    # D in float32 for half-precision u, as mixed-precision training keeps parameters.
    params = [p.to(ctype) for p in p64[:3]] + [p64[3].to(ctype.to_real())]
    u = u64.to(dt)
    y, du, gp, state = run(u[..., off:off + n], params, dy64[..., off:off + n].to(dt), True)
    ys, dus, gps, states = run(u, params, dy64.to(dt), False)
    rep.cmp("y_vs_single", y, ys[..., off:off + n])
    rep.cmp("du_vs_single", du, dus[..., off:off + n])
    for name, a, b in zip(("ddA", "ddB", "dC", "dD"), gp, gps):
        rep.cmp(name + "_vs_single", a, b, kind="full")
    if rank == P - 1:  # the state after the whole sequence
        rep.cmp("final_state_vs_single", state, states, kind="full")
    if dt in (torch.bfloat16, torch.float16):
        # The tolerance rule: errors against float64, the single-process op's as the yardstick.
        y64, du64, _, _ = run(u.double(), p64[:3] + [params[3].double()], dy64, False)
        rep.cmp("y_vs_f64", y, y64[..., off:off + n])
        rep.cmp("ysingle_vs_f64", ys[..., off:off + n], y64[..., off:off + n])
        rep.cmp("du_vs_f64", du, du64[..., off:off + n])
        rep.cmp("dusingle_vs_f64", dus[..., off:off + n], du64[..., off:off + n])
    plan = distributed.plan_ssm_conv(lengths, B, H, M_STATE, dtype)
    rep.put("plan_ssm_%s" % dtype, [plan.sent[rank] + plan.sent_backward[rank],
                                    plan.received[rank] + plan.received_backward[rank]])
    return rep.d


def case_fft(rank, P, group, dtype, Lk, gated, scheme=None):
    """distributed.fftconv against flashconv.fftconv on the whole sequence (k, D float32 for
    half-precision u, as mixed-precision training keeps them): output, du, the gates'
    gradients, dk and dD after reduce_gradients; the scheme and the bytes against the plan."""
    rep = _Report()
    lengths = LENGTHS[P]
    L, off, n = sum(lengths), sum(lengths[:rank]), lengths[rank]
    dt = getattr(torch, dtype)
    pdt = torch.float64 if dt == torch.float64 else torch.float32
    g = _gen(3)
    u64 = torch.randn(B, H, L, dtype=torch.float64, generator=g)
    k64 = torch.randn(H, Lk, dtype=torch.float64, generator=g) / math.sqrt(Lk)
    D64 = torch.randn(H, dtype=torch.float64, generator=g)
    gi64 = torch.rand(B, H, L, dtype=torch.float64, generator=g) + 0.5
    go64 = torch.randn(B, H, L, dtype=torch.float64, generator=g)
    dy64 = torch.randn(B, H, L, dtype=torch.float64, generator=g)
    sl = slice(off, off + n)

    def run(u, k, D, gi, go, dy, dist_call):
        leaves = [_leaf(t) if t is not None else None for t in (u, k, D, gi, go)]
        u, k, D, gi, go = leaves
        if dist_call:
            with distributed.traffic() as t:
                y = distributed.fftconv(u, k, D, g_in=gi, g_out=go, scheme=scheme,
                                          group=group)
                (y.to(dy.dtype) * dy).sum().backward()
            distributed.reduce_gradients([k, D], group)
            rep.put("traffic", [t.sent, t.received])
            rep.put("phases", t.phases)
        else:
            y = flashconv.fftconv(u, k, D, g_in=gi, g_out=go)
            (y.to(dy.dtype) * dy).sum().backward()
        return y, [None if t is None else t.grad for t in leaves]

    gates = (gi64.to(dt), go64.to(dt)) if gated else (None, None)
    args = (u64.to(dt), k64.to(pdt), D64.to(pdt))
    y, gr = run(args[0][..., sl], args[1], args[2],
                *(None if x is None else x[..., sl] for x in gates), dy64[..., sl].to(dt), True)
    ys, grs = run(*args, *gates, dy64.to(dt), False)
    rep.cmp("y_vs_single", y, ys[..., sl])
    names = ("du", "dk", "dD", "dg_in", "dg_out")
    for i, name in enumerate(names):
        if gr[i] is None:
            continue
        kind = "full" if name in ("dk", "dD") else "shard"
        ref = grs[i] if kind == "full" else grs[i][..., sl]
        rep.cmp(name + "_vs_single", gr[i], ref, kind=kind)
    if dt in (torch.bfloat16, torch.float16):
        gates64 = (gi64, go64) if gated else (None, None)
        y64, gr64 = run(u64, k64, D64, *gates64, dy64, False)
        rep.cmp("y_vs_f64", y, y64[..., sl])
        rep.cmp("ysingle_vs_f64", ys[..., sl], y64[..., sl])
        rep.cmp("du_vs_f64", gr[0], gr64[0][..., sl])
        rep.cmp("dusingle_vs_f64", grs[0][..., sl], gr64[0][..., sl])
    plan = distributed.plan_fftconv(lengths, B, H, Lk, dtype, gated=gated, scheme=scheme)
    rep.put("scheme", plan.scheme)
    rep.put("plan", [plan.sent[rank] + plan.sent_backward[rank],
                     plan.received[rank] + plan.received_backward[rank]])
    text = distributed.explain(args[0][..., sl], args[1], args[2], group=group, scheme=scheme,
                               g_in=None if gates[0] is None else gates[0][..., sl])
    rep.put("explain", text)
    return rep.d


def _expect_error(fn, kind):
    """(error type name, message) that fn raised, or ('none', '') if it returned."""
    try:
        fn()
    except kind as exc:
        return [type(exc).__name__, str(exc)]
    except Exception as exc:  # noqa: BLE001 - reported, the test says what was wrong
        return ["unexpected " + type(exc).__name__, str(exc)]
    return ["none", ""]


def case_validation(rank, P, group):
    """Inconsistent arguments across ranks and bad input on one rank: every rank raises, and
    a correct call afterwards still works (no rank is left inside a collective)."""
    out = {}
    L = LENGTHS[P][rank]
    u = torch.randn(B, H, L)
    k = torch.randn(H, 5)
    dA, dB, C, D = _ssm_params(4, H, M_STATE, torch.complex64)
    D = D.float()
    last = P - 1
    # H differs on the last rank (its k and D follow, so its local call is valid).
    Hr = H + 1 if rank == last else H
    out["H"] = _expect_error(lambda: distributed.fftconv(
        torch.randn(B, Hr, L), torch.randn(Hr, 5), torch.randn(Hr), group=group), ValueError)
    out["dtype"] = _expect_error(lambda: distributed.fftconv(
        u.double() if rank == last else u, k.double() if rank == last else k, group=group),
        ValueError)
    out["Lk"] = _expect_error(lambda: distributed.fftconv(
        u, torch.randn(H, 7) if rank == last else k, group=group), ValueError)
    out["B_ssm"] = _expect_error(lambda: distributed.ssm_conv(
        torch.randn(B + (rank == last), H, L), dA, dB, C, D, group=group), ValueError)
    out["state_shape"] = _expect_error(lambda: distributed.ssm_conv(
        u, *(_ssm_params(4, H, M_STATE + (rank == last), torch.complex64)[:3]), D,
        group=group), ValueError)
    out["requires_grad"] = _expect_error(lambda: distributed.fftconv(
        u.clone().requires_grad_(rank == last), k, group=group), ValueError)
    # Bad local input on the last rank only: g_in of the wrong shape; a complex u (TypeError).
    out["bad_g_in"] = _expect_error(lambda: distributed.fftconv(
        u, k, g_in=torch.randn(B, H, L + 1) if rank == last else torch.randn(B, H, L),
        group=group), ValueError)
    out["bad_type"] = _expect_error(lambda: distributed.ssm_conv(
        u.to(torch.complex64) if rank == last else u, dA, dB, C, D, group=group), TypeError)
    out["bad_scheme"] = _expect_error(lambda: distributed.fftconv(
        u, k, scheme="ring" if rank == last else None, group=group),
        ValueError)
    y = distributed.fftconv(u, k, group=group)  # the group still works
    out["after"] = list(y.shape)
    return out


def case_layers(rank, P, group):
    """S4D and H3 (head_dim 1 and 2), float64, run with group= on each rank's piece,
    against the same layer on whole sequences: output, du, parameters' gradients."""
    import copy

    from flashconv.nn import H3, S4D

    rep = _Report()
    lengths = LENGTHS[P]
    L, off, n = sum(lengths), sum(lengths[:rank]), lengths[rank]
    d_model = 4
    for name, make in (("s4d", lambda: S4D(d_model, d_state=8, dt_min=0.01)),
                       ("h3", lambda: H3(d_model, d_state=8, dt_min=0.01)),
                       ("h3_head2", lambda: H3(d_model, d_state=8, head_dim=2, dt_min=0.01))):
        torch.manual_seed(5)
        single = make().double()
        sp = copy.deepcopy(single)
        sp.group = group
        g = _gen(6)
        u = torch.randn(B, L, d_model, dtype=torch.float64, generator=g)
        dy = torch.randn(B, L, d_model, dtype=torch.float64, generator=g)
        us = _leaf(u)
        (single(us) * dy).sum().backward()
        ul = _leaf(u[:, off:off + n])
        y = sp(ul)
        (y * dy[:, off:off + n]).sum().backward()
        distributed.reduce_gradients(sp, group)
        rep.cmp(name + "_y", y, single(u)[:, off:off + n])
        rep.cmp(name + "_du", ul.grad, us.grad[:, off:off + n])
        for (pn, a), (_, b) in zip(sp.named_parameters(), single.named_parameters()):
            rep.cmp("%s_d%s" % (name, pn), a.grad, b.grad, kind="full")
    return rep.d


def _cases(P, group):
    # Lk = 5: Lk - 1 = 4 is longer than the one-step shard: the halo spans several ranks.
    L = sum(LENGTHS[P])
    cases = {
        "ssm_float64": lambda r: case_ssm(r, P, group, "float64"),
        "ssm_float32": lambda r: case_ssm(r, P, group, "float32"),
        "ssm_bfloat16": lambda r: case_ssm(r, P, group, "bfloat16"),
        "ssm_float16": lambda r: case_ssm(r, P, group, "float16"),
        "halo_float64": lambda r: case_fft(r, P, group, "float64", 5, True),
        "halo_float32": lambda r: case_fft(r, P, group, "float32", 5, False),
        "halo_bfloat16": lambda r: case_fft(r, P, group, "bfloat16", 5, True),
        "two_level_float64": lambda r: case_fft(r, P, group, "float64", L, True),
        "two_level_float32": lambda r: case_fft(r, P, group, "float32", L + 9, False),
        "two_level_bfloat16": lambda r: case_fft(r, P, group, "bfloat16", L, True),
        "two_level_float16": lambda r: case_fft(r, P, group, "float16", L, False),
        "forced_two_level_short_k":
            lambda r: case_fft(r, P, group, "float64", 5, False, "two_level"),
        "forced_halo_long_k": lambda r: case_fft(r, P, group, "float64", L, True, "halo"),
        "validation": lambda r: case_validation(r, P, group),
        "layers": lambda r: case_layers(r, P, group),
    }
    return cases


def _warm_up():
    u = torch.randn(1, 1, 8, dtype=torch.float64, requires_grad=True)
    dA, dB, C, D = _ssm_params(0, 1, 2)
    ssm_conv_single(u, dA, dB, C, D, chunk=4).sum().backward()


def _worker(rank, world, init_file, out_dir):
    """One rank of the one started world (max(WORLDS) ranks): the groups of 2 and 3 ranks
    are the first ranks of it (new_group), so torch and the group start once, not per size.
    A case that raises is written out and ends this process: the parent then stops the others
    (a rank left inside a collective would otherwise wait for its timeout)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    # The first state-passing backward imports torch._dynamo (torch.utils.checkpoint):
    # seconds of CPU per process. Done here on every rank at once, not in the first case of
    # each group size, where the others would wait for the newcomer inside a collective.
    _warm_up()
    # Every rank creates every group, members or not, in the same order.
    groups = {P: dist.group.WORLD if P == world else dist.new_group(list(range(P)))
              for P in WORLDS}
    results = {}
    out = Path(out_dir, "rank%d.json" % rank)
    for P in WORLDS:
        if rank >= P:
            continue
        results[P] = {}
        dist.barrier(group=groups[P])  # the cases' times: without waiting for the group
        for name, fn in _cases(P, groups[P]).items():
            t0 = time.perf_counter()
            try:
                results[P][name] = fn(rank)
            except Exception:
                results[P][name] = {"error": traceback.format_exc()}
                out.write_text(json.dumps(results))
                raise
            results[P][name]["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(results))
    dist.destroy_process_group()


# --- the parent: one start, every world size judged from its reports --------------------------

@pytest.fixture(scope="module")
def runs():
    """{P: [rank 0's report, ...]} from one run of max(WORLDS) forked ranks, and the error
    that ended it early, if any."""
    import torch.multiprocessing as mp

    world = max(WORLDS)
    failure = None
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        t0 = time.monotonic()
        # Forked, not spawned: the ranks inherit this process's imported torch, flashconv
        # and torch._dynamo (_warm_up) instead of importing them again, about 5 s of CPU per
        # rank on 2 cores. The ranks run torch with one thread (no OpenMP pool to inherit)
        # and start their own gloo groups.
        _warm_up()
        ctx = mp.start_processes(_worker, args=(world, init, tmp), nprocs=world, join=False,
                                 start_method="fork")
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() - t0 > SPAWN_TIMEOUT_S:
                    for p in ctx.processes:
                        p.kill()
                    failure = "the %d-rank run did not finish within %d s" % (world,
                                                                             SPAWN_TIMEOUT_S)
                    break
        except Exception as exc:  # a rank raised: its report says where
            failure = "%s: %s" % (type(exc).__name__, exc)
        print("started %d ranks, all cases: %.1f s" % (world, time.monotonic() - t0))
        reports = []
        for r in range(world):
            f = Path(tmp, "rank%d.json" % r)
            reports.append(json.loads(f.read_text()) if f.exists() else {})
    by_size = {P: [rep.get(str(P), {}) for rep in reports[:P]] for P in WORLDS}
    return by_size, failure


@pytest.fixture(scope="module", params=WORLDS, ids=lambda P: "P%d" % P)
def world(request, runs):
    by_size, failure = runs
    return request.param, by_size[request.param], failure


def _case(world, name):
    P, reports, failure = world
    for r, rep in enumerate(reports):
        if name not in rep:
            pytest.fail("rank %d of %d did not run %r (%s)" % (r, P, name, failure))
        assert "error" not in rep[name], "rank %d of %d:\n%s" % (r, P, rep[name]["error"])
    return P, [rep[name] for rep in reports]


def _rel(per_rank, key):
    """Relative error of a quantity: summed over ranks for 'shard:', the worst rank's for
    'full:'."""
    if key.startswith("shard:"):
        err = sum(r[key][0] for r in per_rank)
        ref = sum(r[key][1] for r in per_rank)
        return math.sqrt(err / ref) if ref else math.sqrt(err)
    return max(math.sqrt(r[key][0] / r[key][1]) if r[key][1] else math.sqrt(r[key][0])
               for r in per_rank if key in r)


def _check_vs_single(per_rank, dtype, what):
    keys = sorted({k for r in per_rank for k in r if k.endswith("_vs_single")})
    assert any(k.startswith("shard:y") for k in keys) and any("du" in k for k in keys)
    for key in keys:
        rel = _rel(per_rank, key)
        print("%s %s %s: rel %.3g" % (what, dtype, key, rel))
        if dtype in TOL:
            assert rel <= TOL[dtype], (key, rel)


def _check_half(per_rank, what):
    """bfloat16 / float16: within 2x the single-process op's own error against float64."""
    for q in ("y", "du"):
        mine = _rel(per_rank, "shard:%s_vs_f64" % q)
        single = _rel(per_rank, "shard:%ssingle_vs_f64" % q)
        print("%s %s: distributed %.3g, single-process %.3g" % (what, q, mine, single))
        assert 0 < single and mine <= 2 * single, (q, mine, single)
    # The parameters' gradients (float32 / complex64 there) against the single-process op's.
    for key in {k for r in per_rank for k in r if k.startswith("full:") and "_vs_single" in k}:
        rel = _rel(per_rank, key)
        print("%s %s: rel %.3g" % (what, key, rel))
        assert rel <= 2e-5, (key, rel)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
def test_ssm_conv_equals_single_process(world, dtype):
    P, per_rank = _case(world, "ssm_" + dtype)
    if dtype in TOL:
        _check_vs_single(per_rank, dtype, "ssm_conv P=%d" % P)
    else:
        _check_half(per_rank, "ssm_conv P=%d %s" % (P, dtype))
    # Bytes: measured == plan_ssm_conv's, (P - 1) B H N/2 complex values each way, per direction.
    c = 16 if dtype == "float64" else 8
    for r in per_rank:
        assert r["traffic_ssm_" + dtype] == r["plan_ssm_" + dtype] == [2 * (P - 1) * B * H * M_STATE * c] * 2


@pytest.mark.parametrize("name", ["halo_float64", "halo_float32", "halo_bfloat16",
                                  "two_level_float64", "two_level_float32",
                                  "two_level_bfloat16", "two_level_float16",
                                  "forced_two_level_short_k", "forced_halo_long_k"])
def test_fftconv_equals_single_process(world, name):
    P, per_rank = _case(world, name)
    dtype = next(d for d in ("float64", "float32", "bfloat16", "float16") if d in name) \
        if "forced" not in name else "float64"
    if dtype in TOL:
        _check_vs_single(per_rank, dtype, "fftconv %s P=%d" % (name, P))
    else:
        _check_half(per_rank, "fftconv %s P=%d" % (name, P))
    scheme = "two_level" if "two_level" in name else "halo"
    for r in per_rank:
        assert r["scheme"] == scheme
        assert re.search(r"\n  %s +<- serves it" % scheme, r["explain"]), r["explain"]
        # Bytes counted by traffic() equal the plan's, forward + backward, on every rank.
        assert r["traffic"] == r["plan"], (r["traffic"], r["plan"], r["phases"])
    if scheme == "halo" and "forced" not in name:
        # The one-step shard: the next rank's halo of Lk - 1 = 4 inputs comes from more than
        # one rank, so some rank received from two or more ranks and sent to two or more.
        assert sum(r["traffic"][1] for r in per_rank) > 0


def test_validation_raises_on_every_rank(world):
    P, per_rank = _case(world, "validation")
    last = P - 1
    expect = {  # case: (error type, words every rank's message must contain)
        "H": ("ValueError", ["H (u_local.shape[1])", "rank %d" % last]),
        "dtype": ("ValueError", ["u_local's dtype", "float64", "rank %d" % last]),
        "Lk": ("ValueError", ["Lk (k.shape[1])", "rank %d" % last]),
        "B_ssm": ("ValueError", ["B (u_local.shape[0])", "rank %d" % last]),
        "state_shape": ("ValueError", ["N/2 (dA.shape[1])", "rank %d" % last]),
        "requires_grad": ("ValueError", ["u_local.requires_grad", "rank %d" % last]),
        "bad_g_in": ("ValueError", ["g_in must have shape", "rank %d" % last]),
        "bad_type": ("TypeError", ["u must be", "rank %d" % last]),
        "bad_scheme": ("ValueError", ["scheme", "rank %d" % last]),
    }
    for case, (kind, words) in expect.items():
        for r, rep in enumerate(per_rank):
            got_kind, msg = rep[case]
            assert got_kind == kind, (case, r, got_kind, msg)
            for w in words:
                assert w in msg, (case, r, w, msg)
    for r, rep in enumerate(per_rank):
        assert rep["after"] == [B, H, LENGTHS[P][r]]


def test_layers_sequence_parallel(world):
    P, per_rank = _case(world, "layers")
    keys = sorted(per_rank[0].keys() - {"seconds"})
    assert len([k for k in keys if k.startswith("full:")]) >= 15
    for key in keys:
        rel = _rel(per_rank, key)
        assert rel <= 1e-12, (key, rel)


def test_spawned_runs_stay_small(world):
    """Every case of a world size together takes seconds, not minutes (the whole file is meant
    to stay under about a minute on 2 cores, the start included)."""
    P, reports, failure = world
    assert all(reports) and failure is None, failure
    total = max(sum(c["seconds"] for c in rep.values()) for rep in reports)
    print("P=%d: cases took %.1f s" % (P, total))
    assert total < 40


# --- in one process ----------------------------------------------------------------------------

def test_group_of_one_is_the_single_process_op():
    """No process group: the single-process ops themselves, bit for bit."""
    g = _gen(7)
    u = torch.randn(2, 3, 50, generator=g)
    k = torch.randn(3, 50, generator=g)
    D = torch.randn(3, generator=g)
    gi = torch.rand(2, 3, 50, generator=g)
    assert torch.equal(distributed.fftconv(u, k, D, g_in=gi),
                       flashconv.fftconv(u, k, D, g_in=gi))
    dA, dB, C, Dd = _ssm_params(8, 3, 4, torch.complex64)
    assert torch.equal(distributed.ssm_conv(u, dA, dB, C, Dd.float()),
                       ssm_conv_single(u, dA, dB, C, Dd.float()))
    assert "single" in distributed.explain(u, k, D)


def test_initialised_group_of_one(tmp_path):
    """A one-rank gloo group: the single-process op, and reduce_gradients changes nothing."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method="file://%s" % (tmp_path / "rdv"), rank=0,
                            world_size=1)
    try:
        g = _gen(9)
        u = torch.randn(1, 2, 40, generator=g)
        k = _leaf(torch.randn(2, 40, generator=g))
        y = distributed.fftconv(u, k)
        assert torch.equal(y, flashconv.fftconv(u, k))
        y.sum().backward()
        before = k.grad.clone()
        distributed.reduce_gradients([k])
        assert torch.equal(k.grad, before)
    finally:
        dist.destroy_process_group()


def test_local_errors_without_group():
    u = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"k must have shape \(H, Lk\) = \(3, Lk\)"):
        distributed.fftconv(u, torch.randn(4, 5))
    with pytest.raises(ValueError, match="group was given but torch.distributed is not"):
        distributed.fftconv(u, torch.randn(3, 5), group=object())
    with pytest.raises(ValueError, match="scheme"):
        distributed.fftconv(u, torch.randn(3, 5), scheme="ring")


def test_two_level_transform_in_one_process():
    """The two-level transform with a group of one (its outer stage of length 2): forward and
    both gradients against flashconv.fftconv, float64, odd H, kernels shorter and longer than L."""
    comm = distributed._Comm(None, 0, 1, torch.device("cpu"))
    g = _gen(10)
    for Bq, Hq, L, Lk in ((2, 3, 37, 37), (1, 4, 64, 10), (1, 1, 8, 20)):
        u = _leaf(torch.randn(Bq, Hq, L, dtype=torch.float64, generator=g))
        k = _leaf(torch.randn(Hq, Lk, dtype=torch.float64, generator=g))
        y = distributed._TwoLevel.apply(u, k, comm, distributed._Layout([L], 0, min(L, Lk)))
        ref = flashconv.fftconv(u, k)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
        for a, b in zip(torch.autograd.grad(y, (u, k), dy), torch.autograd.grad(ref, (u, k), dy)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_plans_choose_and_count():
    """The choice rule and the byte formulas of docs/distributed.md."""
    p = distributed.plan_fftconv([1000, 1000], 1, 8, 64, "bfloat16")
    assert p.scheme == "halo" and p.halo == 63
    assert p.sent == (63 * 8 * 2, 0) and p.received == (0, 63 * 8 * 2)  # u's dtype, ungated
    assert p.sent_backward == (0, 63 * 8 * 4)                            # gradients in float32
    g = distributed.plan_fftconv([1000, 1000], 1, 8, 64, "bfloat16", gated=True)
    assert g.sent == (63 * 8 * 4, 0)                                     # x = g_in u in float32
    # A kernel longer than the longest shard: the two-level transform. With even shards and
    # L / P a multiple of P: 6 (P - 1)/P B H M values of the compute dtype forward, M = L / P.
    P, L, Bq, Hq = 4, 1 << 12, 2, 8
    t = distributed.plan_fftconv([L // P] * P, Bq, Hq, L, "float32")
    M = L // P
    assert t.scheme == "two_level" and t.M == M
    assert t.sent == t.received == (6 * (P - 1) * Bq * Hq * M * 4 // P,) * P
    assert t.sent_backward == ((6 * (P - 1) * Bq * Hq + 3 * (P - 1) * Hq) * M * 4 // P,) * P
    assert re.search(r"two_level +<- serves it", t.summary())
    assert "longer than the longest piece" in t.summary()
    # Short shards: a halo longer than every shard is not taken.
    assert distributed.plan_fftconv([3, 3, 3], 1, 1, 5, "float32").scheme == "two_level"
    assert distributed.plan_fftconv([3, 1, 3], 1, 1, 4, "float32").scheme == "halo"
    s = distributed.plan_ssm_conv([10, 20, 30], 2, 3, 4, "float32")
    assert s.sent == (2 * 2 * 3 * 4 * 8,) * 3


def test_bench_estimate_uses_the_formulas():
    """bench/distributed.py's written estimate (8 GPUs, B = 1, H = 768, bfloat16 u): the bytes
    are the plans' formulas of docs/distributed.md, the times follow from the stated links."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "distributed.py"
    spec = importlib.util.spec_from_file_location("bench_distributed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.estimates()
    est = bench.EST
    P, Hq, m = est["ranks"], est["H"], est["m"]
    assert {r["L"] for r in rows} == {1 << 20, 1 << 22, 1 << 24, 1 << 26}
    for r in rows:
        M = r["L"] // P
        want = {("state_scan", "fwd"): (P - 1) * Hq * m * 8,
                ("halo", "fwd"): (est["short_lk"] - 1) * Hq * 2,
                ("two_level", "fwd"): 6 * (P - 1) * Hq * M * 4 // P,
                ("two_level", "fwdbwd"): (12 * (P - 1) * Hq + 3 * (P - 1) * Hq) * M * 4 // P}
        if (r["scheme"], r["mode"]) in want:
            assert r["bytes_sent_per_rank"] == want[r["scheme"], r["mode"]], r
        nv = est["links"]["nvlink"]
        assert math.isclose(r["nvlink_s"], r["collectives"] * nv["latency_s"]
                            + r["bytes_sent_per_rank"] / nv["bytes_per_s"])
        assert math.isclose(r["compute_floor_s"], r["hbm_floor_bytes_per_rank"] / 3.0e12)
