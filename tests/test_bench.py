"""The main job (bench/sweep.py) runs end to end on a CPU and writes a complete report."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_quick_writes_report(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--quick", "--no-gpu",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    print(out.stdout[-3000:], out.stderr[-3000:])
    assert out.returncode == 0
    (path,) = tmp_path.glob("sweep_*.json")
    rep = json.loads(path.read_text())
    assert rep["kind"] == "fftconv_sweep" and rep["commit"]
    assert len(rep["cpu_rows"]) >= 2
    for r in rep["cpu_rows"]:
        for key in ("flashconv_s", "torch_ref_s", "scipy_s", "flashconv_fwdbwd_s", "torch_ref_fwdbwd_s"):
            assert r[key] > 0
        assert abs(r["speedup_vs_torch_ref"] - r["torch_ref_s"] / r["flashconv_s"]) < 1e-9
    assert "CPU forward" in out.stdout
