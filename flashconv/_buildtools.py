"""Build helpers shared by setup.py (loaded by path, without importing flashconv) and the tests.

Standard library only: setup.py runs in pip's isolated build environment.
"""
import os
import re
import shutil
import subprocess


def find_nvcc():
    """Path of nvcc, or None: $CUDACXX, then PATH, then $CUDA_HOME/bin, /usr/local/cuda/bin."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log):
    """Per (kernel, arch) resource usage from `nvcc -Xptxas=-v` output.

    Returns a list of dicts: name (mangled), arch, registers, stack, spill_stores,
    spill_loads, smem (static shared memory bytes).
    """
    kernels, cur = [], None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "registers": None, "stack": 0,
                   "spill_stores": 0, "spill_loads": 0, "smem": 0}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _PTXAS_USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = _PTXAS_SMEM.search(line)
            cur["smem"] = int(s.group(1)) if s else 0
    names = [k["name"] for k in kernels]
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
        demangled = out.stdout.splitlines()
        if len(demangled) == len(names):
            for k, d in zip(kernels, demangled):
                k["demangled"] = d
    return kernels
