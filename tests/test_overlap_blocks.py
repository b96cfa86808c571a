"""Overlap-save around a block convolution (flashconv._overlap.overlap_save_blocks, the CUDA
short-kernel path around the fused kernel) on the CPU: blocks convolved by flashconv's CPU
path stand in for the fused kernel; results against float64 python_ref."""
import numpy as np
import pytest
import torch

import flashconv
from flashconv._overlap import gpu_block, overlap_save_blocks
from python_ref.conv import causal_conv_direct


def cpu_conv(calls):
    def conv(ub, kb, Db, gib, gob):
        calls.append(tuple(ub.shape))
        return flashconv.fftconv(ub, kb, Db, g_in=gib, g_out=gob)
    return conv


@pytest.mark.parametrize("B,H,L,lk,P", [(2, 3, 1000, 1, 32), (1, 2, 777, 17, 64), (3, 2, 5000, 100, 256),
                                        (2, 1, 300, 300, 512), (1, 1, 64, 64, 64)])
@pytest.mark.parametrize("gates", [False, True])
def test_overlap_save_blocks(B, H, L, lk, P, gates):
    rng = np.random.default_rng(L + lk)
    u = rng.standard_normal((B, H, L))
    k = rng.standard_normal((H, lk)) / np.sqrt(lk)
    D = rng.standard_normal(H)
    gi = rng.standard_normal((B, H, L)) if gates else None
    go = rng.standard_normal((B, H, L)) if gates else None
    t = [None if a is None else torch.from_numpy(a).float() for a in (u, k, D, gi, go)]
    calls = []
    y = overlap_save_blocks(*t, conv=cpu_conv(calls), block=P)
    S = P - min(lk, L) + 1
    assert calls == [(-(-L // S), H, P)] * B  # one call per batch row, blocks as its batch
    ref = causal_conv_direct(u, k, D, gi, go)
    err = float(np.linalg.norm(y.double().numpy() - ref) / np.linalg.norm(ref))
    assert y.dtype == torch.float32 and err < 5e-6, err


def test_block_too_small_and_gpu_block():
    u, k = torch.zeros(1, 1, 100), torch.zeros(1, 40)
    with pytest.raises(ValueError, match="block must be >= min"):
        overlap_save_blocks(u, k, None, None, None, conv=cpu_conv([]), block=32)
    assert gpu_block(1, 16384) == 256 and gpu_block(64, 16384) == 512
    assert gpu_block(100, 16384) == 1024 and gpu_block(2048, 16384) == 16384
    assert gpu_block(2049, 16384) is None


def test_cuda_overlap_rule(monkeypatch):
    """The CUDA overlap-save engine's check (engines/cuda_overlap_save.py) with the extension's
    limits mocked: short kernels beyond the fused size get a block, long kernels and short
    inputs do not."""
    from types import SimpleNamespace

    from flashconv.engines import _cuda, cuda_overlap_save
    from flashconv.problem import from_shape

    fwd_max = {0: 16384, 1: 16384, 2: 32768}  # float32, float16, bfloat16 (fftconv_fwd.h)
    monkeypatch.setattr(_cuda._ext, "extension",
                        lambda: SimpleNamespace(fftconv_fwd_max_n=lambda code: fwd_max[code]))
    monkeypatch.setattr(_cuda._ext, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(_cuda, "max_smem", lambda device: 227 * 1024)
    _cuda.reset()

    def block(L, lk, dtype="bfloat16", k_rev=False, device="cuda"):
        p = from_shape(2, 3, L, dtype, device, Lk=lk, Lk_rev=5 if k_rev else None)
        why = cuda_overlap_save.check(p)
        return 0 if why else cuda_overlap_save.block(p)

    try:
        assert block(100000, 64) == 512
        assert block(100000, 1) == 256
        assert block(1 << 20, 2048) == 16384            # bf16: fused inputs up to 16K
        assert block(1 << 20, 2048, "float32") == 0      # float32: fused inputs up to 8K
        assert block(1 << 20, 1024, "float32") == 8192
        assert block(1 << 20, 2049) == 0
        assert block(200, 1) == 0                        # L within one block: the fused kernel
        assert block(100000, 64, k_rev=True) == 0
        assert block(100000, 64, device="cpu") == 0
        assert block(100000, 64, "float64") == 0
        monkeypatch.setattr(_cuda, "max_smem", lambda device: 100 * 1024)  # less shared memory
        assert block(1 << 20, 2048) == 0 and block(1 << 20, 1024) == 8192
        p = from_shape(2, 3, 1 << 20, "bfloat16", "cuda", Lk=2049)
        assert "too long" in cuda_overlap_save.check(p)
        assert cuda_overlap_save.check(p.with_direction("backward")) == "forward only"
    finally:
        _cuda.reset()
