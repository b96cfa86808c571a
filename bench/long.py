"""Long sequences: time and peak memory against L for the full-length and the chunked paths.

    python bench/long.py                 # L = 16K .. 4M, B = 1, H = 8, float32
    python bench/long.py --quick         # L = 16K, 64K (smoke test)
    python bench/long.py --lengths 16384 1048576 --H 16 --device cuda
    python bench/long.py --lengths 1048576 --dtype bfloat16 --methods fftconv fftconv_fb ssm_conv

Methods, forward-only (torch.no_grad) on the same inputs:

- fftconv:   flashconv.fftconv(u, k, D) with a length-L kernel (the CPU engine on CPU; the
             fused kernel / torch.fft on CUDA);
- ssm_conv:  flashconv.state_passing.ssm_conv(u, dA, dB, C, D), an S4D SSM with N/2 = 32
             complex modes per channel, default chunk (its time includes building the
             chunk kernel and Vandermonde matrices; the full-length paths are handed k, whose
             S4D generation would cost another O(H N L) and is not timed);
- torch_ref: flashconv.reference.fftconv_ref, the H3/Hyena/S4 torch.fft convolution (2L);

then forward + backward (autograd for u, k and D; --no-backward skips it) of fftconv
(fftconv_fb: the CPU engine / the fused or two-level backward on CUDA) and of torch_ref
(torch_ref_fb); and, on the CPU for a short kernel (Lk = 64, numpy arrays): the CPU engine's full-length
FFT (fft_full: flashconv._cpu_torch.conv_forward, called directly, since fftconv itself picks
overlap-save where the model says so) against overlap-save (flashconv._overlap.overlap_save).

Each (method, L) runs in a fresh subprocess so that its memory high-water mark is its own.
Peak memory is what the process needed beyond its inputs during the first call:

- CPU:  ru_maxrss after the call minus the resident set size just before it (inputs
        already allocated and touched). It counts every allocation (numpy, torch, scipy's
        work buffers, thread stacks and per-thread buffers, the output itself), not only
        tensors; the output's size is reported next to it.
- CUDA: torch.cuda.max_memory_allocated() during the call minus memory_allocated() before
        it (torch's caching allocator only: cuFFT plans' workspaces are included when
        torch allocates them, the driver's own are not).

Each row also gives the peak beyond its outputs in multiples of u's size (extra_x: (peak_mb -
out_mb) / u_mb; outputs: y, and the gradients for the forward+backward methods), the measure of
the CPU engine's memory budget (docs/cpu-engines.md: at most 2.5x forward, 5x forward+backward,
2x for ssm_conv).

Times: the fastest of the repeated calls after that first one (CPU: perf_counter; CUDA:
CUDA events on the current stream); the median is in the JSON too. The minimum, because
on a shared CPU the other jobs only ever add time (the 1-minute load average at the start
and end of each configuration is recorded). A JSON report goes to
bench/results/long_<date>_<device>.json (or --out).
"""
import argparse
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAIN_METHODS = ("fftconv", "ssm_conv", "torch_ref")
FB_METHODS = ("fftconv_fb", "torch_ref_fb")  # forward + backward (autograd: du, dk, dD)
SHORT_METHODS = ("fft_full", "overlap")
LENGTHS = [1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22]
QUICK_LENGTHS = [1 << 14, 1 << 16]
SHORT_LK = 64
D_STATE = 64  # S4D state size N: N/2 = 32 complex modes per channel


def _rss_bytes():
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _inputs(method, B, H, L, device):
    """(fn, output bytes): the call to measure, on freshly allocated inputs."""
    import numpy as np
    import torch

    import flashconv

    gen = torch.Generator().manual_seed(0)
    if method in SHORT_METHODS:
        from flashconv._overlap import overlap_save

        u = torch.randn(B, H, L, generator=gen).numpy()
        k = (torch.randn(H, SHORT_LK, generator=gen) / SHORT_LK ** 0.5).numpy()
        D = torch.randn(H, generator=gen).numpy()
        if method == "fft_full":
            # The full-length CPU engine itself: flashconv.fftconv would pick overlap-save
            # here wherever the model says it is cheaper.
            from flashconv import _cpu, _cpu_torch

            def full():
                n = _cpu.fft_size(L, SHORT_LK)
                K = _cpu_torch.kernel_spectrum(torch.from_numpy(k), L, n, torch.float32)
                return _cpu_torch.conv_forward(torch.from_numpy(u), K, n, torch.from_numpy(D))
            return full, u.nbytes
        return (lambda: overlap_save(u, k, D)), u.nbytes

    dt = getattr(torch, DTYPE[0])

    def dev(x):
        return x.to(device=device, dtype=dt) if x.is_floating_point() else x.to(device)

    u = dev(torch.randn(B, H, L, generator=gen))
    D = dev(torch.randn(H, generator=gen))
    if method == "ssm_conv":
        from flashconv.state_passing import ssm_conv

        # S4D-Lin, ZOH, dt log-uniform in [1e-3, 1e-1], B = 1, random complex C.
        m = D_STATE // 2
        A = torch.complex(torch.full((m,), -0.5, dtype=torch.float64),
                          torch.pi * torch.arange(m, dtype=torch.float64))
        dt = torch.exp(torch.empty(H, 1, dtype=torch.float64).uniform_(np.log(1e-3), np.log(1e-1),
                                                                       generator=gen))
        dA = torch.exp(dt * A)
        dB = (dA - 1) / A
        C = torch.randn(H, m, dtype=torch.complex128, generator=gen)
        dA, dB, C = (x.to(device=device, dtype=torch.complex64) for x in (dA, dB, C))
        return (lambda: ssm_conv(u, dA, dB, C, D)), u.numel() * u.element_size()
    k = dev(torch.randn(H, L, generator=gen) / L ** 0.5)
    if method in FB_METHODS:
        from flashconv.reference import fftconv_ref

        f = flashconv.fftconv if method == "fftconv_fb" else fftconv_ref
        leaves = [t.requires_grad_() for t in (u, k, D)]
        dy = dev(torch.randn(B, H, L, generator=gen))

        def fb():
            with torch.enable_grad():
                f(*leaves).backward(dy)
            for t in leaves:
                t.grad = None
        # Outputs: y (alive until backward returns) and the gradients.
        return fb, (2 * u.numel() + k.numel() + D.numel()) * u.element_size()
    if method == "fftconv":
        return (lambda: flashconv.fftconv(u, k, D)), u.numel() * u.element_size()
    from flashconv.reference import fftconv_ref

    return (lambda: fftconv_ref(u, k, D)), u.numel() * u.element_size()


DTYPE = ["float32"]  # u's dtype (set from the spec in the child)


def child(spec):
    """Measure one (method, L) in this process; print one JSON line."""
    import torch

    if spec["method"] not in SHORT_METHODS:
        DTYPE[0] = spec.get("dtype", "float32")
    method, B, H, L, device = spec["method"], spec["B"], spec["H"], spec["L"], spec["device"]
    cuda = device == "cuda" and method not in SHORT_METHODS
    torch.set_grad_enabled(False)
    # One call on small inputs first: lazy initialisation (libraries paged in, thread pools,
    # FFT plans, CUDA context) is not what the measurement is about.
    warm, _ = _inputs(method, B, H, 4096, "cuda" if cuda else "cpu")
    warm()
    del warm
    fn, out_bytes = _inputs(method, B, H, L, "cuda" if cuda else "cpu")
    r = dict(spec, device="cuda" if cuda else "cpu", out_mb=out_bytes / 2 ** 20,
             u_mb=B * H * L * getattr(torch, DTYPE[0]).itemsize / 2 ** 20,
             loadavg_start=os.getloadavg()[0])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()  # max_memory_allocated counts the output while it was alive
        torch.cuda.synchronize()
        r["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        times = []
        for _ in range(2):  # warm-up beyond the first call
            fn()
        from bench._common import cuda_event_time

        times = [cuda_event_time(fn) for _ in range(spec["reps"])]
    else:
        rss0 = _rss_bytes()
        t0 = time.perf_counter()
        fn()  # the high-water mark keeps the output's pages even after it is freed
        first = time.perf_counter() - t0
        r["peak_mb"] = max(0, _maxrss_bytes() - rss0) / 2 ** 20
        r["first_call_s"] = first
        times = []
        t_end = time.perf_counter() + spec["min_time"]
        while len(times) < spec["reps"] or (time.perf_counter() < t_end and len(times) < 20):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if first > 5 and len(times) >= 2:  # a slow config: two timed calls are enough
                break
    r["extra_x"] = (r["peak_mb"] - r["out_mb"]) / r["u_mb"]
    r["time_s"] = min(times)
    r["median_s"] = statistics.median(times)
    r["n_timed"] = len(times)
    r["melem_per_s"] = B * H * L / r["time_s"] / 1e6
    r["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(r), flush=True)


def run_child(spec, timeout, threads=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    env = dict(os.environ)
    if threads:
        # Before the child imports torch: OpenMP reads these once.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FLASHCONV_NUM_THREADS"):
            env[var] = str(threads)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return dict(spec, error="timeout after %d s" % timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        err = (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]
        return dict(spec, error=err[-300:])
    return json.loads(lines[-1])


def _fmt(r, key, scale, fmt, width=9):
    if r is None or "error" in r or key not in r:
        return "%*s" % (width, "error" if r is not None and "error" in r else "-")
    return fmt % (r[key] * scale)


def print_tables(rows, H, B, dtype="float32"):
    by = {(r["method"], r["L"]): r for r in rows}
    lengths = sorted({r["L"] for r in rows})
    print("\nLong sequences, B=%d H=%d %s: time (ms, min) | peak extra memory (MB) beyond "
          "inputs, output included | beyond the output too, in multiples of u's size"
          % (B, H, dtype))
    hdr = "%9s %8s | %9s %9s %9s | %8s %8s %8s | %5s %5s %5s | %8s" % (
        "L", "out MB", "fftconv", "ssm_conv", "torch_ref", "fftconv", "ssm_conv", "torch_ref",
        "fc x", "ssm x", "ref x", "x_ref")
    print(hdr)
    print("-" * len(hdr))
    for L in lengths:
        rs = [by.get((m, L)) for m in MAIN_METHODS]
        if not any(rs):
            continue
        out = next((r["out_mb"] for r in rs if r and "out_mb" in r), float("nan"))
        ok = [r for r in rs if r and "error" not in r]
        speed = ("%8.2f" % (rs[2]["time_s"] / min(r["time_s"] for r in ok[:2])) if len(ok) == 3
                 and rs[2] in ok else "%8s" % "-")
        print("%9d %8.1f | %s %s %s | %s %s %s | %s %s %s | %s" % (
            L, out, *[_fmt(r, "time_s", 1e3, "%9.1f") for r in rs],
            *[_fmt(r, "peak_mb", 1, "%8.1f") for r in rs],
            *[_fmt(r, "extra_x", 1, "%5.2f", 5) for r in rs], speed))
    fb = [(by.get(("fftconv_fb", L)), by.get(("torch_ref_fb", L))) for L in lengths]
    if any(a or b for a, b in fb):
        print("\nForward + backward (autograd, gradients of u, k and D), B=%d H=%d %s: time "
              "(ms, min) | peak extra memory (MB), y and gradients included | beyond them, in "
              "multiples of u's size" % (B, H, dtype))
        hdr = "%9s | %9s %9s %7s | %9s %9s | %5s %5s" % ("L", "fftconv", "torch_ref", "x_ref",
                                                          "fftconv", "torch_ref", "fc x", "ref x")
        print(hdr)
        print("-" * len(hdr))
        for L, (a, b) in zip(lengths, fb):
            if not (a or b):
                continue
            x = ("%7.2f" % (b["time_s"] / a["time_s"]) if a and b and "error" not in a
                 and "error" not in b else "%7s" % "-")
            print("%9d | %s %s %s | %s %s | %s %s" % (
                L, _fmt(a, "time_s", 1e3, "%9.1f"), _fmt(b, "time_s", 1e3, "%9.1f"), x,
                _fmt(a, "peak_mb", 1, "%9.1f"), _fmt(b, "peak_mb", 1, "%9.1f"),
                _fmt(a, "extra_x", 1, "%5.2f", 5), _fmt(b, "extra_x", 1, "%5.2f", 5)))
    short = [(by.get(("fft_full", L)), by.get(("overlap", L))) for L in lengths]
    if any(a or b for a, b in short):
        from flashconv._overlap import choose_block, overlap_save_cheaper

        print("\nShort kernel Lk=%d (CPU, numpy float32): full-length FFT vs overlap-save" % SHORT_LK)
        hdr = "%9s | %9s %9s %7s | %8s %8s | %6s %7s" % (
            "L", "full ms", "ovl ms", "x", "full MB", "ovl MB", "block", "model")
        print(hdr)
        print("-" * len(hdr))
        for L, (a, b) in zip(lengths, short):
            if not (a or b):
                continue
            x = ("%7.2f" % (a["time_s"] / b["time_s"]) if a and b and "error" not in a and "error" not in b
                 else "%7s" % "-")
            print("%9d | %s %s %s | %s %s | %6d %7s" % (
                L, _fmt(a, "time_s", 1e3, "%9.2f"), _fmt(b, "time_s", 1e3, "%9.2f"), x,
                _fmt(a, "peak_mb", 1, "%8.1f"), _fmt(b, "peak_mb", 1, "%8.1f"),
                choose_block(SHORT_LK, L), "yes" if overlap_save_cheaper(L, SHORT_LK) else "no"))


def _environment(device):
    import numpy as np
    import scipy
    import torch

    import flashconv

    env = {"host": socket.gethostname(), "python": platform.python_version(),
           "versions": {"flashconv": flashconv.__version__, "torch": torch.__version__,
                        "numpy": np.__version__, "scipy": scipy.__version__},
           "cpu_threads": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else os.cpu_count()),
           "torch_threads": torch.get_num_threads(), "loadavg_start": list(os.getloadavg())}
    try:
        env["cpu"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name"))
    except (OSError, StopIteration):
        env["cpu"] = platform.processor() or "unknown"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        env["commit"] = (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="L = 16K and 64K only")
    ap.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 16K..4M)")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if visible, else cpu")
    ap.add_argument("--reps", type=int, default=3, help="timed calls at least (after the first)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per (method, L) subprocess")
    ap.add_argument("--threads", type=int, help="CPU threads for torch and flashconv's CPU engine "
                    "(default: theirs, i.e. all cores). On a CPU shared with other jobs, torch's "
                    "OpenMP threads spin-wait for each other and times swing by 10x; 1 is steadier")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"),
                    help="dtype of u, k and D (the short-kernel section stays numpy float32)")
    ap.add_argument("--methods", nargs="+", choices=MAIN_METHODS + FB_METHODS + SHORT_METHODS,
                    help="only these methods (default: all of the sections asked for)")
    ap.add_argument("--no-short", action="store_true", help="skip the short-kernel section")
    ap.add_argument("--no-backward", action="store_true",
                    help="skip the forward+backward section (fftconv and torch_ref autograd)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    configs = [(m, L) for L in lengths for m in MAIN_METHODS]
    if not args.no_backward:
        configs += [(m, L) for L in lengths for m in FB_METHODS]
    if not args.no_short:
        configs += [(m, L) for L in lengths for m in SHORT_METHODS]
    if args.methods:
        configs = [(m, L) for L in lengths for m in MAIN_METHODS + FB_METHODS + SHORT_METHODS
                   if m in args.methods]
    env = _environment(device)
    print("device %s (%s), %d CPU threads (%s used), load average %s" % (
        device, env.get("gpu", env["cpu"]), env["cpu_threads"], args.threads or "all",
        " ".join("%.1f" % x for x in env["loadavg_start"])), flush=True)
    rows = []
    t_start = time.perf_counter()
    for i, (method, L) in enumerate(configs, 1):
        spec = {"method": method, "B": args.B, "H": args.H, "L": L, "device": device,
                "reps": args.reps, "min_time": 1.0, "dtype": args.dtype}
        r = run_child(spec, args.timeout, args.threads)
        rows.append(r)
        if "error" in r:
            msg = "error: %s" % r["error"]
        else:
            msg = ("%.2f ms (median %.2f), peak %.1f MB (outputs %.1f MB; beyond them %.2fx u's "
                   "size), %.0f Melem/s, load %.1f" % (
                       r["time_s"] * 1e3, r["median_s"] * 1e3, r["peak_mb"], r["out_mb"],
                       r["extra_x"], r["melem_per_s"], r["loadavg_end"]))
        print("[%2d/%d %5.0fs] %-9s L=%-8d %s" % (
            i, len(configs), time.perf_counter() - t_start, method, L, msg), flush=True)
    print_tables(rows, args.H, args.B, args.dtype)

    report = {"kind": "long_sequences", "device": device,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "quick": args.quick, "threads": args.threads, "B": args.B, "H": args.H,
              "d_state": D_STATE, "short_lk": SHORT_LK, "dtype": args.dtype,
              "time": "time_s: fastest timed call after the first; median_s: their median",
              "memory": ("peak_mb: ru_maxrss after the first call minus RSS before it "
                         "(all allocations, output included)" if device == "cpu" else
                         "peak_mb: torch.cuda.max_memory_allocated during the first "
                         "call minus memory_allocated before it"),
              "env": env, "rows": rows, "wall_s": time.perf_counter() - t_start}
    from bench._common import report_path, write_report

    tag = "" if args.dtype == "float32" else args.dtype
    write_report(report_path(args.out, "long", env.get("gpu", "cpu"), tag, quick=args.quick), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
