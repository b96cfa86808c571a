"""The build: the extension exists wherever nvcc does, and the ptxas report is clean.

setup.py parses `nvcc -Xptxas=-v` output into flashconv/_build_info.json; here every
kernel flashconv marks hot (flashconv._ext.HOT_KERNELS) must have no register spills and
shared memory within its architecture's limit.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from flashconv import _ext
from flashconv._buildtools import find_nvcc, parse_ptxas

ROOT = Path(__file__).resolve().parents[1]
# Static shared memory a kernel may declare (the 48 KB static limit; dynamic smem is
# checked at launch against the opt-in limit: 163 KB on sm_80, 227 KB on sm_90).
STATIC_SMEM_LIMIT = 48 * 1024


NVCC = find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the pure-Python install is expected")
def test_extension_built_where_nvcc_exists():
    info = _ext.build_info()
    print("build info: built=%s reason=%r" % (info.get("built"), info.get("reason", "")[:300]))
    assert info.get("built"), "nvcc is present but _C was not built: %s" % info.get("reason")
    ext = _ext.extension()
    assert ext is not None, _ext.unavailable_reason()
    i = ext.info()
    print(i)
    assert i["version"] == __import__("flashconv").__version__
    assert i["cuda_runtime"].split(".")[0].isdigit()
    assert set(i["cuda_archs"].split(",")) >= {"90"}
    count, reason = ext.device_count()
    assert count >= 0 and (count > 0 or reason)  # no driver: 0 with a reason, no crash


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_ptxas_report_hot_kernels_do_not_spill():
    kernels = _ext.build_info().get("kernels", [])
    assert kernels, "no ptxas report in _build_info.json"
    archs = {k["arch"] for k in kernels}
    print("archs:", sorted(archs))
    hot = [k for k in kernels if any(h in k.get("demangled", k["name"]) for h in _ext.HOT_KERNELS)]
    assert hot, "no hot kernel found in the ptxas report"
    for k in hot:
        print("%-60s %s regs=%s stack=%d spills=%d/%d smem=%d" % (
            k.get("demangled", k["name"])[:60], k["arch"], k["registers"], k["stack"],
            k["spill_stores"], k["spill_loads"], k["smem"]))
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, "register spills in hot kernel %s" % k
        # A stack frame without spills is a register array indexed at run time: local memory.
        assert k["stack"] == 0, "local-memory stack frame in hot kernel %s" % k
        assert k["smem"] <= STATIC_SMEM_LIMIT


def test_parse_ptxas_reads_spills():
    # The parser must see spills when ptxas reports them, or the check above proves nothing.
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]
"""
    (k,) = parse_ptxas(log)
    assert (k["name"], k["arch"], k["registers"], k["spill_stores"], k["spill_loads"], k["smem"]) == (
        "_Z3fooPf", "sm_90", 255, 8, 12, 4096)


def test_python_m_flashconv_reports():
    out = subprocess.run([sys.executable, "-m", "flashconv"], capture_output=True, text=True, timeout=120)
    print(out.stdout, out.stderr)
    assert out.returncode == 0
    assert "extension _C" in out.stdout and "torch" in out.stdout and "cupy" in out.stdout


# ---- the SASS and resource lint (flashconv._buildtools.sass_lint) ----

def _extension_path():
    import glob
    found = glob.glob(str(ROOT / "flashconv" / "_C*.so"))
    return found[0] if found else None


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: no extension to lint")
def test_sass_lint_hot_kernels():
    from flashconv._buildtools import find_cuda_tool, format_lint, sass_lint
    if not (find_cuda_tool("cuobjdump") and find_cuda_tool("nvdisasm")):
        pytest.skip("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    so = _extension_path()
    assert so, "nvcc is present but the extension was not built"
    rows = sass_lint(so)
    print(format_lint(rows))
    hot = [r for r in rows if any(h in r["demangled"] for h in _ext.HOT_KERNELS)]
    names = {(r["demangled"], r["arch"]) for r in hot}
    for kernel in ("fftconv_fwd_kernel", "fftconv_bwd_kernel", "fftconv_fwd_tc_kernel",
                   "fftconv_bwd_tc_kernel", "fftconv_long_inner_kernel"):
        for arch in ("sm_80", "sm_90"):
            assert any(kernel in n and a == arch for n, a in names), (kernel, arch)
    for r in hot:
        assert r["instructions"] > 0 and r["registers"] > 0
        assert r["local_instructions"] == 0, "local memory in hot kernel %s" % r["demangled"]
        assert r["ctas_per_sm"] >= 1
        # Sizes are powers of two: quotients and remainders are shifts and masks. A call to
        # the compiler's software division or remainder routine is a regression.
        assert r["slow_div_calls"] == 0, "%s %s: %d calls to software division/remainder %s" % (
            r["demangled"][:60], r["arch"], r["slow_div_calls"], r["calls"])


def test_parse_sass_counts_calls_and_local_memory():
    from flashconv._buildtools import _parse_sass, is_slow_division
    text = """
        .type           _Z3foov,@function
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0020*/                   STL [R1], R2 ;
        /*0030*/                   LDS.64 R4, [R3] ;
        /*0040*/                   HMMA.16816.F32 R8, R12, R16, R8 ;
        .type           $__internal_0_$__cuda_sm20_div_s64,@function
        /*0050*/                   IMAD R0, R1, R2, RZ ;
        /*0060*/                   RET.REL.NODEC R20 `(_Z3foov) ;
"""
    (name, k), = _parse_sass(text).items()
    assert name == "_Z3foov" and k["instructions"] == 5  # the subroutine is not counted
    assert k["calls"] == {"__cuda_sm20_div_s64": 1} and is_slow_division("__cuda_sm20_div_s64")
    assert k["ops"]["STL"] == 1 and k["ops"]["LDS"] == 1 and k["ops"]["HMMA"] == 1


@pytest.mark.parametrize("header", ["fwd_tc.h", "bwd_tc.h"])
def test_region_marks_distinct(header):
    # The marked SASS build tells a kernel's regions apart by PMTRIG 1 << region_id(name), a
    # hash mod 16: two regions of one kernel with the same id would pool their instructions
    # (the backward's "dk" shared id 8 with "kernel" until 2026-11-30, and was charged the
    # set-up code's instructions per access).
    import re
    from flashconv._buildtools import region_id
    inc = ROOT / "cuda" / "include" / "flashconv"
    names = set(re.findall(r'FC_REGION\("([^"]+)"\)', (inc / header).read_text() + (inc / "tc_core.h").read_text()))
    ids = {}
    for n in sorted(names):
        ids.setdefault(region_id(n), []).append(n)
    assert len(names) >= 6 and all(len(v) == 1 for v in ids.values()), ids


def test_sass_regions_split_by_executed_lines():
    # The model's instruction estimate leaves out the SASS of lines a run did not execute:
    # sass_regions keys each instruction by its inlining chain in flashconv's headers, and
    # executed_counts keeps a chain only when every frame the coverage lists ran.
    from flashconv._buildtools import executed_counts, sass_regions
    inc = "/x/cuda/include/flashconv/"
    text = f"""
        .type           _Z1kv,@function
\t//## File "{inc}fwd_tc.h", line 10
        /*0000*/                   PMTRIG 0x1 ;
\t//## File "{inc}tc_core.h", line 5 inlined at "{inc}fwd_tc.h", line 20
\t//## File "{inc}fwd_tc.h", line 20
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   IMAD R0, R1, R2, RZ ;
\t//## File "/usr/include/cuda_bf16.hpp", line 7 inlined at "{inc}tc_core.h", line 6 inlined at "{inc}fwd_tc.h", line 21
\t//## File "{inc}tc_core.h", line 6 inlined at "{inc}fwd_tc.h", line 21
\t//## File "{inc}fwd_tc.h", line 21
        /*0030*/                   LDG.E.U16 R6, desc[UR4][R2.64] ;
        /*0040*/                   PRMT R6, R6, 0x5410, R7 ;
        /*0050*/                   LEA R8, P0, R6, R2, 0x1 ;
\t//## File "{inc}hw.h", line 99 inlined at "{inc}fwd_tc.h", line 22
\t//## File "{inc}fwd_tc.h", line 22
        /*0060*/                   STG.E [R2.64], R6 ;
"""
    (name, regs), = sass_regions(text).items()
    r = regs[0]
    assert (r["instructions"], r["counted"]) == (6, 3)
    assert r["lines"] == {"tc_core.h:5<fwd_tc.h:20": [2, 1], "tc_core.h:6<fwd_tc.h:21": [3, 1],
                          "hw.h:99<fwd_tc.h:22": [1, 1]}
    # Line 6 (a scalar fallback, say) never ran; hw.h:99 (device code) is not in the coverage.
    cov = {"tc_core.h:5": 12, "tc_core.h:6": 0, "fwd_tc.h:20": 3, "fwd_tc.h:21": 3, "fwd_tc.h:22": 3}
    assert executed_counts(r["lines"], cov) == (3, 2)
    # A caller that never ran (another switch case) drops the code inlined into it.
    assert executed_counts(r["lines"], {**cov, "fwd_tc.h:20": 0}) == (1, 1)
    assert executed_counts(r["lines"], {}) == (6, 3)  # nothing known: all of it


@pytest.mark.parametrize("arch, regs, smem, ctas, limit", [
    ("sm_90", 128, 0, 2, "registers"),         # 4096 registers per warp: 16 warps
    ("sm_90", 64, 0, 4, "registers"),
    ("sm_90", 255, 0, 1, "registers"),         # rounded up to 8192 per warp: 8 warps
    ("sm_90", 16, 0, 8, "threads"),            # 2048 threads
    ("sm_90", 64, 102400, 2, "shared memory"),  # (100 KB + 1 KB reserved) into 228 KB
    ("sm_80", 64, 102400, 1, "shared memory"),  # ... into 164 KB
])
def test_occupancy_rules(arch, regs, smem, ctas, limit):
    from flashconv._buildtools import occupancy
    occ = occupancy(arch, regs, 256, smem)
    assert (occ["ctas_per_sm"], occ["limited_by"]) == (ctas, limit)
    assert occ["warps_per_sm"] == 8 * ctas
