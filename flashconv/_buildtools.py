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


# ---- SASS and resource lint -------------------------------------------------------------------
# Reads the cubins built into the extension (cuobjdump, nvdisasm: the CUDA toolkit's, or PyPI's
# nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm where the toolkit lacks them) and reports, per
# kernel and architecture: calls to the compiler's software division / remainder routines,
# local-memory instructions, static SASS instruction counts by kind, registers, static shared
# memory, and the occupancy those allow.

# Per-SM limits for the occupancy calculator's rules (CUDA C Programming Guide, compute
# capabilities table): registers, threads, resident CTAs, shared memory (bytes, the largest
# carve-out) and the shared memory the system reserves per CTA.
SM_LIMITS = {
    "sm_80": {"regs": 65536, "threads": 2048, "ctas": 32, "smem": 167936, "reserved": 1024},
    "sm_90": {"regs": 65536, "threads": 2048, "ctas": 32, "smem": 233472, "reserved": 1024},
}
_REG_UNIT = 256  # registers are allocated per warp in units of 256

# SASS opcodes the emulator's counters see one-to-one (the denominator of the model's
# instructions-per-access estimate), by the emulator's category.
_COUNTED_OPS = {
    "LDS": "lds", "LDSM": "lds", "STS": "sts", "LDG": "ldg", "STG": "stg", "RED": "stg",
    "ATOM": "stg", "ATOMG": "stg", "REDG": "stg", "LD": "ldg", "ST": "stg", "HMMA": "mma",
    "SHFL": "shfl", "BAR": "bar",
}


def find_cuda_tool(name):
    """Path of a CUDA binary tool (cuobjdump, nvdisasm, ...) or None: PATH, $CUDA_HOME/bin,
    /usr/local/cuda/bin, then the bin/ folders of PyPI's nvidia-* packages."""
    import glob
    import importlib.util
    candidates = [shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else None) or []:
        candidates += sorted(glob.glob(os.path.join(root, "*", "bin", name)), reverse=True)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def occupancy(arch, registers, threads, smem_bytes):
    """CTAs and warps per SM for a kernel of `threads` threads per CTA using `registers` per
    thread and `smem_bytes` of shared memory per CTA (static + dynamic), and what limits it."""
    lim = SM_LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // _REG_UNIT) * _REG_UNIT
    by = {
        "registers": (lim["regs"] // regs_per_warp) // warps,
        "threads": lim["threads"] // (warps * 32),
        "ctas": lim["ctas"],
        "shared memory": lim["smem"] // (smem_bytes + lim["reserved"]),
    }
    limiter = min(by, key=by.get)
    return {"ctas_per_sm": by[limiter], "warps_per_sm": by[limiter] * warps, "limited_by": limiter}


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw).stdout


def _parse_sass(text):
    """{mangled kernel: {"instructions", "ops": {opcode: n}, "calls": {routine: n}}} from nvdisasm
    -c output; subroutines ($__internal_*) are not kernels and are not counted in their size."""
    kernels, cur = {}, None
    instr = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)\s*(.*)$")
    for line in text.splitlines():
        m = re.match(r"\s+\.type\s+([^,]+),@function", line)
        if m:
            name = m.group(1)
            cur = None if name.startswith("$") else kernels.setdefault(
                name, {"instructions": 0, "ops": {}, "calls": {}})
            continue
        m = instr.match(line)
        if not m or cur is None:
            continue
        op = m.group(1)
        cur["instructions"] += 1
        cur["ops"][op] = cur["ops"].get(op, 0) + 1
        if op == "CALL":
            t = re.search(r"\(\$__internal_\d+_\$([\w]+)\)", m.group(3))
            routine = t.group(1) if t else m.group(3).strip(" ;`")
            cur["calls"][routine] = cur["calls"].get(routine, 0) + 1
    return kernels


def _parse_res_usage(text):
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            out[name] = dict(zip(("registers", "stack", "smem", "local"), map(int, m.groups())))
            name = None
    return out


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def is_slow_division(routine):
    """The compiler's software division / remainder routines (64-bit integer, IEEE float)."""
    return bool(re.search(r"(div|rem|rcp)", routine))


def sass_lint(binary, threads=256):
    """Per (kernel, arch) facts of the cubins in `binary` (the built extension or an object).

    Returns a list of dicts: name (mangled), demangled, arch, instructions (static SASS count,
    subroutines excluded), ops (opcode -> count), calls (routine -> call sites),
    slow_div_calls, local_instructions (LDL/STL), counted_ops (static instructions the emulator
    counts one-to-one, by its category), registers, stack, smem (static), and ctas_per_sm /
    warps_per_sm / limited_by at `threads` threads with only the static shared memory (the
    model adds each launch's dynamic shared memory). Raises RuntimeError if a tool is missing.
    """
    import tempfile
    cuobjdump, nvdisasm = find_cuda_tool("cuobjdump"), find_cuda_tool("nvdisasm")
    if not cuobjdump or not nvdisasm:
        raise RuntimeError("cuobjdump/nvdisasm not found: install the CUDA toolkit's binary "
                           "utilities or `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fc-sass-") as tmp:
        _run([cuobjdump, "-xelf", "all", os.path.abspath(binary)], cwd=tmp)
        for cubin in sorted(os.listdir(tmp)):
            m = re.search(r"\.(sm_\d+)a?\.cubin$", cubin)
            if not m:
                continue
            arch, path = m.group(1), os.path.join(tmp, cubin)
            sass = _parse_sass(_run([nvdisasm, "-c", path]))
            res = _parse_res_usage(_run([cuobjdump, "-res-usage", path]))
            for name, k in sass.items():
                r = dict(res.get(name, {"registers": 0, "stack": 0, "smem": 0, "local": 0}))
                if arch == "sm_90":  # cuobjdump counts the 1 KB the system reserves per CTA
                    r["smem"] = max(0, r["smem"] - 1024)
                counted = {}
                for op, n in k["ops"].items():
                    cat = _COUNTED_OPS.get(op)
                    if cat:
                        counted[cat] = counted.get(cat, 0) + n
                row = {"name": name, "arch": arch, **k, **r,
                       "slow_div_calls": sum(n for c, n in k["calls"].items() if is_slow_division(c)),
                       "local_instructions": k["ops"].get("LDL", 0) + k["ops"].get("STL", 0),
                       "counted_ops": counted}
                if arch in SM_LIMITS:
                    row.update(occupancy(arch, r["registers"], threads, r["smem"]))
                rows.append(row)
    for row, d in zip(rows, [_demangle([r["name"] for r in rows])[r["name"]] for r in rows]):
        row["demangled"] = d
    return rows


def format_lint(rows):
    """The lint as a text table, one line per kernel and architecture."""
    lines = ["%-52s %-5s %6s %4s %5s %5s %5s %4s %s" % (
        "kernel", "arch", "instr", "regs", "smem", "local", "slowdiv", "CTAs", "warps/SM (limit)")]
    for r in sorted(rows, key=lambda r: (r["demangled"], r["arch"])):
        name = re.sub(r"^void |\(.*$", "", r["demangled"]).replace("flashconv::", "").replace("hw::", "")
        lines.append("%-52s %-5s %6d %4d %5d %5d %7d %4s %s" % (
            name[:52], r["arch"], r["instructions"], r["registers"], r["smem"],
            r["local_instructions"], r["slow_div_calls"], r.get("ctas_per_sm", "-"),
            "%s (%s)" % (r.get("warps_per_sm", "-"), r.get("limited_by", "-"))))
    return "\n".join(lines)


def region_id(name):
    """hw::region_id: FNV-1a of a counter region's name, mod 16 (the id of its SASS marker)."""
    h = 2166136261
    for ch in name.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h & 15


def sass_regions(text):
    """{mangled kernel: {region id or None: {"instructions": n, "counted": n, "lines": {...}}}}
    from nvdisasm -c -gi output of a build with -DFLASHCONV_REGION_MARKS: instructions in
    address order belong to the region of the last `PMTRIG 1<<id` before them (None: before
    the first marker); subroutines are skipped. `counted` are those the emulator counts
    one-to-one. `lines` splits the region by source position (with -lineinfo): {chain:
    [instructions, counted]}, chain being the instruction's inlining frames in flashconv's own
    headers, innermost first, as "tc_core.h:260<fwd_tc.h:95" ("" without line information), so
    that a model can leave out code that a run did not execute (executed_counts)."""
    out, cur, region = {}, None, None
    chain, pending = "", []
    instr = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)\s*(.*)$")
    frame = re.compile(r'^\s*//## File "([^"]+)", line (\d+)( inlined at)?')
    for line in text.splitlines():
        m = re.match(r"\s+\.type\s+([^,]+),@function", line)
        if m:
            name = m.group(1)
            cur = None if name.startswith("$") else out.setdefault(name, {})
            region, chain, pending = None, "", []
            continue
        m = frame.match(line)
        if m:  # a group of frames, innermost first, ends with the one not inlined
            if "/flashconv/" in m.group(1).replace("\\", "/"):
                pending.append("%s:%s" % (os.path.basename(m.group(1)), m.group(2)))
            if not m.group(3):
                chain, pending = "<".join(pending), []
            continue
        m = instr.match(line)
        if not m or cur is None:
            continue
        op = m.group(1)
        if op == "PMTRIG":
            region = int(m.group(3).strip(" ;"), 16).bit_length() - 1
            continue
        if op in ("NOP",):
            continue
        r = cur.setdefault(region, {"instructions": 0, "counted": 0, "lines": {}})
        counted = int(op in _COUNTED_OPS)
        r["instructions"] += 1
        r["counted"] += counted
        at = r["lines"].setdefault(chain, [0, 0])
        at[0] += 1
        at[1] += counted
    return out


def executed_counts(lines, coverage):
    """(instructions, counted) of a sass_regions region's `lines` that a run executed:
    coverage maps "file.h:line" to the times the CPU emulation ran that line (gcov). An
    instruction counts when every frame of its chain that coverage lists ran (the inlined
    code's own line and each call site on the way to it, so that an instantiation whose switch
    case or caller did not run is left out); frames the emulation does not compile (hw.h's
    device code, for one) are passed over. Line granularity: a line that ran for one caller
    counts for the others that ran too."""
    ins = cnt = 0
    for chain, (n, k) in lines.items():
        if all(coverage.get(f, 1) > 0 for f in chain.split("<") if f):
            ins += n
            cnt += k
    return ins, cnt


def marked_cubin_regions(sources, include, arch="sm_90", cache_dir=None):
    """sass_regions of each CUDA source in `sources` compiled with -DFLASHCONV_REGION_MARKS
    for `arch` (cached under cache_dir by the sources' and headers' contents): {demangled
    kernel: {region id: counts}}. Raises RuntimeError without nvcc or nvdisasm."""
    import hashlib
    import tempfile
    nvcc, nvdisasm = find_nvcc(), find_cuda_tool("nvdisasm")
    if not nvcc or not nvdisasm:
        raise RuntimeError("the marked lint build needs nvcc and nvdisasm")
    h = hashlib.sha256(arch.encode() + b"lines-v2")
    for path in sorted(list(sources) + sorted(
            os.path.join(d, f) for d, _, fs in os.walk(include) for f in fs)):
        h.update(path.encode() + open(path, "rb").read())
    cache = os.path.join(cache_dir or tempfile.gettempdir(), "fc-marked-%s.json" % h.hexdigest()[:16])
    if os.path.exists(cache):
        import json
        with open(cache) as f:
            return {k: {(None if r == "null" else int(r)): v for r, v in regs.items()}
                    for k, regs in json.load(f).items()}
    result = {}
    with tempfile.TemporaryDirectory(prefix="fc-marked-") as tmp:
        for src in sources:
            cubin = os.path.join(tmp, os.path.basename(src) + ".cubin")
            _run([nvcc, "-std=c++17", "-arch=" + arch, "-O3", "-lineinfo", "-DFLASHCONV_REGION_MARKS",
                  "--expt-relaxed-constexpr", "-I", include, "-cubin", "-o", cubin, src])
            for name, regs in sass_regions(_run([nvdisasm, "-c", "-gi", cubin])).items():
                result[name] = regs
    names = _demangle(list(result))
    result = {names[k]: v for k, v in result.items()}
    import json
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "w") as f:
        json.dump({k: {("null" if r is None else str(r)): v for r, v in regs.items()}
                   for k, regs in result.items()}, f)
    return result
