"""setup.py reuses the last CUDA build when its sources, flags and toolkit are unchanged (the
test command after the main-job command used to recompile everything with --clean-first, about
3 minutes), and the ptxas report stays complete: a reused build keeps the last full report, any
change compiles every object again. setup.py is loaded with setuptools.setup stubbed out."""
import importlib.util
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    real = setuptools.setup
    setuptools.setup = lambda **kw: None
    try:
        spec = importlib.util.spec_from_file_location("_flashconv_setup", ROOT / "setup.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        setuptools.setup = real
    return mod


CFG = ["cmake", "-S", "/src", "-B", "/src/build/x", "-DCMAKE_CUDA_ARCHITECTURES=80;90",
       "-Dpybind11_DIR=/tmp/pip-build-env-abc/lib/pybind11/share/cmake"]


def tree(tmp_path):
    (tmp_path / "cuda" / "src").mkdir(parents=True)
    (tmp_path / "cuda" / "src" / "fwd.cu").write_text("__global__ void k() {}\n")
    (tmp_path / "cuda" / "include").mkdir()
    (tmp_path / "cuda" / "include" / "hw.h").write_text("#pragma once\n")
    (tmp_path / "CMakeLists.txt").write_text("project(x)\n")
    return tmp_path


def test_stamp_follows_sources_flags_and_toolkit(setup_py, tmp_path):
    root = tree(tmp_path)
    stamp = setup_py._build_stamp(root, CFG, "13.0")
    assert stamp == setup_py._build_stamp(root, CFG, "13.0")
    # pip's isolated build environment moves pybind11 on every install: not a change.
    moved = CFG[:-1] + ["-Dpybind11_DIR=/tmp/pip-build-env-xyz/lib/pybind11/share/cmake"]
    assert setup_py._build_stamp(root, moved, "13.0") == stamp
    assert setup_py._build_stamp(root, CFG[:-2] + ["-DCMAKE_CUDA_ARCHITECTURES=80"], "13.0") != stamp
    assert setup_py._build_stamp(root, CFG, "12.4") != stamp
    (root / "cuda" / "include" / "hw.h").write_text("#pragma once\n// edited\n")
    edited = setup_py._build_stamp(root, CFG, "13.0")
    assert edited != stamp
    (root / "cuda" / "src" / "bwd.cu").write_text("")
    assert setup_py._build_stamp(root, CFG, "13.0") != edited
    (root / "CMakeLists.txt").write_text("project(y)\n")
    assert setup_py._build_stamp(root, CFG, "13.0") not in (stamp, edited)


def test_reuse_only_a_complete_build_with_the_same_stamp(setup_py, tmp_path, monkeypatch):
    monkeypatch.delenv("FLASHCONV_REBUILD", raising=False)
    ext = tmp_path / "_C.so"
    ext.write_bytes(b"\x7fELF")
    kernels = [{"name": "k", "arch": "sm_80", "registers": 64}]
    prev = {"built": True, "stamp": "s", "kernels": kernels}
    assert setup_py._reusable(prev, "s", ext) == kernels
    assert setup_py._reusable(prev, "t", ext) is None                       # sources changed
    assert setup_py._reusable(dict(prev, built=False), "s", ext) is None    # CPU-only install
    assert setup_py._reusable(dict(prev, kernels=[]), "s", ext) is None     # no ptxas report
    assert setup_py._reusable({"built": True, "kernels": kernels}, "s", ext) is None  # old file
    assert setup_py._reusable(prev, "s", tmp_path / "missing.so") is None   # extension gone
    monkeypatch.setenv("FLASHCONV_REBUILD", "1")
    assert setup_py._reusable(prev, "s", ext) is None
