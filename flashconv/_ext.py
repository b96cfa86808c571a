"""Loads the CUDA extension flashconv._C once and says clearly why it is unavailable.

Nothing here imports torch: the extension takes plain integers (pointers, sizes,
strides, dtype codes, streams), so it is usable from any array library.
"""
import functools
import json
from pathlib import Path

# Kernels whose register spills fail the build check (tests/test_build.py): substrings of
# demangled kernel names as the ptxas report in _build_info.json gives them.
HOT_KERNELS = ("probe_kernel", "fftconv_fwd_kernel", "fftconv_bwd_kernel", "fftconv_fwd_tc_kernel",
               "fftconv_bwd_tc_kernel", "fftconv_long_")

_BUILD_INFO = Path(__file__).with_name("_build_info.json")


@functools.lru_cache(maxsize=None)
def build_info():
    """What setup.py recorded: whether _C was built, why not, and the ptxas report."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {"built": False, "reason": "no build record (package not installed with setup.py)",
                "kernels": []}


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from flashconv import _C
    except ImportError as exc:
        info = build_info()
        why = info.get("reason") if not info.get("built") else None
        reason = "flashconv._C could not be imported (%s)" % exc
        if why:
            reason = "flashconv._C was not built: %s" % why.splitlines()[0]
        return None, reason
    return _C, ""


def extension():
    """The _C module, or None (see unavailable_reason())."""
    return _load()[0]


def unavailable_reason():
    """Empty string if _C loaded, else one line saying why not."""
    return _load()[1]


@functools.lru_cache(maxsize=None)
def cuda_device_count():
    """Devices the extension's CUDA runtime sees (0 where there is no driver or no _C)."""
    ext = extension()
    if ext is None:
        return 0
    return int(ext.device_count()[0])
