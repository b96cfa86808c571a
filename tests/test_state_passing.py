"""State passing (flashconv.state_passing.ssm_conv) against float64 references.

Three references for the same y (python_ref.ssm): the step-by-step recurrence, the
full-length convolution with the S4D kernel (through flashconv.fftconv and through
python_ref), and python_ref's numpy mirror of the chunked algorithm.
"""
import math
import time

import numpy as np
import pytest
import torch

import flashconv
from flashconv import ssm
from flashconv import state_passing as sp
from flashconv.state_passing import ssm_conv
from python_ref.conv import fftconv as ref_fftconv
from python_ref.ssm import ssm_kernel, ssm_recurrence, state_passing

F64, C128 = torch.float64, torch.complex128


def as_np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def rel_err(y, ref):
    y, ref = as_np(y), as_np(ref)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(y - ref) / (den if den > 0 else 1.0))


def report(what, y, ref, bound):
    err = rel_err(y, ref)
    print("%s: rel err %.3g (bound %.3g)" % (what, err, bound))
    assert err <= bound
    return err


def make_ssm(H, m, seed, B=2, L=0):
    """S4D-Lin-like discrete SSM (ZOH, dt log-uniform in [1e-3, 1e-1]) and inputs, float64."""
    rng = np.random.default_rng(seed)
    A = -0.5 + 1j * np.pi * np.arange(m)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (H, 1)))
    dA = np.exp(dt * A)
    dB = (dA - 1) / A  # ZOH with B = 1
    C = (rng.standard_normal((H, m)) + 1j * rng.standard_normal((H, m))) / np.sqrt(2)
    D = rng.standard_normal(H)
    u = rng.standard_normal((B, H, L))
    s0 = rng.standard_normal((B, H, m)) + 1j * rng.standard_normal((B, H, m))
    return u, dA, dB, C, D, s0


def t(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


@pytest.mark.parametrize("L", [1, 37, 1000, 4099])
@pytest.mark.parametrize("chunk", [None, 1, 7, 256, 1000])
def test_matches_full_convolution_and_recurrence(L, chunk):
    u, dA, dB, C, D, s0 = make_ssm(3, 4, seed=L, L=L)
    tu, tdA, tdB, tC, tD = t(u, dA, dB, C, D)
    y, final = ssm_conv(tu, tdA, tdB, tC, tD, chunk=chunk, return_state=True)
    assert y.dtype == F64 and y.shape == tu.shape and final.dtype == C128 and final.shape == (2, 3, 4)
    k = torch.from_numpy(ssm_kernel(dA, dB, C, L))
    report("L=%d chunk=%s vs fftconv(u, k)" % (L, chunk), y, flashconv.fftconv(tu, k, tD), 1e-12)
    y_rec, s_rec = ssm_recurrence(u, dA, dB, C, D)
    report("  vs recurrence", y, y_rec, 1e-12)
    report("  final state vs recurrence", final, s_rec, 1e-12)
    # From a nonzero starting state: the recurrence is the only reference.
    y, final = ssm_conv(tu, tdA, tdB, tC, tD, chunk=chunk, state=torch.from_numpy(s0), return_state=True)
    y_rec, s_rec = ssm_recurrence(u, dA, dB, C, D, state=s0)
    report("  with state vs recurrence", y, y_rec, 1e-12)
    report("  with state, final state", final, s_rec, 1e-12)


def test_long_sequence_2_20():
    """L = 2^20, default chunk: equals the recurrence and the full-length convolution."""
    L = 1 << 20
    u, dA, dB, C, D, _ = make_ssm(2, 4, seed=20, B=1, L=L)
    tu, tdA, tdB, tC, tD = t(u, dA, dB, C, D)
    t0 = time.perf_counter()
    y, final = ssm_conv(tu, tdA, tdB, tC, tD, return_state=True)
    print("ssm_conv (1, 2, 2^20) float64: %.2f s" % (time.perf_counter() - t0))
    y_rec, s_rec = ssm_recurrence(u, dA, dB, C, D)
    report("2^20 vs recurrence", y, y_rec, 1e-11)
    report("2^20 final state vs recurrence", final, s_rec, 1e-11)
    k = torch.from_numpy(ssm_kernel(dA, dB, C, L))
    report("2^20 vs fftconv(u, k)", y, flashconv.fftconv(tu, k, tD), 1e-11)


@pytest.mark.parametrize("chunk", [None, 64, 1000])
def test_streaming_uneven_pieces(chunk):
    L = 6000
    u, dA, dB, C, D, s0 = make_ssm(3, 5, seed=3, L=L)
    tu, tdA, tdB, tC, tD, ts0 = t(u, dA, dB, C, D, s0)
    y_one, s_one = ssm_conv(tu, tdA, tdB, tC, tD, chunk=chunk, state=ts0, return_state=True)
    pieces = [1, 5, 0, 300, 2047, 2049, 7, 1591]
    assert sum(pieces) == L
    ys, state, a = [], ts0, 0
    for p in pieces:
        y, state = ssm_conv(tu[..., a:a + p], tdA, tdB, tC, tD, chunk=chunk, state=state, return_state=True)
        ys.append(y)
        a += p
    report("streamed y (chunk=%s)" % chunk, torch.cat(ys, -1), y_one, 1e-12)
    report("streamed final state", state, s_one, 1e-12)


def test_python_ref_mirror():
    u, dA, dB, C, D, s0 = make_ssm(3, 4, seed=5, L=2500)
    for chunk in (1, 300, 2048, 5000):
        y_np, s_np = state_passing(u, dA, dB, C, D, chunk=chunk, state=s0)
        y, s = ssm_conv(*t(u, dA, dB, C, D), chunk=chunk, state=torch.from_numpy(s0), return_state=True)
        report("mirror chunk=%d" % chunk, y, y_np, 1e-12)
        report("mirror state chunk=%d" % chunk, s, s_np, 1e-12)
        y_rec, s_rec = ssm_recurrence(u, dA, dB, C, D, state=s0)
        report("  mirror vs recurrence", y_np, y_rec, 1e-12)
    # The literal Python loop and the lfilter recurrence agree, and y(no state) is the
    # full-length convolution in python_ref too.
    u, dA, dB, C, D, s0 = make_ssm(2, 3, seed=6, L=200)
    y1, f1 = ssm_recurrence(u, dA, dB, C, D, state=s0, method="loop")
    y2, f2 = ssm_recurrence(u, dA, dB, C, D, state=s0)
    report("recurrence loop vs lfilter", y2, y1, 1e-13)
    report("recurrence states", f2, f1, 1e-13)
    report("python_ref: recurrence vs kernel",
           ssm_recurrence(u, dA, dB, C, D)[0], ref_fftconv(u, ssm_kernel(dA, dB, C, 200), D), 1e-12)


def test_s4d_module_convention():
    """ssm_conv on S4DKernel.discretize() equals fftconv with the module's own kernel."""
    torch.manual_seed(0)
    kern = ssm.S4DKernel(3, 8).to(F64)
    with torch.no_grad():
        dA, dB, C = kern.discretize()
        u = torch.randn(2, 3, 700, dtype=F64)
        D = torch.randn(3, dtype=F64)
        y = ssm_conv(u, dA, dB, C, D, chunk=128)
        report("S4DKernel convention", y, flashconv.fftconv(u, ssm.s4d_kernel(dA, dB, C, 700), D), 1e-12)
        _, state = ssm_conv(u, dA, dB, C, chunk=128, return_state=True)
        report("S4DKernel state", state, ssm.s4d_state_from_inputs(dA, dB, u), 1e-12)


def test_groups_of_chunks_and_channels(monkeypatch):
    """Tiny working-set budgets: several chunk groups and channel groups, same answer."""
    u, dA, dB, C, D, s0 = make_ssm(5, 3, seed=9, B=2, L=1234)
    args = t(u, dA, dB, C, D)
    want = ssm_conv(*args, chunk=50, state=torch.from_numpy(s0), return_state=True)
    calls = []
    real = sp.fftconv

    def spy(x, k, D=None):
        calls.append(tuple(x.shape))
        return real(x, k, D)

    monkeypatch.setattr(sp, "fftconv", spy)
    monkeypatch.setitem(sp._GROUP_ELEMS, "cpu", 2 * 2 * 50 * 3)  # 3 chunks per group
    monkeypatch.setattr(sp, "_VANDER_ELEMS", 3 * 51 * 2)  # 2 channels per group
    got = ssm_conv(*args, chunk=50, state=torch.from_numpy(s0), return_state=True)
    report("grouped y", got[0], want[0], 1e-13)
    report("grouped state", got[1], want[1], 1e-13)
    # No FFT convolution longer than the chunk: rows are (B*g, Hg, <= T).
    assert calls and max(c[2] for c in calls) <= 50 and max(c[1] for c in calls) <= 2
    assert max(c[0] * c[1] * c[2] for c in calls) <= 2 * 2 * 50 * 3  # the group budget


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    """float32 compute: error vs float64 (same rounded inputs) within 2x the output rounding floor."""
    u, dA, dB, C, D, s0 = make_ssm(4, 32, seed=11, B=2, L=5000)
    tu, tdA, tdB, tC, tD, ts0 = t(u, dA, dB, C, D, s0)
    uq = tu.to(dtype)
    p32 = [p.to(torch.complex64) for p in (tdA, tdB, tC)]
    y, s = ssm_conv(uq, *p32, tD.float(), state=ts0.to(torch.complex64), return_state=True)
    assert y.dtype == dtype and s.dtype == torch.complex64
    ref, s_ref = ssm_conv(uq.to(F64), *[p.to(C128) for p in p32], tD.float().to(F64),
                          state=ts0.to(torch.complex64).to(C128), return_state=True)
    floor = rel_err(ref.to(dtype).to(F64), ref)
    report("%s y" % dtype, y.to(F64), ref, 2 * floor + 2e-6)
    report("%s state" % dtype, s.to(C128), s_ref, 2e-6)
    # float64 u with complex64 parameters computes in float64.
    y64, s64 = ssm_conv(uq.to(F64), *p32, tD.float(), return_state=True)
    assert y64.dtype == F64 and s64.dtype == C128


def test_strided_input():
    u, dA, dB, C, D, _ = make_ssm(3, 4, seed=12, B=2, L=3001)
    big = torch.randn(4, 7, 2 * 3001, dtype=F64)
    big[::2, 1::2, ::2] = torch.from_numpy(u)
    us = big[::2, 1::2, ::2]
    assert not us.is_contiguous()
    y = ssm_conv(us, *t(dA, dB, C, D), chunk=512)
    report("strided u", y, ssm_recurrence(u, dA, dB, C, D)[0], 1e-12)


def test_gradcheck():
    u, dA, dB, C, D, s0 = make_ssm(2, 2, seed=13, B=1, L=9)
    args = [a.requires_grad_() for a in t(u, dA, dB, C, D, s0)]

    def f(u, dA, dB, C, D, s0):
        return ssm_conv(u, dA, dB, C, D, chunk=4, state=s0, return_state=True)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def test_gradients_match_full_convolution():
    """Backward through state passing equals backward through fftconv with the S4D kernel."""
    u, dA, dB, C, D, _ = make_ssm(3, 4, seed=14, B=2, L=500)
    leaves_a = [a.requires_grad_() for a in t(u, dA, dB, C, D)]
    leaves_b = [a.detach().clone().requires_grad_() for a in leaves_a]
    dy = torch.randn(2, 3, 500, dtype=F64)
    ssm_conv(*leaves_a, chunk=64).backward(dy)
    ub, dAb, dBb, Cb, Db = leaves_b
    j = torch.arange(500, dtype=F64)
    k = 2 * torch.einsum("hn,hnj->hj", Cb * dBb, torch.exp(torch.log(dAb).unsqueeze(-1) * j)).real
    flashconv.fftconv(ub, k, Db).backward(dy)
    for name, a, b in zip(("u", "dA", "dB", "C", "D"), leaves_a, leaves_b):
        report("grad %s" % name, a.grad, b.grad, 1e-10)


def test_zero_length_and_empty_batch():
    u, dA, dB, C, D, s0 = make_ssm(3, 4, seed=15, B=2, L=0)
    tu, tdA, tdB, tC, tD, ts0 = t(u, dA, dB, C, D, s0)
    y, s = ssm_conv(tu, tdA, tdB, tC, tD, state=ts0, return_state=True)
    assert y.shape == (2, 3, 0) and torch.equal(s, ts0)
    y, s = ssm_conv(tu, tdA, tdB, tC, return_state=True)
    assert torch.count_nonzero(s) == 0
    y = ssm_conv(torch.zeros(0, 3, 10, dtype=F64), tdA, tdB, tC, tD)
    assert y.shape == (0, 3, 10)


def test_bad_inputs():
    u, dA, dB, C, D, s0 = t(*make_ssm(3, 4, seed=16, B=2, L=20))
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        ssm_conv(u.numpy(), dA, dB, C)
    with pytest.raises(ValueError, match=r"u must have shape \(B, H, L\)"):
        ssm_conv(u[0], dA, dB, C)
    with pytest.raises(TypeError, match="u must be float32"):
        ssm_conv(u.to(torch.int32), dA, dB, C)
    with pytest.raises(TypeError, match="dA must be complex64 or complex128"):
        ssm_conv(u, dA.real, dB, C)
    with pytest.raises(ValueError, match=r"dA must have shape \(H, N/2\) = \(3, N/2\)"):
        ssm_conv(u, dA[:2], dB, C)
    with pytest.raises(ValueError, match=r"C must have shape \(H, N/2\) = \(3, 4\)"):
        ssm_conv(u, dA, dB, C[:, :3])
    with pytest.raises(ValueError, match=r"D must have shape \(H,\) = \(3,\)"):
        ssm_conv(u, dA, dB, C, D[:2])
    with pytest.raises(TypeError, match="D must be a real floating"):
        ssm_conv(u, dA, dB, C, dA[:, 0])
    with pytest.raises(ValueError, match=r"state must have shape \(B, H, N/2\) = \(2, 3, 4\)"):
        ssm_conv(u, dA, dB, C, state=s0[:1])
    with pytest.raises(TypeError, match="state must be a complex"):
        ssm_conv(u, dA, dB, C, state=s0.real)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="chunk must be a positive int"):
            ssm_conv(u, dA, dB, C, chunk=bad)
    with pytest.raises(ValueError, match="N/2 >= 1"):
        ssm_conv(u, dA[:, :0], dB[:, :0], C[:, :0])


def test_default_chunk():
    assert sp.DEFAULT_CHUNK == 2048 and sp.DEFAULT_CHUNK & (sp.DEFAULT_CHUNK - 1) == 0
    assert math.log2(sp.DEFAULT_CHUNK) <= 13  # the fused kernel serves float32 rows up to 8K
