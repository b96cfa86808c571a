"""Long Range Arena training speed: Transformer vs S4D on torch.fft vs S4D on flashconv.

    python bench/lra.py                 # GPU: the S4 LRA configurations; CPU: scaled-down shapes
    python bench/lra.py --quick         # tiny shapes (smoke test, well under a minute on a CPU)
    python bench/lra.py --full-shapes   # the real configurations even on a CPU (very slow)

The H3 paper (arXiv 2212.14052, the LRA speed table) reports, averaged over five LRA tasks
without Path-X and relative to a standard Transformer: FlashAttention 2.4x, S4 2.9x, S4
with FlashConv 5.8x. This script times one full training step (forward, loss, backward,
AdamW step) of each model on every LRA task shape, on synthetic tokens/pixels generated
before timing (data loading is not timed), and reports the peak memory of training:

    transformer_math  Transformer, standard attention (SDPA math backend: materialises L x L)
    transformer       Transformer, F.scaled_dot_product_attention (the flash backend on GPU):
                      the 1x baseline of the table
    s4d_torchfft      S4D, bidirectional, convolution by torch.fft (fftconv_ref + the k_rev term)
    s4d_flashconv     the same S4D network on flashconv.fftconv

Task shapes and model configurations are those of the S4 repository's LRA experiments
(state-spaces/s4, configs/experiment/lra/s4-{listops,imdb,aan,cifar,pathfinder,pathx}.yaml):
6 layers, d_model 256 (Image 512), bidirectional SSM with a GLU output, BatchNorm,
mean pooling; see TASKS. The Transformer has the same width and depth.

GPU: CUDA-event timing (median of --steps after --warmup steps), peak memory by
torch.cuda.max_memory_allocated from model creation on, bf16 autocast (--precision).
CPU: without a GPU the script still runs, on shapes scaled down so that it finishes in
about two minutes on two cores (shorter sequences, fewer and narrower layers, tiny
batches; said in the output and the JSON), float32, wall-clock timing, and peak memory as
the growth of the process's peak resident set (an approximation). CPU numbers say
nothing about the GPU speedups.

A JSON report goes to bench/results/lra_<date>_<device>.json (or --out).
"""
import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import os
import platform
import re
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import flashconv  # noqa: E402
from bench._common import cuda_event_time, report_path, write_report  # noqa: E402
from flashconv.nn import S4D  # noqa: E402
from sweep import cpu_name, git_commit  # noqa: E402

S4_CONFIGS = "state-spaces/s4 configs/experiment/lra/"


@dataclasses.dataclass(frozen=True)
class Task:
    """One LRA task: data shape, the S4 configuration, and its source."""

    name: str
    L: int            # sequence length (per document for Retrieval)
    batch: int        # examples per step (document pairs for Retrieval)
    d_model: int
    n_layers: int
    d_state: int      # S4's N: N/2 complex modes per channel
    prenorm: bool
    dropout: float
    n_classes: int
    vocab: int        # token vocabulary; 0: one grayscale pixel value per position
    dual: bool        # Retrieval: two documents through one encoder, then a matching head
    lr: float         # AdamW learning rate of the config (SSM dynamics get 1e-3, no decay)
    source: str       # the S4 config file

    def config(self):
        return dataclasses.asdict(self)


# From the S4 repository's LRA experiment configs (read with the search tool): n_layers 6,
# d_model 256 (cifar: 512), norm: batch, decoder mode: pool (cifar's pipeline default is
# pool too), layer.bidirectional: true, final_act: glu, dt_min 1e-3 (pathx 1e-4), weight
# decay 0.05, SSM lr 1e-3. d_state, prenorm, dropout, batch size and lr differ per task.
# Vocab sizes are approximate (LRA's ListOps has 15 symbols plus padding; Text and
# Retrieval are byte-level): they only size the embedding table.
TASKS = [
    Task("ListOps", 2048, 32, 256, 6, 4, False, 0.0, 10, 18, False, 0.01, "s4-listops.yaml"),
    Task("Text", 4096, 16, 256, 6, 4, True, 0.0, 2, 256, False, 0.01, "s4-imdb.yaml"),
    Task("Retrieval", 4000, 64, 256, 6, 4, True, 0.0, 2, 256, True, 0.01, "s4-aan.yaml"),
    Task("Image", 1024, 50, 512, 6, 64, False, 0.1, 10, 0, False, 0.01, "s4-cifar.yaml"),
    Task("Pathfinder", 1024, 64, 256, 6, 64, True, 0.0, 2, 0, False, 0.004, "s4-pathfinder.yaml"),
    Task("Path-X", 16384, 16, 256, 6, 64, True, 0.0, 2, 0, False, 0.001, "s4-pathx.yaml"),
]
PATH_X = "Path-X"

# Scaled-down shapes for machines without a GPU: (L divisor, d_model divisor, layers, batch).
# "cpu" keeps every task's sequence long enough for the convolution to matter and runs
# in about two minutes on two cores; "quick" is a smoke test.
SCALES = {"cpu": (8, 4, 2, 2), "quick": (32, 8, 1, 2)}

MODELS = {
    "transformer_math": "Transformer (standard attention)",
    "transformer": "Transformer (SDPA)",
    "s4d_torchfft": "S4D (torch.fft)",
    "s4d_flashconv": "S4D (flashconv)",
}
BASELINE = "transformer"
# H3 paper, LRA speed table: speedup over a standard Transformer, mean of five tasks.
PAPER = {"transformer_math": 1.0, "flash_attention": 2.4, "s4": 2.9, "s4_flashconv": 5.8}


def scaled_tasks(shapes):
    """TASKS for ``shapes`` in {"full", "cpu", "quick"}: scaled copies for the CPU."""
    if shapes == "full":
        return list(TASKS)
    l_div, d_div, layers, batch = SCALES[shapes]
    out = []
    for t in TASKS:
        # Retrieval's batch counts pairs: one pair is already two sequences.
        b = max(1, batch // 2) if t.dual else batch
        out.append(dataclasses.replace(t, L=t.L // l_div, d_model=t.d_model // d_div, n_layers=layers,
                                       batch=b))
    return out


# ------------------------------------------------------------------------ models


def fftconv_torch(u, k, D, k_rev=None):
    """The torch.fft convolution of the S4/H3 code bases, with H3's anti-causal term.

    u (B, H, L); k, k_rev (H, L); D (H,). FFT size 2L, spectrum rfft(k) + conj(rfft(k_rev)):
    the conjugate is the time-reversed kernel, so ``y[t] += sum_s k_rev[s] u[t+s]``, and
    2L leaves room for every lag without wrap-around. Computes in k's dtype (float32 under
    autocast too), as ``flashconv.reference.fftconv_ref`` does.
    """
    L = u.shape[-1]
    n = 2 * L
    k_f = torch.fft.rfft(k, n=n)  # (H, L+1) complex
    if k_rev is not None:
        k_f = k_f + torch.fft.rfft(k_rev, n=n).conj()
    u_f = torch.fft.rfft(u.to(k.dtype), n=n)  # (B, H, L+1) complex
    y = torch.fft.irfft(u_f * k_f, n=n)[..., :L]
    return (y + u * D.unsqueeze(-1)).to(u.dtype)


class TorchFFTS4D(S4D):
    """S4D whose convolution is the torch.fft baseline: same parameters, same network."""

    def conv(self, x, k, k_rev):
        return fftconv_torch(x, k, self.D, k_rev)


class ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of a (B, L, d) sequence (S4's ``norm: batch``)."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Attention(nn.Module):
    """Non-causal multi-head self-attention through F.scaled_dot_product_attention.

    ``backends`` restricts SDPA's choice (torch.nn.attention.sdpa_kernel): MATH is the
    standard attention that materialises the L x L scores; FLASH_ATTENTION is pinned on
    GPU so a silent fallback cannot pass for FlashAttention; None lets SDPA pick.
    """

    def __init__(self, d, heads, dropout, backends=None):
        super().__init__()
        self.heads, self.dropout, self.backends = heads, dropout, backends
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B, L, d = x.shape
        # (3, B, heads, L, d/heads)
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        ctx = contextlib.nullcontext()
        if self.backends is not None:
            from torch.nn.attention import sdpa_kernel
            ctx = sdpa_kernel(self.backends)
        with ctx:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(B, L, d))


class MLP(nn.Sequential):
    def __init__(self, d, dropout):
        super().__init__(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))


class Residual(nn.Module):
    """``x + Dropout(f(norm(x)))`` (prenorm) or ``norm(x + Dropout(f(x)))`` (postnorm)."""

    def __init__(self, f, norm, dropout, prenorm):
        super().__init__()
        self.f, self.norm, self.prenorm = f, norm, prenorm
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        if self.prenorm:
            return x + self.drop(self.f(self.norm(x)))
        return self.norm(x + self.drop(self.f(x)))


class RetrievalHead(nn.Module):
    """Document matching (LRA Retrieval): MLP on [a, b, a - b, a * b] of the two pooled encodings."""

    def __init__(self, d, n_classes):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * d, d), nn.ReLU(), nn.Linear(d, d // 2), nn.ReLU(),
                                 nn.Linear(d // 2, n_classes))

    def forward(self, pooled):
        a, b = pooled.chunk(2, dim=0)  # the batch holds all first documents, then all second
        return self.mlp(torch.cat([a, b, a - b, a * b], dim=-1))


class LRAModel(nn.Module):
    """Encoder -> residual blocks -> mean pool -> classifier (or the Retrieval head).

    Input: (B, L) token ids, or (B, L) pixel values in [0, 1] for the image tasks (one
    grayscale value per position, embedded by a linear map as S4 does). For Retrieval
    the batch holds 2B sequences: B first documents, then their B partners.
    """

    def __init__(self, task, blocks, norm, positions=False):
        super().__init__()
        d = task.d_model
        self.task = task
        self.encoder = nn.Embedding(task.vocab, d) if task.vocab else nn.Linear(1, d)
        # Attention needs positions; the SSMs see order through their kernels.
        self.pos = nn.Parameter(0.02 * torch.randn(1, task.L, d)) if positions else None
        self.blocks = nn.ModuleList(blocks)
        # A prenorm stack leaves its last residual sum unnormalised: normalise before pooling.
        self.final_norm = norm(d) if task.prenorm else nn.Identity()
        self.head = RetrievalHead(d, task.n_classes) if task.dual else nn.Linear(d, task.n_classes)

    def forward(self, x):
        h = self.encoder(x if self.task.vocab else x.unsqueeze(-1))  # (B, L, d)
        if self.pos is not None:
            h = h + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.final_norm(h).mean(dim=1))


def _attention_backends(name, device):
    from torch.nn.attention import SDPBackend
    if name == "transformer_math":
        return [SDPBackend.MATH]
    if device.type == "cuda":
        return [SDPBackend.FLASH_ATTENTION]
    return None  # CPU: SDPA's own choice (its fused CPU kernel for these inputs)


def build_model(name, task, device=torch.device("cpu")):
    """The model ``name`` (a key of MODELS) for ``task``, on ``device``."""
    d, p = task.d_model, task.dropout
    if name.startswith("transformer"):
        heads = 8 if d >= 512 else 4  # head_dim 64 at the S4 widths
        backends = _attention_backends(name, device)
        blocks = []
        for _ in range(task.n_layers):
            blocks.append(Residual(Attention(d, heads, p, backends), nn.LayerNorm(d), p, task.prenorm))
            blocks.append(Residual(MLP(d, p), nn.LayerNorm(d), p, task.prenorm))
        model = LRAModel(task, blocks, nn.LayerNorm, positions=True)
    elif name in ("s4d_torchfft", "s4d_flashconv"):
        layer = TorchFFTS4D if name == "s4d_torchfft" else S4D
        dt_min = 1e-4 if task.name == PATH_X else 1e-3
        blocks = [Residual(layer(d, task.d_state, dropout=p, dt_min=dt_min, dt_max=0.1, lr=1e-3,
                                 bidirectional=True), ChannelBatchNorm(d), p, task.prenorm)
                  for _ in range(task.n_layers)]
        model = LRAModel(task, blocks, ChannelBatchNorm)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return model.to(device)


def make_optimizer(model, task):
    """AdamW as S4 trains: SSM dynamics (marked ``_optim`` by S4DKernel) get lr 1e-3, no decay."""
    plain, groups = [], {}
    for p in model.parameters():
        hint = getattr(p, "_optim", None)
        if hint is None:
            plain.append(p)
        else:
            groups.setdefault(tuple(sorted(hint.items())), []).append(p)
    param_groups = [{"params": plain}] + [{"params": ps, **dict(h)} for h, ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=task.lr, weight_decay=0.05)


def make_batch(task, device, gen):
    """Synthetic inputs and labels, generated on the CPU with ``gen`` and moved to ``device``."""
    n_seq = 2 * task.batch if task.dual else task.batch
    if task.vocab:
        x = torch.randint(task.vocab, (n_seq, task.L), generator=gen)
    else:
        x = torch.rand(n_seq, task.L, generator=gen)
    y = torch.randint(task.n_classes, (task.batch,), generator=gen)
    return x.to(device), y.to(device)


# ------------------------------------------------------------------------ measuring


def _rss_kib(field):
    """VmRSS / VmHWM of this process in KiB (Linux), or None."""
    try:
        m = re.search(r"^%s:\s+(\d+)\s+kB" % field, Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _release_cpu_memory():
    """Return freed heap pages to the OS so that the resident set tracks live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CPUPeakMemory:
    """Peak resident-set growth over a region, via Linux's resettable high-water mark.

    Writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS; VmHWM after
    the region minus RSS before it is the peak growth. It counts every allocator
    (torch, numpy, scipy's FFT buffers) but also allocator slack and first-use library
    state, so it is an approximation of the GPU's max_memory_allocated.
    """

    def __enter__(self):
        _release_cpu_memory()
        self.base = _rss_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.ok = self.base is not None
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc):
        hwm = _rss_kib("VmHWM") if self.ok else None
        self.peak_bytes = None if hwm is None else max(0, hwm - self.base) * 1024
        return False


def measure(name, task, device, precision, steps, warmup, seed=0):
    """Median time of one training step of ``name`` on ``task`` and its peak memory.

    Returns a dict: status ("ok" | "oom" | "error"), step_s, step_times_s, peak_mem_bytes,
    params, and the error text when it failed.
    """
    gen = torch.Generator().manual_seed(seed)
    x, y = make_batch(task, device, gen)  # before timing: data loading is not measured
    cuda = device.type == "cuda"
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and precision == "bfloat16"
           else contextlib.nullcontext())
    model = opt = None
    result = {"status": "ok"}
    try:
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            mem = contextlib.nullcontext()
            base = torch.cuda.memory_allocated(device)
        else:
            mem = CPUPeakMemory()
        with mem:
            torch.manual_seed(seed)
            model = build_model(name, task, device).train()
            opt = make_optimizer(model, task)

            def step():
                with amp:
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(warmup):  # allocates optimizer state, warms caches and plans
                step()
            times = []
            for _ in range(steps):
                if cuda:
                    times.append(cuda_event_time(step))
                else:
                    t0 = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - t0)
        result["step_s"] = statistics.median(times)
        result["step_times_s"] = times
        result["peak_mem_bytes"] = (torch.cuda.max_memory_allocated(device) - base if cuda
                                    else mem.peak_bytes)
        result["params"] = sum(p.numel() for p in model.parameters())
    except torch.cuda.OutOfMemoryError as exc:
        result = {"status": "oom", "error": str(exc).splitlines()[0]}
    except RuntimeError as exc:  # e.g. no flash-attention kernel for this GPU/dtype
        result = {"status": "error", "error": "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0])}
    finally:
        model = opt = None  # drop the references before freeing memory for the next model
        if cuda:
            torch.cuda.empty_cache()
        else:
            _release_cpu_memory()
    return result


# ------------------------------------------------------------------------ reporting


def _fmt_time(s):
    if s >= 1:
        return "%.2f s" % s
    return "%.1f ms" % (s * 1e3)


def _fmt_mem(b):
    if b is None:
        return "n/a"
    return "%.2f GB" % (b / 1e9) if b >= 1e9 else "%.1f MB" % (b / 1e6)


def _speedups(tasks, models, base, key):
    """Set r[key] = time(base) / time(model) per task, where both ran."""
    for t in tasks:
        b = t["results"].get(base, {})
        for m in models:
            r = t["results"][m]
            ok = r["status"] == "ok" and b.get("status") == "ok"
            r[key] = b["step_s"] / r["step_s"] if ok else None


def _mean_over_tasks(tasks, models, key):
    """Mean of r[key] over the five tasks without Path-X where it exists, and the count."""
    means, counts = {}, {}
    for m in models:
        vals = [t["results"][m][key] for t in tasks if t["name"] != PATH_X and t["results"][m][key] is not None]
        means[m] = statistics.mean(vals) if vals else None
        counts[m] = len(vals)
    return means, counts


def summarise(tasks, models):
    """Per-task speedups over BASELINE and their mean over the five tasks without Path-X.

    When the standard-attention Transformer ran, the same ratios re-based on it (the
    paper's normalisation) are given too, averaged over the tasks where it fit in memory.
    """
    _speedups(tasks, models, BASELINE, "speedup")
    mean, count = _mean_over_tasks(tasks, models, "speedup")
    summary = {"baseline": BASELINE, "mean_speedup_5_tasks": mean, "tasks_in_mean": count,
               "path_x_speedup": {m: t["results"][m]["speedup"] for t in tasks if t["name"] == PATH_X
                                  for m in models if t["results"][m]["speedup"] is not None}}
    if "transformer_math" in models:
        _speedups(tasks, models, "transformer_math", "speedup_vs_standard_attention")
        mean, count = _mean_over_tasks(tasks, models, "speedup_vs_standard_attention")
        summary["mean_speedup_vs_standard_attention"] = mean
        summary["tasks_in_mean_vs_standard_attention"] = count
    return summary


def print_table(report):
    models = report["models"]
    tasks = report["tasks"]
    where = "CPU" if report["device"] == "cpu" else "GPU " + report["device"]
    print("\nLRA training step on %s, %s%s" % (
        where, report["precision"],
        ", SCALED-DOWN shapes (%s): not the paper's configurations" % report["shapes"]
        if report["scaled_down"] else ", S4 LRA configurations"))
    print("time per step (median) and speedup over %s = 1x" % MODELS[BASELINE])
    w = 24
    hdr = "%-11s %6s %4s %4s %3s |" % ("task", "L", "B", "d", "n") + "".join(" %*s" % (w, MODELS[m]) for m in models)
    print(hdr)
    print("-" * len(hdr))

    def cell(r):
        if r["status"] != "ok":
            return r["status"].upper()
        return "%s %5.2fx" % (_fmt_time(r["step_s"]), r["speedup"]) if r["speedup"] is not None \
            else _fmt_time(r["step_s"])

    def row(t):
        return "%-11s %6d %4d %4d %3d |" % (t["name"], t["L"], t["batch"], t["d_model"], t["n_layers"]) + \
            "".join(" %*s" % (w, cell(t["results"][m])) for m in models)

    for t in tasks:
        if t["name"] != PATH_X:
            print(row(t))
    summ = report["summary"]
    mean = summ["mean_speedup_5_tasks"]
    print("-" * len(hdr))
    print("%-33s |" % "mean speedup, 5 tasks" + "".join(
        " %*s" % (w, "n/a" if mean[m] is None else "%.2fx" % mean[m]) for m in models))
    for t in tasks:
        if t["name"] == PATH_X:
            print(row(t) + "   (separately: not in the mean)")
    vs = summ.get("mean_speedup_vs_standard_attention")
    if vs:
        n = max(summ["tasks_in_mean_vs_standard_attention"].values())
        print("%-33s |" % ("vs standard attn, mean of %d" % n) + "".join(
            " %*s" % (w, "n/a" if vs[m] is None else "%.2fx" % vs[m]) for m in models))
    print("H3 paper (A100, over a standard Transformer, 5 tasks): FlashAttention %.1fx, S4 %.1fx, "
          "S4 with FlashConv %.1fx" % (PAPER["flash_attention"], PAPER["s4"], PAPER["s4_flashconv"]))
    print("\npeak memory of training (%s)" % ("torch.cuda.max_memory_allocated" if report["device"] != "cpu"
                                              else "CPU: peak resident-set growth, approximate"))
    print("%-11s |" % "task" + "".join(" %*s" % (w, MODELS[m]) for m in models))
    for t in tasks:
        print("%-11s |" % t["name"] + "".join(
            " %*s" % (w, _fmt_mem(t["results"][m].get("peak_mem_bytes"))) for m in models))
    if report["scaled_down"]:
        print("\nNOTE: %s" % report["note"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one timed step (smoke test)")
    ap.add_argument("--full-shapes", action="store_true", help="the S4 configurations even without a GPU")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--precision", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="auto: bf16 autocast on GPU, float32 on CPU")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of: " + ",".join(t.name for t in TASKS))
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ",".join(MODELS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and flashconv's CPU engine (default: torch's default); "
                         "1 gives steadier numbers on a machine shared with other jobs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON report")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
        os.environ["FLASHCONV_NUM_THREADS"] = str(args.threads)  # read by the CPU engine per call

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    shapes = "quick" if args.quick else ("full" if cuda or args.full_shapes else "cpu")
    precision = args.precision if args.precision != "auto" else ("bfloat16" if cuda else "float32")
    if precision == "bfloat16" and not cuda:
        ap.error("--precision bfloat16 is for GPUs: CPU bf16 matmuls would time the emulation, not the model")
    steps = args.steps or (10 if cuda else (1 if args.quick else 3))
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error("unknown model %r; choose from %s" % (m, ", ".join(MODELS)))
    if BASELINE not in models:
        ap.error("--models must include the baseline %r" % BASELINE)
    tasks = scaled_tasks(shapes)
    if args.tasks:
        wanted = [s.strip() for s in args.tasks.split(",")]
        unknown = set(wanted) - {t.name for t in tasks}
        if unknown:
            ap.error("unknown task(s) %s" % ", ".join(sorted(unknown)))
        tasks = [t for t in tasks if t.name in wanted]

    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    note = ""
    if shapes != "full":
        l_div, d_div, layers, batch = SCALES[shapes]
        note = ("%s: shapes scaled down from the S4 LRA configurations (L/%d, d_model/%d, %d layer(s), "
                "batch %d, float32 on CPU). These are CPU timings of tiny models: they check that the "
                "benchmark runs and say nothing about the GPU speedups." % (
                    "CPU" if not cuda else "quick", l_div, d_div, layers, batch))
    if not cuda:
        print("No GPU: timing on the CPU with scaled-down shapes (%s)." % shapes if shapes != "full"
              else "No GPU: timing the full S4 LRA configurations on the CPU (slow).")
    print("LRA speed: %d task(s) x %d model(s), %d warm-up + %d timed step(s) each, %s, %s"
          % (len(tasks), len(models), warmup, steps, dev_name, precision), flush=True)

    report = {
        "kind": "lra_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": socket.gethostname(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "flashconv_cpu_threads": flashconv._cpu.num_threads(),
        "device": dev_name,
        "precision": precision if cuda else "float32",
        "shapes": shapes,
        "scaled_down": shapes != "full",
        "note": note,
        "timing": ("CUDA events, median of %d steps after %d warm-up" if cuda
                   else "wall clock (perf_counter), median of %d steps after %d warm-up") % (steps, warmup),
        "memory": ("torch.cuda.max_memory_allocated from model creation on (parameters, optimizer "
                   "state, activations)" if cuda else
                   "peak resident-set growth from model creation on (VmHWM reset by /proc/self/clear_refs); "
                   "approximate"),
        "versions": {"flashconv": flashconv.__version__, "python": platform.python_version(),
                     "torch": torch.__version__, "cuda": torch.version.cuda},
        "engines": flashconv.info()["engines"],
        "models": {m: MODELS[m] for m in models},
        "attention": {"heads": "4 (d_model 256), 8 (d_model 512); head_dim d_model/heads", "mlp": "4x, GELU",
                      "positions": "learned", "sdpa_backend": "FLASH_ATTENTION pinned" if cuda
                      else "SDPA default selection (CPU)", "transformer_math": "SDPBackend.MATH"},
        "s4d": {"init": "S4D-Lin (S4's configs use init: legs; the kernel's cost does not depend on it)",
                "channels": "one S4D kernel of 2*d_model channels: forward half k, backward half k_rev",
                "conv_under_autocast": "flashconv: the autocast dtype; torch.fft: float32 (fftconv_ref)"},
        "paper_reference": {"source": "H3 paper (arXiv 2212.14052), LRA speed table, 5-task mean",
                            "speedup_over_standard_transformer": PAPER},
        "tasks": [],
    }
    # One untimed step of every model on a tiny task first: the one-off costs of a process
    # (thread pools, FFT plans, kernel selection, allocator growth) would otherwise be
    # charged to whichever measurement comes first.
    tiny = dataclasses.replace(scaled_tasks("quick")[0], L=64, batch=2)
    for m in models:
        measure(m, tiny, device, precision, steps=1, warmup=0)
    n_meas = len(tasks) * len(models)
    t_start = time.perf_counter()
    i = 0
    for task in tasks:
        full = next(t for t in TASKS if t.name == task.name)
        entry = {"name": task.name, "L": task.L, "batch": task.batch, "d_model": task.d_model,
                 "n_layers": task.n_layers, "config": task.config(), "paper_config": full.config(),
                 "scaled_from": {"L": full.L, "batch": full.batch, "d_model": full.d_model,
                                 "n_layers": full.n_layers},
                 "source": S4_CONFIGS + task.source, "results": {}}
        for m in models:
            i += 1
            r = measure(m, task, device, precision, steps, warmup)
            entry["results"][m] = r
            elapsed = time.perf_counter() - t_start
            eta = elapsed / i * (n_meas - i)
            what = ("%s/step, peak %s" % (_fmt_time(r["step_s"]), _fmt_mem(r["peak_mem_bytes"]))
                    if r["status"] == "ok" else "%s (%s)" % (r["status"].upper(), r["error"][:80]))
            print("[%2d/%d] %-10s L=%-5d %-34s %s   elapsed %.0fs, ETA %.0fs"
                  % (i, n_meas, task.name, task.L, MODELS[m], what, elapsed, eta), flush=True)
        report["tasks"].append(entry)
    report["summary"] = summarise(report["tasks"], models)
    report["wall_s"] = time.perf_counter() - t_start
    print_table(report)

    write_report(report_path(args.out, "lra", dev_name, quick=shapes == "quick"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
