"""The fftconv benchmark sweep: flashconv against the torch.fft reference (and scipy on CPU).

    python bench/sweep.py            # full sweep: CPU section, and the GPU section if a GPU is visible
    python bench/sweep.py --quick    # a few small shapes (smoke test)

CPU section: flashconv's CPU path, the torch.fft ``fftconv_ref`` and the plain scipy.fft
pipeline on the same inputs in one run, forward and forward+backward, with the ratios.
GPU section (when torch sees a GPU): bf16/fp16/fp32, B = 16 and 64, H = 768, L = 256 ... 16K:
time, achieved GB/s, % of the device-to-device copy bandwidth measured in the same run,
and the speedup over ``fftconv_ref`` measured in the same run.

A JSON report (environment, commit, every figure) goes to bench/results/ (or --out).
"""
import argparse
import datetime
import json
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
from flashconv.reference import fftconv_ref, scipy_fftconv  # noqa: E402

# CPU shapes: every power of two L from 256 to 256K at about 2M elements (B*H*L), plus the
# shapes the CPU-speed issue quotes.
CPU_SHAPES = [(max(1, (1 << 21) // (64 * L)), 64, L) for L in (256, 512, 1024, 2048, 4096, 8192, 16384)]
CPU_SHAPES += [(1, 32, 65536), (1, 16, 131072), (1, 8, 262144)]
CPU_SHAPES += [(8, 64, 1024), (8, 64, 4096), (4, 64, 16384), (1, 16, 262144)]
CPU_QUICK = [(2, 8, 256), (1, 4, 4096)]

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


def time_cpu(fn, min_reps=5, min_time=0.3):
    """Median wall time (s) of fn() after one warm-up call."""
    fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_gpu(fn, reps=20, warmup=3):
    """Median time (s) of fn() on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def progress(i, n, text):
    print("[%3d/%d] %s" % (i, n, text), flush=True)


def cpu_section(shapes):
    rows = []
    torch.manual_seed(0)
    for i, (B, H, L) in enumerate(shapes, 1):
        u = torch.randn(B, H, L)
        k = torch.randn(H, L) / L ** 0.5
        D = torch.randn(H)
        un, kn, Dn = u.numpy(), k.numpy(), D.numpy()
        r = {"B": B, "H": H, "L": L, "dtype": "float32"}
        r["flashconv_s"] = time_cpu(lambda: flashconv.fftconv(u, k, D))
        r["torch_ref_s"] = time_cpu(lambda: fftconv_ref(u, k, D))
        r["scipy_s"] = time_cpu(lambda: scipy_fftconv(un, kn, Dn))
        r["speedup_vs_torch_ref"] = r["torch_ref_s"] / r["flashconv_s"]
        r["speedup_vs_best_baseline"] = min(r["torch_ref_s"], r["scipy_s"]) / r["flashconv_s"]

        # Forward + backward: autograd through each implementation, grads for u, k and D.
        ug, kg, Dg = (t.clone().requires_grad_() for t in (u, k, D))
        dy = torch.randn(B, H, L)

        def fb(fn):
            def run():
                ug.grad = kg.grad = Dg.grad = None
                fn(ug, kg, Dg).backward(dy)
            return run
        r["flashconv_fwdbwd_s"] = time_cpu(fb(flashconv.fftconv), min_reps=3)
        r["torch_ref_fwdbwd_s"] = time_cpu(fb(fftconv_ref), min_reps=3)
        r["fwdbwd_speedup_vs_torch_ref"] = r["torch_ref_fwdbwd_s"] / r["flashconv_fwdbwd_s"]
        rows.append(r)
        progress(i, len(shapes), "cpu B=%d H=%d L=%d: flashconv %.2f ms, torch ref %.2f ms, scipy %.2f ms"
                 % (B, H, L, r["flashconv_s"] * 1e3, r["torch_ref_s"] * 1e3, r["scipy_s"] * 1e3))
    return rows


def print_cpu_table(rows):
    print("\nCPU forward (float32; ms, median) and forward+backward")
    hdr = "%4s %4s %7s | %9s %9s %9s | %7s %7s | %9s %9s %7s" % (
        "B", "H", "L", "flashconv", "torch_ref", "scipy", "x_ref", "x_best", "fb_flash", "fb_ref", "fb_x")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print("%4d %4d %7d | %9.2f %9.2f %9.2f | %7.2f %7.2f | %9.2f %9.2f %7.2f" % (
            r["B"], r["H"], r["L"], r["flashconv_s"] * 1e3, r["torch_ref_s"] * 1e3, r["scipy_s"] * 1e3,
            r["speedup_vs_torch_ref"], r["speedup_vs_best_baseline"], r["flashconv_fwdbwd_s"] * 1e3,
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
    for i, (dt, B, L) in enumerate(configs, 1):
        dtype = getattr(torch, dt)
        gen = torch.Generator(device="cuda").manual_seed(i)
        u = torch.randn(B, H, L, device="cuda", generator=gen).to(dtype)
        k = torch.randn(H, L, device="cuda", generator=gen) / L ** 0.5
        D = torch.randn(H, device="cuda", generator=gen)
        r = {"B": B, "H": H, "L": L, "dtype": dt}
        r["flashconv_s"] = time_gpu(lambda: flashconv.fftconv(u, k, D))
        r["torch_ref_s"] = time_gpu(lambda: fftconv_ref(u, k, D))
        nbytes = 2 * B * H * L * u.element_size() + k.numel() * 4 + H * 4  # u once, y once, k, D
        r["bytes"] = nbytes
        r["flashconv_gbs"] = nbytes / r["flashconv_s"] / 1e9
        r["flashconv_pct_copy_bw"] = 100 * r["flashconv_gbs"] / env["copy_bandwidth_gbs"]
        r["speedup_vs_torch_ref"] = r["torch_ref_s"] / r["flashconv_s"]
        rows.append(r)
        progress(i, len(configs), "gpu %s B=%d L=%d: %.3f ms (%.0f GB/s, %.0f%% of copy), ref %.3f ms, x%.2f"
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few small shapes (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON report")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU section")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU section")
    args = ap.parse_args(argv)

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
        "backends": flashconv.info()["backends"],
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

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = report.get("gpu", {}).get("gpu", "cpu").replace(" ", "-")
    name = "sweep_%s_%s_%s%s.json" % (datetime.date.today().isoformat(), device, report["commit"][:10],
                                      "_quick" if args.quick else "")
    path = out / name
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("\nreport: %s" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
