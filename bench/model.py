"""A performance model of flashconv's CUDA kernels, computed on the CPU: MODEL figures, not
measurements.

    python bench/model.py                 # every row; writes bench/results/model_<date>_cpu_<commit>.json
    python bench/model.py --quick         # a few rows (smoke test)
    python bench/model.py --rows fwd      # only rows whose kind starts with "fwd"

How (docs/performance-model.md says more):
1. Each kernel runs, unchanged, under the CPU emulation (tests/emu, hw.h) with its counters on,
   at H = 1 with one CTA and B = 2 and B = 4 (one and two pairs of batch rows). The difference
   is the cost of one pair, the rest the CTA's fixed cost; a CTA at B = 64, H = 768 has the
   same fixed cost and 32 pairs (the launchers' grid there is one CTA per channel), so every
   count scales exactly: shared-memory wavefronts (bank rules), global sectors (L2 traffic),
   first touches (DRAM traffic while the launch's working set fits L2), barriers, mma,
   shuffles and dependent load rounds, per region (stage) of the kernel.
2. The SASS lint (flashconv._buildtools.sass_lint, on the built extension) gives registers,
   static shared memory and the sm_90 occupancy with each launch's dynamic shared memory; and
   the ratio of all static SASS instructions to those the emulator counts one-to-one (shared
   and global accesses, mma, shuffles, barriers), which turns the emulated access counts into
   an estimate of dynamic instructions (index arithmetic, twiddles, software division).
3. Per region r of a CTA, the time it takes with its SM to itself: the largest of
     DRAM bytes / (HBM bandwidth / SMs)           L2 bytes / (L2 bandwidth / SMs)
     wavefronts / clock (1 per clock per SM)      mma / (0.5 per clock per SM, mma.sync)
     instructions / (4 per clock per SM)          load rounds x latency + barriers x cost
   Regions are separated by barriers, so one CTA takes the sum over its regions; c CTAs on an
   SM overlap each other's regions at best up to the SM's throughput limits:
     T_cta = max(sum_r t_r, c * max over resources of sum_r t_res,r)
     T     = ceil(CTAs / (SMs * c)) * T_cta
   Re-reads of a CTA's K that the emulator sees hit L2 are counted as DRAM reads when the K
   rows of all resident CTAs exceed the L2 capacity.
4. floor_bytes is what the operation must move through HBM at least (stated per kind below);
   floor_time_s = floor_bytes / 3.0e12 (an H100 SXM's measured copy bandwidth).

The constants (H100 SXM, below) are nominal or commonly measured values, not readings of a
GPU of ours: until scripts/gpu_check.sh compares Nsight Compute's counters and measured times
with these rows on a real GPU, every time here is a model figure.
"""
import argparse
import datetime
import glob
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import write_report  # noqa: E402
from flashconv import _buildtools  # noqa: E402
from flashconv._long import long_spectrum, two_level_plan  # noqa: E402
from flashconv.plan import fused_fft_size  # noqa: E402
from tests.emu import build as emu  # noqa: E402
from tests.test_emu_fftconv import spectrum_inputs, to_io  # noqa: E402

# H100 SXM5 constants of the model (see the module docstring).
GPU = {
    "name": "H100 SXM (model constants)",
    "arch": "sm_90",
    "sms": 132,
    "clock_hz": 1.755e9,          # sustained SM clock under load (boost 1.98 GHz)
    "hbm_bytes_per_s": 3.0e12,    # measured device-to-device copy bandwidth (read + write)
    "l2_bytes_per_s": 5.5e12,     # L2 read bandwidth (microbenchmarks report 5.5-7 TB/s)
    "l2_capacity_bytes": 50e6,
    "smem_wavefronts_per_clk": 1.0,   # per SM: 128 bytes per clock
    "mma_per_clk": 0.5,           # m16n8k16 mma.sync per SM per clock (half the wgmma peak)
    "issue_per_clk": 4.0,         # warp instructions per SM per clock (4 schedulers)
    "dram_latency_s": 500e-9,
    "l2_latency_s": 150e-9,
    "barrier_s": 100 / 1.755e9,   # a __syncthreads with its pipeline drain, about 100 cycles
}
SCALE_B, SCALE_H = 64, 768
THREADS = 256
IO_BYTES = {"bf16": 2, "f16": 2, "f32": 4}
DATA_TENSORS = ("u", "g_in", "g_out", "y", "dy", "du", "dg_in", "dg_out")
PER_CHANNEL = ("K", "k_exp", "D", "dk", "dD", "dk_rev")


# ---- emulated runs -----------------------------------------------------------------------------

def _inputs(kind, dtype, B, L, rng):
    """Driver case, inputs and params for one emulated launch at H = 1 (random data, D; gates
    for the *_gated kinds, with every gradient wanted in the backward, as H3 trains)."""
    kind, gated = kind.split("_")[0], kind.endswith("_gated")
    u = rng.standard_normal((B, 1, L))
    k = rng.standard_normal((1, L)) / np.sqrt(L)
    D = rng.standard_normal(1).astype(np.float32)
    if kind == "long":
        _, N1, N2 = two_level_plan(L, max_n2={"bf16": 32768}.get(dtype, 16384))
        K, k_exp = long_spectrum(k, L, N1, N2)
        inputs = {"u": to_io(u, dtype), "K": np.stack([K.real, K.imag], -1).astype(np.float32),
                  "k_exp": k_exp, "D": D}
        params = {"B": B, "H": 1, "L": L, "N1": N1, "N2": N2, "has_D": 1}
        return "fftconv_long_" + dtype, inputs, params
    N = fused_fft_size(L)
    inputs = {"u": to_io(u, dtype).reshape(-1), **spectrum_inputs(k, L, N, dtype), "D": D}
    params = {"B": B, "H": 1, "L": L, "N": N, "has_D": 1, "u_sb": L, "u_sh": L, "u_st": 1}
    if kind == "bwd":
        inputs["dy"] = to_io(rng.standard_normal((B, 1, L)), dtype)
        params["lk"] = L
    if gated:
        inputs["g_in"], inputs["g_out"] = (to_io(rng.standard_normal((B, 1, L)), dtype).reshape(-1)
                                           for _ in range(2))
        params["has_gates"] = 1
    return "fftconv_%s_%s" % (kind, dtype), inputs, params


def pairs_per_iteration(kind, dtype, L):
    """Pairs of batch rows a CTA processes at once: the bfloat16 tensor-core forward and
    backward batch pp = 8192/N pairs for N < 8192 (cuda/include/flashconv/fwd_tc.h fwd_lgpp,
    bwd_tc.h bwd_lgpp; the gated backward wants dg_out: its Z rows make it one pair at N = 4K);
    everything else one. (Until 2026-11-29 this said one for the backward, which batched
    4096/N pairs: its B = 2 and B = 4 runs were the same iteration, and its rows below N = 4K
    were too fast.)"""
    N = fused_fft_size(L)
    if dtype == "bf16" and kind.startswith("fwd"):
        return max(1, 8192 // N)
    if dtype == "bf16" and kind.startswith("bwd") and N <= 8192:
        return 1 if kind == "bwd_gated" and N >= 4096 else max(1, 8192 // N)
    return 1


def emulate(kind, dtype, L, B, coverage=None):
    """The emulator's counters for one call (a list of launches); num_sms=0: one CTA. With
    coverage (default: where gcov is installed) the driver is the gcov build and every launch
    carries "lines", the run's line counts of the kernels' headers (tests/emu/build.py)."""
    assert kind in ("fwd", "bwd", "long", "fwd_gated", "bwd_gated"), kind
    case, inputs, params = _inputs(kind, dtype, B, L, np.random.default_rng(L + B))
    params["num_sms"] = 0
    if coverage is None:
        coverage = shutil.which("gcov") is not None
    res = emu.run(case, inputs, "coverage" if coverage else "plain", sm=90, params=params,
                  counters=True, timeout=3600)
    for launch in res.counters:
        launch["lines"] = res.lines if coverage else None
    return res.counters


def _flat(region):
    """A region's counters as a flat dict of numbers (keys like 'ldg.u.sectors')."""
    out = {}
    for kind in ("lds", "sts"):
        for key, v in region[kind].items():
            out["%s.%s" % (kind, key)] = v
    for kind in ("ldg", "stg"):
        for tensor, st in region[kind].items():
            for key, v in st.items():
                out["%s.%s.%s" % (kind, tensor, key)] = v
    for key in ("barriers", "mma", "shfl", "entries", "ld_rounds_dram", "ld_rounds_l2"):
        out[key] = region.get(key, 0)
    return out


def per_cta(launch2, launch4, pairs):
    """Counts of one CTA doing `pairs` units of work (pairs, or iterations of several pairs),
    per region: fixed + pairs * (launch4 - launch2), launch4 doing one unit more than launch2."""
    r2 = {r["name"]: _flat(r) for r in launch2["regions"]}
    r4 = {r["name"]: _flat(r) for r in launch4["regions"]}
    out = {}
    for name in [r["name"] for r in launch4["regions"]] + [n for n in r2 if n not in r4]:
        a, b = r2.get(name, {}), r4.get(name, {})
        out[name] = {}
        for key in set(a) | set(b):
            one = b.get(key, 0) - a.get(key, 0)  # the second pair
            fixed = a.get(key, 0) - one
            out[name][key] = fixed + pairs * one
    return out


# ---- the lint ---------------------------------------------------------------------------------

def lint_rows(binary=None):
    """sass_lint of `binary` (default: the built extension), or [] with a warning (then no
    registers or issue term)."""
    so = [binary] if binary else glob.glob(str(ROOT / "flashconv" / "_C*.so"))
    if not so:
        print("model: flashconv._C is not built: no SASS lint (registers, instructions) in the model")
        return []
    try:
        return _buildtools.sass_lint(so[0], threads=THREADS)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print("model: SASS lint unavailable (%s)" % exc)
        return []


def lint_for(lint, kernel, dtype, arch):
    """The lint row of the emulated `kernel` (a demangled name) for `arch`."""
    name = _short(kernel)
    for r in lint:
        if r["arch"] == arch and _short(r["demangled"]) == name:
            return r
    return None


# ---- the time model ---------------------------------------------------------------------------

def marked_regions():
    """Per-region static SASS counts of the kernels (flashconv._buildtools.marked_cubin_regions:
    a build with -DFLASHCONV_REGION_MARKS, cached under build/model), or {} without nvcc."""
    try:
        return _buildtools.marked_cubin_regions(
            sorted(str(p) for p in (ROOT / "cuda" / "src").glob("fftconv_*.cu")),
            str(ROOT / "cuda" / "include"), arch=GPU["arch"], cache_dir=str(ROOT / "build" / "model"))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print("model: no per-region instruction counts (%s): kernel-wide ratios instead" % exc)
        return {}


def region_instructions(marked, kernel, region, counts, fallback, lines=None):
    """Estimated dynamic warp instructions of a region's counts: its counted accesses times the
    region's static instructions per counted instruction in the marked build -- over the SASS
    of source lines the run executed where `lines` (the emulation's gcov line counts) is given
    (_buildtools.executed_counts), so that fallback paths, other instantiations and switch
    cases a call never takes are not charged to it; for a region with no counted instruction
    (set-up code), its (executed) static instructions times the warps' entries into it; for a
    kernel without region marks (the fp32-stage and two-level kernels) the ratio of its whole
    executed SASS; without a marked build, `fallback` (the kernel-wide ratio) per access."""
    regs = marked.get(next((k for k in marked if _short(k) == _short(kernel)), ""), {})
    c = regs.get(_buildtools.region_id(region))
    accesses = (counts.get("lds.instr", 0) + counts.get("sts.instr", 0) + counts.get("barriers", 0) +
                counts.get("mma", 0) + counts.get("shfl", 0) +
                sum(v for k, v in counts.items() if k.endswith(".requests")))
    if not c:  # a kernel without region marks: its whole executed SASS, where known
        whole = regs.get(None) if len(regs) == 1 else None
        if lines and whole and whole.get("lines"):
            e_ins, e_cnt = _buildtools.executed_counts(whole["lines"], lines)
            if e_cnt:
                return accesses * e_ins / e_cnt
        return accesses * fallback
    ins, cnt = c["instructions"], c["counted"]
    if lines and c.get("lines"):
        e_ins, e_cnt = _buildtools.executed_counts(c["lines"], lines)
        if e_cnt or not cnt:
            ins, cnt = e_ins, e_cnt
    if cnt:
        return accesses * ins / cnt
    return counts.get("entries", 0) * ins


def region_times(c, gpu, instructions):
    """Per-resource seconds of one region's counts c (and estimated warp instructions) for a CTA
    alone on its SM."""
    clk, sms = gpu["clock_hz"], gpu["sms"]
    return {
        "dram": c["dram_bytes"] / (gpu["hbm_bytes_per_s"] / sms),
        "l2": c["l2_bytes"] / (gpu["l2_bytes_per_s"] / sms),
        "smem": (c.get("lds.wavefronts", 0) + c.get("sts.wavefronts", 0)) / (gpu["smem_wavefronts_per_clk"] * clk),
        "tensor": c.get("mma", 0) / (gpu["mma_per_clk"] * clk),
        "issue": instructions / (gpu["issue_per_clk"] * clk),
        "latency": (c.get("ld_rounds_dram", 0) * gpu["dram_latency_s"] +
                    c.get("ld_rounds_l2", 0) * gpu["l2_latency_s"] + c.get("barriers", 0) * gpu["barrier_s"]),
    }


def model_launch(launch2, launch4, dtype, lint, gpu=GPU, B=SCALE_B, H=SCALE_H, pp=1, marked=None):
    """One launch at (B, H): bytes, wavefronts, occupancy and modeled time (dict). launch2 and
    launch4 ran one and two iterations of pp pairs."""
    pairs = (B + 1) // 2
    regions = per_cta(launch2, launch4, -(-pairs // pp))
    lr = lint_for(lint, launch4["kernel"], dtype, gpu["arch"])
    smem = launch4["smem_bytes"] + (lr["smem"] if lr else 0)
    if lr:
        occ = _buildtools.occupancy(gpu["arch"], lr["registers"], THREADS, smem)
        counted = sum(v for k, v in lr["counted_ops"].items())
        instr_ratio = lr["instructions"] / counted if counted else 0.0
    else:
        occ = _buildtools.occupancy(gpu["arch"], 255, THREADS, smem)  # unknown: assume the worst
        instr_ratio = 0.0
    c = occ["ctas_per_sm"]
    # DRAM and L2 bytes per region. K re-reads that the emulator sees hit L2 go to DRAM when
    # the K rows every resident CTA cycles through exceed the L2 capacity.
    k_footprint = 32 * sum(r.get("ldg.K.first", 0) for r in regions.values())
    k_spills = k_footprint * gpu["sms"] * c > gpu["l2_capacity_bytes"]
    for r in regions.values():
        first = sum(v for k, v in r.items() if k.endswith(".first"))
        if k_spills:
            first += r.get("ldg.K.sectors", 0) - r.get("ldg.K.first", 0)
        r["dram_bytes"] = 32 * first
        r["l2_bytes"] = 32 * sum(v for k, v in r.items() if k.endswith(".sectors"))
    lines = launch4.get("lines")
    instrs = {name: region_instructions(marked or {}, launch4["kernel"], name, r, instr_ratio, lines)
              for name, r in regions.items()}
    times = {name: region_times(r, gpu, instrs[name]) for name, r in regions.items()}
    # One CTA: its regions in sequence (barriers). c CTAs per SM: at best overlapped up to the
    # SM's share of each throughput resource.
    serial = sum(max(t.values()) for t in times.values())
    sums = {res: sum(t[res] for t in times.values()) for res in ("dram", "l2", "smem", "tensor", "issue")}
    shared = max(sums.values())
    t_cta = max(serial, c * shared)
    ctas = H * max(1, launch4["grid"][1])  # the launchers' grid at (B, H): one CTA per channel
    waves = math.ceil(ctas / (gpu["sms"] * c))
    total = lambda key: H * sum(r.get(key, 0) for r in regions.values())  # noqa: E731
    data_bytes = sum(total(k) for k in _keys(regions, "bytes", DATA_TENSORS))
    data_sectors = sum(total(k) for k in _keys(regions, "sectors", DATA_TENSORS))
    per_pair = lambda key: total(key) / (H * pairs)  # noqa: E731
    bound = "serial phases (barriers)" if serial >= c * shared else max(sums, key=sums.get)
    return {
        "kernel": _short(launch4["kernel"]),
        "dram_bytes": total("dram_bytes"),
        "l2_bytes": total("l2_bytes"),
        "smem_wavefronts": total("lds.wavefronts") + total("sts.wavefronts"),
        "smem_wavefronts_ideal": total("lds.ideal") + total("sts.ideal"),
        "global_sector_efficiency": data_bytes / (32 * data_sectors) if data_sectors else None,
        "barriers_per_pair": per_pair("barriers"),
        "mma_per_pair": per_pair("mma"),
        "regs": lr["registers"] if lr else None,
        "smem_bytes_per_cta": smem,
        "ctas_per_sm": c,
        "warps_per_sm": occ["warps_per_sm"],
        "occupancy_limited_by": occ["limited_by"],
        "slow_div_calls": lr["slow_div_calls"] if lr else None,
        "instructions_per_access": round(instr_ratio, 2),
        "k_rereads_from_dram": bool(k_spills),
        "modeled_time_s": waves * t_cta,
        "time_if_overlapped_s": waves * c * shared,
        "time_if_serial_s": waves * serial,
        "bound": bound,
        "resource_s": {res: waves * c * v for res, v in sums.items()},
        "executed_lines": bool(lines),
        "regions": {name: _region_summary(r, times[name], H, pairs, instrs[name]) for name, r in regions.items()},
    }


def _keys(regions, suffix, tensors):
    keys = set()
    for r in regions.values():
        for k in r:
            parts = k.split(".")
            if len(parts) == 3 and parts[1] in tensors and parts[2] == suffix:
                keys.add(k)
    return keys


def _short(kernel):
    return kernel.split("(")[0].replace("void ", "").replace("flashconv::", "").replace("hw::", "")


def _region_summary(r, t, H, pairs, instructions):
    per = H * pairs
    lw, li = r.get("lds.wavefronts", 0), r.get("lds.ideal", 0)
    sw, si = r.get("sts.wavefronts", 0), r.get("sts.ideal", 0)
    return {
        "wavefronts_per_pair": (lw + sw) * H / per,
        "wavefront_ratio": round((lw + sw) / (li + si), 3) if li + si else None,
        "lds_ratio": round(lw / li, 3) if li else None,
        "sts_ratio": round(sw / si, 3) if si else None,
        "dram_bytes_per_pair": r["dram_bytes"] * H / per,
        "l2_bytes_per_pair": r["l2_bytes"] * H / per,
        "barriers_per_pair": r.get("barriers", 0) * H / per,
        "instructions_per_pair": instructions * H / per,
        "cta_seconds": {k: v for k, v in t.items()},
    }


# ---- rows -------------------------------------------------------------------------------------

def floor_bytes(kind, dtype, L, B=SCALE_B, H=SCALE_H):
    """What must cross HBM at least. fwd: u read and y written once (io dtype), k (float32,
    H x L) and D; bwd: u and dy read, du written, k read and dk written (float32), D and dD;
    fwdbwd: both; long: as fwd (the whole two-level convolution); fwd_gated: fwd and the two
    gates read; bwd_gated: bwd and the two gates read, dg_in and dg_out written."""
    s = IO_BYTES[dtype]
    data, kern = B * H * L * s, H * L * 4 + H * 4
    return {"fwd": 2 * data + kern, "long": 2 * data + kern, "bwd": 3 * data + 2 * kern,
            "fwdbwd": 5 * data + 3 * kern, "fwd_gated": 4 * data + kern,
            "bwd_gated": 7 * data + 2 * kern}[kind]


def model_row(kind, dtype, L, lint, gpu=GPU, marked=None, coverage=None):
    """One row: the call's launches modeled at (64, 768) and summed (coverage: emulate's)."""
    t0 = time.time()
    pp = pairs_per_iteration(kind, dtype, L)
    two, four = (emulate(kind, dtype, L, n * pp, coverage) for n in (2, 4))
    launches = [model_launch(a, b, dtype, lint, gpu, pp=pp, marked=marked) for a, b in zip(two, four)]
    N = fused_fft_size(L)
    fb = floor_bytes(kind, dtype, L)
    row = {"kind": kind, "kernel": " + ".join(x["kernel"] for x in launches), "dtype": dtype,
           "L": L, "N": N, "B": SCALE_B, "H": SCALE_H}
    if len(launches) == 1:
        row.update({k: v for k, v in launches[0].items() if k != "kernel"})
    else:
        for key in ("dram_bytes", "l2_bytes", "smem_wavefronts", "smem_wavefronts_ideal",
                    "barriers_per_pair", "mma_per_pair", "modeled_time_s"):
            row[key] = sum(x[key] for x in launches)
        eff = [x["global_sector_efficiency"] for x in launches if x["global_sector_efficiency"]]
        row["global_sector_efficiency"] = min(eff) if eff else None
        for key in ("regs", "ctas_per_sm", "warps_per_sm", "slow_div_calls"):
            vals = [x[key] for x in launches if x[key] is not None]
            row[key] = (max if key in ("regs", "slow_div_calls") else min)(vals) if vals else None
        row["passes"] = launches
    row["floor_bytes"] = fb
    row["floor_time_s"] = fb / gpu["hbm_bytes_per_s"]
    row["modeled_over_floor"] = row["modeled_time_s"] / row["floor_time_s"]
    row["emulation_s"] = round(time.time() - t0, 1)
    return row


def combine_fwdbwd(fwd, bwd, gpu=GPU):
    row = {k: fwd[k] for k in ("dtype", "L", "N", "B", "H")}
    row.update({"kind": "fwdbwd", "kernel": fwd["kernel"] + " + " + bwd["kernel"]})
    for key in ("dram_bytes", "l2_bytes", "smem_wavefronts", "smem_wavefronts_ideal",
                "barriers_per_pair", "mma_per_pair", "modeled_time_s"):
        row[key] = fwd[key] + bwd[key]
    row["global_sector_efficiency"] = min(fwd["global_sector_efficiency"], bwd["global_sector_efficiency"])
    for key in ("regs", "slow_div_calls"):
        row[key] = max(fwd[key] or 0, bwd[key] or 0)
    for key in ("ctas_per_sm", "warps_per_sm"):
        row[key] = min(fwd[key], bwd[key])
    row["floor_bytes"] = floor_bytes("fwdbwd", fwd["dtype"], fwd["L"])
    row["floor_time_s"] = row["floor_bytes"] / gpu["hbm_bytes_per_s"]
    row["modeled_over_floor"] = row["modeled_time_s"] / row["floor_time_s"]
    return row


FWD_L = [256, 512, 1024, 2048, 4096, 8192, 16384]
BWD_L = [1024, 2048, 4096, 8192]
LONG_L = [65536, 1 << 20]
GATED_L = [1024, 4096]  # H3's gated call (bf16): the gate reads and gradients
MAX_FUSED_N = {"bf16": 32768, "f16": 16384, "f32": 16384}
MAX_BWD_N = {"bf16": 16384, "f16": 8192, "f32": 8192}


def plan_rows(quick=False):
    if quick:
        return [("fwd", "bf16", 1024), ("fwd", "f32", 1024), ("bwd", "bf16", 1024), ("long", "bf16", 65536)]
    rows = []
    for dtype in ("bf16", "f16", "f32"):
        for L in FWD_L:
            rows.append(("fwd" if fused_fft_size(L) <= MAX_FUSED_N[dtype] else "long", dtype, L))
    for dtype in ("bf16", "f16", "f32"):
        rows += [("bwd", dtype, L) for L in BWD_L if fused_fft_size(L) <= MAX_BWD_N[dtype]]
    rows += [(kind, "bf16", L) for kind in ("fwd_gated", "bwd_gated") for L in GATED_L]
    rows += [("long", "bf16", L) for L in LONG_L]
    return rows


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt_table(rows):
    head = "%-9s %-4s %7s %9s %9s %6s %7s %6s %6s %5s %7s %s" % (
        "kind", "io", "L", "model us", "floor us", "x", "wf/ideal", "sector", "warps", "div",
        "bar/pr", "bound")
    lines = [head]
    for r in rows:
        wf = r["smem_wavefronts"] / r["smem_wavefronts_ideal"] if r.get("smem_wavefronts_ideal") else float("nan")
        lines.append("%-9s %-4s %7d %9.1f %9.1f %6.2f %7.2f %6s %6s %5s %7.1f %s" % (
            r["kind"], r["dtype"], r["L"], r["modeled_time_s"] * 1e6, r["floor_time_s"] * 1e6,
            r["modeled_over_floor"], wf,
            "%.0f%%" % (100 * r["global_sector_efficiency"]) if r.get("global_sector_efficiency") else "-",
            r.get("warps_per_sm", "-"), r.get("slow_div_calls", "-"), r["barriers_per_pair"],
            r.get("bound", "(sum of passes)")))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="four small rows")
    ap.add_argument("--rows", default="", help="only rows whose kind starts with this")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--binary", default="", help="lint this object or library instead of the "
                    "built extension (e.g. one .cu compiled with nvcc -arch=sm_90)")
    ap.add_argument("--dtypes", default="", help="comma-separated io dtypes (bf16,f16,f32)")
    ap.add_argument("--lengths", default="", help="comma-separated L values")
    args = ap.parse_args(argv)

    lint = lint_rows(args.binary or None)
    marked = marked_regions()
    if lint:
        print(_buildtools.format_lint([r for r in lint if "probe" not in r["demangled"]]))
    plan = [p for p in plan_rows(args.quick) if p[0].startswith(args.rows)
            and (not args.dtypes or p[1] in args.dtypes.split(","))
            and (not args.lengths or str(p[2]) in args.lengths.split(","))]
    rows, start = [], time.time()
    for i, (kind, dtype, L) in enumerate(plan):
        rows.append(model_row(kind, dtype, L, lint, marked=marked))
        print("[%d/%d] %s %s L=%d: modeled %.1f us (floor %.1f us), emulated in %.0f s" % (
            i + 1, len(plan), kind, dtype, L, rows[-1]["modeled_time_s"] * 1e6,
            rows[-1]["floor_time_s"] * 1e6, rows[-1]["emulation_s"]), flush=True)
    for b in [r for r in rows if r["kind"] == "bwd"]:
        f = next((r for r in rows if r["kind"] == "fwd" and r["dtype"] == b["dtype"] and r["L"] == b["L"]), None)
        if f:
            rows.append(combine_fwdbwd(f, b))
    print("\nMODEL (not measured): B=%d H=%d, %s; times in microseconds\n" % (SCALE_B, SCALE_H, GPU["name"]))
    print(fmt_table(rows))
    report = {
        "kind": "model",
        "note": "MODEL figures computed on the CPU from the emulator's counters and the SASS lint; "
                "not measurements. A GPU run (scripts/gpu_check.sh) is what confirms or refutes them.",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "gpu_constants": GPU,
        "scale": {"B": SCALE_B, "H": SCALE_H},
        "floor_formula": floor_bytes.__doc__,
        "lint": [{k: r[k] for k in ("demangled", "arch", "instructions", "registers", "smem",
                                    "local_instructions", "slow_div_calls", "ctas_per_sm",
                                    "warps_per_sm", "limited_by", "calls")} for r in lint],
        "rows": rows,
        "wall_s": round(time.time() - start, 1),
    }
    if not args.no_write:
        name = "model_%s_cpu_%s%s.json" % (datetime.date.today().isoformat(), report["commit"][:10],
                                           "_quick" if args.quick else "")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_report(Path(args.out) / name, report)
    return report


if __name__ == "__main__":
    main()
