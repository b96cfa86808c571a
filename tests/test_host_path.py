"""The CUDA host path issues no synchronising operation (CPU test).

The CUDA engines' host code (cuda_fused, cuda_overlap_save, cuda_two_level: spectra,
permutations, workspaces, launches, the composed backward) runs here on meta tensors standing
in for CUDA ones, with the extension mocked (it records its launches) and the caller's stream
mocked. Meta tensors have no data: any read of a value on the host (.item(), .tolist(),
nonzero, a comparison turned into a Python bool) fails or shows up as an operator, and any
host data copied in shows up as a CPU tensor. A TorchDispatchMode records every operator
with the devices of its tensors, and torch.tensor / as_tensor / from_numpy / synchronize are
wrapped to record calls. Asserted: no CPU tensor and no synchronising operator anywhere on the
path, every launch on the caller's stream, and the permutations cached per (device, N).

That is what makes the path capturable by torch.cuda.graph and torch.compile's
"reduce-overhead" mode; tests/test_cuda_graph_gpu.py checks that on a GPU.
"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashconv import _ext, dispatch, plan
from flashconv.engines import _cuda
from flashconv.problem import Operands, from_arrays

STREAM = 0xC0FFEE
SYNC_OPS = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose",
            "masked_select", "unique", "_assert_async", "tolist", "_to_cpu")


class FakeExt:
    """flashconv._C's interface: limits as built for sm_90, launches recorded."""

    def __init__(self):
        self.launches = []
        self.epilogues = []  # (launch, its keyword arguments)

    def info(self):
        return {"cuda_runtime": "13.0", "cuda_driver": "13.0", "device_error": "", "device_count": 1}

    def max_shared_memory(self, device):
        return 227 * 1024

    def fftconv_fwd_max_n(self, code):
        return {0: 16384, 1: 16384, 2: 32768}[code]

    def fftconv_bwd_max_n(self, code):
        return {0: 8192, 1: 8192, 2: 16384}[code]

    def fftconv_fwd(self, *args, **epilogue):  # (the epilogue's keyword arguments)
        self.launches.append(("fftconv_fwd", args[-1]))
        self.epilogues.append(("fftconv_fwd", epilogue))

    def fftconv_bwd(self, *args, **epilogue):  # (the epilogue's keyword arguments)
        self.launches.append(("fftconv_bwd", args[-1]))
        self.epilogues.append(("fftconv_bwd", epilogue))

    def fftconv_long_fwd(self, *args, **epilogue):  # (the epilogue's keyword arguments)
        self.launches.append(("fftconv_long_fwd", args[-1]))
        self.epilogues.append(("fftconv_long_fwd", epilogue))


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = set()
        for x in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(x, torch.Tensor):
                devices.add(x.device.type)
        self.ops.append((str(func), devices))
        return out


@pytest.fixture
def fake_cuda(monkeypatch):
    ext = FakeExt()
    host_calls = []
    monkeypatch.setattr(_ext, "extension", lambda: ext)
    monkeypatch.setattr(_ext, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: SimpleNamespace(cuda_stream=STREAM))
    for name in ("tensor", "as_tensor", "from_numpy"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, (lambda r, n: lambda *a, **k: host_calls.append(n) or r(*a, **k))(real, name))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: host_calls.append("synchronize"))
    _cuda.reset()
    yield ext, host_calls
    _cuda.reset()


def meta_problem(B, H, L, Lk, dtype, direction="forward", gates=True, activation="", mask=None):
    def t(*shape, dt=dtype):
        return torch.empty(*shape, device="meta", dtype=dt)

    m = None if mask is None else t(*((B, H) if mask == "BH" else (B, H, L)), dt=torch.float32)
    a = Operands(t(B, H, L), t(H, Lk, dt=torch.float32), t(H, dt=torch.float32),
                 t(B, H, L) if gates else None, t(B, H, L) if gates else None,
                 dropout_mask=m, activation=activation)
    p = from_arrays(a, direction, kind="torch")
    return dataclasses.replace(p, device="cuda:0"), a  # the engines see a CUDA call


def run(p, a):
    with Recorder() as rec:
        engine = dispatch.select(p)
        if p.backward:
            dy = torch.empty(a.u.shape, device="meta", dtype=a.u.dtype)
            out = engine.backward(p, a, dy, p.mask)
        else:
            out = engine.forward(p, a)
    return engine.NAME, out, rec.ops


@pytest.mark.parametrize("name,B,H,L,Lk,direction,launch", [
    ("cuda_fused", 3, 4, 1000, 1000, "forward", "fftconv_fwd"),
    ("cuda_fused", 3, 4, 1000, 700, "backward", "fftconv_bwd"),
    ("cuda_overlap_save", 2, 4, 40000, 16, "forward", "fftconv_fwd"),
    ("cuda_two_level", 2, 3, 40000, 40000, "forward", "fftconv_long_fwd"),
    ("cuda_two_level", 2, 3, 40000, 40000, "backward", "fftconv_long_fwd"),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_host_path_has_no_sync(fake_cuda, name, B, H, L, Lk, direction, launch, dtype):
    ext, host_calls = fake_cuda
    p, a = meta_problem(B, H, L, Lk, dtype, direction)
    run(p, a)  # warm-up: the per-(device, N) plan caches fill here
    ext.launches.clear()
    host_calls.clear()
    got, out, ops = run(p, a)
    assert got == name
    assert ops, "nothing recorded"
    on_host = [op for op, devs in ops if "cpu" in devs]
    assert not on_host, "host tensors on the CUDA path: %s" % on_host
    syncs = [op for op, _ in ops if any("aten.%s." % s in op + "." for s in SYNC_OPS)]
    assert not syncs, syncs
    assert host_calls == []
    assert ext.launches and {s for _, s in ext.launches} == {STREAM}
    assert {n for n, _ in ext.launches} == {launch}
    outs = out if isinstance(out, tuple) else (out,)
    for g in outs:
        assert g is None or g.device.type == "meta"
    if not p.backward:
        assert out.shape == (B, H, L) and out.dtype == dtype


def test_permutations_cached_per_device_and_size(fake_cuda):
    p, a = meta_problem(2, 2, 1000, 1000, torch.bfloat16)
    run(p, a)
    key = ("perm", "meta", 2048)
    assert key in plan._DEVICE_PLANS
    cached = plan._DEVICE_PLANS[key]
    _, _, ops = run(p, a)
    assert plan._DEVICE_PLANS[key] is cached
    assert not any("arange" in op for op, _ in ops)  # the cached permutation is reused


@pytest.mark.parametrize("name,L,direction,launches", [
    ("cuda_fused", 1000, "forward", ["fftconv_fwd"]),
    # the recompute of z (float32 output), then the backward with the float32 gate
    ("cuda_fused", 1000, "backward", ["fftconv_fwd", "fftconv_bwd"]),
    ("cuda_two_level", 40000, "forward", ["fftconv_long_fwd"]),
])
@pytest.mark.parametrize("mask", ["BH", "BHL"])
def test_cuda_host_path_epilogue(fake_cuda, name, L, direction, launches, mask):
    """An activation and a dropout mask reach the kernels (no host sync on the way): the act
    code, the mask's float32 address and strides (0 along L for a (B, H) mask); in the fused
    backward a z-only forward launch, then the backward with g_out_f32 and no dg_out."""
    ext, host_calls = fake_cuda
    p, a = meta_problem(3, 4, L, L, torch.bfloat16, direction, activation="silu", mask=mask)
    got, out, ops = run(p, a)
    assert got == name
    assert not [op for op, devs in ops if "cpu" in devs] and host_calls == []
    assert [n for n, _ in ext.launches] == launches
    kw = dict(ext.epilogues)
    if direction == "forward":
        fwd = kw[launches[0]]
        # (meta tensors have no address: the strides show what was passed)
        assert fwd["act"] == 2
        assert tuple(fwd["mask_strides"]) == ((4, 1, 0) if mask == "BH" else (4 * L, L, 1))
    else:
        fwd, bwd = kw["fftconv_fwd"], kw["fftconv_bwd"]
        assert fwd["act"] == 0 and tuple(fwd["mask_strides"]) == (0, 0, 0)
        assert tuple(fwd["z_strides"]) == (4 * L, L, 1)  # z only (float32, B H L)
        assert bwd["g_out_f32"] is True
        assert out[4] is not None and out[4].dtype == torch.bfloat16  # dg_out, made in torch
