"""The CUDA overlap-save path's use of the fused forward kernel, under the CPU emulation: the
blocks of one batch row are overlapping windows of one zero-padded row (batch stride S < the
block length P, channel stride Lp), gates windowed the same way, exactly as
flashconv._overlap.overlap_save_blocks hands them to the kernel; the kept outputs must equal
the causal convolution of the whole row (python_ref, float64)."""
import numpy as np
import pytest

from flashconv.plan import fused_fft_size
from python_ref.conv import fftconv as ref_fftconv
from tests.emu import build as emu
from tests.test_emu_fftconv import CASE, ROUND, from_io, rel_err, spectrum_inputs, to_io

pytestmark = pytest.mark.emu


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("L,lk,P,gates", [(300, 5, 32, True), (777, 1, 64, False), (200, 64, 128, True)])
def test_fused_kernel_on_overlapping_windows(dtype, L, lk, P, gates):
    rng = np.random.default_rng(L + lk)
    H = 2
    rnd = ROUND[dtype]
    u = rnd(rng.standard_normal((H, L)))
    k = rng.standard_normal((H, lk)) / np.sqrt(lk)
    D = rnd(rng.standard_normal(H)).astype(np.float32).astype(np.float64)
    gi = rnd(rng.standard_normal((H, L))) if gates else None
    go = rnd(rng.standard_normal((H, L))) if gates else None
    S = P - lk + 1
    nb = -(-L // S)
    Lp = nb * S + lk - 1

    def padded(a):  # (H, Lp): lk - 1 zeros, the row, zeros; flat, in the io dtype
        p = np.zeros((H, Lp))
        p[:, lk - 1:lk - 1 + L] = a
        return to_io(p, dtype).reshape(-1)

    N = fused_fft_size(P)
    inputs = {"u": padded(u), **spectrum_inputs(k, P, N, dtype), "D": D.astype(np.float32)}
    params = {"B": nb, "H": H, "L": P, "N": N, "num_sms": 2, "has_D": 1,
              "u_sb": S, "u_sh": Lp, "u_st": 1}  # block j of channel h starts at h Lp + j S
    if gates:
        inputs["g_in"], inputs["g_out"] = padded(gi), padded(go)
        params["has_gates"] = 1
    yb = from_io(emu.run(CASE[dtype], inputs, params=params).outputs["y"], dtype)  # (nb, H, P)
    y = yb[:, :, lk - 1:].transpose(1, 0, 2).reshape(H, nb * S)[:, :L]
    ref = ref_fftconv(u[None], k, D, None if gi is None else gi[None],
                      None if go is None else go[None])[0]
    err = rel_err(y, ref)
    floor = rel_err(ROUND[dtype](ref), ref)
    print("overlapping windows %s L=%d lk=%d P=%d: rel err %.3g, floor %.3g" % (dtype, L, lk, P, err, floor))
    assert np.isfinite(y).all() and err <= 2 * floor + 5e-7
