"""Every code block of README.md, run: an example cannot rot unnoticed (the streaming example
split a 1,000,000-step input into pieces summing to 1,001,000 and failed as written).

- python blocks run in order in one namespace, as a reader pastes them into one session, with
  the sizes below scaled down where the README's would be slow on a 2-core CPU;
- the `$ python -m flashconv explain ...` transcript: the command runs and every line shown
  (up to the "...") is in its output;
- shell blocks: the scripts and pip extras they name exist (installing is not run here);
- plain blocks other than the transcript (the layout tree) name files that exist.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# README text -> what the test runs instead (sizes only; nothing else is changed).
SMALLER = {
    "torch.randn(2, 64, 1_000_000)": "torch.randn(2, 64, 20_000)",  # ssm_conv example: 512 MB
}


def blocks():
    """[(language, text, line)] of README.md's fenced code blocks."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.S | re.M):
        out.append((m.group(1), m.group(2), README[:m.start()].count("\n") + 1))
    return out


def test_readme_has_the_blocks_this_test_knows():
    langs = [lang for lang, _, _ in blocks()]
    assert langs.count("python") >= 4 and "bash" in langs
    assert set(langs) <= {"python", "bash", ""}, langs  # a new kind needs a way to run it here


def test_python_blocks_run_in_order():
    code = [text for lang, text, _ in blocks() if lang == "python"]
    for old, new in SMALLER.items():
        assert sum(old in c for c in code) == 1, "README no longer has %r: update SMALLER" % old
        code = [c.replace(old, new) for c in code]
    ns = {"__name__": "readme"}
    for i, (text, (_, _, line)) in enumerate(zip(code, [b for b in blocks() if b[0] == "python"])):
        try:
            exec(compile(text, "README.md:%d" % line, "exec"), ns)
        except Exception as exc:  # noqa: BLE001 - report which block, then fail
            pytest.fail("README.md python block at line %d failed: %r" % (line, exc))
    # The examples' own claims, checked where they state one.
    torch, flashconv = ns["torch"], ns["flashconv"]
    assert ns["y"].shape == ns["u"].shape  # the last y: ssm_conv's, (B, H, L)
    assert ns["y_piece"].shape[-1] == ns["u"].shape[-1] - 1007
    full = flashconv.fftconv(ns["u"], _s4d_kernel(ns, ns["u"].shape[-1]), ns["D"])
    torch.testing.assert_close(ns["y"], full, rtol=2e-4, atol=2e-4)
    # Streaming: the last piece of the loop equals the tail of the one-call output.
    torch.testing.assert_close(ns["y_piece"], ns["y"][..., 1007:], rtol=2e-4, atol=2e-4)


def _s4d_kernel(ns, L):
    from flashconv.ssm import s4d_kernel

    with ns["torch"].no_grad():
        return s4d_kernel(ns["dA"], ns["dB"], ns["C"], L).float()


def test_explain_transcript_matches():
    """The command runs; its first line is the README's, and the engines it lists come in the
    README's order. (Each engine's reason depends on this machine's built extension, e.g. an
    extension older than the sources lacks a kernel: not compared word for word.)"""
    (text,) = [t for lang, t, _ in blocks() if lang == "" and t.startswith("$ python -m flashconv")]
    lines = text.splitlines()
    cmd = shlex.split(lines[0][2:])
    out = subprocess.run([sys.executable] + cmd[1:], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    got = out.stdout.splitlines()
    shown = lines[1:lines.index("...")] if "..." in lines else lines[1:]
    assert got[0] == shown[0]
    engines = [ln.split()[0] for ln in shown[1:]]
    assert [ln.split()[0] for ln in got[1:1 + len(engines)]] == engines


def test_shell_blocks_name_real_scripts_and_extras():
    setup_py = (ROOT / "setup.py").read_text()
    for lang, text, line in blocks():
        if lang != "bash":
            continue
        for script in re.findall(r"python ((?:bench|scripts)/\S+\.py)", text):
            assert (ROOT / script).is_file(), (line, script)
        for extras in re.findall(r'pip install -e "\.\[([\w,]+)\]"', text):
            for extra in extras.split(","):
                assert '"%s":' % extra in setup_py, (line, extra)


def test_layout_tree_names_real_paths():
    (tree,) = [t for lang, t, _ in blocks() if lang == "" and t.startswith("flashconv/")]
    files = {p.relative_to(ROOT).as_posix() for d in ("flashconv", "cuda", "python_ref", "tests",
                                                       "bench", "docs")
             for p in (ROOT / d).rglob("*") if p.is_file()}
    for name in re.findall(r"([\w/-]+\.(?:py|md|h|cpp))\b", tree):
        assert any(f == name or f.endswith("/" + name) for f in files), name
