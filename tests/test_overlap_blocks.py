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
