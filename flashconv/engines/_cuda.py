"""What the CUDA extension can do on a device: the facts the CUDA engines' checks read.

Everything is asked of flashconv._C (no torch): whether it loaded, whether its CUDA runtime sees
a device (and if not, why, in words a user can act on), the opt-in shared memory of a device,
the kernels' largest FFT sizes. Answers are cached per process; ``reset()`` clears them (tests).
"""
import functools
import os

from flashconv import _ext

# dtype codes of the launchers (cuda/include/flashconv/fftconv_params.h)
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
# Assumed opt-in shared memory of a GPU explain() is asked about without one: H100/H200 (sm_90).
ASSUMED_SMEM = 227 * 1024

_SMEM = {}
_MAX_N = {}
_REASON = {}
_assume = {"gpu": False, "smem": ASSUMED_SMEM}


def reset():
    _SMEM.clear()
    _MAX_N.clear()
    _REASON.clear()
    if hasattr(_driver_text, "cache_clear"):  # (tests replace it)
        _driver_text.cache_clear()


def _driver_release():
    """The NVIDIA kernel module's version ("535.104.05"), or None (not Linux, no driver)."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


@functools.lru_cache(maxsize=None)
def _driver_text():
    return _driver_release()


def unavailable_reason():
    """Why the extension cannot run kernels on this machine ("" if it can): not built, not
    importable, no driver, a driver too old for the runtime it was built with, no device.
    Cached per process (reset() clears it)."""
    if _assume["gpu"]:
        return ""
    if "why" not in _REASON:
        _REASON["why"] = _unavailable_reason()
    return _REASON["why"]


def _unavailable_reason():
    ext = _ext.extension()
    if ext is None:
        return _ext.unavailable_reason()
    if _ext.cuda_device_count() > 0:
        return ""
    try:
        info = dict(ext.info())
    except Exception as exc:  # noqa: BLE001 - an old or broken extension
        return "flashconv._C.info() failed: %s" % exc
    err = info.get("device_error") or ""
    runtime = info.get("cuda_runtime")
    driver_cuda = info.get("cuda_driver")  # None: cudaDriverGetVersion found no driver
    release = _driver_text()
    if driver_cuda is None and release is None:
        return "no NVIDIA driver is installed (the extension's CUDA %s runtime says %s)" % (
            runtime, err or "no device")
    if "InsufficientDriver" in err or (driver_cuda and runtime and
                                       _version_tuple(driver_cuda) < _version_tuple(runtime)):
        drv = "driver %s" % release if release else "the NVIDIA driver"
        if driver_cuda:
            drv += " (supports CUDA up to %s)" % driver_cuda
        return ("%s is older than this build's CUDA %s runtime needs; rebuild with "
                "FLASHCONV_CUDA_HOME=<a CUDA 12 toolkit> (see README, Install) or update the "
                "driver" % (drv, runtime))
    if "NoDevice" in err or not err:
        return "the extension's CUDA runtime sees no CUDA device%s" % (
            " (%s)" % err if err else "")
    return "the extension's CUDA runtime sees no usable device: %s" % err


def _version_tuple(v):
    try:
        return tuple(int(x) for x in str(v).split("."))
    except ValueError:
        return (0,)


def has(attr):
    """True if the extension is loaded and has the launcher `attr`."""
    ext = _ext.extension()
    return ext is not None and hasattr(ext, attr)


def max_smem(device_index):
    """Opt-in dynamic shared memory per block of a device (bytes)."""
    if _assume["gpu"]:
        return _assume["smem"]
    if device_index not in _SMEM:
        _SMEM[device_index] = int(_ext.extension().max_shared_memory(device_index))
    return _SMEM[device_index]


def kernel_max_n(dtype, backward=False):
    """The fused kernel's own largest FFT size for a dtype name (0: not a kernel dtype or no
    extension)."""
    key = (dtype, backward)
    if key not in _MAX_N:
        ext = _ext.extension()
        code = DTYPE_CODES.get(dtype)
        if ext is None or code is None:
            _MAX_N[key] = 0
        else:
            _MAX_N[key] = int(ext.fftconv_bwd_max_n(code) if backward
                              else ext.fftconv_fwd_max_n(code))
    return _MAX_N[key]


def static_smem(backward=False):
    """Static shared memory (bytes) of the fused forward (backward) kernels: the largest the
    build's ptxas report (_build_info.json) gives over dtypes and architectures, 1024 where
    the report has none. The opt-in limit applies to static plus dynamic shared memory."""
    key = ("static", backward)
    if key not in _MAX_N:
        d = "bwd" if backward else "fwd"
        names = ("fftconv_%s_kernel" % d, "fftconv_%s_tc_kernel" % d)  # fp32 stages, tensor cores
        sizes = [int(k.get("smem") or 0) for k in _ext.build_info().get("kernels", [])
                 if any(n in (k.get("demangled") or k.get("name") or "") for n in names)]
        _MAX_N[key] = max(sizes) if sizes else 1024
    return _MAX_N[key]


def fused_max_n(dtype, device_index, backward=False):
    """The largest FFT size the fused forward (backward) kernel runs for `dtype` on a device:
    the largest power of two up to its own limit such that, at it and every size below it, the
    launch's dynamic shared memory plus its static shared memory fit in the opt-in shared
    memory (sizes are not monotone: smaller N batch more pairs, and the bfloat16 backward
    changes kernels above 8K); 0 where the extension, a device or the dtype is missing."""
    if unavailable_reason() or dtype not in DTYPE_CODES:
        return 0
    limit = kernel_max_n(dtype, backward)
    smem = max_smem(device_index) - static_smem(backward)
    best, n = 0, 32
    while n <= limit and launch_smem(dtype, n, backward) <= smem:
        best, n = n, 2 * n
    return best


def launch_smem(dtype, n, backward=False):
    """Dynamic shared memory (bytes) of a fused launch at FFT size n, as the extension says
    (an extension without the query: one row of complex fp16 (bf16) or fp32, two for the
    backward)."""
    ext = _ext.extension()
    query = getattr(ext, "fftconv_bwd_smem" if backward else "fftconv_fwd_smem", None)
    if query is not None:
        return int(query(DTYPE_CODES[dtype], int(n)))
    return (2 if backward else 1) * int(n) * (4 if dtype == "bfloat16" else 8)


class assume_gpu:
    """Context: answer as if a GPU with `smem` bytes of opt-in shared memory were visible
    (explain() for a CUDA call on a machine without one). The kernels' own limits still come
    from the built extension."""

    def __init__(self, smem=ASSUMED_SMEM):
        self.smem = int(smem)

    def __enter__(self):
        self._saved = dict(_assume)
        _assume.update(gpu=True, smem=self.smem)
        return self

    def __exit__(self, *exc):
        _assume.clear()
        _assume.update(self._saved)
        return False


def assuming_gpu():
    return _assume["gpu"]


def require_kernel():
    """FLASHCONV_REQUIRE_KERNEL=1: CUDA tensors the extension cannot serve are an error."""
    return os.environ.get("FLASHCONV_REQUIRE_KERNEL", "").strip().lower() in ("1", "true", "yes", "on")
