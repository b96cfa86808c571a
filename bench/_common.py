"""Pieces the bench scripts share: timing one call with CUDA events, and writing a JSON report
under bench/results/ with the common naming <kind>_<date>_<device>[_<tag>][_quick].json."""
import datetime
import json
from pathlib import Path


def engines_for(u, k, D=None):
    """(forward, backward) names of the engines flashconv's dispatch picks for fftconv(u, k, D)
    (flashconv/engines/): recorded with each timed shape."""
    from flashconv import dispatch
    from flashconv.problem import Operands, from_arrays

    p = from_arrays(Operands(u, k, D))
    return dispatch.select(p).NAME, dispatch.select(p.with_direction("backward")).NAME


def cuda_event_time(fn):
    """Seconds that fn() takes on the current CUDA stream (events around it; waits for it)."""
    import torch

    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e-3


def report_path(out_dir, kind, device, tag="", quick=False):
    """out_dir / kind_<date>_<device with spaces as dashes>[_tag][_quick].json (dir created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [kind, datetime.date.today().isoformat(), str(device).replace(" ", "-")]
    parts += [tag] if tag else []
    parts += ["quick"] if quick else []
    return out / ("_".join(parts) + ".json")


def write_report(path, report):
    """Write report as indented JSON to path and say where."""
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
    print("\nreport: %s" % path)
    return path
