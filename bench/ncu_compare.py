"""Nsight Compute's counters beside the emulator's, for scripts/ncu_case.py's launches.

    python bench/ncu_compare.py gpu_out/ncu.csv [--json out.json]

ncu.csv is `ncu --csv --page raw --metrics <METRICS>` output (scripts/gpu_check.sh writes it).
For each profiled fused launch, the same counters come from the CPU emulation, scaled from one
CTA's fixed and per-pair counts (bench/model.py) to the launch's B and H. Shared-memory
instructions and wavefronts and global sectors and requests depend only on the access pattern,
so they should agree closely; DRAM bytes and time test the model's assumptions (caching,
latency, overlap).
"""
import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import model  # noqa: E402
from scripts.ncu_case import CASES  # noqa: E402

METRICS = {
    "smem_ld_instr": "smsp__sass_inst_executed_op_shared_ld.sum",
    "smem_st_instr": "smsp__sass_inst_executed_op_shared_st.sum",
    "smem_ld_wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
    "smem_st_wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
    "smem_ld_conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "smem_st_conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
    "global_ld_sectors": "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "global_ld_requests": "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
    "global_st_sectors": "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "global_st_requests": "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "dram_read_bytes": "dram__bytes_read.sum",
    "dram_write_bytes": "dram__bytes_write.sum",
    "warp_instructions": "smsp__inst_executed.sum",
    "time_ns": "gpu__time_duration.sum",
    "registers": "launch__registers_per_thread",
    "achieved_occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
}
DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def read_ncu(path):
    """[(kernel name, {metric: float})] in launch order from ncu's raw CSV page."""
    rows = list(csv.reader(open(path)))
    head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    cols = rows[head]
    out = []
    for r in rows[head + 2:]:  # the row after the header holds units
        if len(r) != len(cols):
            continue
        rec = dict(zip(cols, r))
        vals = {}
        for key, metric in METRICS.items():
            try:
                vals[key] = float(rec.get(metric, "nan").replace(",", ""))
            except ValueError:
                vals[key] = float("nan")
        out.append((rec["Kernel Name"], vals))
    return out


def emulated(kind, dtype, B, H, L):
    """The emulator's counters for the launch at (B, H), in ncu's terms."""
    two, four = model.emulate(kind, dtype, L, 2), model.emulate(kind, dtype, L, 4)
    regions = model.per_cta(two[0], four[0], (B + 1) // 2)
    tot = lambda suffix: H * sum(v for r in regions.values() for k, v in r.items() if k.endswith(suffix))  # noqa: E731
    sectors = lambda kind_: H * sum(v for r in regions.values() for k, v in r.items()  # noqa: E731
                                    if k.startswith(kind_ + ".") and k.endswith(".sectors"))
    requests = lambda kind_: H * sum(v for r in regions.values() for k, v in r.items()  # noqa: E731
                                     if k.startswith(kind_ + ".") and k.endswith(".requests"))
    first = lambda kind_: 32 * H * sum(v for r in regions.values() for k, v in r.items()  # noqa: E731
                                       if k.startswith(kind_ + ".") and k.endswith(".first"))
    return {
        "smem_ld_instr": tot("lds.instr"), "smem_st_instr": tot("sts.instr"),
        "smem_ld_wavefronts": tot("lds.wavefronts"), "smem_st_wavefronts": tot("sts.wavefronts"),
        "smem_ld_conflicts": tot("lds.wavefronts") - tot("lds.ideal"),
        "smem_st_conflicts": tot("sts.wavefronts") - tot("sts.ideal"),
        "global_ld_sectors": sectors("ldg"), "global_ld_requests": requests("ldg"),
        "global_st_sectors": sectors("stg"), "global_st_requests": requests("stg"),
        "dram_read_bytes": first("ldg"), "dram_write_bytes": first("stg"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    launches = [x for x in read_ncu(args.csv) if "fftconv_" in x[0]]
    report, lines = [], []
    # Each case launches its kernel once; bwd cases launch the forward first.
    expected = []
    for kind, dtype, B, H, L in CASES:
        dt = DTYPES[str(dtype).replace("torch.", "")]
        if kind == "bwd":
            expected.append(("fwd", dt, B, H, L))
        expected.append((kind, dt, B, H, L))
    for (name, got), (kind, dt, B, H, L) in zip(launches, expected):
        emu = emulated(kind, dt, B, H, L)
        rec = {"kernel": name, "kind": kind, "dtype": dt, "B": B, "H": H, "L": L, "ncu": got, "emulator": emu}
        report.append(rec)
        lines.append("%s %s B=%d H=%d L=%d (%s)" % (kind, dt, B, H, L, name[:60]))
        for key in METRICS:
            e = emu.get(key)
            ratio = got[key] / e if e else float("nan")
            lines.append("  %-22s ncu %14.0f   emulator %14s   ncu/emu %s" % (
                key, got[key], "%.0f" % e if e is not None else "-", "%.3f" % ratio if e else "-"))
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
