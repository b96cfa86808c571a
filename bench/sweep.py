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
line with the elapsed time and an estimate of the time left.
"""
import argparse
import datetime
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

    The ETA extrapolates the mean time per configuration so far: rough, since
    configurations differ in size, but enough to tell minutes from hours.
    """

    def __init__(self, n):
        self.n, self.i, self.t0 = n, 0, time.perf_counter()

    def __call__(self, text):
        self.i += 1
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.i * (self.n - self.i)
        print("[%3d/%d] %s  (elapsed %s, ETA %s)" % (self.i, self.n, text, _hms(elapsed), _hms(eta)),
              flush=True)


def _hms(seconds):
    m, s = divmod(int(round(seconds)), 60)
    return "%dm%02ds" % (m, s) if m else "%ds" % s


def cpu_section(shapes):
    """Forward and forward+backward timings of flashconv's CPU path, the torch.fft
    fftconv_ref and the scipy pipeline on the same inputs. Half-precision inputs: the
    baselines (torch.fft has no CPU bfloat16 transform, numpy no bfloat16) convert to
    float32 first and back after, inside the timed call, as a user of them would."""
    rows = []
    torch.manual_seed(0)
    progress = Progress(len(shapes))
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
        rows.append(r)
        progress("cpu B=%d H=%d L=%d %s: flashconv %.2f ms, torch ref %.2f ms, scipy %.2f ms"
                 % (B, H, L, dtype, r["flashconv_s"] * 1e3, r["torch_ref_s"] * 1e3,
                    r["scipy_s"] * 1e3))
    return rows


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
    progress = Progress(len(configs))
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
        # Plain "3x" labels; on the minor ticks too when the data span about a decade or
        # less (a log axis may otherwise show no label at all). Called after plotting.
        fmt = FuncFormatter(lambda v, _: "%gx" % float("%.2g" % v))
        ax.yaxis.set_major_formatter(fmt)
        lo, hi = ax.get_ylim()
        ax.yaxis.set_minor_formatter(fmt if hi / lo < 100 else NullFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("L")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


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
    fig.suptitle("flashconv sweep %s, commit %s%s" % (report["date"][:10], report["commit"][:12],
                                                       " (quick)" if report["quick"] else ""), fontsize=11)
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
    args = ap.parse_args(argv)
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
    }
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
