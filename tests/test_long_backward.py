"""The long-L backward (flashconv._long.fftconv_long_backward) on the CPU: its composition
(a conjugate-spectrum two-level forward for dx, batch-chunked correlation for dk) run with
the numpy mirror of the two-level passes standing in for the CUDA kernels, against the
float64 analytic gradients of python_ref. The CUDA run of the same function is in
tests/test_long_gpu.py (GPU only)."""
import numpy as np
import pytest
import torch

from flashconv._long import fftconv_long_backward, reference_forward, two_level_plan
from python_ref.conv import fftconv_grads

KEYS = ("du", "dk", "dD", "dg_in", "dg_out", "dk_rev")


def rel(a, b):
    a = a.detach().to(torch.float64).numpy()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def problem(seed, B, H, L, lk, lkr=0, gates=True):
    rng = np.random.default_rng(seed)
    a = {"u": rng.standard_normal((B, H, L)), "k": rng.standard_normal((H, lk)) / np.sqrt(lk),
         "D": rng.standard_normal(H), "dy": rng.standard_normal((B, H, L))}
    a["g_in"] = rng.standard_normal((B, H, L)) if gates else None
    a["g_out"] = rng.standard_normal((B, H, L)) if gates else None
    a["k_rev"] = rng.standard_normal((H, lkr)) / np.sqrt(lkr) if lkr else None
    return a


@pytest.mark.parametrize("B,H,L,lk,lkr,n2", [(3, 2, 300, 300, 0, 64), (2, 3, 1000, 37, 0, 128),
                                             (1, 2, 513, 513, 200, 64), (4, 1, 2000, 2000, 0, 256)])
@pytest.mark.parametrize("corr_bytes,chunk_bytes", [(1, 1), (1 << 30, 1 << 30)])
def test_long_backward_matches_reference(B, H, L, lk, lkr, n2, corr_bytes, chunk_bytes):
    """corr_bytes / chunk_bytes = 1: one batch row per correlation chunk, one channel per
    backward chunk; 1 << 30: everything at once."""
    a = problem(B * L + lk, B, H, L, lk, lkr)
    t = {key: None if v is None else torch.from_numpy(v).float() for key, v in a.items()}
    grads = fftconv_long_backward(t["dy"], t["u"], t["k"], t["D"], t["g_in"], t["g_out"],
                                  t["k_rev"], forward=reference_forward, n2=n2,
                                  max_corr_bytes=corr_bytes, max_chunk_bytes=chunk_bytes)
    ref = fftconv_grads(a["u"], a["k"], a["dy"], a["D"], a["g_in"], a["g_out"], k_rev=a["k_rev"])
    for key, g in zip(KEYS, grads):
        if ref.get(key) is None:
            assert g is None, key
            continue
        assert g.dtype == torch.float32 and tuple(g.shape) == ref[key].shape, key
        err = rel(g, ref[key])
        print(key, "rel err %.2e" % err)
        assert err < 2e-5, key


def test_long_backward_mask_and_half_io():
    a = problem(5, 2, 2, 700, 700)
    t = {key: None if v is None else torch.from_numpy(v).to(torch.bfloat16) for key, v in a.items()}
    mask = (True, False, False, False, True, False)
    grads = fftconv_long_backward(t["dy"], t["u"], t["k"], t["D"], t["g_in"], t["g_out"],
                                  mask=mask, forward=reference_forward, n2=128)
    assert [g is not None for g in grads] == list(mask)
    a64 = {key: None if v is None else v.double().numpy() for key, v in t.items()}
    ref = fftconv_grads(a64["u"], a64["k"], a64["dy"], a64["D"], a64["g_in"], a64["g_out"])
    for key, g in zip(KEYS, grads):
        if g is None:
            continue
        assert g.dtype == torch.bfloat16
        floor = float(np.linalg.norm(torch.from_numpy(ref[key]).to(torch.bfloat16).double().numpy()
                                     - ref[key]) / np.linalg.norm(ref[key]))
        assert rel(g, ref[key]) <= 2 * floor + 1e-5, key  # one rounding, at the end


@pytest.mark.emu
@pytest.mark.parametrize("B,H,L,lk,n2", [(3, 2, 700, 700, 128), (2, 1, 1500, 90, 256)])
def test_long_backward_through_emulated_kernel(B, H, L, lk, n2):
    """The same composition with the two-level CUDA kernel itself, run by the CPU emulation
    (tests/emu), as the forward: the conjugate spectrum goes through the real pass A/B/C
    code (float32 io, as the backward uses it)."""
    from tests.emu import build as emu
    from tests.test_emu_fftconv import from_io, to_io

    def emu_forward(u, k, D=None, g_in=None, g_out=None, k_rev=None, spectrum=None, n2=None):
        assert g_in is None and g_out is None and k_rev is None and spectrum is not None
        Bu, Hu, Lu = (int(s) for s in u.shape)
        _, N1, N2 = two_level_plan(Lu, n2=n2)
        K, k_exp = spectrum
        inputs = {"u": to_io(u.double().numpy(), "f32"),
                  "K": torch.view_as_real(K.resolve_conj()).numpy().astype(np.float32),
                  "k_exp": k_exp.numpy().astype(np.int32)}
        params = {"B": Bu, "H": Hu, "L": Lu, "N1": N1, "N2": N2, "num_sms": 2, "C": 0}
        if D is not None:
            inputs["D"] = D.numpy().astype(np.float32)
            params["has_D"] = 1
        y = emu.run("fftconv_long_f32", inputs, params=params).outputs["y"]
        return torch.from_numpy(from_io(y, "f32")).float()

    a = problem(B + L, B, H, L, lk)
    t = {key: None if v is None else torch.from_numpy(v).float() for key, v in a.items()}
    grads = fftconv_long_backward(t["dy"], t["u"], t["k"], t["D"], t["g_in"], t["g_out"],
                                  forward=emu_forward, n2=n2)
    ref = fftconv_grads(a["u"], a["k"], a["dy"], a["D"], a["g_in"], a["g_out"])
    for key, g in zip(KEYS, grads):
        if ref.get(key) is None:
            continue
        err = rel(g, ref[key])
        print(key, "rel err %.2e" % err)
        assert err < 2e-5, key
