"""flashconv.nn: S4D and H3 layers against direct float64 references, decoding, causality.

The references evaluate the layers' formulas with an explicit Toeplitz (direct-sum)
convolution, so they check the modules' use of ``flashconv.fftconv`` (gates, D, the
multi-head K V^T layout) as well as the algebra. bench/synthetic.py's data generators
and a tiny end-to-end run are checked at the end.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashconv.nn import H3, S4D, H3State

F64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent


def _rel(got, want):
    got, want = got.detach(), want.detach()
    err = (got - want).abs().max().item()
    rel = ((got - want).norm() / want.norm().clamp_min(1e-300)).item()
    return err, rel


def _check(name, got, want, tol):
    err, rel = _rel(got, want)
    print(f"{name}: max abs err {err:.3e}, rel L2 err {rel:.3e}")
    assert rel < tol, name


def _conv(x, k):
    """Direct causal convolution: x (B, C, L), k (C, L) -> (B, C, L)."""
    L = x.shape[-1]
    t = torch.arange(L)
    lag = t[:, None] - t[None, :]  # (t, s) -> t - s
    T = k[:, lag.clamp(min=0)] * (lag >= 0)  # (C, L, L)
    return torch.einsum("cts,bcs->bct", T, x)


def _s4d_reference(m, u):
    x = u.transpose(1, 2)
    y = _conv(x, m.kernel(u.shape[1])) + m.D[:, None] * x
    return m.output_linear(F.gelu(y.transpose(1, 2)))


def _h3_reference(m, u):
    """Algorithm 1 of the H3 paper, one head at a time."""
    B, L, dm = u.shape
    d, H = m.head_dim, m.n_heads
    q, k, v = (p(u).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))  # (B, dm, L)
    k = _conv(k, m.shift_kernel(L)) + m.D_shift[:, None] * k
    kd = m.kernel(L)  # (H, L)
    out = torch.zeros(B, dm, L, dtype=u.dtype)
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        kv = k[:, sl, None, :] * v[:, None, sl, :]  # (B, d_i, d_j, L)
        kv = kv.reshape(B, d * d, L)
        y = _conv(kv, kd[h].expand(d * d, L)) + m.D[h] * kv
        y = y.reshape(B, d, d, L)
        out[:, sl] = (q[:, sl, None, :] * y).sum(1)  # contract over i
    return m.output_linear(out.transpose(1, 2))


def _make(kind, d_model=8, d_state=6, head_dim=1, seed=0, dtype=F64, **kw):
    torch.manual_seed(seed)
    if kind == "s4d":
        m = S4D(d_model, d_state, **kw)
    else:
        m = H3(d_model, d_state, head_dim=head_dim, **kw)
    return m.to(dtype).eval()


LAYERS = [("s4d", 1), ("h3", 1), ("h3", 2), ("h3", 4)]


# ------------------------------------------------------------------------ forward


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_s4d_forward_matches_reference(disc):
    m = _make("s4d", disc=disc)
    u = torch.randn(3, 17, 8, dtype=F64)
    y = m(u)
    assert y.shape == u.shape and y.dtype == F64
    _check(f"S4D forward ({disc})", y, _s4d_reference(m, u), 1e-12)


def test_s4d_plain_linear_output_and_dropout():
    m = _make("s4d", glu=False, dropout=0.5)
    assert isinstance(m.output_linear, torch.nn.Linear)
    assert isinstance(m.dropout, torch.nn.Dropout)
    u = torch.randn(2, 5, 8, dtype=F64)
    _check("S4D linear output", m(u), _s4d_reference(m, u), 1e-12)


@pytest.mark.parametrize("head_dim", [1, 2, 4])
def test_h3_forward_matches_algorithm1(head_dim):
    m = _make("h3", head_dim=head_dim)
    u = torch.randn(2, 13, 8, dtype=F64)
    y = m(u)
    assert y.shape == u.shape and y.dtype == F64
    _check(f"H3 forward head_dim={head_dim}", y, _h3_reference(m, u), 1e-12)


def test_h3_sequence_shorter_and_longer_than_shift_filter():
    for L in (1, 3, 20):
        m = _make("h3", d_state=6, head_dim=2)
        u = torch.randn(2, L, 8, dtype=F64)
        _check(f"H3 L={L}", m(u), _h3_reference(m, u), 1e-12)


def test_float32_forward_close_to_float64():
    for kind, hd in LAYERS[:3]:
        m = _make(kind, head_dim=hd, dtype=torch.float32)
        u = torch.randn(2, 33, 8)
        y32 = m(u)
        assert y32.dtype == torch.float32
        _check(f"{kind} hd={hd} float32 vs float64", y32.double(), m.double()(u.double()), 1e-5)


# ----------------------------------------------------------------------- decoding


def _leaves(state):
    return (state,) if isinstance(state, torch.Tensor) else tuple(state)


def _decode(m, u, state):
    ys = []
    for t in range(u.shape[1]):
        y, state = m.step(u[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("kind, head_dim", LAYERS)
def test_step_equals_forward(kind, head_dim):
    m = _make(kind, head_dim=head_dim)
    u = torch.randn(2, 21, 8, dtype=F64)
    with torch.no_grad():
        y, _ = _decode(m, u, m.allocate_state(2))
        _check(f"{kind} hd={head_dim} step vs forward", y, m(u), 1e-11)


@pytest.mark.parametrize("kind, head_dim", LAYERS)
@pytest.mark.parametrize("split", [1, 4, 15])
def test_prefill_then_step_equals_forward(kind, head_dim, split):
    m = _make(kind, head_dim=head_dim)  # d_state 6: split 4 is shorter than the shift filter
    u = torch.randn(2, 20, 8, dtype=F64)
    with torch.no_grad():
        full = m(u)
        y0, state = m.prefill(u[:, :split])
        y1, state_end = _decode(m, u[:, split:], state)
        _check(f"{kind} hd={head_dim} prefill({split})", y0, full[:, :split], 1e-12)
        _check(f"{kind} hd={head_dim} prefill({split})+step", y1, full[:, split:], 1e-11)
        # The state after decoding equals the state a prefill of everything gives.
        _, state_all = m.prefill(u)
        for a, b in zip(_leaves(state_end), _leaves(state_all)):
            _check(f"{kind} hd={head_dim} state", a, b, 1e-11)


def test_state_shapes():
    m = _make("h3", d_model=8, d_state=6, head_dim=2)
    s = m.allocate_state(3)
    assert isinstance(s, H3State)
    assert s.shift.shape == (3, 8, 6) and s.shift.dtype == F64
    assert s.diag.shape == (3, 2, 2, 4, 3) and s.diag.dtype == torch.complex128
    s = _make("s4d").allocate_state(3)
    assert s.shape == (3, 8, 3) and s.dtype == torch.complex128


def test_float32_decoding_close_to_forward():
    for kind, hd in LAYERS[:3]:
        m = _make(kind, head_dim=hd, dtype=torch.float32)
        u = torch.randn(2, 40, 8)
        with torch.no_grad():
            y, _ = _decode(m, u, m.allocate_state(2))
            _check(f"{kind} hd={hd} float32 step vs forward", y, m(u), 1e-5)


# ---------------------------------------------------------------------- causality


@pytest.mark.parametrize("kind, head_dim", LAYERS[:3])
def test_causality_by_perturbation(kind, head_dim):
    m = _make(kind, head_dim=head_dim)
    u = torch.randn(2, 16, 8, dtype=F64)
    y = m(u)
    for t in (0, 7, 14):
        u2 = u.clone()
        u2[:, t + 1:] += torch.randn_like(u2[:, t + 1:])
        y2 = m(u2)
        assert (y2[:, : t + 1] - y[:, : t + 1]).abs().max() < 1e-12
        assert (y2[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-3  # the change does arrive


@pytest.mark.parametrize("kind, head_dim", LAYERS[:3])
def test_causality_by_autograd(kind, head_dim):
    m = _make(kind, head_dim=head_dim)
    u = torch.randn(1, 12, 8, dtype=F64, requires_grad=True)
    y = m(u)
    for t in (0, 5, 10):
        (g,) = torch.autograd.grad(y[:, t].sum(), u, retain_graph=True)
        assert g[:, t + 1:].abs().max() < 1e-12
        assert g[:, : t + 1].abs().max() > 0


# ---------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind, head_dim", LAYERS[:3])
def test_gradients_reach_every_parameter(kind, head_dim):
    m = _make(kind, head_dim=head_dim, dtype=torch.float32).train()
    u = torch.randn(2, 24, 8, requires_grad=True)
    m(u).pow(2).sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize("make, exc, word", [
    (lambda: H3(8, head_dim=3), ValueError, "head_dim"),
    (lambda: H3(8, head_dim=0), ValueError, "head_dim"),
    (lambda: H3(8, head_dim=2.0), TypeError, "head_dim"),
    (lambda: H3(0), ValueError, "d_model"),
    (lambda: H3(8, d_state=5), ValueError, "d_state"),
    (lambda: H3(8, init="foo"), ValueError, "init"),
    (lambda: S4D(8, d_state=3), ValueError, "d_state"),
    (lambda: S4D(8, dropout=1.5), ValueError, "dropout"),
    (lambda: S4D(8, disc="rk4"), ValueError, "disc"),
    (lambda: S4D(8, dt_min=-1.0), ValueError, "dt_min"),
])
def test_bad_constructor_arguments(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


def test_bad_inputs():
    for m in (_make("s4d"), _make("h3", head_dim=2)):
        with pytest.raises(ValueError, match="u must have shape"):
            m(torch.randn(2, 8, dtype=F64))
        with pytest.raises(ValueError, match="u must have shape"):
            m(torch.randn(2, 5, 7, dtype=F64))
        with pytest.raises(TypeError, match="u must be a torch.Tensor"):
            m(np.zeros((2, 5, 8)))
        with pytest.raises(ValueError, match="u must have shape"):
            m.step(torch.randn(2, 3, 8, dtype=F64), m.allocate_state(2))
    with pytest.raises(TypeError, match="state"):
        _make("h3").step(torch.randn(2, 8, dtype=F64), (None, None))


# ------------------------------------------------------------ synthetic benchmark


def _synthetic():
    spec = importlib.util.spec_from_file_location("bench_synthetic", ROOT / "bench" / "synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_induction_head_data():
    syn = _synthetic()
    x, y = syn.induction_head_batch(500, 30, 20, torch.Generator().manual_seed(0))
    assert x.shape == (500, 30) and y.shape == (500,)
    prefix = 18
    assert (x[:, -1] == prefix).all()
    assert ((x == prefix).sum(1) == 2).all()  # one trigger plus the final query
    assert (x < 18).logical_or(x == prefix).all()  # the no-op token is never emitted
    first = (x == prefix).int().argmax(1)
    assert (first <= 27).all()
    assert (x[torch.arange(500), first + 1] == y).all()
    assert len(set(first.tolist())) > 20  # trigger positions spread over the sequence


def test_associative_recall_data():
    syn = _synthetic()
    x, y = syn.associative_recall_batch(500, 20, 10, torch.Generator().manual_seed(0))
    assert x.shape == (500, 20)
    keys, values = x[:, 0:18:2], x[:, 1:18:2]
    assert (keys < 4).all() and (values >= 4).all() and (values < 8).all()
    assert (x[:, -2] == 8).all()
    query = x[:, -1]
    for b in range(500):
        hits = values[b][keys[b] == query[b]]
        assert len(hits) > 0 and (hits == y[b]).all()  # present, and a consistent map


def test_synthetic_quick_run(tmp_path):
    syn = _synthetic()
    out = tmp_path / "quick.json"
    report = syn.main(["--quick", "--steps", "4", "--n-test", "16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["torch"] == torch.__version__
    assert {(r["task"], r["model"]) for r in saved["results"]} == {
        (t, m) for t in syn.TASKS for m in syn.MODELS}
    for r in report["results"]:
        assert 0.0 <= r["test_acc"] <= 100.0 and r["steps"] == 4
