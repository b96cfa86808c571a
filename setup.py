"""Build script: setup.py drives CMake to build the CUDA extension flashconv._C.

Environment variables
---------------------
FLASHCONV_CUDA_ARCHS     CUDA architectures, CMake syntax (default "80;90").
FLASHCONV_REQUIRE_CUDA   "1": a missing nvcc or a failed CUDA build is an error
                         (the GPU machine sets it). Otherwise the install completes as
                         pure Python (CPU paths only) with one warning.
FLASHCONV_NO_CUDA        "1": do not try to build the extension at all.
FLASHCONV_CUDA_HOME      root of the CUDA toolkit to build with (its bin/nvcc, headers and
                         static runtime), e.g. /usr/local/cuda-12.4: a CUDA 12 build runs on
                         R525+ drivers, the default CUDA 13 build needs R580+. Default: nvcc
                         from CUDACXX, PATH, CUDA_HOME or /usr/local/cuda.
FLASHCONV_REBUILD        "1": compile every CUDA object again even if the sources and flags
                         are those of the last build (which is otherwise reused, with its
                         ptxas report: see _build_stamp).
CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (CMake's own variable).

The build log's ``ptxas -v`` lines (registers, spills, shared memory per kernel and
architecture) are parsed into ``flashconv/_build_info.json``; tests/test_build.py reads
it and fails on register spills in the kernels flashconv marks hot.
"""
import json
import os
import shutil
import subprocess
import sys
import importlib.util
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_INFO = ROOT / "flashconv" / "_build_info.json"


def _load_buildtools():
    # By path: importing the flashconv package would need numpy in the build environment.
    spec = importlib.util.spec_from_file_location("_flashconv_buildtools",
                                                  ROOT / "flashconv" / "_buildtools.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_bt = _load_buildtools()
find_nvcc, parse_ptxas = _bt.find_nvcc, _bt.parse_ptxas


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _version():
    ns = {}
    exec((ROOT / "flashconv" / "_version.py").read_text(), ns)
    return ns["__version__"]


def _build_stamp(root, cfg, toolkit):
    """sha256 of what the CUDA build depends on: every file under cuda/ and CMakeLists.txt, the
    CMake configure flags (less pybind11's path: pip's isolated environment moves it on every
    install) and the toolkit's release. The same stamp as the last successful build means its
    objects and its ptxas report (every kernel) are still exact."""
    import hashlib

    h = hashlib.sha256()
    root = Path(root)
    files = sorted(p for p in (root / "cuda").rglob("*") if p.is_file())
    for p in files + [root / "CMakeLists.txt"]:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() if p.exists() else b"")
    for flag in cfg[1:]:
        if not flag.startswith("-Dpybind11_DIR="):
            h.update(flag.encode() + b"\0")
    h.update(str(toolkit).encode())
    return h.hexdigest()


def _reusable(previous, stamp, extension):
    """The last build's ptxas report if it has this stamp, covers kernels and its extension
    file is in place (and FLASHCONV_REBUILD is not set); else None."""
    if _env_flag("FLASHCONV_REBUILD") or not previous.get("built"):
        return None
    if previous.get("stamp") != stamp or not previous.get("kernels"):
        return None
    return previous["kernels"] if Path(extension).is_file() else None


def _nvcc_release(nvcc):
    """'13.0', '12.4', ... from `nvcc --version` ('unknown' if it does not say)."""
    out = subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True).stdout
    for line in out.splitlines():
        if "release" in line:
            return line.split("release", 1)[1].split(",")[0].strip()
    return "unknown"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build with CMake; fall back to pure Python unless CUDA is required."""

    def run(self):
        required = _env_flag("FLASHCONV_REQUIRE_CUDA")
        info = {"version": _version(), "built": False, "reason": "", "kernels": []}
        try:
            if _env_flag("FLASHCONV_NO_CUDA"):
                raise RuntimeError("FLASHCONV_NO_CUDA is set")
            info.update(self._build_cmake())
            info["built"] = True
        except Exception as exc:  # noqa: BLE001 - any build failure degrades to CPU-only
            info["reason"] = str(exc)
            if required:
                raise
            self.warn(
                "flashconv: the CUDA extension was not built (%s); installing the pure-Python "
                "package (CPU paths only). Set FLASHCONV_REQUIRE_CUDA=1 to make this an error."
                % exc)
        BUILD_INFO.write_text(json.dumps(info, indent=1) + "\n")
        # An editable install reads the file from the source tree; a wheel needs a copy.
        if not self.inplace:
            dest = Path(self.build_lib) / "flashconv" / BUILD_INFO.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(BUILD_INFO, dest)

    def _build_cmake(self):
        cuda_home = os.environ.get("FLASHCONV_CUDA_HOME", "").strip()
        if cuda_home:
            nvcc = os.path.join(cuda_home, "bin", "nvcc")
            if not os.access(nvcc, os.X_OK):
                raise RuntimeError("FLASHCONV_CUDA_HOME=%s has no bin/nvcc" % cuda_home)
        else:
            nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set FLASHCONV_CUDA_HOME, CUDACXX or CUDA_HOME, "
                               "or put nvcc on PATH)")
        toolkit = _nvcc_release(nvcc)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        import pybind11

        ext = self.extensions[0]
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # One build folder per toolkit: CMake cannot switch compilers inside one.
        build_dir = ROOT / "build" / ("cmake-py%d%d-cuda%s" % (sys.version_info[:2] + (toolkit,)))
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("FLASHCONV_CUDA_ARCHS", "").strip() or "80;90"
        cfg = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DCMAKE_CUDA_COMPILER=" + nvcc,
            "-DCMAKE_CUDA_ARCHITECTURES=" + archs,
            "-Dpybind11_DIR=" + pybind11.get_cmake_dir(),
            "-DPython_EXECUTABLE=" + sys.executable,
            "-DFLASHCONV_VERSION=" + _version(),
            "-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=" + str(out_dir),
        ]
        if cuda_home:
            cfg.append("-DCUDAToolkit_ROOT=" + cuda_home)
        if shutil.which("ninja"):
            cfg.append("-GNinja")
        stamp = _build_stamp(ROOT, cfg, toolkit)
        try:
            previous = json.loads(BUILD_INFO.read_text())
        except (OSError, ValueError):
            previous = {}
        kept = _reusable(previous, stamp, self.get_ext_fullpath(ext.name))
        log = self._run(cfg)
        if kept is not None:
            # Same sources, flags and toolkit as the last build: an incremental build (nothing
            # to do) and its ptxas report, which covers every kernel.
            print("flashconv: CUDA sources and flags unchanged since the last build: reusing it "
                  "and its ptxas report (FLASHCONV_REBUILD=1 compiles everything again)",
                  flush=True)
            log = self._run([cmake, "--build", str(build_dir)])
            fresh = {(k["name"], k["arch"]): k for k in parse_ptxas(log)}
            kernels = [fresh.pop((k["name"], k["arch"]), k) for k in kept] + list(fresh.values())
        else:
            print("flashconv: compiling the CUDA extension with %s (CUDA %s, archs %s): this takes "
                  "a few minutes; FLASHCONV_NO_CUDA=1 skips it on a machine without a GPU"
                  % (nvcc, toolkit, archs), flush=True)
            # Every CUDA object compiled again, so the ptxas report covers every kernel.
            log += self._run([cmake, "--build", str(build_dir), "--clean-first"])
            kernels = parse_ptxas(log)
        return {"cuda_archs": archs, "nvcc": nvcc, "cuda_toolkit": toolkit, "kernels": kernels,
                "python": sysconfig.get_python_version(), "stamp": stamp}

    def _run(self, cmd):
        print("flashconv:", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-30:])
            raise RuntimeError("command failed (%d): %s\n%s" % (proc.returncode, cmd[1:3], tail))
        return proc.stdout


setup(
    name="flashconv",
    version=_version(),
    description="Fused block-FFT causal convolution for long-sequence models (FlashConv, H3 section 4)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["flashconv", "flashconv.*", "python_ref", "python_ref.*"]),
    package_data={"flashconv": ["_build_info.json"]},
    ext_modules=[CMakeExtension("flashconv._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["numpy", "scipy"],
    extras_require={
        "torch": ["torch>=2.1"],
        "cupy": ["cupy-cuda13x"],
        # cuobjdump and nvdisasm for the SASS lint (tests/test_build.py, bench/model.py), where
        # the CUDA toolkit lacks them.
        "test": ["pytest", "pytest-benchmark", "nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm"],
        # bench/sweep.py's PNG plot.
        "bench": ["matplotlib"],
    },
    zip_safe=False,
)
