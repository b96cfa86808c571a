"""Numerics every CPU engine owes its callers (docs/cpu-engines.md), each engine forced with
use_engines and checked against float64 python_ref:

- no overflow or underflow inside the FFTs: a finite exact result within about a quarter of the
  dtype's largest value stays finite and as accurate as an ordinary one (rows and kernel
  channels scaled by powers of two, flashconv/_scaling.py), forward and backward;
- the NaN rule: a NaN or Inf in a row of x (or in a channel of k) makes that output row NaN, all
  of it, and nothing else; gradients likewise; no warnings;
- bitwise reproducibility of every output for a given input and thread count (the scipy
  engine's dk used to depend on which pool thread summed which rows).
"""
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import flashconv
from flashconv import _cpu
from python_ref.conv import causal_conv_direct, fftconv_grads

# (engine, array kind); overlap-save serves forward calls with a short kernel on L >= 4096.
ENGINES = [("cpu_torch", "torch"), ("cpu_torch", "numpy"), ("cpu_scipy", "numpy"),
           ("torch_fft", "torch"), ("cpu_overlap_save", "numpy"), ("cpu_overlap_save", "torch")]
BACKWARD = [e for e in ENGINES if e[0] != "cpu_overlap_save"]
DTYPES = {"torch": ["float32", "bfloat16", "float16", "float64"],
          "numpy": ["float32", "float16", "float64"]}
FMAX = {"float32": float(np.finfo(np.float32).max), "float16": 65504.0,
        "bfloat16": float(torch.finfo(torch.bfloat16).max), "float64": float(np.finfo(np.float64).max)}
GRAD_KEYS = ("du", "dk", "dD", "dg_in", "dg_out", "dk_rev")


def shape(engine):
    """(L, Lk): overlap-save needs a long input and a short kernel."""
    return (4096, 16) if engine == "cpu_overlap_save" else (600, 600)


def rel(a, ref):
    a = np.asarray(a, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def conv(kind, dtype, a, kdtype=None):
    """float64 numpy array -> the engine's array kind in dtype (None stays None)."""
    if a is None:
        return None
    dt = kdtype or dtype
    if kind == "numpy":
        return a.astype(dt)
    return torch.from_numpy(a).to(getattr(torch, dt))


def back(x):
    """-> float64 numpy (NaN kept)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    return np.asarray(x, np.float64)


def kernel_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


def forward(engine, kind, dtype, u, k, D=None, g_in=None, g_out=None, k_rev=None):
    """y (float64) of the engine on the operands rounded to dtype (k, D, k_rev: float32 /
    float64), and the float64 operands it actually saw."""
    kd = kernel_dtype(dtype)
    args = dict(u=conv(kind, dtype, u), k=conv(kind, dtype, k, kd), D=conv(kind, dtype, D, kd),
                g_in=conv(kind, dtype, g_in), g_out=conv(kind, dtype, g_out),
                k_rev=conv(kind, dtype, k_rev, kd))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from numpy, no other warning
        with flashconv.use_engines(engine):
            y = flashconv.fftconv(args["u"], args["k"], args["D"], g_in=args["g_in"],
                                  g_out=args["g_out"], k_rev=args["k_rev"])
    return back(y), {n: back(a) for n, a in args.items()}


def backward(engine, kind, dtype, dy, u, k, D=None, g_in=None, g_out=None, k_rev=None):
    kd = kernel_dtype(dtype)
    args = [conv(kind, dtype, dy), conv(kind, dtype, u), conv(kind, dtype, k, kd),
            conv(kind, dtype, D, kd), conv(kind, dtype, g_in), conv(kind, dtype, g_out),
            conv(kind, dtype, k_rev, kd)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with flashconv.use_engines(engine):
            g = flashconv.fftconv_backward(*args)
    return {key: back(v) for key, v in g.items()}, [back(a) for a in args]


# --- 2. no overflow / underflow inside the FFTs -------------------------------------------------

def positive_problem(seed, B, H, L, lk):
    """v in [0.5, 1), k >= 0 with unit sum per channel, D in [0, 0.1): |y| < 1.1 max|v|."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.5, 1.0, (B, H, L))
    k = rng.uniform(0.0, 1.0, (H, lk))
    k /= k.sum(axis=1, keepdims=True)
    return v, k, rng.uniform(0.0, 0.1, H)


def scale_for(dtype):
    """A power of two c with 1.1 c below a quarter of the dtype's largest value."""
    return 2.0 ** np.floor(np.log2(FMAX[dtype] / 4.5))


@pytest.mark.parametrize("engine,kind", ENGINES)
def test_forward_near_dtype_max(engine, kind):
    """u near a quarter of the dtype's max: finite and as accurate as u near 1 (before: NaN or
    Inf from L = 4096 on once the output exceeded 1.4e-4 of the max)."""
    L, lk = shape(engine)
    v, k, D = positive_problem(1, 2, 3, L, lk)
    for dtype in DTYPES[kind]:
        c = scale_for(dtype)
        y1, a1 = forward(engine, kind, dtype, v, k, D)
        err1 = rel(y1, causal_conv_direct(a1["u"], a1["k"], a1["D"]))
        yc, ac = forward(engine, kind, dtype, v * c, k, D)
        assert np.isfinite(yc).all(), (dtype, "non-finite output near the max")
        # The reference from the rounded operands, divided by c (exact: a power of two).
        ref = causal_conv_direct(ac["u"] / c, ac["k"], ac["D"])
        assert rel(yc / c, ref) <= 2 * err1 + 1e-300, (dtype, rel(yc / c, ref), err1)


@pytest.mark.parametrize("engine,kind", [e for e in ENGINES if e[1] == "torch"])
def test_the_issue_cases(engine, kind):
    """The two reported cases: full(1e35) * full(1/4096) (exact: 1e35 (t + 1) / 4096, was 4096
    NaN) and a bfloat16 input at the dtype's max with k = 1/(4L) (was NaN)."""
    L = 4096
    lk = 16 if engine == "cpu_overlap_save" else L
    t = np.arange(1, L + 1, dtype=np.float64)
    with flashconv.use_engines(engine):
        y = flashconv.fftconv(torch.full((1, 1, L), 1e35), torch.full((1, lk), 1 / 4096))
        exact = 1e35 * np.minimum(t, lk) / 4096
        assert torch.isfinite(y).all() and rel(back(y)[0, 0], exact) < 1e-6
        big = torch.full((1, 1, L), FMAX["bfloat16"], dtype=torch.bfloat16)
        y = flashconv.fftconv(big, torch.full((1, lk), 1 / (4 * L)))
        exact = FMAX["bfloat16"] * np.minimum(t, lk) / (4 * L)
        assert torch.isfinite(y).all() and rel(back(y)[0, 0], exact) < 8e-3


@pytest.mark.parametrize("engine,kind", ENGINES)
def test_tiny_values_keep_their_accuracy(engine, kind):
    """Values far below 1 (outputs ~2^-120 in float32, ~2^-1000 in float64, still normal)."""
    L, lk = shape(engine)
    v, k, D = positive_problem(2, 2, 3, L, lk)
    for dtype, c in (("float32", 2.0 ** -60), ("float64", 2.0 ** -500)):
        y1, a1 = forward(engine, kind, dtype, v, k, D)
        err1 = rel(y1, causal_conv_direct(a1["u"], a1["k"], a1["D"]))
        y, a = forward(engine, kind, dtype, v * c, k * c, D * c)
        ref = causal_conv_direct(a["u"] / c, a["k"] / c, a["D"] / c)
        assert rel(y / c / c, ref) <= 2 * err1, (dtype, rel(y / c / c, ref), err1)


@pytest.mark.parametrize("engine,kind", BACKWARD)
def test_backward_near_dtype_max(engine, kind):
    """du with dy near the max, and dk / dk_rev near the max (dy scaled by c / L): finite and as
    accurate as the ordinary case."""
    L, lk = 500, 500
    v, k, D = positive_problem(3, 2, 3, L, lk)
    w = np.random.default_rng(4).uniform(0.5, 1.0, v.shape)
    kr = k[:, :40].copy()
    for dtype in DTYPES[kind]:
        c = scale_for(dtype)
        g1, a1 = backward(engine, kind, dtype, w, v, k, D, k_rev=kr)
        r1 = fftconv_grads(a1[1], a1[2], a1[0], a1[3], k_rev=a1[6])
        # du near the max (dk's exact value overflows here: not checked).
        g, a = backward(engine, kind, dtype, w * c, v, k, D, k_rev=kr)
        ref = fftconv_grads(a[1], a[2], a[0] / c, a[3], k_rev=a[6])
        assert np.isfinite(g["du"]).all(), dtype
        assert rel(g["du"] / c, ref["du"]) <= 2 * rel(g1["du"], r1["du"]), dtype
        # dk and dk_rev near the max: dy scaled by c / L (a power of two).
        s = c / 2.0 ** np.ceil(np.log2(L))
        g, a = backward(engine, kind, dtype, w * s, v, k, D, k_rev=kr)
        ref = fftconv_grads(a[1], a[2], a[0] / s, a[3], k_rev=a[6])
        for key in ("dk", "dk_rev", "du"):
            assert np.isfinite(g[key]).all(), (dtype, key)
            assert rel(g[key] / s, ref[key]) <= 2 * rel(g1[key], r1[key]) + 1e-300, (dtype, key)


# --- 6. the NaN rule ----------------------------------------------------------------------------

def nan_problem(engine):
    L, lk = shape(engine)
    rng = np.random.default_rng(5)
    u = rng.standard_normal((2, 4, L))
    k = rng.standard_normal((4, lk)) / np.sqrt(lk)
    return u, k, rng.standard_normal(4), rng.standard_normal((2, 4, L))


@pytest.mark.parametrize("engine,kind", ENGINES)
def test_nan_rule_forward(engine, kind):
    """A NaN or Inf in a row of x makes that row of y NaN (all of it, before the bad value too);
    a non-finite tap of k[h] every row of channel h; a NaN output gate only its own position.
    Every other value is what it is without them; no warnings."""
    u, k, D, g_out = nan_problem(engine)
    L = u.shape[-1]
    bad_u = u.copy()
    bad_u[0, 1, L // 2] = np.nan
    bad_u[1, 0, L - 1] = np.inf  # the last position: an FFT may leave earlier outputs finite
    bad_k = k.copy()
    bad_k[2, 3] = -np.inf
    bad_go = g_out.copy()
    bad_go[1, 3, 7] = np.nan
    for dtype in ("float32", "float64"):
        y, _ = forward(engine, kind, dtype, bad_u, bad_k, D, g_out=bad_go)
        clean, _ = forward(engine, kind, dtype, u, k, D, g_out=g_out)
        expect = np.zeros(y.shape, bool)
        expect[0, 1] = expect[1, 0] = expect[:, 2] = True
        expect[1, 3, 7] = True
        np.testing.assert_array_equal(np.isnan(y), expect)
        ok = ~expect
        np.testing.assert_allclose(y[ok], clean[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine,kind", BACKWARD)
def test_nan_rule_backward(engine, kind):
    """A NaN in dy[b, h, t]: du and dg_in NaN over row (b, h), dk, dk_rev and dD NaN for channel
    h; every other gradient finite and unchanged."""
    u, k, D, dy = nan_problem(engine)
    L = u.shape[-1]
    kr = k[:, :30].copy()
    bad = dy.copy()
    bad[1, 2, L // 3] = np.nan
    g, _ = backward(engine, kind, "float32", bad, u, k, D, g_in=dy, k_rev=kr)
    clean, _ = backward(engine, kind, "float32", dy, u, k, D, g_in=dy, k_rev=kr)
    row = np.zeros(u.shape, bool)
    row[1, 2] = True
    for key in ("du", "dg_in"):
        np.testing.assert_array_equal(np.isnan(g[key]), row, err_msg=key)
        np.testing.assert_allclose(g[key][~row], clean[key][~row], rtol=1e-5, atol=1e-5)
    for key in ("dk", "dk_rev", "dD"):
        chan = np.zeros(g[key].shape, bool)
        chan[2] = True
        np.testing.assert_array_equal(np.isnan(g[key]), chan, err_msg=key)
        np.testing.assert_allclose(g[key][~chan], clean[key][~chan], rtol=1e-4, atol=1e-5)


# --- 3. bitwise reproducibility ---------------------------------------------------------------

def test_pool_assigns_items_statically(monkeypatch):
    """static=True (the backward's dk sums): item i runs on worker i % nt whatever the timing,
    so per-worker partial sums added in worker order are the same bits on every run."""
    monkeypatch.setenv("FLASHCONV_NUM_THREADS", "3")
    items = list(range(11))
    rng = np.random.default_rng(0)
    for _ in range(3):
        got = {}
        lock = threading.Lock()

        def fn(item, w):
            time.sleep(float(rng.uniform(0, 0.004)))  # uneven, timing-dependent progress
            with lock:
                got[item] = (w, threading.get_ident())

        nt = _cpu._run(items, fn, 1 << 30, static=True)
        assert nt == 3 and {i: w for i, (w, _) in got.items()} == {i: i % 3 for i in items}
        # Each worker's items on one thread (a pool thread may serve two workers in turn).
        for w in range(3):
            assert len({tid for wi, tid in got.values() if wi == w}) == 1


@pytest.mark.parametrize("engine,kind", ENGINES)
def test_bitwise_reproducible(engine, kind, monkeypatch):
    """Five calls, forward and backward: every output the same bits (2 threads; the scipy
    engine's work cut into many small items so that its pool is busy)."""
    monkeypatch.setenv("FLASHCONV_NUM_THREADS", "2")
    monkeypatch.setattr(_cpu, "_CHUNK_BYTES", 40000)
    L, lk = (4096, 16) if engine == "cpu_overlap_save" else (2500, 2500)
    rng = np.random.default_rng(6)
    B, H = 4, 8  # B * H * L above _cpu._PARALLEL_MIN_ELEMS: the pool runs
    u, gi, go, dy = (rng.standard_normal((B, H, L)) for _ in range(4))
    k = rng.standard_normal((H, lk)) / np.sqrt(lk)
    D = rng.standard_normal(H)
    kr = None if engine == "cpu_overlap_save" else k[:, :50].copy()
    outs = []
    for _ in range(5):
        y, _ = forward(engine, kind, "float32", u, k, D, g_in=gi, g_out=go, k_rev=kr)
        res = [y]
        if engine != "cpu_overlap_save":
            g, _ = backward(engine, kind, "float32", dy, u, k, D, g_in=gi, g_out=go, k_rev=kr)
            res += [g[key] for key in GRAD_KEYS]
        outs.append(res)
    for res in outs[1:]:
        for a, b in zip(outs[0], res):
            assert (a is None and b is None) or np.array_equal(a, b)
