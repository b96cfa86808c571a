"""fftconv / fftconv_backward with DLPack arrays (CuPy and others) and the functional backward.

Without a GPU the DLPack path is proven with FakeArray, a minimal foreign array that wraps a
CPU torch tensor behind __dlpack__ / __dlpack_device__ only: fftconv must read it with
torch.from_dlpack (no copy), and hand the result back as a FakeArray. The CuPy tests (marked
gpu) check results against float64 python_ref, on the null stream and on a non-default one.
"""
import types

import numpy as np
import pytest
import torch

import flashconv
from flashconv import dispatch
from python_ref.conv import causal_conv_direct, fftconv_grads

KEYS = ("du", "dk", "dD", "dg_in", "dg_out")


class FakeArray:
    """A foreign array library of one class: DLPack in, DLPack out (its from_dlpack)."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, **kwargs):
        return self.t.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()

    def __array_namespace__(self, api_version=None):
        return FAKE_NAMESPACE


FAKE_NAMESPACE = types.SimpleNamespace(from_dlpack=lambda x: FakeArray(torch.from_dlpack(x)))


class BareArray(FakeArray):
    """A DLPack producer whose library offers no from_dlpack: results stay torch tensors."""

    __array_namespace__ = None


def rel_err(y, ref):
    y = np.asarray(y, np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))


def np64(x):
    if x is None:
        return None
    if isinstance(x, FakeArray):
        x = x.t
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, np.float64)


def make(B, H, L, Lk, D=True, gates=False, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, H, L)), rng.standard_normal((H, Lk)) / np.sqrt(Lk),
            rng.standard_normal(H) if D else None,
            rng.standard_normal((B, H, L)) if gates else None,
            rng.standard_normal((B, H, L)) if gates else None)


def fake(a, dtype=torch.float32, strided=False):
    """FakeArray over a tensor of `a`'s values; strided: a slice of a bigger buffer."""
    if a is None:
        return None
    t = torch.from_numpy(a).to(dtype)
    if strided:
        big = torch.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=dtype)
        big[..., 1::2] = t
        t = big[..., 1::2]
    return FakeArray(t)


@pytest.fixture
def engine_inputs(monkeypatch):
    """Records the tensors the operator hands to the device dispatch, and what it returns."""
    seen = []

    def spy(p, a):
        y = forward(p, a)
        seen.append({"u": a.u, "k": a.k, "D": a.D, "g_in": a.g_in, "g_out": a.g_out, "y": y})
        return y

    forward = dispatch.run_forward
    monkeypatch.setattr(dispatch, "run_forward", spy)
    return seen


# --- DLPack, without a GPU ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L,Lk,gates,strided", [(129, 129, True, False), (100, 7, False, True),
                                                 (40, 90, True, True)])
def test_fake_dlpack_forward_zero_copy(L, Lk, gates, strided, dtype, engine_inputs):
    u, k, D, gi, go = make(2, 3, L, Lk, gates=gates, seed=L)
    args = [fake(a, dtype, strided) for a in (u, k, D, gi, go)]
    y = flashconv.fftconv(args[0], args[1], args[2], g_in=args[3], g_out=args[4])
    assert isinstance(y, FakeArray) and y.t.dtype == dtype and y.t.shape == u.shape
    # Zero-copy both ways: the engine read the caller's memory, the caller got the engine's.
    (call,) = engine_inputs
    for name, a in zip(("u", "k", "D", "g_in", "g_out"), args):
        if a is not None:
            assert call[name].data_ptr() == a.t.data_ptr() and call[name].stride() == a.t.stride()
    assert y.t.data_ptr() == call["y"].data_ptr()
    ref = causal_conv_direct(*(np64(a) for a in args))
    t = [None if a is None else a.t for a in args]
    expect = flashconv.fftconv(t[0], t[1], t[2], g_in=t[3], g_out=t[4])
    print("dlpack %s L=%d Lk=%d: rel err %.3g" % (dtype, L, Lk, rel_err(np64(y), ref)))
    assert torch.equal(y.t, expect)
    assert rel_err(np64(y), ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_fake_dlpack_precomputed_spectrum():
    u, k, D, _, _ = make(2, 4, 64, 20)
    ks = flashconv.fft_kernel(fake(k), 64)
    assert ks.kind == "torch" and ks.lk == 20
    y = flashconv.fftconv(fake(u), ks, fake(D))
    assert isinstance(y, FakeArray)
    assert rel_err(np64(y), causal_conv_direct(u, k, D)) < 1e-5


def test_fake_dlpack_backward():
    u, k, D, gi, go = make(2, 3, 50, 70, gates=True, seed=4)
    dy = np.random.default_rng(5).standard_normal(u.shape)
    grads = flashconv.fftconv_backward(fake(dy), fake(u), fake(k), fake(D), fake(gi), fake(go))
    ref = fftconv_grads(u, k, dy, D=D, g_in=gi, g_out=go)
    for key in KEYS:
        assert isinstance(grads[key], FakeArray)
        print(key, rel_err(np64(grads[key]), ref[key]))
        assert rel_err(np64(grads[key]), ref[key]) < 1e-5
    grads = flashconv.fftconv_backward(fake(dy), fake(u), fake(k))
    assert grads["dD"] is None and grads["dg_in"] is None and grads["dg_out"] is None


def test_bare_dlpack_producer_gets_torch_tensors():
    u, k, _, _, _ = make(1, 2, 30, 30, D=False)
    y = flashconv.fftconv(BareArray(torch.from_numpy(u)), BareArray(torch.from_numpy(k)))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    assert rel_err(np64(y), causal_conv_direct(u, k)) < 1e-12


def test_fake_dlpack_empty():
    y = flashconv.fftconv(FakeArray(torch.zeros(0, 3, 10)), FakeArray(torch.zeros(3, 4)))
    assert isinstance(y, FakeArray) and tuple(y.t.shape) == (0, 3, 10)


def test_dlpack_errors():
    u, k, D, gi, _ = (fake(a) for a in make(2, 3, 10, 10, gates=True))
    suffix = "read as a torch.Tensor through torch.from_dlpack"
    with pytest.raises(ValueError, match=r"fftconv: u must have shape \(B, H, L\), got shape \(3, 10\).*"
                       + suffix):
        flashconv.fftconv(FakeArray(u.t[0]), k)
    with pytest.raises(ValueError, match=r"k must have shape \(H, Lk\) = \(3, Lk\)"):
        flashconv.fftconv(u, FakeArray(k.t[:2]))
    with pytest.raises(ValueError, match=r"g_in must have shape \(2, 3, 10\)"):
        flashconv.fftconv(u, k, g_in=FakeArray(gi.t[..., :5]))
    with pytest.raises(TypeError, match="u must be a real floating"):
        flashconv.fftconv(FakeArray(u.t.int()), k)
    with pytest.raises(TypeError, match="D must be a real floating"):
        flashconv.fftconv(u, k, FakeArray(D.t.to(torch.complex64)))
    with pytest.raises(TypeError, match=r"fftconv: k must be a test_interop array like u "
                       r"\(test_interop.FakeArray\), got numpy.ndarray"):
        flashconv.fftconv(u, k.t.numpy())
    with pytest.raises(TypeError, match="g_out must be a test_interop array like u"):
        flashconv.fftconv(u, k, g_out=torch.zeros(2, 3, 10))
    with pytest.raises(ValueError, match="fftconv_backward: dy must have u's shape"):
        flashconv.fftconv_backward(FakeArray(u.t[:1]), u, k)
    with pytest.raises(TypeError, match="fftconv_backward: dy must be a test_interop array"):
        flashconv.fftconv_backward(u.t, u, k)


# --- the functional backward for numpy arrays and torch tensors --------------------------

@pytest.mark.parametrize("L,Lk,gates", [(151, 151, True), (100, 30, False), (60, 90, True)])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_backward_numpy(L, Lk, gates, dtype):
    u, k, D, gi, go = (None if a is None else a.astype(dtype) for a in make(3, 4, L, Lk, gates=gates, seed=L))
    dy = np.random.default_rng(L).standard_normal(u.shape).astype(dtype)
    grads = flashconv.fftconv_backward(dy, u, k, D, gi, go)
    ref = fftconv_grads(*(np64(a) for a in (u, k, dy)), D=np64(D), g_in=np64(gi), g_out=np64(go))
    tol = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3}[dtype]
    for key, arr in zip(KEYS, (u, k, D, gi, go)):
        if arr is None:
            assert grads[key] is None
            continue
        err = rel_err(grads[key], ref[key])
        print("numpy %s %s: rel err %.3g" % (dtype, key, err))
        assert isinstance(grads[key], np.ndarray) and grads[key].dtype == arr.dtype
        assert grads[key].shape == arr.shape and err < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_torch_equals_autograd(dtype):
    u, k, D, gi, go = make(2, 3, 77, 33, gates=True, seed=2)
    ins = [torch.from_numpy(a).to(dtype if i in (0, 3, 4) else torch.float32).requires_grad_()
           for i, a in enumerate((u, k, D, gi, go))]
    dy = torch.randn(2, 3, 77).to(dtype)
    flashconv.fftconv(ins[0], ins[1], ins[2], g_in=ins[3], g_out=ins[4]).backward(dy)
    grads = flashconv.fftconv_backward(dy, *ins)
    for key, t in zip(KEYS, ins):
        assert not grads[key].requires_grad
        assert torch.equal(grads[key], t.grad), key


def test_backward_precomputed_spectrum_and_empty():
    u, k, D, _, _ = make(2, 3, 40, 12)
    for conv in (np.float32, lambda a: torch.from_numpy(a).float()):
        ks = flashconv.fft_kernel(conv(k), 40)
        grads = flashconv.fftconv_backward(conv(u), conv(u), ks, conv(D))
        ref = fftconv_grads(u, k, u, D=D)
        assert grads["dk"] is None
        assert rel_err(np64(grads["du"]), ref["du"]) < 1e-5 and rel_err(np64(grads["dD"]), ref["dD"]) < 1e-5
        e = conv(np.zeros((0, 3, 40)))
        grads = flashconv.fftconv_backward(e, e, conv(k), conv(D))
        assert tuple(grads["du"].shape) == (0, 3, 40) and tuple(grads["dk"].shape) == (3, 12)
        assert not np64(grads["dD"]).any()


# --- CuPy (GPU) ----------------------------------------------------------------------------

def _cupy_inputs(cp, dtype, B=2, H=8, L=1000, gates=True, seed=0):
    u, k, D, gi, go = make(B, H, L, L, gates=gates, seed=seed)
    return (cp.asarray(u, dtype=dtype), cp.asarray(k, dtype=np.float32),
            cp.asarray(D, dtype=np.float32), None if gi is None else cp.asarray(gi, dtype=dtype),
            None if go is None else cp.asarray(go, dtype=dtype))


def _cupy_tol(ref, dtype):
    """2x the error of rounding the exact result to the output dtype, plus fp32 compute."""
    floor = rel_err(ref.astype(dtype).astype(np.float64), ref)
    return 2 * floor + 2e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cupy_forward(dtype, engine_inputs):
    cp = pytest.importorskip("cupy")
    u, k, D, gi, go = _cupy_inputs(cp, dtype)
    y = flashconv.fftconv(u, k, D, g_in=gi, g_out=go)
    assert isinstance(y, cp.ndarray) and y.dtype == u.dtype and y.shape == u.shape
    (call,) = engine_inputs
    assert call["u"].data_ptr() == u.data.ptr and call["u"].is_cuda
    assert y.data.ptr == call["y"].data_ptr()
    ref = causal_conv_direct(*(cp.asnumpy(a).astype(np.float64) for a in (u, k, D, gi, go)))
    err = rel_err(cp.asnumpy(y), ref)
    print("cupy %s: rel err %.3g (bound %.3g)" % (dtype, err, _cupy_tol(ref, dtype)))
    assert err <= _cupy_tol(ref, dtype)


@pytest.mark.gpu
def test_cupy_non_default_stream(monkeypatch):
    cp = pytest.importorskip("cupy")
    streams = []

    def spy(*args):
        streams.append(torch.cuda.current_stream().cuda_stream)
        return forward(*args)

    forward = dispatch.run_forward
    monkeypatch.setattr(dispatch, "run_forward", spy)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        u, k, D, gi, go = _cupy_inputs(cp, "float32", H=64, L=4096, seed=3)  # produced on s
        y = flashconv.fftconv(u, k, D, g_in=gi, g_out=go)
        y2 = y * 2  # consumed on s, with no synchronisation in between
    s.synchronize()
    assert streams == [s.ptr]
    assert torch.cuda.current_stream().cuda_stream != s.ptr  # restored after the call
    ref = causal_conv_direct(*(cp.asnumpy(a).astype(np.float64) for a in (u, k, D, gi, go)))
    assert rel_err(cp.asnumpy(y2) / 2, ref) <= _cupy_tol(ref, "float32")


@pytest.mark.gpu
def test_cupy_backward_and_errors():
    cp = pytest.importorskip("cupy")
    u, k, D, gi, go = _cupy_inputs(cp, "float32", L=300, seed=5)
    dy = cp.random.standard_normal(u.shape, dtype=cp.float32)
    s = cp.cuda.Stream()
    with s:
        grads = flashconv.fftconv_backward(dy, u, k, D, gi, go)
    s.synchronize()
    ref = fftconv_grads(*(cp.asnumpy(a).astype(np.float64) for a in (u, k, dy)),
                        D=cp.asnumpy(D), g_in=cp.asnumpy(gi), g_out=cp.asnumpy(go))
    for key in KEYS:
        assert isinstance(grads[key], cp.ndarray)
        err = rel_err(cp.asnumpy(grads[key]), ref[key])
        print("cupy grad", key, err)
        assert err < 1e-5
    with pytest.raises(TypeError, match="k must be a cupy array like u"):
        flashconv.fftconv(u, cp.asnumpy(k))
    with pytest.raises(ValueError, match=r"D must have shape \(8,\)"):
        flashconv.fftconv(u, k, D[:3])
