"""``python -m flashconv``: what is available here (extension, CUDA, GPU, torch, cupy) and why not."""
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
            facts["extension"]["reason"] = "no CUDA device visible: " + i["device_error"]
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
    facts["backends"] = _backends(facts)
    return facts


def _backends(facts):
    ext, th = facts["extension"], facts["torch"]
    gpu_kernel = ext.get("available") and ext.get("device_count", 0) > 0
    return {
        "numpy (CPU, scipy.fft)": True,
        "torch CPU (scipy.fft engine)": th.get("available", False),
        "torch CUDA (torch.fft)": th.get("gpu", False),
        # The fused kernel is not built yet (issue 4); torch CUDA tensors use torch.fft.
        "fused CUDA kernel (not implemented yet)": False and bool(gpu_kernel),
    }


def main():
    f = collect()
    print("flashconv %s (Python %s)" % (f["flashconv"], f["python"]))
    ext = f["extension"]
    if ext["available"]:
        print("  extension _C : built for sm_%s, CUDA runtime %s, driver %s, %d device(s)"
              % (ext["cuda_archs"].replace(",", ", sm_"), ext["cuda_runtime"], ext["cuda_driver"],
                 ext["device_count"]))
        if "reason" in ext:
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
    print("backends:")
    for name, ok in f["backends"].items():
        print("  [%s] %s" % ("x" if ok else " ", name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
