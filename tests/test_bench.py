"""The main job (bench/sweep.py) runs end to end on a CPU and writes a complete report and plot."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "bench" / "sweep.py"
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def flashconv_engine_names():
    import flashconv

    return flashconv.engine_names()


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    """One quick CPU sweep shared by the tests below (without a plot if matplotlib is absent),
    with --threads 1 and a machine that looks busy: os.getloadavg() answers 99.0 at the start
    and 98.0 at the end."""
    out_dir = tmp_path_factory.mktemp("sweep")
    argv = [str(SWEEP), "--quick", "--no-gpu", "--threads", "1", "--out", str(out_dir)]
    if not HAVE_MPL:
        argv.append("--no-plot")
    code = ("import itertools, os, runpy, sys; loads = itertools.chain([99.0], itertools.repeat(98.0)); "
            "os.getloadavg = lambda: (next(loads), 1.0, 1.0); sys.argv = %r; "
            "runpy.run_path(%r, run_name='__main__')" % (argv, str(SWEEP)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    print(out.stdout[-3000:], out.stderr[-3000:])
    assert out.returncode == 0
    return out, out_dir


def test_sweep_quick_writes_report(quick_sweep):
    out, out_dir = quick_sweep
    (path,) = out_dir.glob("sweep_*.json")
    rep = json.loads(path.read_text())
    assert rep["kind"] == "fftconv_sweep" and rep["commit"]
    assert len(rep["cpu_rows"]) >= 2
    for r in rep["cpu_rows"]:
        for key in ("flashconv_s", "torch_ref_s", "scipy_s", "flashconv_fwdbwd_s", "torch_ref_fwdbwd_s"):
            assert r[key] > 0
        assert abs(r["speedup_vs_torch_ref"] - r["torch_ref_s"] / r["flashconv_s"]) < 1e-9
        assert r["engine"] in ("cpu_torch", "cpu_overlap_save") and r["engine_bwd"] == "cpu_torch"
    assert [e["name"] for e in rep["engines"]] == flashconv_engine_names()
    assert "CPU forward" in out.stdout
    # A progress line per configuration, with the elapsed time and an ETA.
    progress = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == len(rep["cpu_rows"])
    assert all("elapsed" in line and "ETA" in line for line in progress)


def test_sweep_records_threads_and_load_and_warns(quick_sweep):
    out, out_dir = quick_sweep
    (path,) = out_dir.glob("sweep_*.json")
    rep = json.loads(path.read_text())
    assert rep["threads"] == {"requested": 1, "torch": 1, "flashconv_cpu": 1}
    assert rep["loadavg"]["start"][0] == 99.0 and rep["loadavg"]["end"][0] == 98.0
    assert all(r["loadavg"] == 98.0 for r in rep["cpu_rows"])
    assert len(rep["warnings"]) == 2 and "load average 99.0 at the start" in rep["warnings"][0]
    assert out.stdout.count("WARNING: load average") == 2 and "--threads 1" in rep["warnings"][1]
    sweep = _sweep_module()
    assert sweep.machine_line(rep) == "%d cores, 1 threads, load 99.0 -> 98.0" % rep["cpu_threads"]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("_sweep_under_test", SWEEP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_warning_only_beyond_the_cores():
    sweep = _sweep_module()
    assert sweep.load_warning(1.9, 2, "the start") is None
    assert sweep.load_warning(2.0, 2, "the start") is None
    assert "load average 2.5 at the end on 2 cores" in sweep.load_warning(2.5, 2, "the end")


def test_eta_from_measured_configurations():
    """The ETA predicts what is left from the time per unit of work measured so far, robust to
    one slow configuration (the old estimate, mean time per configuration, said 4m40s for a
    run that took 1m29s)."""
    sweep = _sweep_module()
    now = [0.0]
    p = sweep.Progress([1, 1, 1, 10, 10], clock=lambda: now[0])
    assert p.eta() != p.eta()  # nothing measured: unknown
    now[0] = 6.0
    p("first")   # slow: 6 s for 1 unit
    now[0] = 7.0
    p("second")  # 1 s
    now[0] = 8.0
    p("third")   # 1 s: median rate 1 s per unit
    assert p.eta() == pytest.approx(20.0)
    q = sweep.Progress([4, 1, 1], clock=lambda: now[0])
    now[0] += 4.0
    q("big")  # 1 s per unit; the small ones left take at least the shortest time measured
    assert q.eta() == pytest.approx(8.0)


@pytest.mark.parametrize("lo,hi", [(0.7, 3.2), (0.95, 1.1), (0.3, 40.0), (1.0, 1.02),
                                   (1.05, 2.4), (0.01, 900.0), (2.2, 2.3)])
def test_speedup_ticks_do_not_crowd(lo, hi):
    """The speedup panel's labels: round values inside the axis, 1x when it is in range, no
    two closer than a factor 1.3 (0.7x 0.8x 0.9x overlapped before), at most 9."""
    ticks = _sweep_module().speedup_ticks(lo, hi)
    assert 1 <= len(ticks) <= 9 and ticks == sorted(set(ticks))
    assert all(lo <= t <= hi for t in ticks) or len(ticks) == 1
    assert all(b / a >= 1.3 * 0.999 for a, b in zip(ticks, ticks[1:]))
    if lo <= 1 <= hi:
        assert 1.0 in ticks


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed (pip install -e \".[bench]\"): "
                                         "the sweep ran with --no-plot, so there is no PNG to check")
def test_sweep_quick_writes_plot(quick_sweep):
    out, out_dir = quick_sweep
    (path,) = out_dir.glob("sweep_*.json")
    png = path.with_suffix(".png")
    assert png.is_file(), "no plot next to %s" % path.name
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert json.loads(path.read_text())["plot"] == png.name
    assert "plot:" in out.stdout


def test_sweep_without_matplotlib_fails_loudly(tmp_path):
    """Missing matplotlib stops the sweep before any timing, naming the install command."""
    # sys.modules[name] = None makes `import matplotlib` raise ImportError.
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            "sys.argv = [%r, '--quick', '--no-gpu', '--out', %r]; "
            "runpy.run_path(%r, run_name='__main__')" % (str(SWEEP), str(tmp_path), str(SWEEP)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    print(out.stdout[-2000:], out.stderr[-2000:])
    assert out.returncode != 0
    assert "matplotlib" in out.stderr and 'pip install -e ".[bench]"' in out.stderr
    assert "--no-plot" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing timed, nothing written
    assert "[  1/" not in out.stdout


@pytest.mark.emu
def test_model_row_keys_and_sanity():
    # One small row of the performance model (bench/model.py) through the emulator.
    from bench import model
    pytest.importorskip("numpy")
    row = model.model_row("fwd", "bf16", 256, lint=[], coverage=shutil.which("gcov") is not None)
    for key in ("kernel", "dtype", "L", "N", "B", "H", "dram_bytes", "floor_bytes", "l2_bytes",
                "smem_wavefronts", "smem_wavefronts_ideal", "global_sector_efficiency",
                "barriers_per_pair", "mma_per_pair", "regs", "ctas_per_sm", "warps_per_sm",
                "slow_div_calls", "modeled_time_s", "floor_time_s"):
        assert key in row, key
    assert (row["B"], row["H"], row["L"]) == (64, 768, 256)
    # u read and y written at least once: the DRAM estimate cannot be below the data part
    # of the floor, nor the time below the floor time.
    assert row["dram_bytes"] >= 2 * 64 * 768 * 256 * 2
    assert row["modeled_time_s"] >= row["floor_time_s"]
    assert row["smem_wavefronts"] >= row["smem_wavefronts_ideal"] > 0
    assert 0 < row["global_sector_efficiency"] <= 1
    assert row["barriers_per_pair"] > 0
    if shutil.which("gcov"):  # the gcov build's line counts reach the model
        assert row["executed_lines"]


@pytest.mark.emu
@pytest.mark.parametrize("kind", ["fwd_gated", "bwd_gated"])
def test_model_gated_rows(kind):
    # H3's gated call in the model: the floor counts the gates (and the backward's gate
    # gradients), the DRAM estimate covers at least that data, and the dense gates are read
    # whole sectors at a time (>= 90% of the sectors' bytes used: vectorised gate loads).
    from bench import model
    pytest.importorskip("numpy")
    row = model.model_row(kind, "bf16", 1024, lint=[], coverage=False)
    data = 64 * 768 * 1024 * 2
    assert row["floor_bytes"] == (4 if kind == "fwd_gated" else 7) * data + 768 * 4 * (
        1024 + 1) * (1 if kind == "fwd_gated" else 2)
    assert row["dram_bytes"] >= (4 if kind == "fwd_gated" else 7) * data
    assert row["global_sector_efficiency"] >= 0.9
    assert row["modeled_time_s"] >= row["floor_time_s"]


def test_ncu_compare_reads_raw_csv(tmp_path):
    # bench/ncu_compare.py's reader on a synthetic `ncu --csv --page raw` file.
    from bench import ncu_compare
    metrics = list(ncu_compare.METRICS.values())
    head = ["ID", "Kernel Name"] + metrics
    units = ["", ""] + ["" for _ in metrics]
    row = ["0", "void flashconv::fftconv_fwd_kernel<...>(FwdParams)"] + [str(i + 1) for i in range(len(metrics))]
    (tmp_path / "ncu.csv").write_text("\n".join(",".join('"%s"' % c for c in r) for r in (head, units, row)) + "\n")
    (name, vals), = ncu_compare.read_ncu(tmp_path / "ncu.csv")
    assert "fftconv_fwd_kernel" in name
    assert vals["smem_ld_instr"] == 1.0 and vals["achieved_occupancy_pct"] == float(len(metrics))
