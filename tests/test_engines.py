"""The engine table (flashconv/engines/, flashconv/dispatch.py): every CPU-capable engine forced
with use_engines against float64 python_ref (forward and gradients, odd lengths, strided inputs,
every dtype), the restriction (use_engines, FLASHCONV_ENGINES) and its errors, explain(),
``python -m flashconv`` and its explain command, and the CUDA fallback warning /
FLASHCONV_REQUIRE_KERNEL with the extension's answers mocked."""
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import flashconv
from flashconv import _ext, dispatch
from flashconv.engines import BY_NAME, _cuda
from flashconv.problem import from_shape
from python_ref.conv import causal_conv_direct, fftconv_grads

KEYS = ("du", "dk", "dD", "dg_in", "dg_out", "dk_rev")
TOL = {torch.float64: 1e-11, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel(a, ref):
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def case(B, H, L, Lk, dtype, gates=True, k_rev=None, strided=True, seed=0):
    """u and the gates in dtype (u strided: every other element of a wider buffer), k, D and
    k_rev in float32 (float64 for float64 u)."""
    g = torch.Generator().manual_seed(seed)
    kdt = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    u = rnd(B, H, 2 * L)[..., ::2] if strided else rnd(B, H, L)
    t = {"u": u, "k": rnd(H, Lk, dt=kdt, scale=Lk ** -0.5), "D": rnd(H, dt=kdt),
         "g_in": rnd(B, H, L) if gates else None, "g_out": rnd(B, H, L) if gates else None,
         "k_rev": None if k_rev is None else rnd(H, k_rev, dt=kdt, scale=k_rev ** -0.5),
         "dy": rnd(B, H, L)}
    return t


def np64(t):
    return None if t is None else t.detach().double().numpy()


def ran(engine, monkeypatch):
    """Counts the forward / backward runs of an engine."""
    mod = BY_NAME[engine]
    calls = []
    for what in ("forward", "backward"):
        real = getattr(mod, what)
        if real is not None:
            monkeypatch.setattr(mod, what, (lambda r, w: lambda *a: calls.append(w) or r(*a))(real, what))
    return calls


@pytest.mark.parametrize("engine", ["cpu_torch", "torch_fft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L,Lk,k_rev", [(37, 37, None), (50, 9, 13), (21, 64, None)])
def test_torch_engines_forward_and_gradients(engine, dtype, L, Lk, k_rev, monkeypatch):
    t = case(3, 2, L, Lk, dtype, k_rev=k_rev, seed=L + Lk)
    calls = ran(engine, monkeypatch)
    leaves = {n: None if v is None else v.detach().clone().requires_grad_()
              for n, v in t.items() if n != "dy"}
    with flashconv.use_engines(engine):
        y = flashconv.fftconv(leaves["u"], leaves["k"], leaves["D"], g_in=leaves["g_in"],
                              g_out=leaves["g_out"], k_rev=leaves["k_rev"])
        y.backward(t["dy"])
    assert calls == ["forward", "backward"]
    a = {n: np64(v) for n, v in t.items()}
    y_ref = causal_conv_direct(a["u"], a["k"], a["D"], a["g_in"], a["g_out"], k_rev=a["k_rev"])
    g_ref = fftconv_grads(a["u"], a["k"], a["dy"], a["D"], a["g_in"], a["g_out"], k_rev=a["k_rev"])
    tol = TOL[dtype]
    print(engine, dtype, L, Lk, "y %.3g" % rel(y, y_ref))
    assert y.dtype == dtype and rel(y, y_ref) < tol
    for key, name in zip(KEYS, ("u", "k", "D", "g_in", "g_out", "k_rev")):
        if leaves[name] is None:
            continue
        grad = leaves[name].grad
        assert grad.dtype == leaves[name].dtype and grad.shape == leaves[name].shape
        print("  ", key, "%.3g" % rel(grad, g_ref[key]))
        assert rel(grad, g_ref[key]) < tol, key


@pytest.mark.parametrize("engine", ["cpu_torch", "cpu_scipy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_numpy_engines(engine, dtype, monkeypatch):
    t = case(2, 3, 45, 30, torch.float64, k_rev=11, seed=7)
    a = {n: None if v is None else v.numpy().astype(dtype) for n, v in t.items()}
    a["u"] = np.ascontiguousarray(a["u"])[..., ::-1][..., ::-1]  # a strided view, positive strides
    calls = ran(engine, monkeypatch)
    with flashconv.use_engines(engine):
        y = flashconv.fftconv(a["u"], a["k"], a["D"], g_in=a["g_in"], g_out=a["g_out"],
                              k_rev=a["k_rev"])
        grads = flashconv.fftconv_backward(a["dy"], a["u"], a["k"], a["D"], a["g_in"],
                                           a["g_out"], k_rev=a["k_rev"])
    assert calls == ["forward", "backward"]
    a64 = {n: None if v is None else v.astype(np.float64) for n, v in a.items()}
    y_ref = causal_conv_direct(a64["u"], a64["k"], a64["D"], a64["g_in"], a64["g_out"],
                               k_rev=a64["k_rev"])
    g_ref = fftconv_grads(a64["u"], a64["k"], a64["dy"], a64["D"], a64["g_in"], a64["g_out"],
                          k_rev=a64["k_rev"])
    tol = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-11}[dtype]
    assert isinstance(y, np.ndarray) and y.dtype == dtype and rel(y, y_ref) < tol
    for key in KEYS:
        assert grads[key].dtype == dtype and rel(grads[key], g_ref[key]) < tol, key


def test_scipy_engine_serves_arrays_torch_cannot_view(monkeypatch):
    t = case(2, 2, 40, 40, torch.float64, gates=False, strided=False, seed=3)
    u = t["u"].numpy()[:, :, ::-1]  # negative strides: torch.from_numpy refuses
    calls = ran("cpu_scipy", monkeypatch)
    y = flashconv.fftconv(u, t["k"].numpy(), t["D"].numpy())
    assert calls == ["forward"]
    assert rel(y, causal_conv_direct(u.copy(), t["k"].numpy(), t["D"].numpy())) < 1e-11
    assert "an operand torch cannot view" in flashconv.explain(u, t["k"].numpy(), t["D"].numpy())


def test_cpu_overlap_save_engine(monkeypatch):
    t = case(2, 3, 8191, 7, torch.float32, seed=4)
    calls = ran("cpu_overlap_save", monkeypatch)
    y = flashconv.fftconv(t["u"], t["k"], t["D"], g_in=t["g_in"], g_out=t["g_out"])
    assert calls == ["forward"]  # the table's first choice for a short kernel
    a = {n: np64(v) for n, v in t.items()}
    assert rel(y, causal_conv_direct(a["u"], a["k"], a["D"], a["g_in"], a["g_out"])) < 2e-6
    text = flashconv.explain(t["u"], t["k"], t["D"], g_in=t["g_in"], g_out=t["g_out"])
    assert "cpu_overlap_save   <- serves it" in text
    assert "cpu_overlap_save   no: forward only" in text  # the backward goes on to cpu_torch


def test_restriction_errors(monkeypatch):
    t = case(1, 2, 30, 30, torch.float32, gates=False, seed=1)
    with flashconv.use_engines("cpu_scipy"):
        with pytest.raises(flashconv.NoEngineError) as err:
            flashconv.fftconv(t["u"], t["k"], t["D"])
    msg = str(err.value)
    assert "allowed set cpu_scipy (use_engines)" in msg and "cpu_scipy: serves numpy arrays only" in msg
    with pytest.raises(ValueError, match="unknown engine.*'fused'.*the engines are cuda_fused"):
        with flashconv.use_engines("fused"):
            pass
    # FLASHCONV_ENGINES: the same restriction from the environment; use_engines overrides it.
    monkeypatch.setenv("FLASHCONV_ENGINES", "cpu_scipy, torch_fft")
    calls = ran("torch_fft", monkeypatch)
    y = flashconv.fftconv(t["u"], t["k"], t["D"])
    assert calls == ["forward"]
    assert rel(y, causal_conv_direct(np64(t["u"]), np64(t["k"]), np64(t["D"]))) < 2e-6
    with flashconv.use_engines(["cpu_torch"]):
        flashconv.fftconv(t["u"], t["k"], t["D"])
    assert calls == ["forward"]
    monkeypatch.setenv("FLASHCONV_ENGINES", "cpu_torch,nope")
    with pytest.raises(ValueError, match="FLASHCONV_ENGINES: unknown engine"):
        flashconv.fftconv(t["u"], t["k"], t["D"])


def test_bad_input_errors_unchanged():
    u = torch.zeros(2, 3, 10)
    with pytest.raises(ValueError, match=r"k must have shape \(H, Lk\) = \(3, Lk\)"):
        flashconv.fftconv(u, torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"explain: D must have shape \(3,\)"):
        flashconv.explain(u, torch.zeros(3, 5), torch.zeros(2))
    with pytest.raises(TypeError, match="u must be a torch.Tensor or numpy.ndarray"):
        flashconv.explain([1, 2], torch.zeros(3, 5))


def test_explain_text():
    t = case(2, 4, 1000, 1000, torch.float32, gates=False, seed=2)
    text = flashconv.explain(t["u"], t["k"], t["D"])
    lines = text.splitlines()
    assert lines[0] == ("forward: torch float32 on cpu, B=2 H=4 L=1000, k taps (Lk used 1000), D")
    assert lines[1].startswith("  cuda_fused         no: u is on cpu, not a CUDA device")
    assert "  cpu_torch          <- serves it" in text
    assert "cpu_scipy" not in text  # engines after the chosen one are not consulted
    assert "backward: " in text and "gradients: du, dk, dD" in text
    with flashconv.use_engines("torch_fft"):
        text = flashconv.explain(t["u"], t["k"], t["D"], direction="forward")
    assert "cuda_fused         no: not in the allowed set (use_engines)" in text
    assert "cpu_torch          no: (as above)" in text
    assert "torch_fft          <- serves it" in text and "backward" not in text


def test_explain_cuda_shapes_without_gpu(monkeypatch):
    """A CUDA bf16 call explained from its shape: the kernel limits come from the built
    extension (mocked here, so the test does not need one) and an assumed H100-class GPU."""
    fwd = {0: 16384, 1: 16384, 2: 32768}
    bwd = {0: 8192, 1: 8192, 2: 16384}
    fake = SimpleNamespace(fftconv_fwd_max_n=fwd.get, fftconv_bwd_max_n=bwd.get,
                           fftconv_long_fwd=object())
    monkeypatch.setattr(_ext, "extension", lambda: fake)
    _cuda.reset()
    try:
        p = from_shape(8, 64, 12000, "bf16", "cuda")
        text = flashconv.ops.explain_problem(p, assume_gpu=True)
        print(text)
        assert "forward: torch bfloat16 on cuda:0, B=8 H=64 L=12000" in text
        fwd_part, bwd_part = text.split("backward: ")
        assert "cuda_fused         <- serves it" in fwd_part
        assert ("cuda_fused         no: L = 12000 needs FFT size 32768; the backward kernel holds "
                "at most 16384 for bfloat16 on this device (227 KB opt-in shared memory)") in bwd_part
        assert "cuda_two_level     <- serves it" in bwd_part
        p = from_shape(8, 64, 1 << 20, "fp32", "cuda", Lk=64)
        text = flashconv.ops.explain_problem(p, "forward", assume_gpu=100 * 1024)
        assert "cuda_overlap_save  <- serves it" in text and "100 KB" in text
        text = flashconv.ops.explain_problem(from_shape(2, 2, 100, "float64", "cuda"),
                                             "forward", assume_gpu=True)
        assert "float64 is not a kernel dtype" in text
    finally:
        _cuda.reset()


def test_python_m_flashconv_lists_engines():
    out = subprocess.run([sys.executable, "-m", "flashconv"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for name in flashconv.engine_names():
        assert name in out.stdout
    assert "not implemented" not in out.stdout
    assert "[x] cpu_torch" in out.stdout and "[x] torch_fft" in out.stdout
    if _cuda.unavailable_reason():  # here: no GPU; the reason is printed under the engine
        assert "[ ] cuda_fused" in out.stdout and "unavailable: " in out.stdout
    out = subprocess.run([sys.executable, "-m", "flashconv", "explain", "2", "3", "100",
                          "--dtype", "bf16", "--device", "cuda", "--direction", "forward"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("forward: torch bfloat16 on cuda:0, B=2 H=3 L=100")
    out = subprocess.run([sys.executable, "-m", "flashconv", "explain", "2", "3", "100",
                          "--dtype", "bf17"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "dtype must be" in out.stderr


# --- the CUDA fallback warning, with the extension's answers mocked ---------------------------

class FakeExt:
    def __init__(self, runtime="13.0", driver=None, err="", count=0):
        self._info = {"cuda_runtime": runtime, "cuda_driver": driver, "device_error": err,
                      "device_count": count}

    def info(self):
        return dict(self._info)

    def fftconv_fwd_max_n(self, code):
        return 16384

    def fftconv_bwd_max_n(self, code):
        return 8192

    def max_shared_memory(self, device):
        return 227 * 1024


@pytest.fixture
def cuda_machine(monkeypatch):
    """torch 'sees' a GPU; the extension is whatever the test sets."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv("FLASHCONV_REQUIRE_KERNEL", raising=False)
    monkeypatch.delenv("FLASHCONV_ENGINES", raising=False)
    _cuda.reset()

    def set_ext(ext, count=0, release=None, reason=""):
        monkeypatch.setattr(_ext, "extension", lambda: ext)
        monkeypatch.setattr(_ext, "unavailable_reason", lambda: reason)
        monkeypatch.setattr(_ext, "cuda_device_count", lambda: count)
        monkeypatch.setattr(_cuda, "_driver_text", lambda: release)
        _cuda.reset()

    yield set_ext
    _cuda.reset()


def _select(dtype="bf16", L=4096):
    return dispatch.select(from_shape(2, 4, L, dtype, "cuda"))


def test_old_driver_warns_once_and_names_the_fix(cuda_machine):
    cuda_machine(FakeExt("13.0", "12.2", "cudaErrorInsufficientDriver: CUDA driver version is "
                         "insufficient for CUDA runtime version"), release="535.104.05")
    with pytest.warns(flashconv.KernelFallbackWarning) as rec:
        assert _select().NAME == "torch_fft"
    msg = str(rec[0].message)
    print(msg)
    assert ("driver 535.104.05 (supports CUDA up to 12.2) is older than this build's CUDA 13.0 "
            "runtime needs; rebuild with FLASHCONV_CUDA_HOME=<a CUDA 12 toolkit>") in msg
    assert "Running torch_fft" in msg and "FLASHCONV_REQUIRE_KERNEL=1" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _select().NAME == "torch_fft"  # once per reason
        assert _select("fp32").NAME == "torch_fft"


def test_require_kernel_makes_the_fallback_an_error(cuda_machine, monkeypatch):
    cuda_machine(FakeExt("13.0", "12.4", "cudaErrorInsufficientDriver: x"), release="550.54")
    monkeypatch.setenv("FLASHCONV_REQUIRE_KERNEL", "1")
    with pytest.raises(RuntimeError, match="driver 550.54 .* is older than .*FLASHCONV_REQUIRE_KERNEL is set"):
        _select()


@pytest.mark.parametrize("ext,count,release,reason,expect", [
    (None, 0, None, "flashconv._C was not built: nvcc not found", "flashconv._C was not built: nvcc not found"),
    (FakeExt(err="cudaErrorNoDevice: no CUDA-capable device is detected", driver="13.0"), 0,
     "580.65", "", "sees no CUDA device (cudaErrorNoDevice"),
    (FakeExt(err="cudaErrorInsufficientDriver: x"), 0, None, "", "no NVIDIA driver is installed"),
])
def test_other_fallback_reasons(cuda_machine, ext, count, release, reason, expect):
    cuda_machine(ext, count, release, reason)
    with pytest.warns(flashconv.KernelFallbackWarning) as rec:
        assert _select().NAME == "torch_fft"
    assert expect in str(rec[0].message) and "Running torch_fft" in str(rec[0].message)


def test_no_warning_when_the_kernels_run(cuda_machine):
    cuda_machine(FakeExt(driver="13.0", count=1), count=1, release="580.65")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _select().NAME == "cuda_fused"
        assert _select(L=100000).NAME == "torch_fft"  # FakeExt has no fftconv_long_fwd
        assert _select("float64").NAME == "torch_fft"  # the call's own reason: silent
        with flashconv.use_engines("torch_fft"):
            assert _select().NAME == "torch_fft"


def test_first_call_is_light():
    """A fresh interpreter's first torch call (forward and backward) imports neither
    torch._dynamo (torch.library.custom_op's wrapper did: ~2.3 s) nor scipy.fft (~0.5 s)."""
    code = ("import sys, torch, flashconv\n"
            "u = torch.randn(2, 3, 100, requires_grad=True)\n"
            "flashconv.fftconv(u, torch.randn(3, 100), torch.randn(3)).sum().backward()\n"
            "print(sorted(m for m in ('torch._dynamo', 'scipy.fft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_numpy_only_install():
    """With torch unimportable, numpy calls (forward, backward, a precomputed spectrum, explain,
    python -m flashconv) run on cpu_scipy and cpu_overlap_save."""
    code = r'''
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import numpy as np, flashconv
from python_ref.conv import causal_conv_direct, fftconv_grads
rng = np.random.default_rng(0)
u = rng.standard_normal((2, 3, 41))[..., ::-1]; k = rng.standard_normal((3, 17)); D = rng.standard_normal(3)
dy = rng.standard_normal(u.shape)
y = flashconv.fftconv(u, k, D)
g = flashconv.fftconv_backward(dy, u, k, D)
r = fftconv_grads(u.copy(), k, dy, D)
err = max([float(np.abs(y - causal_conv_direct(u.copy(), k, D)).max())] +
          [float(np.abs(g[key] - r[key]).max()) for key in ("du", "dk", "dD")])
ks = flashconv.fft_kernel(k, 41)
err = max(err, float(np.abs(flashconv.fftconv(u, ks, D) - y).max()))
text = flashconv.explain(u, k, D)
assert "cpu_scipy          <- serves it" in text and "torch is not installed" in text, text
from flashconv.__main__ import main
main([])
main(["explain", "2", "3", "50", "--numpy"])
print("ERR", err, "torch" in sys.modules)
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1].split()
    assert last[0] == "ERR" and float(last[1]) < 1e-12 and last[2] == "False"
    assert "[ ] cpu_torch" in out.stdout and "[x] cpu_scipy" in out.stdout


def test_fused_size_counts_static_shared_memory(cuda_machine, monkeypatch):
    """The opt-in limit covers dynamic plus static shared memory: one byte short and the
    kernel's largest size no longer fits (static size from the build's ptxas report)."""
    cuda_machine(FakeExt(driver="13.0", count=1), count=1, release="580.65")
    monkeypatch.setattr(_ext, "build_info", lambda: {"kernels": [
        {"name": "_Zfwd", "demangled": "void flashconv::fftconv_fwd_kernel<float>(...)", "smem": 128}]})
    fwd = 16384 * 8  # float32: complex fp32 rows of the kernel's largest N
    for smem, want in ((fwd + 128, 16384), (fwd + 127, 8192)):
        monkeypatch.setattr(_cuda, "max_smem", lambda device, s=smem: s)
        _cuda._MAX_N.clear()
        assert _cuda.fused_max_n("float32", 0) == want
    assert _cuda.static_smem(backward=True) == 1024  # no report for the backward: a margin
