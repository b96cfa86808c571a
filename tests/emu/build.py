"""Builds and runs the CPU emulation driver (tests/emu/driver.cpp) for the tests.

``driver(variant)`` compiles on demand into ``build/emu/<variant>/driver-<hash>``; the hash
covers the compiler, the flags and every source the driver can include, so repeated test runs
reuse the binary. A missing g++ (or sanitizer runtime) skips the calling test. ``run()`` hands
numpy arrays to a driver case as .npy files and returns the case's outputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
INCLUDE = ROOT / "cuda" / "include"
BUILD = ROOT / "build" / "emu"
CXX = os.environ.get("CXX", "g++")
NVCC = os.environ.get("NVCC", "nvcc")

FLAGS = ["-std=c++20", "-O1", "-g", "-pthread", "-rdynamic", "-Wall", "-Wextra"]
VARIANTS = {
    "plain": [],
    "tsan": ["-fsanitize=thread"],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
             "-fno-omit-frame-pointer"],
}
# Builds with a test-only compile-time setting, not sanitizers (not run by test_emu.py's
# variant sweep): "fp16limit8" lowers the fp16 store limit (fp32-stage kernels: a clamp and a
# flag) and makes fp16 packing overflow to inf above 8 (tensor-core kernels), so the kernels'
# overflow retry paths run on ordinary data.
TEST_VARIANTS = {
    "fp16limit8": ["-DFLASHCONV_FP16_STORE_LIMIT=8.0f", "-DFLASHCONV_FP16_OVERFLOW_AT=8.0f"],
    # gcov line counts of the kernels' headers (Result.lines; bench/model.py leaves the SASS of
    # lines that did not run out of its instruction estimate).
    "coverage": ["--coverage"],
}
SANITIZER_ENV = {
    "TSAN_OPTIONS": "halt_on_error=0 exitcode=66",  # report every race, then fail the run
    "ASAN_OPTIONS": "detect_leaks=0",  # LeakSanitizer needs ptrace, often denied in containers
    "UBSAN_OPTIONS": "print_stacktrace=1",
}


def _sources() -> list[Path]:
    return sorted([*HERE.glob("*.h"), *HERE.glob("*.cpp"), *HERE.glob("*.cu"),
                   *INCLUDE.rglob("*.h"), *INCLUDE.rglob("*.cuh")])


def _digest(tool: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    h.update(subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.encode())
    h.update("\0".join(flags).encode())
    for p in _sources():
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _compile(cmd: list[str], out: Path) -> None:
    """Runs cmd writing to a temporary name next to out, then renames: concurrent runs are safe."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    p = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compile failed: {' '.join(cmd)}\n{p.stderr}")
    os.replace(tmp, out)


@functools.cache
def driver(variant: str = "plain") -> Path:
    if shutil.which(CXX) is None:
        pytest.skip(f"{CXX} not found: the emulation tests compile C++")
    flags = FLAGS + {**VARIANTS, **TEST_VARIANTS}[variant]
    exe = BUILD / variant / f"driver-{_digest(CXX, flags)}"
    if exe.exists():
        return exe
    if variant in VARIANTS and variant != "plain":
        probe = subprocess.run([CXX, *flags, "-x", "c++", "-", "-o", os.devnull],
                               input="int main() {}\n", capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"{CXX} cannot build with {' '.join(VARIANTS[variant])}: "
                        f"{probe.stderr.strip()[:200]}")
    _compile([CXX, *flags, "-I", str(INCLUDE), "-I", str(HERE), str(HERE / "driver.cpp")], exe)
    # Drop binaries of older sources, but not ones another session may be running right now.
    for old in exe.parent.glob("driver-*"):
        if not old.name.startswith(exe.name) and time.time() - old.stat().st_mtime > 3600:
            old.unlink(missing_ok=True)
    return exe


@dataclass
class Result:
    returncode: int
    stderr: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    # With counters=True: one dict per launch (kernel, grid, threads, smem_bytes, regions), as
    # tests/emu/driver.cpp writes hw::emu::launches().
    counters: list = field(default_factory=list)
    # Variant "coverage": {"tc_core.h:260": times run} for the lines of cuda/include/flashconv
    # that the compiled driver holds (gcov; summed over template instantiations).
    lines: dict = field(default_factory=dict)


def run(case: str, inputs: dict[str, np.ndarray] | None = None, variant: str = "plain",
        sm: int = 80, params: dict[str, int] | None = None, check: bool = True,
        timeout: float = 300, counters: bool = False) -> Result:
    """Runs driver case `case`; with check, a non-zero exit raises with the driver's stderr."""
    exe = driver(variant)
    inputs = inputs or {}
    with tempfile.TemporaryDirectory(prefix="fc-emu-") as tmp:
        d = Path(tmp)
        for name, a in inputs.items():
            np.save(d / f"{name}.npy", np.ascontiguousarray(a))
        args = [str(exe), case, str(d), f"sm={sm}"]
        args += [f"{k}={v}" for k, v in {**(params or {}), **({"counters": 1} if counters else {})}.items()]
        env = {**os.environ, **SANITIZER_ENV}
        if variant == "coverage":
            env["GCOV_PREFIX"] = str(d / "gcov")  # this run's counts, apart from any other's
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
        outputs = {f.stem: np.load(f) for f in d.glob("*.npy") if f.stem not in inputs}
        stats = json.loads((d / "counters.json").read_text()) if (d / "counters.json").exists() else []
        lines = _gcov_lines(exe, d / "gcov") if variant == "coverage" else {}
    if check and p.returncode != 0:
        raise AssertionError(f"{case} [{variant}] exited with {p.returncode}:\n{p.stderr}")
    return Result(p.returncode, p.stderr, outputs, stats, lines)


def _gcov_lines(exe: Path, prefix: Path) -> dict:
    """{"file.h:line": count} of cuda/include/flashconv from the .gcda a coverage run of `exe`
    left under `prefix` (its notes file, written by the compile beside exe, is copied next to
    it for gcov)."""
    out: dict = {}
    for gcda in prefix.rglob("*.gcda"):
        gcno = exe.parent / (gcda.stem + ".gcno")
        if not gcno.exists():
            raise RuntimeError(f"coverage: no notes file {gcno} for {gcda}")
        shutil.copy(gcno, gcda.with_suffix(".gcno"))
        p = subprocess.run(["gcov", "--json-format", "--stdout", gcda.name], cwd=gcda.parent,
                           capture_output=True, text=True, check=True)
        for doc in p.stdout.splitlines():
            for f in json.loads(doc)["files"]:
                path = Path(f["file"])
                if path.parent != INCLUDE / "flashconv":
                    continue
                for ln in f["lines"]:
                    key = f"{path.name}:{ln['line_number']}"
                    out[key] = out.get(key, 0) + ln["count"]
    return out


@functools.cache
def nvcc_check(arch: int) -> str:
    """Compiles nvcc_check.cu (hw.h and all proof kernels) for sm_<arch>; returns its PTX."""
    if shutil.which(NVCC) is None:
        pytest.skip(f"{NVCC} not found")
    flags = ["-std=c++17", f"-arch=sm_{arch}"]
    ptx = BUILD / f"nvcc-sm_{arch}" / f"nvcc_check-{_digest(NVCC, flags)}.ptx"
    if not ptx.exists():
        with tempfile.TemporaryDirectory(prefix="fc-nvcc-") as keep:
            _compile([NVCC, *flags, "-I", str(INCLUDE), "-c", str(HERE / "nvcc_check.cu"),
                      "--keep", "--keep-dir", keep], Path(keep) / "nvcc_check.o")
            ptx.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(keep) / "nvcc_check.ptx", ptx)
    return ptx.read_text()
