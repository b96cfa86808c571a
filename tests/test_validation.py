"""First contact: input the front ends must refuse or handle instead of failing deep inside.

- dtypes are read by kind and item size (numpy's big-endian '>f8' is float64);
- numpy masked arrays and sparse torch tensors are refused with a TypeError naming the argument
  (the mask would be silently ignored; a sparse tensor failed in the engine);
- fft_kernel: empty kernels, a bool L, numpy dtype classes, an L too large for the machine,
  torch.compile(fullgraph=True), and a warning (once) when it detaches a k that requires grad;
- ssm_conv with H = 0, the layers with integer input: results or clean errors.
"""
import warnings

import numpy as np
import pytest
import torch

import flashconv
from flashconv import ops
from flashconv.nn import H3, S4D
from flashconv.state_passing import ssm_conv
from python_ref.conv import causal_conv_direct, fftconv_grads


def rel(a, ref):
    a = np.asarray(a, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


# --- dtypes by kind and item size -------------------------------------------------------------

def test_big_endian_float64_computes_in_float64():
    rng = np.random.default_rng(0)
    u, k, D, dy = (rng.standard_normal(s) for s in ((2, 3, 300), (3, 300), (3,), (2, 3, 300)))
    be = [a.astype(">f8") for a in (u, k, D, dy)]
    ref = causal_conv_direct(u, k, D)
    y = flashconv.fftconv(*be[:3])
    assert y.dtype == np.dtype(">f8") and rel(y, ref) < 1e-13  # was 1.8e-7: float32
    g = flashconv.fftconv_backward(be[3], *be[:3])
    gref = fftconv_grads(u, k, dy, D)
    for key in ("du", "dk", "dD"):
        assert rel(g[key], gref[key]) < 1e-12, key
    ks = flashconv.fft_kernel(be[1], 300)
    assert ks.dtype == "float64" and ks.spectrum.dtype == np.complex128  # was float32
    assert rel(flashconv.fftconv(be[0], ks, be[2]), ref) < 1e-13
    assert "float64" in flashconv.explain(*be[:3]).splitlines()[0]
    # Big-endian float32 still computes in float32; little-endian spelled out is native.
    y32 = flashconv.fftconv(*(a.astype(">f4") for a in (u, k, D)))
    assert 1e-9 < rel(y32, ref) < 1e-5
    assert rel(flashconv.fftconv(*(a.astype("<f8") for a in (u, k, D))), ref) < 1e-13


# --- masked arrays and sparse tensors ---------------------------------------------------------

@pytest.mark.parametrize("name", ["u", "k", "D", "g_in", "g_out", "k_rev", "dy"])
def test_masked_arrays_are_refused(name):
    rng = np.random.default_rng(1)
    a = {"u": rng.standard_normal((2, 3, 20)), "k": rng.standard_normal((3, 20)),
         "D": rng.standard_normal(3), "g_in": rng.standard_normal((2, 3, 20)),
         "g_out": rng.standard_normal((2, 3, 20)), "k_rev": rng.standard_normal((3, 5)),
         "dy": rng.standard_normal((2, 3, 20))}
    a[name] = np.ma.masked_array(a[name], mask=a[name] > 0)
    with pytest.raises(TypeError, match="%s is a numpy.ma.MaskedArray" % name):
        if name == "dy":
            flashconv.fftconv_backward(a["dy"], a["u"], a["k"], a["D"])
        else:
            flashconv.fftconv(a["u"], a["k"], a["D"], g_in=a["g_in"], g_out=a["g_out"],
                              k_rev=a["k_rev"])
    if name in ("k", "k_rev"):
        with pytest.raises(TypeError, match="%s is a numpy.ma.MaskedArray" % name):
            flashconv.fft_kernel(a["k"], 20, k_rev=a["k_rev"])


@pytest.mark.parametrize("name,layout", [(n, "to_sparse") for n in ("u", "k", "D", "g_out", "dy")]
                         + [("k", "to_sparse_csr")])
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_tensors_are_refused(name, layout):
    t = {"u": torch.randn(2, 3, 20), "k": torch.randn(3, 20), "D": torch.randn(3),
         "g_out": torch.randn(2, 3, 20), "dy": torch.randn(2, 3, 20)}
    t[name] = getattr(t[name], layout)()
    with pytest.raises(TypeError, match=r"%s is a sparse_\w+ tensor.*to_dense\(\)" % name):
        if name == "dy":
            flashconv.fftconv_backward(t["dy"], t["u"], t["k"], t["D"])
        else:
            flashconv.fftconv(t["u"], t["k"], t["D"], g_out=t["g_out"])


def test_sparse_inputs_of_ssm_conv_and_layers_are_refused():
    H, m = 3, 2
    dA = torch.full((H, m), 0.9 + 0j, dtype=torch.complex64)
    with pytest.raises(TypeError, match="ssm_conv: u is a sparse_coo tensor"):
        ssm_conv(torch.randn(1, H, 8).to_sparse(), dA, dA, dA)
    with pytest.raises(TypeError, match="sparse_coo tensor"):
        S4D(4, d_state=4)(torch.randn(1, 5, 4).to_sparse())


# --- fft_kernel ------------------------------------------------------------------------------

def test_fft_kernel_empty_channels_and_length():
    for k in (torch.zeros(0, 3), np.zeros((0, 3))):
        ks = flashconv.fft_kernel(k, 5)  # was an MKL RuntimeError for torch
        assert ks.H == 0 and ks.L == 5
        u = torch.zeros(2, 0, 5) if isinstance(k, torch.Tensor) else np.zeros((2, 0, 5))
        assert flashconv.fftconv(u, ks).shape == (2, 0, 5)
    ks = flashconv.fft_kernel(torch.randn(3, 4), 0)
    assert ks.L == 0 and flashconv.fftconv(torch.zeros(2, 3, 0), ks).shape == (2, 3, 0)


@pytest.mark.parametrize("L", [True, False, 2.0, -1, "8", None])
def test_fft_kernel_rejects_non_int_L(L):
    with pytest.raises(ValueError, match="fft_kernel: L must be a non-negative int"):
        flashconv.fft_kernel(torch.randn(2, 3), L)


@pytest.mark.parametrize("dtype,expect", [
    (np.float32, "float32"), (np.dtype("float32"), "float32"), ("float32", "float32"),
    (torch.float32, "float32"), (np.float64, "float64"), (np.dtype(">f8"), "float64"),
    ("float64", "float64"), (torch.float64, "float64")])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_fft_kernel_dtype_spellings(dtype, expect, kind):
    k = np.random.default_rng(2).standard_normal((2, 6))
    k = torch.from_numpy(k) if kind == "torch" else k
    ks = flashconv.fft_kernel(k, 10, dtype=dtype)
    assert ks.dtype == expect
    u = np.random.default_rng(3).standard_normal((1, 2, 10))
    u = torch.from_numpy(u).to(getattr(torch, expect)) if kind == "torch" else u.astype(expect)
    ref = causal_conv_direct(np.asarray(u, np.float64), np.asarray(k, np.float64))
    assert rel(flashconv.fftconv(u, ks), ref) < (1e-12 if expect == "float64" else 1e-5)


@pytest.mark.parametrize("dtype", [np.float16, torch.bfloat16, "int32", int, "bf16"])
def test_fft_kernel_rejects_other_dtypes(dtype):
    with pytest.raises(TypeError, match="fft_kernel: dtype must be float32 or float64"):
        flashconv.fft_kernel(torch.randn(2, 3), 8, dtype=dtype)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_fft_kernel_huge_L_names_L(kind):
    k = torch.randn(2, 3) if kind == "torch" else np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"fft_kernel: L = 10000000000000 is too large"):
        flashconv.fft_kernel(k, 10 ** 13)


def test_fft_kernel_allocation_failure_names_L(monkeypatch):
    """A spectrum that fits the machine's memory on paper but cannot be allocated."""
    def fail(*a, **kw):
        raise MemoryError("Unable to allocate 3.2 GiB")

    monkeypatch.setattr(ops._cpu, "kernel_spectrum", fail)
    with pytest.raises(MemoryError, match=r"fft_kernel: L = 100 needs an FFT of \d+ points"):
        flashconv.fft_kernel(np.zeros((2, 3)), 100)


def test_fft_kernel_overflowing_spectrum_is_an_error():
    """The spectrum of finite taps whose sum overflows float32: a clear error, not Inf."""
    k = np.full((1, 64), 1e37, np.float32)
    with pytest.raises(ValueError, match="the spectrum of k overflows float32"):
        flashconv.fft_kernel(k, 64)
    with pytest.raises(ValueError, match="the spectrum of k overflows float32"):
        flashconv.fft_kernel(torch.from_numpy(k), 64)
    assert np.isfinite(flashconv.fft_kernel(k, 64, dtype="float64").spectrum).all()
    # fftconv with the taps themselves scales each channel: finite.
    y = flashconv.fftconv(np.full((1, 1, 64), 1e-30, np.float32), k)
    assert np.isfinite(y).all() and abs(y[0, 0, -1] / (64 * 1e7) - 1) < 1e-5


def test_fft_kernel_warns_once_when_it_detaches_k(monkeypatch):
    monkeypatch.setattr(ops, "_detach_warned", [])
    k = torch.randn(3, 10, requires_grad=True)
    with pytest.warns(UserWarning, match=r"fft_kernel: k requires grad.*detached"):
        ks = flashconv.fft_kernel(k, 16)
    assert not ks.spectrum.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        flashconv.fft_kernel(k, 16)
        flashconv.fft_kernel(k.detach(), 16)
    monkeypatch.setattr(ops, "_detach_warned", [])
    with pytest.warns(UserWarning, match="k_rev requires grad"):
        flashconv.fft_kernel(k.detach(), 16, k_rev=torch.randn(3, 4, requires_grad=True))
    monkeypatch.setattr(ops, "_detach_warned", [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no grad wanted: no warning
        flashconv.fft_kernel(k.detach(), 16)


def test_fft_kernel_under_torch_compile_fullgraph():
    """Traced through (was: Dynamo could not trace the FFT size's bisect)."""
    torch._dynamo.reset()

    def f(u, k, D):
        return flashconv.fftconv(u, flashconv.fft_kernel(k, u.shape[-1]), D)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    u, k, D = torch.randn(2, 3, 50), torch.randn(3, 50) / 7, torch.randn(3)
    torch.testing.assert_close(compiled(u, k, D), flashconv.fftconv(u, k, D), rtol=1e-5,
                               atol=1e-5)
    big = torch.full((1, 1, 50), 1e36)  # the traced path scales k as the eager one does
    torch.testing.assert_close(compiled(big, torch.full((1, 50), 0.02), None),
                               flashconv.fftconv(big, torch.full((1, 50), 0.02)), rtol=1e-5,
                               atol=0)


# --- ssm_conv and the layers ------------------------------------------------------------------

def test_ssm_conv_without_channels():
    empty = torch.zeros(0, 4, dtype=torch.complex64)
    y, s = ssm_conv(torch.zeros(2, 0, 7), empty, empty, empty, torch.zeros(0),
                    return_state=True)  # was ZeroDivisionError
    assert y.shape == (2, 0, 7) and s.shape == (2, 0, 4)


@pytest.mark.parametrize("layer", [lambda: H3(8, d_state=4), lambda: S4D(8, d_state=4)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_layers_refuse_non_floating_input(layer, dtype):
    with pytest.raises(TypeError, match="u must be a floating tensor"):
        layer()(torch.ones(1, 4, 8).to(dtype))  # H3 raised "mat1 and mat2 must have the same dtype"
