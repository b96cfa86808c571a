"""Bidirectional S4D (the LRA layer) and the LRA speed benchmark (bench/lra.py).

The layer is checked against float64 references that share none of its code:
python_ref.conv.causal_conv_direct (numpy direct sums, with k_rev) for the output, and
an explicit Toeplitz matrix with entries above the diagonal for the gradients. The
benchmark runs end to end on its quick CPU shapes and its JSON report is checked.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flashconv
from flashconv.nn import S4D
from python_ref.conv import causal_conv_direct

F64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent


def _check(name, got, want, tol):
    got, want = got.detach(), want.detach()
    err = (got - want).abs().max().item()
    rel = ((got - want).norm() / want.norm().clamp_min(1e-300)).item()
    print(f"{name}: max abs err {err:.3e}, rel L2 err {rel:.3e}")
    assert rel < tol, name


def _make(d_model=8, d_state=6, seed=0, dtype=F64, **kw):
    torch.manual_seed(seed)
    return S4D(d_model, d_state, bidirectional=True, **kw).to(dtype).eval()


def _reference(m, u):
    """forward() from python_ref's direct sums: conv(x, k) + conv_rev(x, k_rev) + D x."""
    L = u.shape[1]
    kk = m.kernel(L).detach().numpy()  # (2H, L): forward half, then backward half
    H = m.d_model
    x = u.detach().transpose(1, 2).numpy()
    y = causal_conv_direct(x, kk[:H], m.D.detach().numpy(), k_rev=kk[H:])
    y = torch.from_numpy(y).transpose(1, 2)
    return m.output_linear(F.gelu(y)).detach()


def _toeplitz_conv(x, k, k_rev):
    """Differentiable direct convolution: x (B, C, L), k, k_rev (C, L) -> (B, C, L).

    T[t, s] = k[t - s] below the diagonal and k_rev[s - t] above it; the diagonal holds
    k[0] + k_rev[0] (both kernels count lag 0).
    """
    L = x.shape[-1]
    t = torch.arange(L)
    lag = t[:, None] - t[None, :]  # (t, s) -> t - s
    T = k[:, lag.clamp(min=0)] * (lag >= 0) + k_rev[:, (-lag).clamp(min=0)] * (lag <= 0)
    return torch.einsum("cts,bcs->bct", T, x)


def _torch_reference(m, u):
    x = u.transpose(1, 2)
    k, k_rev = m.kernels(u.shape[1])
    y = _toeplitz_conv(x, k, k_rev) + m.D[:, None] * x
    return m.output_linear(F.gelu(y.transpose(1, 2)))


@pytest.mark.parametrize("L", [1, 2, 17, 64])
@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_bidirectional_forward_matches_direct_sum(L, disc):
    m = _make(disc=disc)
    u = torch.randn(3, L, 8, dtype=F64)
    y = m(u)
    assert y.shape == u.shape and y.dtype == F64
    _check(f"bidirectional S4D L={L} ({disc})", y, _reference(m, u), 1e-12)


def test_bidirectional_kernel_layout():
    """S4's convention: one S4D kernel of 2H channels, forward half then backward half."""
    m = _make(d_model=8)
    assert m.kernel.d_model == 16 and m.kernel.C.shape[0] == 16
    k, k_rev = m.kernels(11)
    full = m.kernel(11)
    assert k.shape == k_rev.shape == (8, 11)
    assert torch.equal(k, full[:8]) and torch.equal(k_rev, full[8:])
    assert not torch.allclose(k, k_rev)  # independent parameters
    causal = S4D(8, 6)
    assert causal.kernel.d_model == 8 and causal.kernels(11)[1] is None


def test_lag_zero_counted_by_both_kernels():
    """H3's convention: an impulse at t0 gives k[0] + k_rev[0] + D at t0 itself."""
    m = _make(d_model=4, glu=False)
    L, t0 = 9, 4
    x = torch.zeros(1, 4, L, dtype=F64)
    x[:, :, t0] = 1.0
    with torch.no_grad():
        k, k_rev = m.kernels(L)
        y = m.conv(x, k, k_rev)[0]  # (H, L)
        want = torch.zeros(4, L, dtype=F64)
        want[:, t0:] += k[:, : L - t0]            # causal: y[t0 + s] = k[s]
        want[:, : t0 + 1] += k_rev[:, : t0 + 1].flip(-1)  # anti-causal: y[t0 - s] = k_rev[s]
        want[:, t0] += m.D
    _check("impulse response", y, want, 1e-13)


def test_bidirectional_sees_the_future():
    m = _make()
    u = torch.randn(2, 16, 8, dtype=F64)
    y = m(u)
    u2 = u.clone()
    u2[:, 10:] += torch.randn_like(u2[:, 10:])
    y2 = m(u2)
    assert (y2[:, :10] - y[:, :10]).abs().max() > 1e-3  # earlier outputs change


def test_bidirectional_gradients_match_toeplitz_reference():
    m = _make()
    u = torch.randn(2, 13, 8, dtype=F64, requires_grad=True)
    dy = torch.randn(2, 13, 8, dtype=F64)
    grads = torch.autograd.grad((m(u) * dy).sum(), [u, *m.parameters()])
    want = torch.autograd.grad((_torch_reference(m, u) * dy).sum(), [u, *m.parameters()])
    names = ["u"] + [n for n, _ in m.named_parameters()]
    for name, g, w in zip(names, grads, want):
        _check(f"grad {name}", g, w, 1e-11)
    # The backward half of the kernel's parameters is trained too.
    assert grads[names.index("kernel.C")][8:].abs().sum() > 0


def test_one_fftconv_call_with_k_rev(monkeypatch):
    """The layer hands k_rev to fftconv (one FFT pair), not two convolutions."""
    calls = []
    real = flashconv.fftconv

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(flashconv, "fftconv", spy)
    m = _make()
    u = torch.randn(2, 21, 8, dtype=F64)
    _check("through fftconv(k_rev=...)", m(u), _reference(m, u), 1e-12)
    assert len(calls) == 1 and calls[0]["k_rev"].shape == (8, 21)


def test_anti_causal_term_is_the_time_reversed_convolution():
    """conv(x, k, k_rev) - conv(x, k) = reverse(conv(reverse(x), k_rev)), without D."""
    m = _make()
    x = torch.randn(2, 8, 30, dtype=F64)
    k, k_rev = m.kernels(30)
    with torch.no_grad():
        got = m.conv(x, k, k_rev) - flashconv.fftconv(x, k, m.D)
        want = flashconv.fftconv(x.flip(-1), k_rev).flip(-1)
    _check("anti-causal term", got, want, 1e-12)


def test_float32_close_to_float64():
    m = _make(dtype=torch.float32)
    u = torch.randn(2, 40, 8)
    y32 = m(u)
    assert y32.dtype == torch.float32
    _check("bidirectional float32 vs float64", y32.double(), m.double()(u.double()), 1e-5)


def test_autocast_runs_the_convolution_in_bfloat16():
    m = _make(dtype=torch.float32)
    u = torch.randn(2, 32, 8)
    x = u.transpose(1, 2)
    k, k_rev = m.kernels(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = m.conv(x, k, k_rev)
        y = m(u)
    assert z.dtype == torch.bfloat16
    _check("autocast bf16 conv", z.float(), m.conv(x, k, k_rev), 2e-2)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("call", ["step", "prefill", "allocate_state"])
def test_decoding_is_refused(call):
    m = _make()
    u = torch.randn(2, 8, dtype=F64)
    args = {"step": (u, None), "prefill": (u[:, None],), "allocate_state": (2,)}[call]
    with pytest.raises(RuntimeError, match="bidirectional"):
        getattr(m, call)(*args)


def test_bad_bidirectional_argument():
    with pytest.raises(TypeError, match="bidirectional"):
        S4D(8, bidirectional="yes")
    with pytest.raises(ValueError, match="d_model"):
        S4D(0, bidirectional=True)


# --------------------------------------------------------------------- benchmark


def _lra():
    spec = importlib.util.spec_from_file_location("bench_lra", ROOT / "bench" / "lra.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_torch_fft_baseline_matches_reference():
    """The benchmark's torch.fft bidirectional convolution is the same operation."""
    lra = _lra()
    torch.manual_seed(0)
    x = torch.randn(2, 4, 19, dtype=F64)
    k, k_rev, D = torch.randn(4, 19, dtype=F64), torch.randn(4, 19, dtype=F64), torch.randn(4, dtype=F64)
    want = causal_conv_direct(x.numpy(), k.numpy(), D.numpy(), k_rev=k_rev.numpy())
    _check("torch.fft bidirectional", lra.fftconv_torch(x, k, D, k_rev), torch.from_numpy(want), 1e-12)
    _check("torch.fft causal", lra.fftconv_torch(x, k, D, None),
           torch.from_numpy(causal_conv_direct(x.numpy(), k.numpy(), D.numpy())), 1e-12)


def test_models_agree_on_a_task():
    """The S4D models on torch.fft and on flashconv are the same network."""
    lra = _lra()
    task = lra.scaled_tasks("quick")[0]
    torch.manual_seed(0)
    a = lra.build_model("s4d_flashconv", task).double().eval()
    b = lra.build_model("s4d_torchfft", task).double().eval()
    b.load_state_dict(a.state_dict())
    x, _ = lra.make_batch(task, torch.device("cpu"), torch.Generator().manual_seed(0))
    _check("flashconv vs torch.fft model", a(x), b(x), 1e-10)


def test_lra_quick_writes_report(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "lra.py"), "--quick", "--threads", "1",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    print(out.stdout[-4000:], out.stderr[-3000:])
    assert out.returncode == 0
    (path,) = tmp_path.glob("lra_*.json")
    rep = json.loads(path.read_text())
    assert rep["kind"] == "lra_speed" and rep["commit"]
    assert rep["device"] == "cpu" and rep["shapes"] == "quick" and rep["scaled_down"] is True
    assert rep["precision"] == "float32"
    names = [t["name"] for t in rep["tasks"]]
    assert names == ["ListOps", "Text", "Retrieval", "Image", "Pathfinder", "Path-X"]
    models = set(rep["models"])
    assert {"transformer", "s4d_torchfft", "s4d_flashconv"} <= models
    for t in rep["tasks"]:
        assert t["scaled_from"]["L"] > t["L"] and t["paper_config"]["n_layers"] == 6
        assert t["source"].startswith("state-spaces/s4 configs/experiment/lra/")
        for m in models:
            r = t["results"][m]
            assert r["status"] == "ok", (t["name"], m, r)
            assert r["step_s"] > 0 and len(r["step_times_s"]) >= 1
            assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
            assert abs(r["speedup"] - t["results"]["transformer"]["step_s"] / r["step_s"]) < 1e-9
    summ = rep["summary"]
    assert set(summ["mean_speedup_5_tasks"]) == models and summ["tasks_in_mean"]["s4d_flashconv"] == 5
    assert summ["mean_speedup_5_tasks"]["transformer"] == 1.0
    assert set(summ["path_x_speedup"]) == models
    assert "CPU" in out.stdout and "SCALED-DOWN" in out.stdout
    progress = [line for line in out.stdout.splitlines() if line.startswith("[") and "ETA" in line]
    assert len(progress) == 6 * len(models)  # a progress line per measurement


def test_summary_and_table_with_a_failed_measurement(capsys):
    """An OOM (standard attention on Path-X or Retrieval on a GPU) is reported, not averaged."""
    lra = _lra()
    models = list(lra.MODELS)
    times = {"transformer_math": 4.0, "transformer": 2.0, "s4d_torchfft": 1.0, "s4d_flashconv": 0.5}
    tasks = []
    for t in lra.TASKS:
        res = {m: {"status": "ok", "step_s": times[m], "peak_mem_bytes": 1e9} for m in models}
        if t.name in ("Retrieval", "Path-X"):
            res["transformer_math"] = {"status": "oom", "error": "CUDA out of memory"}
        tasks.append({"name": t.name, "L": t.L, "batch": t.batch, "d_model": t.d_model,
                      "n_layers": t.n_layers, "results": res})
    summ = lra.summarise(tasks, models)
    assert summ["mean_speedup_5_tasks"] == {"transformer_math": 0.5, "transformer": 1.0,
                                            "s4d_torchfft": 2.0, "s4d_flashconv": 4.0}
    assert summ["tasks_in_mean"]["transformer_math"] == 4 and summ["tasks_in_mean"]["s4d_flashconv"] == 5
    assert "transformer_math" not in summ["path_x_speedup"] and summ["path_x_speedup"]["s4d_flashconv"] == 4.0
    assert summ["mean_speedup_vs_standard_attention"]["s4d_flashconv"] == 8.0
    assert summ["tasks_in_mean_vs_standard_attention"]["s4d_flashconv"] == 4
    lra.print_table({"models": models, "tasks": tasks, "device": "NVIDIA H100", "precision": "bfloat16",
                     "shapes": "full", "scaled_down": False, "note": "", "summary": summ})
    out = capsys.readouterr().out
    assert "OOM" in out and "GPU NVIDIA H100" in out and "4.00x" in out
