"""The fftconv benchmark sweep: flashconv against the torch.fft reference (and scipy on CPU).

    python bench/sweep.py            # full sweep: CPU section, and the GPU section if a GPU is visible
    python bench/sweep.py --quick    # a few small shapes (smoke test)

CPU section: flashconv's CPU path, the torch.fft ``fftconv_ref`` and the plain scipy.fft
pipeline on the same inputs in one run, forward and forward+backward, with the ratios.
GPU section (when torch sees a GPU): bf16/fp16/fp32, B = 16 and 64, H = 768, L = 256 ... 16K:
time, achieved GB/s, % of the device-to-device copy bandwidth measured in the same run,
and the speedup over ``fftconv_ref`` measured in the same run.

A JSON report (environment, commit, every figure) goes to bench/results/ (or --out), and a
PNG plot of the same figures next to it (same name, .png): time and speedup against L,
log-log, per dtype and batch size on GPU. The plot needs matplotlib, the "bench" extra:
``pip install -e ".[bench]"`` (or ``--no-plot``). Each configuration prints a progress
line with the elapsed time and an estimate of the time left, from the configurations
measured so far (after a warm-up call, so the first one is not the libraries loading).

On a shared machine other work changes the CPU timings several-fold: the report records the
threads used and the load average at the start and end (JSON and the plot's title), and the
sweep warns when the load exceeds the cores. ``--threads 1`` gives steadier numbers there
(torch's OpenMP threads spin-wait for each other when a core is taken).
"""
import argparse
import datetime
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flashconv  # noqa: E402
from bench._common import cuda_event_time, engines_for, report_path, write_report  # noqa: E402
from flashconv.reference import fftconv_ref, scipy_fftconv  # noqa: E402

# CPU shapes (B, H, L, dtype, set): every power of two L from 256 to 256K at about 2M
# elements (B*H*L) in float32 (set "sweep": the plotted series), then the shapes the
# CPU-speed issue quotes and a few float64 / bfloat16 ones (set "extra": table only).
CPU_SHAPES = [(max(1, (1 << 21) // (64 * L)), 64, L, "float32", "sweep")
              for L in (256, 512, 1024, 2048, 4096, 8192, 16384)]
CPU_SHAPES += [(1, 32, 65536, "float32", "sweep"), (1, 16, 131072, "float32", "sweep"),
               (1, 8, 262144, "float32", "sweep")]
CPU_SHAPES += [(B, H, L, "float32", "extra") for B, H, L in
               ((8, 64, 1024), (8, 64, 4096), (4, 64, 16384), (1, 16, 262144))]
CPU_SHAPES += [(B, H, L, dt, "extra") for dt in ("float64", "bfloat16")
               for B, H, L in ((8, 64, 1024), (2, 64, 16384))]
CPU_QUICK = [(2, 8, 256, "float32", "sweep"), (1, 4, 4096, "float32", "sweep"),
             (1, 4, 512, "bfloat16", "extra")]

GPU_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
GPU_BATCHES = [16, 64]
GPU_H = 768
GPU_DTYPES = ["bfloat16", "float16", "float32"]


def git_commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_cpu(fns, min_rounds=7, min_time=0.5, max_rounds=40):
    """Wall times (s) of several functions of the same inputs, interleaved: after one
    warm-up call each, round after round, every function once per round (in a rotating
    order), until min_rounds rounds and min_time seconds. The host is shared and its speed
    drifts by tens of percent over seconds; interleaving exposes every function to the same
    drift, so their ratios hold up where separately timed medians do not.
    Returns {name: {"median": s, "min": s}}."""
    names = list(fns)
    for name in names:
        fns[name]()
    times = {name: [] for name in names}
    t_end = time.perf_counter() + min_time
    r = 0
    while r < min_rounds or (time.perf_counter() < t_end and r < max_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        r += 1
    return {name: {"median": statistics.median(ts), "min": min(ts)} for name, ts in times.items()}


def time_gpu(fn, reps=20, warmup=3):
    """Median time (s) of fn() on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(cuda_event_time(fn) for _ in range(reps))


class Progress:
    """Progress lines ``[  i/n] text  (elapsed, ETA)`` for one section of the sweep.

    works: each configuration's amount of work, in order (e.g. B*H*L*log2 L). The ETA
    predicts every configuration left from those measured: time per unit of work (the median
    over measured configurations, so one slow outlier does not set it), at least the shortest
    time a configuration took (the timing loops' minimum duration). The mean time per
    configuration would not do: sizes differ, and the first one used to carry the libraries'
    first-call costs (now a warm-up call before the clock starts; bench/sweep.py warmup()).
    """

    def __init__(self, works, clock=time.perf_counter):
        self.works, self.clock = [float(w) for w in works], clock
        self.n, self.i, self.t0 = len(self.works), 0, clock()
        self.last, self.took = self.t0, []

    def eta(self):
        """Seconds predicted for the configurations not yet measured."""
        if not self.took:
            return float("nan")
        rate = statistics.median(t / w for t, w in zip(self.took, self.works))
        floor = min(self.took)
        return sum(max(floor, rate * w) for w in self.works[self.i:])

    def __call__(self, text):
        now = self.clock()
        self.took.append(now - self.last)
        self.last = now
        self.i += 1
        print("[%3d/%d] %s  (elapsed %s, ETA %s)" % (self.i, self.n, text, _hms(now - self.t0),
                                                     _hms(self.eta())), flush=True)


def _hms(seconds):
    if seconds != seconds:  # NaN: nothing measured yet
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return "%dm%02ds" % (m, s) if m else "%ds" % s


def cpu_section(shapes):
    """Forward and forward+backward timings of flashconv's CPU path, the torch.fft
    fftconv_ref and the scipy pipeline on the same inputs. Half-precision inputs: the
    baselines (torch.fft has no CPU bfloat16 transform, numpy no bfloat16) convert to
    float32 first and back after, inside the timed call, as a user of them would."""
    rows = []
    torch.manual_seed(0)
    warmup()
    progress = Progress(B * H * L * math.log2(max(L, 2)) for B, H, L, _, _ in shapes)
    for B, H, L, dtype, group in shapes:
        tdt = getattr(torch, dtype)
        u = torch.randn(B, H, L).to(tdt)
        k = (torch.randn(H, L) / L ** 0.5).to(tdt)
        D = torch.randn(H).to(tdt)
        half = dtype in ("float16", "bfloat16")
        if half:
            def ref(u_, k_, D_):
                return fftconv_ref(u_.float(), k_.float(), D_.float()).to(u_.dtype)

            def scipy_ref():
                return torch.from_numpy(scipy_fftconv(u.float().numpy(), k.float().numpy(),
                                                      D.float().numpy())).to(tdt)
        else:
            ref = fftconv_ref
            un, kn, Dn = u.numpy(), k.numpy(), D.numpy()

            def scipy_ref():
                return scipy_fftconv(un, kn, Dn)
        r = {"B": B, "H": H, "L": L, "dtype": dtype, "set": group}
        r["engine"], r["engine_bwd"] = engines_for(u, k, D)
        fwd = time_cpu({"flashconv": lambda: flashconv.fftconv(u, k, D),
                        "torch_ref": lambda: ref(u, k, D),
                        "scipy": scipy_ref})
        for name, t in fwd.items():
            r[name + "_s"], r[name + "_min_s"] = t["median"], t["min"]
        r["speedup_vs_torch_ref"] = r["torch_ref_s"] / r["flashconv_s"]
        r["speedup_vs_best_baseline"] = min(r["torch_ref_s"], r["scipy_s"]) / r["flashconv_s"]
        r["speedup_vs_best_baseline_min"] = (min(r["torch_ref_min_s"], r["scipy_min_s"])
                                             / r["flashconv_min_s"])

        # Forward + backward: autograd through each implementation, grads for u, k and D.
        ug, kg, Dg = (t.clone().requires_grad_() for t in (u, k, D))
        dy = torch.randn(B, H, L).to(tdt)

        def fb(fn):
            def run():
                ug.grad = kg.grad = Dg.grad = None
                fn(ug, kg, Dg).backward(dy)
            return run
        fb_t = time_cpu({"flashconv": fb(flashconv.fftconv), "torch_ref": fb(ref)},
                        min_rounds=5)
        for name, t in fb_t.items():
            r[name + "_fwdbwd_s"], r[name + "_fwdbwd_min_s"] = t["median"], t["min"]
        r["fwdbwd_speedup_vs_torch_ref"] = r["torch_ref_fwdbwd_s"] / r["flashconv_fwdbwd_s"]
        r["loadavg"] = os.getloadavg()[0]
        rows.append(r)
        progress("cpu B=%d H=%d L=%d %s: flashconv %.2f ms, torch ref %.2f ms, scipy %.2f ms"
                 % (B, H, L, dtype, r["flashconv_s"] * 1e3, r["torch_ref_s"] * 1e3,
                    r["scipy_s"] * 1e3))
    return rows


def warmup():
    """One small call of everything the CPU section times (forward and backward of flashconv,
    the torch.fft reference, the scipy pipeline): libraries paged in, FFT plans and thread
    pools made before the first configuration's clock starts."""
    u, k, D = torch.randn(2, 4, 512), torch.randn(4, 512), torch.randn(4)
    ug = u.clone().requires_grad_()
    flashconv.fftconv(ug, k, D).sum().backward()
    fftconv_ref(u, k, D)
    scipy_fftconv(u.numpy(), k.numpy(), D.numpy())


def print_cpu_table(rows):
    print("\nCPU forward (ms, median of interleaved runs) and forward+backward; x_best: the"
          " faster baseline / flashconv, by medians and by minima")
    hdr = "%4s %4s %7s %8s | %9s %9s %9s | %6s %6s %8s | %9s %9s %6s" % (
        "B", "H", "L", "dtype", "flashconv", "torch_ref", "scipy", "x_ref", "x_best", "x_best_mn",
        "fb_flash", "fb_ref", "fb_x")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print("%4d %4d %7d %8s | %9.2f %9.2f %9.2f | %6.2f %6.2f %8.2f | %9.2f %9.2f %6.2f" % (
            r["B"], r["H"], r["L"], r["dtype"], r["flashconv_s"] * 1e3, r["torch_ref_s"] * 1e3,
            r["scipy_s"] * 1e3, r["speedup_vs_torch_ref"], r["speedup_vs_best_baseline"],
            r["speedup_vs_best_baseline_min"], r["flashconv_fwdbwd_s"] * 1e3,
            r["torch_ref_fwdbwd_s"] * 1e3, r["fwdbwd_speedup_vs_torch_ref"]))


def copy_bandwidth_gbs(nbytes=1 << 30):
    """Device-to-device copy bandwidth (GB/s, bytes read + written) of the current GPU."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = time_gpu(lambda: dst.copy_(src), reps=20)
    del src, dst
    return 2 * nbytes / t / 1e9


def gpu_section(lengths, batches, H, dtypes):
    dev = torch.cuda.current_device()
    env = {"gpu": torch.cuda.get_device_name(dev), "capability": "%d.%d" % torch.cuda.get_device_capability(dev),
           "cuda": torch.version.cuda, "driver": _nvidia_driver()}
    env["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    print("GPU: %s, measured copy bandwidth %.0f GB/s" % (env["gpu"], env["copy_bandwidth_gbs"]), flush=True)
    rows = []
    configs = [(dt, B, L) for dt in dtypes for B in batches for L in lengths]
    progress = Progress(B * H * L * math.log2(max(L, 2)) for _, B, L in configs)
    for i, (dt, B, L) in enumerate(configs, 1):
        dtype = getattr(torch, dt)
        gen = torch.Generator(device="cuda").manual_seed(i)
        u = torch.randn(B, H, L, device="cuda", generator=gen).to(dtype)
        k = torch.randn(H, L, device="cuda", generator=gen) / L ** 0.5
        D = torch.randn(H, device="cuda", generator=gen)
        r = {"B": B, "H": H, "L": L, "dtype": dt}
        r["engine"], r["engine_bwd"] = engines_for(u, k, D)
        r["flashconv_s"] = time_gpu(lambda: flashconv.fftconv(u, k, D))
        r["torch_ref_s"] = time_gpu(lambda: fftconv_ref(u, k, D))
        nbytes = 2 * B * H * L * u.element_size() + k.numel() * 4 + H * 4  # u once, y once, k, D
        r["bytes"] = nbytes
        r["flashconv_gbs"] = nbytes / r["flashconv_s"] / 1e9
        r["flashconv_pct_copy_bw"] = 100 * r["flashconv_gbs"] / env["copy_bandwidth_gbs"]
        r["speedup_vs_torch_ref"] = r["torch_ref_s"] / r["flashconv_s"]
        rows.append(r)
        progress("gpu %s B=%d L=%d: %.3f ms (%.0f GB/s, %.0f%% of copy), ref %.3f ms, x%.2f"
                 % (dt, B, L, r["flashconv_s"] * 1e3, r["flashconv_gbs"], r["flashconv_pct_copy_bw"],
                    r["torch_ref_s"] * 1e3, r["speedup_vs_torch_ref"]))
        del u, k, D
        torch.cuda.empty_cache()
    return env, rows


def _nvidia_driver():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def print_gpu_table(env, rows):
    print("\nGPU forward on %s (copy bandwidth %.0f GB/s)" % (env["gpu"], env["copy_bandwidth_gbs"]))
    hdr = "%-9s %4s %6s | %10s %8s %6s | %10s %7s" % ("dtype", "B", "L", "flash ms", "GB/s", "%copy",
                                                       "ref ms", "x_ref")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print("%-9s %4d %6d | %10.3f %8.0f %6.1f | %10.3f %7.2f" % (
            r["dtype"], r["B"], r["L"], r["flashconv_s"] * 1e3, r["flashconv_gbs"], r["flashconv_pct_copy_bw"],
            r["torch_ref_s"] * 1e3, r["speedup_vs_torch_ref"]))


def require_matplotlib():
    """Import matplotlib with the file-only Agg backend, or stop with the install command.

    Checked before any timing, so a missing plotting library costs seconds, not a sweep.
    """
    try:
        import matplotlib
    except ImportError:
        sys.exit('bench/sweep.py: matplotlib is needed to plot the sweep (it is in the "bench" extra):\n'
                 '    pip install -e ".[bench]"\n'
                 'or run with --no-plot to write the JSON report only.')
    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt
    return plt


def _loglog(ax, title, ylabel, logy=True):
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if ylabel.startswith("speedup"):
        # Plain "3x" labels at a few round values spread over the axis (speedup_ticks), and
        # no minor labels: matplotlib's own labels on a log axis either vanish on a narrow
        # range or, labelling minor ticks, overlapped (0.7x 0.8x 0.9x). Called after plotting.
        from matplotlib.ticker import FixedLocator

        lo, hi = ax.get_ylim()
        ticks = speedup_ticks(lo, hi)
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: "%gx" % float("%.2g" % v)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(lo, hi)
    ax.set_xlabel("L")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


_ROUND = [0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8]


def speedup_ticks(lo, hi, min_ratio=1.3, most=8):
    """Round speedups within [lo, hi] for a log axis, always 1x when it is in range, the others
    at least min_ratio apart (no two labels closer than about 1/9 of a decade) and at most
    `most` of them."""
    cands = sorted({v * 10.0 ** e for e in range(-3, 4) for v in _ROUND if lo <= v * 10.0 ** e <= hi})
    if not cands:
        return [float("%.2g" % ((lo * hi) ** 0.5))]
    step = max(min_ratio, (hi / lo) ** (1.0 / most))
    keep = [1.0] if lo <= 1.0 <= hi else [cands[0]]
    for v in cands:  # upwards from the anchor
        if v > keep[-1] * step * 0.999:
            keep.append(v)
    down = [keep[0]]
    for v in reversed(cands):  # and downwards
        if v < down[-1] / step / 0.999:
            down.append(v)
    return sorted(set(keep) | set(down))


def _series(rows, key):
    """(L, value) sorted by L."""
    pts = sorted((r["L"], r[key]) for r in rows)
    return [x for x, _ in pts], [y for _, y in pts]


def plot_cpu(ax_row, rows):
    """CPU section: the three implementations and flashconv's ratios, against L.

    The CPU shapes change B*H with L (about 2M elements per call, plus a few listed
    shapes), so times are per element (ns per B*H*L value): comparable across shapes.
    Only the float32 "sweep" series is drawn (one point per L); the extra shapes are in
    the table and the JSON.
    """
    rows = [r for r in rows if r.get("set", "sweep") == "sweep" and r["dtype"] == "float32"]
    per_elem = [dict(r, **{k + "_ns": r[k] * 1e9 / (r["B"] * r["H"] * r["L"]) for k in (
        "flashconv_s", "torch_ref_s", "scipy_s", "flashconv_fwdbwd_s", "torch_ref_fwdbwd_s")}) for r in rows]
    ax = ax_row[0]
    for key, label, style in (("flashconv_s_ns", "flashconv", "o-"), ("torch_ref_s_ns", "torch.fft ref", "s--"),
                              ("scipy_s_ns", "scipy.fft", "^:")):
        ax.plot(*_series(per_elem, key), style, label=label)
    _loglog(ax, "CPU forward, float32", "ns per element (B*H*L)")
    ax.legend(fontsize=8)
    ax = ax_row[1]
    for key, label, style in (("flashconv_fwdbwd_s_ns", "flashconv", "o-"),
                              ("torch_ref_fwdbwd_s_ns", "torch.fft ref", "s--")):
        ax.plot(*_series(per_elem, key), style, label=label)
    _loglog(ax, "CPU forward + backward, float32", "ns per element (B*H*L)")
    ax.legend(fontsize=8)
    ax = ax_row[2]
    for key, label, style in (("speedup_vs_torch_ref", "fwd: torch ref / flashconv", "o-"),
                              ("speedup_vs_best_baseline", "fwd: best of (ref, scipy) / flashconv", "^:"),
                              ("fwdbwd_speedup_vs_torch_ref", "fwd+bwd: torch ref / flashconv", "s--")):
        ax.plot(*_series(rows, key), style, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    _loglog(ax, "CPU speedup of flashconv", "speedup (x)")
    ax.legend(fontsize=8)


def plot_gpu(axes, env, rows):
    """GPU section: one row of panels per dtype; time and speedup against L, a line per B."""
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    batches = sorted({r["B"] for r in rows})
    for ax_row, dt in zip(axes, dtypes):
        for B in batches:
            sel = [r for r in rows if r["dtype"] == dt and r["B"] == B]
            line, = ax_row[0].plot(*_series(sel, "flashconv_s"), "o-", label="flashconv B=%d" % B)
            ax_row[0].plot(*_series(sel, "torch_ref_s"), "s--", color=line.get_color(),
                           label="torch.fft ref B=%d" % B)
            ax_row[1].plot(*_series(sel, "speedup_vs_torch_ref"), "o-", color=line.get_color(),
                           label="B=%d" % B)
        H = rows[0]["H"]
        _loglog(ax_row[0], "%s %s forward, H=%d" % (env["gpu"], dt, H), "time (s)")
        _loglog(ax_row[1], "%s speedup over the torch.fft ref" % dt, "speedup (x)")
        ax_row[1].axhline(1.0, color="k", lw=0.8)
        for ax in ax_row[:2]:
            ax.legend(fontsize=8)
        # Third panel: the fraction of the measured copy bandwidth flashconv reaches.
        for B in batches:
            sel = [r for r in rows if r["dtype"] == dt and r["B"] == B]
            ax_row[2].plot(*_series(sel, "flashconv_pct_copy_bw"), "o-", label="B=%d" % B)
        _loglog(ax_row[2], "%s flashconv, %% of copy bandwidth (%.0f GB/s)" % (dt, env["copy_bandwidth_gbs"]),
                "% of copy bandwidth", logy=False)
        ax_row[2].set_ylim(0, 100)
        ax_row[2].legend(fontsize=8)


def machine_line(report):
    """'2 cores, 2 threads, load 0.4 -> 3.1' (1-minute load average at start -> end)."""
    la = report.get("loadavg", {})
    return "%d cores, %d threads, load %.1f -> %.1f" % (
        report["cpu_threads"], report["threads"]["torch"], la.get("start", [float("nan")])[0],
        la.get("end", [float("nan")])[0])


def load_warning(loadavg, cores, when):
    """A warning line when the 1-minute load average exceeds the cores, else None."""
    if loadavg <= cores:
        return None
    return ("WARNING: load average %.1f at %s on %d cores: other work is running, and CPU timings "
            "swing several-fold with it. Rerun on an idle machine, or with --threads 1 "
            "(steadier on a shared one)." % (loadavg, when, cores))


def write_plot(plt, report, path):
    """One figure: the CPU section (one row) and the GPU section (a row per dtype)."""
    sections = []
    if report.get("cpu_rows"):
        sections.append(("cpu", 1))
    if report.get("gpu_rows"):
        sections.append(("gpu", len({r["dtype"] for r in report["gpu_rows"]})))
    n_rows = sum(n for _, n in sections)
    if n_rows == 0:
        return None
    fig, axes = plt.subplots(n_rows, 3, figsize=(16, 4.2 * n_rows), squeeze=False)
    row = 0
    for kind, n in sections:
        if kind == "cpu":
            plot_cpu(axes[row], report["cpu_rows"])
        else:
            plot_gpu(axes[row:row + n], report["gpu"], report["gpu_rows"])
        row += n
    fig.suptitle("flashconv sweep %s, commit %s%s; %s" % (
        report["date"][:10], report["commit"][:12], " (quick)" if report["quick"] else "",
        machine_line(report)), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (4.2 * n_rows)))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few small shapes (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON report")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU section")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU section")
    ap.add_argument("--no-plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and flashconv's CPU engine (default: all cores); "
                         "1 gives steadier numbers on a machine shared with other jobs")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
        os.environ["FLASHCONV_NUM_THREADS"] = str(args.threads)  # read by the CPU engine per call
    plt = None if args.no_plot else require_matplotlib()

    gpu = torch.cuda.is_available() and not args.no_gpu
    report = {
        "kind": "fftconv_sweep",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": socket.gethostname(),
        "cpu": cpu_name(),
        "cpu_threads": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "versions": {"flashconv": flashconv.__version__, "python": platform.python_version(),
                     "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__},
        "quick": args.quick,
        "engines": flashconv.info()["engines"],
        "threads": {"requested": args.threads, "torch": torch.get_num_threads(),
                    "flashconv_cpu": flashconv._cpu.num_threads()},
        "loadavg": {"start": list(os.getloadavg())},
        "warnings": [],
    }
    print("%d cores, %d threads (torch), load average %s" % (
        report["cpu_threads"], report["threads"]["torch"],
        " ".join("%.1f" % x for x in report["loadavg"]["start"])), flush=True)
    warn = load_warning(report["loadavg"]["start"][0], report["cpu_threads"], "the start")
    if warn:
        report["warnings"].append(warn)
        print(warn, flush=True)
    if not torch.cuda.is_available():
        print("No GPU found (torch.cuda.is_available() is False): timing the CPU paths only.")
    if not args.no_cpu:
        report["cpu_rows"] = cpu_section(CPU_QUICK if args.quick else CPU_SHAPES)
        print_cpu_table(report["cpu_rows"])
    if gpu:
        lengths, batches = ([256, 4096], [4]) if args.quick else (GPU_LENGTHS, GPU_BATCHES)
        env, rows = gpu_section(lengths, batches, 64 if args.quick else GPU_H, GPU_DTYPES)
        report["gpu"], report["gpu_rows"] = env, rows
        print_gpu_table(env, rows)

    report["loadavg"]["end"] = list(os.getloadavg())
    warn = load_warning(report["loadavg"]["end"][0], report["cpu_threads"], "the end")
    if warn:
        report["warnings"].append(warn)
        print(warn, flush=True)
    path = report_path(args.out, "sweep", report.get("gpu", {}).get("gpu", "cpu"),
                       report["commit"][:10], args.quick)
    if plt is not None:
        report["plot"] = path.with_suffix(".png").name
    write_report(path, report)
    if plt is not None and write_plot(plt, report, path.with_suffix(".png")):
        print("plot:   %s" % path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
