"""One sequence across processes: time and bytes per rank of flashconv.distributed on CPU ranks.

    python bench/distributed.py                  # P = 1, 2, 4 gloo ranks; L = 64K, 256K
                                                 # (a few minutes on 2 cores)
    python bench/distributed.py --max-L 1048576  # ... and 1M (about 8 minutes on 2 cores)
    python bench/distributed.py --max-L 4194304  # ... and 4M (an hour or more on 2 cores)
    python bench/distributed.py --quick          # L = 16K, 64K (smoke test)
    python bench/distributed.py --estimates-only # the written estimate (no processes spawned)

For each P in --ranks a gloo process group of P processes is spawned on this machine
(torch.multiprocessing, a file:// rendezvous); the sequence of length L is split evenly, rank r
holding [r L / P, (r + 1) L / P). B = 1, H = 8 (--B, --H), float32. Methods, forward (fwd,
torch.no_grad) and forward + backward (fwdbwd: autograd for u and the parameters; the
parameters' reduce_gradients is not included):

- fftconv_long:  distributed.fftconv(u, k, D) with a length-L kernel: the two-level
                 distributed FFT (docs/distributed.md);
- fftconv_short: the same with Lk = 64 taps: the halo exchange;
- ssm_conv:      distributed.ssm_conv(u, dA, dB, C, D), N/2 = 32 complex modes: state passing
                 with the ranks' states scanned.

P = 1 is a group of one: the single-process op itself (flashconv.fftconv /
state_passing.ssm_conv, which distributed.* call there); the same process also times the
single-process op called directly ("single" rows). Threads: each rank sets
torch.set_num_threads(max(1, cores // P)) (--threads overrides); P ranks on fewer cores than P
share them (P = 4 on 2 cores: two ranks per core), so the times are those of this machine, not
of P devices: they show the schemes' overheads, not a speed-up.

Time: the slowest rank's time of one call (a barrier before each call), the fastest of --reps
calls after a first untimed one; bytes: what flashconv.distributed.traffic() counted on each
rank for one call (payload to and from other ranks; the metadata check's all_gather
separately), next to plan_fftconv / plan_ssm_conv's formulas.

The report also carries a written estimate (section "estimates", printed too) for 8 GPUs on
NVLink and on 400 Gb/s InfiniBand, B = 1, H = 768, L = 1M .. 64M: communication time from the
formulas' bytes and stated link assumptions against a compute time from the HBM floor of
bench/model.py (3.0e12 B/s). These are ESTIMATES from stated assumptions, not measurements.

A JSON report goes to bench/results/distributed_<date>_cpu[_quick].json (or --out).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("fftconv_long", "fftconv_short", "ssm_conv")
MODES = ("fwd", "fwdbwd")
LENGTHS = [1 << 16, 1 << 18, 1 << 20, 1 << 22]
DEFAULT_MAX_L = 1 << 18
QUICK_LENGTHS = [1 << 14, 1 << 16]
SHORT_LK = 64
M_STATE = 32  # N/2 complex modes (S4D d_state = 64)

# --- the written estimate: assumptions ---------------------------------------------------------

EST = {
    "ranks": 8, "B": 1, "H": 768, "io_dtype": "bfloat16",
    "lengths": [1 << 20, 1 << 22, 1 << 24, 1 << 26],
    "short_lk": SHORT_LK, "m": M_STATE,
    "links": {
        # Bytes per second per direction per GPU, and a latency per collective call.
        "nvlink": {"bytes_per_s": 450e9, "latency_s": 10e-6,
                   "what": "8 GPUs in one node on NVLink/NVSwitch, about 450 GB/s per "
                           "direction per GPU"},
        "infiniband": {"bytes_per_s": 400e9 / 8, "latency_s": 25e-6,
                       "what": "400 Gb/s InfiniBand per GPU (50 GB/s per direction), every "
                               "byte a rank sends crossing it (one GPU per node, or the "
                               "worst case)"},
    },
    "hbm_bytes_per_s": 3.0e12,
    "hbm_what": "bench/model.py's HBM floor: an H100 SXM's measured copy bandwidth",
    "gpu_memory_bytes": 80e9,
}


def _collectives(scheme, mode):
    """Collective calls of one call: the metadata all_gather plus the scheme's."""
    data = {"state_scan": 1, "halo": 1, "two_level": 4}[scheme]
    # two_level backward: the forward transform of dy, inverse transforms for du and dk.
    bwd = {"state_scan": 1, "halo": 1, "two_level": 6}[scheme]
    return 1 + data + (bwd if mode == "fwdbwd" else 0)


def _floor_bytes(scheme, mode, B, H, L, P, lk, esize):
    """HBM bytes one rank must move at least (the single-device floor of bench/model.py, per
    rank): forward u read and y written once, backward u and dy read, du written; the kernel
    k (H, lk) float32 read (and dk written backward) - whole on every rank, as the two-level
    scheme needs it (replicated); the halo's and state scan's parameters are small."""
    data = B * H * L // P * esize
    kern = H * lk * 4 if scheme == "two_level" else 0
    if mode == "fwd":
        return 2 * data + kern
    return 5 * data + 3 * kern


def estimates(est=EST):
    """Rows: per L, scheme and mode the bytes each rank sends (the plans' formulas), the
    communication time on each link (collectives x latency + bytes / bandwidth), the compute
    time from the HBM floor, and their ratio. All estimates."""
    from flashconv import distributed

    P, B, H, dt = est["ranks"], est["B"], est["H"], est["io_dtype"]
    esize = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}[dt]
    rows = []
    for L in est["lengths"]:
        lengths = [L // P] * P
        plans = {"state_scan": distributed.plan_ssm_conv(lengths, B, H, est["m"], dt),
                 "halo": distributed.plan_fftconv(lengths, B, H, est["short_lk"], dt),
                 "two_level": distributed.plan_fftconv(lengths, B, H, L, dt)}
        for scheme, plan in plans.items():
            assert plan.scheme == scheme, (scheme, plan.scheme)
            lk = {"state_scan": 0, "halo": est["short_lk"], "two_level": L}[scheme]
            for mode in MODES:
                sent = max(plan.sent) + (max(plan.sent_backward) if mode == "fwdbwd" else 0)
                floor = _floor_bytes(scheme, mode, B, H, L, P, lk, esize)
                compute_s = floor / est["hbm_bytes_per_s"]
                row = {"L": L, "scheme": scheme, "mode": mode, "bytes_sent_per_rank": sent,
                       "collectives": _collectives(scheme, mode),
                       "hbm_floor_bytes_per_rank": floor, "compute_floor_s": compute_s,
                       "u_bytes_per_rank": B * H * L // P * esize,
                       "kernel_bytes_per_rank": H * lk * 4}
                for name, link in est["links"].items():
                    t = row["collectives"] * link["latency_s"] + sent / link["bytes_per_s"]
                    row[name + "_s"] = t
                    row[name + "_over_compute"] = t / compute_s
                if scheme == "two_level" and mode == "fwdbwd":
                    # reduce_gradients of the replicated kernel's shares (ring all_reduce).
                    row["dk_allreduce_bytes_per_rank"] = 2 * (P - 1) * H * lk * 4 // P
                rows.append(row)
    return rows


def _gb(b):
    return "%.3g GB" % (b / 1e9) if b >= 1e8 else "%.3g MB" % (b / 1e6)


def _t(s):
    if s >= 1:
        return "%.3g s" % s
    return "%.3g ms" % (s * 1e3) if s >= 1e-4 else "%.3g us" % (s * 1e6)


def print_estimates(rows, est=EST):
    print("\nESTIMATE (not measured): %d GPUs, B = %d, H = %d, %s u, per layer, per rank; "
          "communication = collectives x latency + bytes / bandwidth (NVLink %.0f GB/s, %g us; "
          "IB %.0f GB/s, %g us); compute = HBM floor at %.1e B/s"
          % (est["ranks"], est["B"], est["H"], est["io_dtype"],
             est["links"]["nvlink"]["bytes_per_s"] / 1e9,
             est["links"]["nvlink"]["latency_s"] * 1e6,
             est["links"]["infiniband"]["bytes_per_s"] / 1e9,
             est["links"]["infiniband"]["latency_s"] * 1e6, est["hbm_bytes_per_s"]))
    print("%-6s %-10s %-6s %11s %11s %11s %9s %11s %9s  %s" % (
        "L", "scheme", "mode", "sent/rank", "compute", "NVLink", "x compute", "IB",
        "x compute", "k per rank"))
    for r in rows:
        kb = r["kernel_bytes_per_rank"]
        note = "" if r["scheme"] != "two_level" else _gb(kb) + (
            " (k + u over %.0f GB: does not fit)" % (est["gpu_memory_bytes"] / 1e9)
            if kb + r["u_bytes_per_rank"] > est["gpu_memory_bytes"] else "")
        print("%-6s %-10s %-6s %11s %11s %11s %9.3g %11s %9.3g  %s" % (
            "%dM" % (r["L"] >> 20), r["scheme"], r["mode"], _gb(r["bytes_sent_per_rank"]),
            _t(r["compute_floor_s"]), _t(r["nvlink_s"]), r["nvlink_over_compute"],
            _t(r["infiniband_s"]), r["infiniband_over_compute"], note))


# --- the measurement: one spawned group per P -----------------------------------------------------

def _inputs(method, B, H, L, n, rank, mode):
    """(call, leaves): one call on this rank's piece of length n of a sequence of length L."""
    import math

    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    u = torch.randn(B, H, n, generator=g)
    D = torch.randn(H, generator=torch.Generator().manual_seed(1))
    if method == "ssm_conv":
        gp = torch.Generator().manual_seed(2)
        A = torch.complex(torch.full((M_STATE,), -0.5, dtype=torch.float64),
                          math.pi * torch.arange(M_STATE, dtype=torch.float64))
        dt = torch.exp(torch.empty(H, 1, dtype=torch.float64).uniform_(
            math.log(1e-3), math.log(1e-1), generator=gp))
        dA = torch.exp(dt * A)
        dB = (dA - 1) / A
        C = torch.randn(H, M_STATE, dtype=torch.complex128, generator=gp)
        params = [t.to(torch.complex64) for t in (dA, dB, C)] + [D]
    else:
        lk = L if method == "fftconv_long" else SHORT_LK
        params = [torch.randn(H, lk, generator=torch.Generator().manual_seed(3)) / lk ** 0.5, D]
    leaves = [u] + params
    if mode == "fwdbwd":
        for t in leaves:
            t.requires_grad_(True)
    return leaves


def _call(method, leaves, group, single, mode):
    import torch

    import flashconv
    from flashconv import distributed
    from flashconv.state_passing import ssm_conv

    def fn():
        with torch.set_grad_enabled(mode == "fwdbwd"):
            if method == "ssm_conv":
                y = (ssm_conv(*leaves) if single
                     else distributed.ssm_conv(*leaves, group=group))
            else:
                u, k, D = leaves
                y = (flashconv.fftconv(u, k, D) if single
                     else distributed.fftconv(u, k, D, group=group))
            if mode == "fwdbwd":
                y.backward(torch.ones_like(y))
                for t in leaves:
                    t.grad = None
    return fn


def _worker(rank, P, configs, threads, reps, init_file, out_file):
    import torch
    import torch.distributed as dist

    from flashconv import distributed

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=P,
                            timeout=datetime.timedelta(seconds=1800))
    group = dist.group.WORLD
    rows = []
    for cfg in configs:
        method, mode, L, B, H, single = (cfg[k] for k in ("method", "mode", "L", "B", "H",
                                                          "single"))
        n = L // P + (1 if rank < L % P else 0)
        row = dict(cfg, P=P, threads=threads)
        try:
            leaves = _inputs(method, B, H, L, n, rank, mode)
            fn = _call(method, leaves, group, single, mode)
            dist.barrier()
            with distributed.traffic() as tr:
                t0 = time.perf_counter()
                fn()
                first = time.perf_counter() - t0
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            mine = torch.tensor([first, min(times), statistics.median(times)],
                                dtype=torch.float64)
            everyone = [torch.empty_like(mine) for _ in range(P)]
            dist.all_gather(everyone, mine)
            row.update(first_s=max(float(t[0]) for t in everyone),
                       time_s=max(float(t[1]) for t in everyone),
                       median_s=max(float(t[2]) for t in everyone),
                       time_per_rank_s=[float(t[1]) for t in everyone],
                       sent=tr.sent, received=tr.received, control_sent=tr.control_sent,
                       phases=tr.phases)
            if not single:
                lengths = [L // P + (1 if r < L % P else 0) for r in range(P)]
                if method == "ssm_conv":
                    plan = distributed.plan_ssm_conv(lengths, B, H, M_STATE, "float32")
                else:
                    lk = L if method == "fftconv_long" else SHORT_LK
                    plan = distributed.plan_fftconv(lengths, B, H, lk, "float32")
                row.update(scheme=plan.scheme, M=plan.M, plan_sent=plan.sent[rank] + (
                    plan.sent_backward[rank] if mode == "fwdbwd" else 0))
            else:
                row.update(scheme="single-process op")
            del leaves, fn
        except Exception:  # noqa: BLE001 - the row says what failed; the others go on
            row["error"] = traceback.format_exc(limit=3)
        gathered = [None] * P
        dist.all_gather_object(gathered, row)
        if rank == 0:
            row = gathered[0]
            row["sent_per_rank"] = [g.get("sent") for g in gathered]
            row["received_per_rank"] = [g.get("received") for g in gathered]
            row["plan_sent_per_rank"] = [g.get("plan_sent") for g in gathered]
            errors = [g["error"] for g in gathered if "error" in g]
            if errors:
                row["error"] = errors[0]
            rows.append(row)
            _print_row(row)
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _print_row(r):
    if "error" in r:
        msg = "error: %s" % r["error"].strip().splitlines()[-1]
    else:
        msg = "%9.1f ms (first %.1f)  sent/rank %s" % (
            r["time_s"] * 1e3, r["first_s"] * 1e3, _bytes_text(r.get("sent_per_rank")))
    who = "single" if r["single"] else "P=%d" % r["P"]
    print("  %-6s %-13s %-6s L=%-8d %s" % (who, r["method"], r["mode"], r["L"], msg),
          flush=True)


def _bytes_text(v):
    if not v or v[0] is None:
        return "-"
    return "max %s" % _gb(max(v)) if max(v) else "0"


def run_world(P, configs, threads, reps):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(P, configs, threads, reps, os.path.join(tmp, "rdv"), out),
                 nprocs=P)
        return json.loads(Path(out).read_text())


def print_table(rows):
    print("\nMEASURED on this machine (CPU, gloo): the slowest rank's time of one call, ms; "
          "bytes sent per rank (max over ranks)")
    keys = sorted({(r["method"], r["mode"], r["L"]) for r in rows},
                  key=lambda k: (METHODS.index(k[0]), MODES.index(k[1]), k[2]))
    cols = sorted({("single" if r["single"] else "P=%d" % r["P"]) for r in rows},
                  key=lambda c: (c != "single", c))
    print("%-13s %-6s %-8s" % ("method", "mode", "L") + "".join("%12s" % c for c in cols)
          + "   bytes sent per rank (P = 2, 4)")
    for m, mode, L in keys:
        line = "%-13s %-6s %-8d" % (m, mode, L)
        sent = []
        for c in cols:
            r = next((r for r in rows if (r["method"], r["mode"], r["L"]) == (m, mode, L)
                      and ("single" if r["single"] else "P=%d" % r["P"]) == c), None)
            if r is None or "error" in r:
                line += "%12s" % ("-" if r is None else "error")
                continue
            line += "%12.1f" % (r["time_s"] * 1e3)
            if not r["single"] and r["P"] > 1:
                sent.append(_gb(max(r["sent_per_rank"])))
        print(line + "   " + ", ".join(sent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-L", type=int, default=DEFAULT_MAX_L,
                    help="largest L of 64K, 256K, 1M, 4M (default 256K; 4194304 for 4M: an hour "
                    "or more on 2 cores)")
    ap.add_argument("--lengths", type=int, nargs="+", help="these L instead")
    ap.add_argument("--quick", action="store_true", help="L = 16K, 64K only")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--reps", type=int, default=2, help="timed calls after the first")
    ap.add_argument("--threads", type=int, help="threads per rank (default cores // P, >= 1)")
    ap.add_argument("--estimates-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    est_rows = estimates()
    print_estimates(est_rows)
    if args.estimates_only:
        return 0
    from bench.long import _environment

    env = _environment("cpu")
    cores = env["cpu_threads"]
    lengths = args.lengths or (QUICK_LENGTHS if args.quick
                               else [L for L in LENGTHS if L <= args.max_L])
    print("\n%d CPU cores, load average %s; L = %s, B = %d, H = %d, float32"
          % (cores, " ".join("%.1f" % x for x in env["loadavg_start"]),
             ", ".join(str(L) for L in lengths), args.B, args.H), flush=True)
    rows = []
    t_start = time.perf_counter()
    for P in args.ranks:
        threads = args.threads or max(1, cores // P)
        configs = [{"method": m, "mode": mode, "L": L, "B": args.B, "H": args.H,
                    "single": single}
                   for L in lengths for m in args.methods for mode in args.modes
                   for single in ((True, False) if P == 1 else (False,))]
        print("P = %d ranks, %d thread%s each (%.0f s so far)" % (
            P, threads, "" if threads == 1 else "s", time.perf_counter() - t_start),
            flush=True)
        rows += run_world(P, configs, threads, args.reps)
    print_table(rows)
    print_estimates(est_rows)
    env["loadavg_end"] = list(os.getloadavg())
    report = {
        "kind": "distributed", "device": "cpu", "backend": "gloo",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "B": args.B, "H": args.H, "dtype": "float32",
        "lengths": lengths, "ranks": args.ranks, "short_lk": SHORT_LK, "m": M_STATE,
        "shards": "even: rank r holds [r L / P, (r + 1) L / P)",
        "time": ("time_s: the slowest rank's time of one call (barrier before each), the "
                 "fastest of the timed calls after a first untimed one (first_s); median_s "
                 "their median. Ranks share this machine's cores: P ranks on fewer cores than "
                 "P are not P devices"),
        "bytes": ("sent / received per rank: payload counted by distributed.traffic() for one "
                  "call (forward, or forward + backward), control_sent: the metadata check; "
                  "plan_sent: plan_fftconv / plan_ssm_conv's formula"),
        "env": env, "rows": rows,
        "estimates": {
            "label": ("ESTIMATES from stated assumptions, not measurements: communication "
                      "time = collectives x latency + bytes sent per rank / link bandwidth; "
                      "compute time = HBM floor bytes per rank / hbm_bytes_per_s "
                      "(a lower bound on compute)"),
            "assumptions": EST, "rows": est_rows},
        "wall_s": time.perf_counter() - t_start,
    }
    from bench._common import report_path, write_report

    write_report(report_path(args.out, "distributed", "cpu", quick=args.quick), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
