"""``python -m flashconv``: what is available here (extension, CUDA, GPU, torch, cupy), the
engine table with each engine's availability and the reason for each unavailable one.

``python -m flashconv explain B H L [--dtype bf16] [--device cuda] [--lk LK] ...``: which engine
would serve an fftconv call of that shape (forward and backward) and why not the ones before
it, without allocating anything (flashconv.explain for arrays you have).
"""
import argparse
import platform
import sys


def collect():
    """Facts about this installation as a dict; every missing piece comes with its reason."""
    from flashconv import __version__, _ext

    facts = {"flashconv": __version__, "python": platform.python_version()}
    ext = _ext.extension()
    if ext is None:
        facts["extension"] = {"available": False, "reason": _ext.unavailable_reason()}
    else:
        i = dict(ext.info())
        facts["extension"] = {"available": True, **i}
        if not i["device_count"]:
            from flashconv.engines import _cuda

            facts["extension"]["reason"] = _cuda.unavailable_reason()
    try:
        import torch

        facts["torch"] = {"available": True, "version": torch.__version__,
                          "cuda": torch.version.cuda, "gpu": torch.cuda.is_available()}
        if torch.cuda.is_available():
            facts["torch"]["devices"] = [torch.cuda.get_device_name(d)
                                         for d in range(torch.cuda.device_count())]
        elif torch.version.cuda is None:
            facts["torch"]["reason"] = "CPU-only torch build: CUDA tensors unavailable"
        else:
            facts["torch"]["reason"] = "torch sees no CUDA device"
    except ImportError as exc:
        facts["torch"] = {"available": False, "reason": "not installed (%s); numpy inputs still work" % exc}
    try:
        import cupy

        facts["cupy"] = {"available": True, "version": cupy.__version__}
    except Exception as exc:  # noqa: BLE001 - cupy raises various errors without a driver
        facts["cupy"] = {"available": False, "reason": "%s: %s" % (type(exc).__name__, exc)}
    facts["engines"] = engine_table()
    return facts


def engine_table():
    """[{name, description, available, reason}] in table order (dispatch's order)."""
    from flashconv.engines import TABLE

    rows = []
    for e in TABLE:
        why = e.available()
        rows.append({"name": e.NAME, "description": e.DESCRIPTION, "available": not why,
                     "reason": why})
    return rows


def _print_info():
    f = collect()
    print("flashconv %s (Python %s)" % (f["flashconv"], f["python"]))
    ext = f["extension"]
    if ext["available"]:
        print("  extension _C : built for sm_%s, CUDA runtime %s, driver %s, %d device(s)"
              % (ext["cuda_archs"].replace(",", ", sm_"), ext["cuda_runtime"], ext["cuda_driver"],
                 ext["device_count"]))
        if ext.get("reason"):
            print("                 " + ext["reason"])
    else:
        print("  extension _C : unavailable - " + ext["reason"])
    th = f["torch"]
    if th["available"]:
        print("  torch        : %s (CUDA %s)%s" % (th["version"], th["cuda"],
              ", GPUs: " + ", ".join(th["devices"]) if th.get("devices") else " - " + th.get("reason", "")))
    else:
        print("  torch        : unavailable - " + th["reason"])
    cp = f["cupy"]
    print("  cupy         : " + (cp["version"] if cp["available"] else "unavailable - " + cp["reason"]))
    from flashconv.dispatch import allowed_engines

    allowed, source = allowed_engines()
    print("engines, in dispatch order (a call runs on the first one whose check says yes)%s:"
          % (" - restricted by %s to %s" % (source, ", ".join(allowed)) if source else ""))
    width = max(len(r["name"]) for r in f["engines"])
    previous = None
    for r in f["engines"]:
        mark = "x" if r["available"] else " "
        line = "  [%s] %-*s  %s" % (mark, width, r["name"], r["description"])
        if not r["available"]:
            line += "\n      %*s  unavailable: %s" % (
                width, "", "(as above)" if r["reason"] == previous else r["reason"])
        previous = r["reason"] or None
        print(line)
    print("`python -m flashconv explain B H L --dtype bf16 --device cuda` says which engine serves "
          "a call and why not the others.")
    return 0


def _explain(argv):
    ap = argparse.ArgumentParser(
        prog="python -m flashconv explain",
        description="Which engine serves fftconv(u (B, H, L), k (H, Lk), ...) and why not the "
                    "ones before it; nothing is allocated.")
    ap.add_argument("B", type=int)
    ap.add_argument("H", type=int)
    ap.add_argument("L", type=int)
    ap.add_argument("--dtype", default="float32",
                    help="u's dtype: float32 (fp32), float16 (fp16), bfloat16 (bf16), float64")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ap.add_argument("--lk", type=int, default=None, help="kernel taps Lk (default L)")
    ap.add_argument("--lk-rev", type=int, default=None, help="taps of k_rev (bidirectional)")
    ap.add_argument("--no-D", action="store_true", help="no skip term D")
    ap.add_argument("--gates", action="store_true", help="with g_in and g_out")
    ap.add_argument("--spectrum", choices=("rfft", "monarch"), default=None,
                    help="k is a precomputed fft_kernel spectrum in this layout")
    ap.add_argument("--numpy", action="store_true", help="numpy arrays instead of torch tensors")
    ap.add_argument("--activation", choices=("gelu", "silu"), default=None,
                    help="the fused epilogue's activation")
    ap.add_argument("--dropout-mask", choices=("BH", "BHL"), default=None,
                    help="a dropout mask of shape (B, H) or (B, H, L)")
    ap.add_argument("--direction", choices=("forward", "backward"), default=None,
                    help="only this direction (default both)")
    ap.add_argument("--assume-gpu", nargs="?", const=True, default=False, metavar="SMEM_BYTES",
                    help="answer as if a usable GPU were present (default 227 KB opt-in "
                         "shared memory, H100/H200)")
    args = ap.parse_args(argv)
    from flashconv.ops import explain_problem
    from flashconv.problem import from_shape

    try:
        p = from_shape(args.B, args.H, args.L, args.dtype, args.device, args.lk,
                       kind="numpy" if args.numpy else "torch", D=not args.no_D,
                       g_in=args.gates, g_out=args.gates, Lk_rev=args.lk_rev,
                       spectrum=args.spectrum, activation=args.activation,
                       dropout_mask=args.dropout_mask)
    except ValueError as exc:
        ap.error(str(exc))
    assume = args.assume_gpu if args.assume_gpu is True or not args.assume_gpu \
        else int(args.assume_gpu)
    print(explain_problem(p, args.direction, assume))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "explain":
        return _explain(argv[1:])
    if argv:
        print("usage: python -m flashconv [explain B H L [options]]", file=sys.stderr)
        return 2
    return _print_info()


if __name__ == "__main__":
    sys.exit(main())
