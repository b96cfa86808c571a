"""H3 paper Table 1 synthetic language tasks on the CPU: induction head, associative recall.

Trains 2-layer language models of the same width, one per (task, mixer), with
mixer in {H3, S4D, attention}, and reports last-token accuracy on a held-out set::

    python bench/synthetic.py            # all six runs (about 10 min on 2 cores), JSON kept
    python bench/synthetic.py --quick    # tiny smoke run (seconds), nothing written

Data, generated on the fly from fixed seeds, follows the ICL synthetics of the H3/safari
code base (``src/dataloaders/synthetics.py``). ``vocab`` counts two special tokens as
there: the copy prefix ``=>`` (id vocab-2) and a no-op token (id vocab-1) that is never
emitted, because queries always ask for a key that is present. ``seq_len`` counts every
input token; the target is the token that follows the input.

* Induction head (seq_len 30, vocab 20): seq_len-1 tokens drawn uniformly from the
  vocab-2 ordinary tokens; one position p in [0, seq_len-3] is overwritten with ``=>``;
  the input ends with ``=>``; the target is the token at p+1, the one that followed the
  first ``=>``.
* Associative recall (seq_len 20, vocab 10): ordinary tokens split into keys (first
  half) and values (second half); each sequence draws its own key -> value map (each
  key an independent uniform value), then (seq_len-2)/2 key-value pairs with keys drawn
  uniformly with replacement, then ``=>`` and a query key drawn uniformly among the keys
  present; the target is the query's value.

Model: token embedding (+ learned positions for attention only; the SSMs see order
through their kernels), 2 pre-LayerNorm residual blocks ``x += mixer(LN(x))``,
``x += MLP(LN(x))`` (4x, GELU), final LayerNorm, linear head. Loss and accuracy are on
the last position only. AdamW, linear warm-up then cosine decay; the SSM dynamics
(log dt, A) get ``min(lr, 1e-3)`` and no weight decay, as in the S4 code base.

The table gives the final test accuracy on 1000 held-out examples and ``step@99%``,
the first evaluation (every ``--eval-every`` steps) at >= 99% test accuracy: with
fresh data every step, how fast a mixer learns a task is what separates them.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flashconv.nn import H3, S4D  # noqa: E402

TASKS = {
    "induction_head": {"seq_len": 30, "vocab": 20},
    "associative_recall": {"seq_len": 20, "vocab": 10},
}
MODELS = ("h3", "s4d", "attention")
# H3 paper (arXiv 2212.14052) Table 1, test accuracy in %.
PAPER = {
    "induction_head": {"s4d": 35.6, "h3": 100.0, "attention": 100.0},
    "associative_recall": {"s4d": 86.0, "h3": 99.8, "attention": 100.0},
}
SSM_LR_CAP = 1e-3


# --------------------------------------------------------------------------- data

def induction_head_batch(batch, seq_len, vocab, generator):
    """Induction-head examples: x (batch, seq_len) int64, y (batch,) int64."""
    if seq_len < 4 or vocab < 4:
        raise ValueError(f"induction head needs seq_len >= 4 and vocab >= 4, got {seq_len}, {vocab}")
    prefix = vocab - 2
    x = torch.randint(0, vocab - 2, (batch, seq_len), generator=generator)
    pos = torch.randint(0, seq_len - 2, (batch,), generator=generator)
    rows = torch.arange(batch)
    x[rows, pos] = prefix
    x[:, -1] = prefix
    return x, x[rows, pos + 1].clone()


def associative_recall_batch(batch, seq_len, vocab, generator):
    """Associative-recall examples: x (batch, seq_len) int64, y (batch,) int64."""
    if seq_len < 4 or seq_len % 2 or vocab < 6:
        raise ValueError(f"associative recall needs an even seq_len >= 4 and vocab >= 6, "
                         f"got {seq_len}, {vocab}")
    n_keys = (vocab - 2) // 2
    n_values = vocab - 2 - n_keys
    n_pairs = (seq_len - 2) // 2
    rows = torch.arange(batch)
    mapping = n_keys + torch.randint(0, n_values, (batch, n_keys), generator=generator)
    keys = torch.randint(0, n_keys, (batch, n_pairs), generator=generator)
    values = torch.gather(mapping, 1, keys)
    present = torch.zeros(batch, n_keys, dtype=torch.bool)
    present[rows.unsqueeze(1), keys] = True
    # Uniform among the keys present: random scores, absent keys masked out.
    scores = torch.rand(batch, n_keys, generator=generator).masked_fill(~present, -1.0)
    query = scores.argmax(1)
    x = torch.empty(batch, seq_len, dtype=torch.int64)
    x[:, 0:-2:2] = keys
    x[:, 1:-2:2] = values
    x[:, -2] = vocab - 2
    x[:, -1] = query
    return x, mapping[rows, query]


GENERATORS = {"induction_head": induction_head_batch, "associative_recall": associative_recall_batch}


# -------------------------------------------------------------------------- models

class CausalSelfAttention(nn.Module):
    """Multi-head causal attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    """Pre-LayerNorm residual block: (B, L, d) -> (B, L, d)."""

    def __init__(self, d_model, mixer):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Embedding -> n_layers Blocks -> LayerNorm -> vocab logits, (B, L) -> (B, L, vocab)."""

    def __init__(self, kind, vocab, seq_len, d_model, n_layers, d_state, n_heads, head_dim):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model) if kind == "attention" else None
        ssm_lr = SSM_LR_CAP

        def mixer():
            if kind == "h3":
                return H3(d_model, d_state, head_dim=head_dim, lr=ssm_lr)
            if kind == "s4d":
                return S4D(d_model, d_state, lr=ssm_lr)
            if kind == "attention":
                return CausalSelfAttention(d_model, n_heads)
            raise ValueError(f"unknown model kind {kind!r}; expected one of {MODELS}")

        self.blocks = nn.ModuleList(Block(d_model, mixer()) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x):
        h = self.embed(x)
        if self.pos is not None:
            h = h + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def param_groups(model, lr, weight_decay):
    """AdamW groups: parameters with an ``_optim`` hint (SSM dynamics) get their own lr
    and decay; biases, norms, embeddings, D terms and SSM C's get no decay."""
    default_decay, default_no_decay, special = [], [], {}
    for name, p in model.named_parameters():
        hint = getattr(p, "_optim", None)
        if hint is not None:
            key = tuple(sorted(hint.items()))
            special.setdefault(key, []).append(p)
        elif p.dim() >= 2 and "embed" not in name and "pos" not in name and "kernel" not in name:
            default_decay.append(p)
        else:
            default_no_decay.append(p)
    groups = [{"params": default_decay, "lr": lr, "weight_decay": weight_decay},
              {"params": default_no_decay, "lr": lr, "weight_decay": 0.0}]
    for key, params in special.items():
        hint = dict(key)
        groups.append({"params": params, "lr": min(lr, hint["lr"]),
                       "weight_decay": hint["weight_decay"]})
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------ training

@dataclasses.dataclass
class Config:
    """One run's settings; every field is also a command-line flag (--d-model etc.)."""

    steps: int = 1200
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: float = 0.05
    d_model: int = 64
    n_layers: int = 2
    d_state: int = 64
    n_heads: int = 4
    head_dim: int = 1
    n_test: int = 1000
    eval_every: int = 100
    log_every: int = 100
    seed: int = 0
    threads: int = 1


QUICK = dict(steps=30, batch=16, d_model=16, d_state=8, n_heads=2, n_test=64,
             eval_every=15, log_every=10)


def evaluate(model, x, y):
    """Last-token (accuracy, loss) of model on x (N, L), targets y (N,)."""
    model.eval()
    with torch.no_grad():
        logits = model(x)[:, -1]
    model.train()
    return (logits.argmax(-1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def train_one(task, kind, cfg, log=print):
    """Train one (task, model) pair; returns a result dict."""
    spec = TASKS[task]
    gen_fn = GENERATORS[task]
    # Separate streams: the test set is the same for every model of a task, and the
    # training stream does not depend on how many test examples were drawn.
    test_gen = torch.Generator().manual_seed(cfg.seed + 10_000)
    x_test, y_test = gen_fn(cfg.n_test, spec["seq_len"], spec["vocab"], test_gen)
    train_gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed)
    model = TinyLM(kind, spec["vocab"], spec["seq_len"], cfg.d_model, cfg.n_layers,
                   cfg.d_state, cfg.n_heads, cfg.head_dim)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay), betas=(0.9, 0.98))
    warmup = max(1, int(cfg.warmup * cfg.steps))

    history = []
    t0 = time.perf_counter()
    run_loss = run_acc = 0.0
    for step in range(1, cfg.steps + 1):
        if step <= warmup:
            scale = step / warmup
        else:
            scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        x, y = gen_fn(cfg.batch, spec["seq_len"], spec["vocab"], train_gen)
        logits = model(x)[:, -1]
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss += loss.item()
        run_acc += (logits.argmax(-1) == y).float().mean().item()
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            entry = {"step": step, "train_loss": run_loss / n, "train_acc": run_acc / n,
                     "elapsed_s": time.perf_counter() - t0}
            msg = (f"  {task:>18s} {kind:>9s} step {step:5d}/{cfg.steps}  "
                   f"loss {entry['train_loss']:.3f}  train acc {100 * entry['train_acc']:5.1f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                entry["test_acc"], entry["test_loss"] = evaluate(model, x_test, y_test)
                msg += f"  test acc {100 * entry['test_acc']:5.1f}"
            log(msg + f"  [{entry['elapsed_s']:.0f}s]")
            history.append(entry)
            run_loss = run_acc = 0.0
    test_acc, test_loss = evaluate(model, x_test, y_test)
    # How fast a model learns the task separates the mixers even where all of them
    # get there eventually: the first evaluation at >= 99% test accuracy.
    solved = [e["step"] for e in history if e.get("test_acc", 0.0) >= 0.99]
    return {"task": task, "model": kind, "steps": cfg.steps, "params": n_params,
            "test_acc": 100 * test_acc, "test_loss": test_loss,
            "first_step_at_99pct": solved[0] if solved else None,
            "wall_s": time.perf_counter() - t0, "paper_test_acc": PAPER[task][kind],
            "history": history}


def format_table(results):
    lines = [f"{'task':<20s} {'model':<10s} {'steps':>6s} {'params':>8s} {'test acc %':>10s} "
             f"{'paper %':>8s} {'step@99%':>9s} {'wall s':>7s}"]
    for r in results:
        first = r["first_step_at_99pct"]
        lines.append(f"{r['task']:<20s} {r['model']:<10s} {r['steps']:>6d} {r['params']:>8d} "
                     f"{r['test_acc']:>10.1f} {r['paper_test_acc']:>8.1f} "
                     f"{'-' if first is None else first:>9} {r['wall_s']:>7.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run; writes JSON only with --out")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/synthetic_<date>_cpu.json)")
    for f in dataclasses.fields(Config):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    args = p.parse_args(argv)

    base = dataclasses.asdict(Config())
    if args.quick:
        base.update(QUICK)
    for name in base:
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    cfg = Config(**base)
    if cfg.steps <= 0 or cfg.batch <= 0 or cfg.n_test <= 0:
        p.error("--steps, --batch and --n-test must be positive")
    torch.set_num_threads(cfg.threads)
    # The fftconv CPU engine has its own thread pool; at these tiny shapes extra threads
    # only contend with torch's, so it gets the same count unless the user set one.
    os.environ.setdefault("FLASHCONV_NUM_THREADS", str(cfg.threads))

    print(f"torch {torch.__version__}, {cfg.threads} thread(s); config {dataclasses.asdict(cfg)}")
    results = []
    t0 = time.perf_counter()
    for task in args.tasks:
        for kind in args.models:
            results.append(train_one(task, kind, cfg))
    total = time.perf_counter() - t0
    print()
    print(format_table(results))
    print(f"total wall time {total:.0f} s")

    out = args.out
    if out is None and not args.quick:
        date = datetime.date.today().strftime("%Y%m%d")
        out = ROOT / "bench" / "results" / f"synthetic_{date}_cpu.json"
    report = {
        "benchmark": "H3 Table 1 synthetic tasks",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": "cpu",
        "torch": torch.__version__,
        "threads": cfg.threads,
        "cpu_count": os.cpu_count(),
        "config": dataclasses.asdict(cfg),
        "seeds": {"model_init": cfg.seed, "train_data": cfg.seed + 1, "test_data": cfg.seed + 10_000},
        "tasks": TASKS,
        "total_wall_s": total,
        "results": results,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
