"""Dispatch: the first engine of flashconv.engines.TABLE whose check says yes serves a call.

    select(problem)          -> the engine module (or RuntimeError naming every reason)
    run_forward(p, operands) -> y                 run_backward(p, operands, dy) -> 6 gradients
    explain_problem(p)       -> text: the engine chosen and, for each engine before it, why not
    use_engines(*names)      context manager restricting the table (also FLASHCONV_ENGINES)

An empty problem (B * H * L == 0) runs no engine: its result is zeros.

When CUDA tensors arrive and the extension cannot use the device (not built, no driver, a
driver older than its CUDA runtime, no device), the call runs on the next engine that serves
it (torch.fft on the GPU) and flashconv warns once per reason, naming it and what runs instead;
FLASHCONV_REQUIRE_KERNEL=1 turns that fallback into a RuntimeError. Calls the kernels do not
serve for reasons of the call itself (float64, a natural spectrum) fall back silently.
"""
import contextlib
import contextvars
import os
import warnings

from flashconv import engines as _engines
from flashconv.engines import _cuda

__all__ = ["select", "walk", "run_forward", "run_backward", "explain_problem", "use_engines",
           "allowed_engines", "NoEngineError", "KernelFallbackWarning"]

_restriction = contextvars.ContextVar("flashconv_engines", default=None)
_warned = set()


class NoEngineError(RuntimeError):
    """No engine of the allowed set serves a call."""


class KernelFallbackWarning(RuntimeWarning):
    """CUDA tensors arrived but the CUDA kernels cannot run on this machine."""


def _parse(names, where):
    if isinstance(names, str):
        names = [n for n in names.replace(",", " ").split() if n]
    names = tuple(names)
    unknown = [n for n in names if n not in _engines.BY_NAME]
    if unknown:
        raise ValueError("%s: unknown engine(s) %s; the engines are %s"
                         % (where, ", ".join(map(repr, unknown)), ", ".join(_engines.NAMES)))
    if not names:
        raise ValueError("%s: name at least one engine (%s)" % (where, ", ".join(_engines.NAMES)))
    return names


def allowed_engines():
    """(names, source): the engines calls may use now and where the restriction comes from
    ("use_engines", "FLASHCONV_ENGINES" or "" for the whole table)."""
    r = _restriction.get()
    if r is not None:
        return r, "use_engines"
    env = os.environ.get("FLASHCONV_ENGINES", "").strip()
    if env:
        return _parse(env, "FLASHCONV_ENGINES"), "FLASHCONV_ENGINES"
    return _engines.NAMES, ""


@contextlib.contextmanager
def use_engines(*names):
    """Restrict fftconv to these engines (names, or one list / comma-separated string) inside
    the block; the table's order still decides among them. A call none of them serves raises
    NoEngineError with each one's reason. Overrides FLASHCONV_ENGINES; nests (innermost wins).

        with flashconv.use_engines("torch_fft"):          # e.g. benchmark the fallback
            y = flashconv.fftconv(u, k, D)
    """
    if len(names) == 1 and not isinstance(names[0], str):
        names = tuple(names[0])
    token = _restriction.set(_parse(names if len(names) != 1 else names[0], "use_engines"))
    try:
        yield
    finally:
        _restriction.reset(token)


def walk(p):
    """[(engine, reason)] in table order up to and including the first engine that serves p
    (reason None); reason "not in the allowed set ..." for engines a restriction excludes."""
    allowed, source = allowed_engines()
    out = []
    for e in _engines.TABLE:
        if e.NAME not in allowed:
            out.append((e, "not in the allowed set (%s)" % source))
            continue
        why = e.check(p)
        if why is None and p.backward and e.backward is None:
            why = "forward only"
        out.append((e, why))
        if why is None:
            break
    return out


def select(p):
    """The engine module serving problem p (see the module docstring for the fallback warning)."""
    steps = walk(p)
    engine, why = steps[-1]
    if why is not None:
        allowed, source = allowed_engines()
        raise NoEngineError(
            "fftconv: no engine%s can serve this call (%s):\n%s"
            % (" in the allowed set %s (%s)" % (", ".join(allowed), source) if source else "",
               p.summary(), "\n".join("  %s: %s" % (e.NAME, w) for e, w in steps
                                      if e.NAME in allowed)))
    if p.device_type == "cuda" and not engine.NAME.startswith("cuda_"):
        _kernel_fallback(p, engine, steps)
    return engine


def _kernel_fallback(p, engine, steps):
    reason = _cuda.unavailable_reason()
    if not reason or not any(e.NAME.startswith("cuda_") and w == reason for e, w in steps):
        return  # the kernels run here; this call is simply not theirs (dtype, spectrum, ...)
    msg = ("flashconv: CUDA tensors, but the CUDA kernels cannot run: %s. Running %s (%s) "
           "instead." % (reason, engine.NAME, engine.DESCRIPTION))
    if _cuda.require_kernel():
        raise RuntimeError(msg + " (FLASHCONV_REQUIRE_KERNEL is set)")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(msg + " Set FLASHCONV_REQUIRE_KERNEL=1 to make this an error.",
                      KernelFallbackWarning, stacklevel=4)


def run_forward(p, a):
    """y for problem p and operands a (zeros for an empty problem)."""
    if p.numel == 0:
        return _zeros_like_u(p, a)
    return select(p).forward(p, a)


def run_backward(p, a, dy):
    """(du, dk, dD, dg_in, dg_out, dk_rev) for p (a backward Problem: p.mask says which)."""
    if p.numel == 0:
        return _zero_grads(p, a)
    return select(p).backward(p, a, dy, p.mask)


def _zeros_like_u(p, a):
    if p.kind == "numpy":
        import numpy as np

        return np.zeros(a.u.shape, a.u.dtype)
    return a.u.new_zeros(a.u.shape)


def _zero_grads(p, a):
    out = []
    for x, m in zip((a.u, a.k, a.D, a.g_in, a.g_out, a.k_rev), p.mask):
        if not m:
            out.append(None)
        elif p.kind == "numpy":
            import numpy as np

            out.append(np.zeros(x.shape, x.dtype))
        else:
            out.append(x.new_zeros(x.shape))
    return tuple(out)


def explain_problem(p, directions=("forward", "backward")):
    """Text: for each direction, the call and each engine in table order up to the one that
    serves it, with the reason for each one before it."""
    lines = []
    for d in directions:
        q = p if p.direction == d else p.with_direction(d)
        lines.append(q.summary())
        if q.numel == 0:
            lines.append("  (empty: B * H * L = 0, the result is zeros; no engine runs)")
            continue
        steps = walk(q)
        width = max(len(e.NAME) for e in _engines.TABLE)
        previous = None
        for e, why in steps:
            if why is None:
                lines.append("  %-*s  <- serves it: %s" % (width, e.NAME, e.DESCRIPTION))
            else:
                lines.append("  %-*s  no: %s" % (width, e.NAME,
                                                 "(as above)" if why == previous else why))
            previous = why
        if steps[-1][1] is not None:
            lines.append("  no engine can serve this call: it raises NoEngineError")
        elif q.device_type == "cuda" and not steps[-1][0].NAME.startswith("cuda_"):
            reason = _cuda.unavailable_reason()
            if reason and any(e.NAME.startswith("cuda_") and w == reason for e, w in steps):
                lines.append("  (a real call warns once about this fallback; "
                             "FLASHCONV_REQUIRE_KERNEL=1 makes it an error)")
        if (q.device_type == "cuda" and _cuda.unavailable_reason()
                and any(e.NAME.startswith("cuda_") for e, w in steps if w)):
            lines.append("  (explain(..., assume_gpu=True) or --assume-gpu: what a usable GPU "
                         "would run)")
    return "\n".join(lines)
