"""README.md runs as written: every ```python and ```bash block in it is executed here.

The organism stands in for a 7B model where the README says so: the real-model CLI block reads
``MODEL``, ``DATA`` and ``TRAIN`` from the environment (``${MODEL:-./Llama-2-7b-chat-hf}``), and
this test points them at the organism's directory and files. A few lines are not run here, each
for a stated reason, and each is checked another way instead:

* ``pip install ...`` and the bare ``pytest``: what ``.ci/run`` runs (the test asserts it runs the
  same commands), since installing, or running the suite, from inside the suite is circular;
* ``pinpoint demo``: tests/test_demo.py runs the same command and asserts its targets;
* ``pytest tests/gpu``: needs a CUDA device;
* benchmarks (``python bench/*.py``): too long for CI; run here with ``--help``, and
  ``bash bench/gpu_check.sh`` with ``--dry-run``;
* ``torchrun --nproc_per_node 8 ... tune``: run with 2 processes for 2 steps;
* ``pinpoint sweep``: two methods at two rates on fewer rows.

The bash blocks run in order in one working directory, so later blocks see earlier results
(``runs/locate``).

The five-line API snippet's printed output must be the one the README quotes (heads and the
chosen learning rate exactly; rates to within 2.5 points, about two of its 120 questions,
because float reductions differ between CPUs).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[A-Za-z]*)[ \t]*$")


def blocks(text: str = README) -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block, dedented to its fence."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^{re.escape(m['indent'])}```\s*$", lines[i]):
            body.append(lines[i][len(m["indent"]):] if lines[i].startswith(m["indent"]) else lines[i].lstrip())
            i += 1
        out.append((m["lang"], "\n".join(body) + "\n", start))
        i += 1
    return out


def _commands(code: str) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in code.splitlines() if ln.split("#", 1)[0].strip()]


CI = (ROOT / ".ci" / "run").read_text()


def _ci_runs(cmd: str) -> bool:
    norm = lambda s: " ".join(w for w in shlex.split(s) if w not in ("python3", "-m", "--disable-pip-version-check"))
    return any(norm(cmd) == norm(line) for line in CI.splitlines() if line.strip() and not line.startswith("#"))


def _rewrite(cmd: str) -> str | None:
    """The command this test runs for one README line (None: checked another way, see the
    module docstring)."""
    words = shlex.split(cmd)
    if words[:2] == ["pip", "install"]:
        assert _ci_runs(cmd), f".ci/run does not run README's `{cmd}`"
        return None
    if words[0] == "pytest":
        if words == ["pytest"]:
            assert re.search(r"^pytest\b", CI, re.M), ".ci/run does not run README's bare `pytest`"
        else:
            assert words[1:2] == ["tests/gpu"], f"unexpected pytest line in README: {cmd}"
        return None
    if words[:2] == ["pinpoint", "demo"]:
        assert '"demo"' in (ROOT / "tests" / "test_demo.py").read_text()
        return None
    if words[0] == "python" and words[1].startswith("bench/"):
        return f"{sys.executable} {words[1]} --help"
    if words[:2] == ["bash", "bench/gpu_check.sh"]:
        return "bash bench/gpu_check.sh --dry-run"
    if words[:2] == ["pinpoint", "sweep"]:
        # two methods, two rates, fewer rows: the full grid takes minutes (tests/test_sweep.py
        # covers the rest)
        return cmd + " --methods spt,sft --grid 1e-3,3e-3 --n-eval 24 --n-dialogues 32 --quiet"
    if words[0] == "torchrun":
        # 2 processes and 2 steps instead of 8 GPUs and the full run; explicit lr: the rule's
        # sweep is covered by the CLI block above
        small = re.sub(r"--nproc_per_node \d+", "--nproc_per_node 2", cmd)
        return re.sub(r"--batch-size \d+", "--batch-size 4", small) + " --steps 2 --lr 1e-3"
    return cmd


@pytest.fixture(scope="module")
def organism_env(tmp_path_factory):
    from pinpoint import organism

    path = organism.build()
    env = dict(os.environ, MODEL=str(path), DATA=str(path / "are_you_sure.jsonl"),
               TRAIN=str(path / "spt_rows.jsonl"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def _run(args, cwd, env, timeout=900) -> str:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args!r} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_readme_has_the_blocks_this_test_runs():
    langs = [lang for lang, _, _ in blocks()]
    assert langs.count("python") >= 4 and langs.count("bash") >= 3
    assert all(lang in ("python", "bash", "text", "") for lang in langs), langs


BASH = [b for b in blocks() if b[0] == "bash"]
PYTHON = [b for b in blocks() if b[0] == "python"]


@pytest.mark.parametrize("lang, code, line", BASH, ids=[f"line{b[2]}" for b in BASH])
def test_bash_block_runs(lang, code, line, organism_env, workdir):
    lines = []
    for raw in code.splitlines():
        cmd = raw.split("#", 1)[0].strip()
        if not cmd:
            continue
        if re.match(r"^[A-Z_]+=", cmd):          # variable assignments run as written
            lines.append(cmd)
            continue
        new = _rewrite(cmd)
        if new is not None:
            lines.append(new)
    if not any(not re.match(r"^[A-Z_]+=", ln) for ln in lines):
        return  # every line of this block is checked another way (see the module docstring)
    script = "set -euo pipefail\ncd " + shlex.quote(str(ROOT)) + "\n" if any("bench/" in ln for ln in lines) else \
        "set -euo pipefail\n"
    _run(["bash", "-c", script + "\n".join(lines)], workdir, organism_env)
    if any(ln.startswith("pinpoint tune ") and "--lr" not in ln for ln in lines) and (workdir / "runs/eval").is_dir():
        _check_defaults_work(workdir)


def _check_defaults_work(workdir: Path) -> None:
    """The CLI block tunes with every default (the recipe rule picks k, lr, steps and the mix):
    on the organism that must reach the demo's targets, and the choices must be recorded."""
    res = json.loads((workdir / "runs/eval/results.json").read_text())["results"]["all"]
    assert res["confidence"] >= 80 and res["truthfulness"] >= 80, res
    tune = json.loads((workdir / "runs/spt/tune.json").read_text())
    assert tune["recipe"]["lr"] > 0 and "one standard error" in tune["recipe"]["rule"], tune["recipe"]
    assert tune["dialogue_mix"]["n_rows"] > 0 and tune["dialogue_mix"]["insist_fraction"] > 0.9, tune["dialogue_mix"]


SNIPPET = re.compile(r"print\(heads, adapter\.recipe")


@pytest.mark.parametrize("lang, code, line", PYTHON, ids=[f"line{b[2]}" for b in PYTHON])
def test_python_block_runs(lang, code, line, organism_env, tmp_path):
    out = _run([sys.executable, "-c", code], tmp_path, organism_env)
    if SNIPPET.search(code):
        _check_quoted_output(out)


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def _check_quoted_output(out: str) -> None:
    """The README quotes the snippet's output in the ```text block after it."""
    m = re.search(r"print\(heads, adapter\.recipe.*?```\s*\n.*?```text\n(?P<quoted>.*?)```", README, re.S)
    assert m, "README must quote the API snippet's output in a ```text block after it"
    quoted, got = m["quoted"].strip(), out.strip().splitlines()[-1].strip()
    q_heads, g_heads = quoted.split(")]")[0], got.split(")]")[0]
    assert q_heads == g_heads, f"heads: README says {quoted!r}, the snippet printed {got!r}"
    qn, gn = _numbers(quoted.split(")]", 1)[1]), _numbers(got.split(")]", 1)[1])
    assert len(qn) == len(gn) == 3, (quoted, got)
    assert qn[0] == gn[0], f"learning rate: README says {qn[0]}, the snippet chose {gn[0]}"
    for a, b in zip(qn[1:], gn[1:]):
        assert abs(a - b) <= 2.5, f"README quotes {quoted!r}, the snippet printed {got!r}"


def test_readme_quotes_no_placeholder():
    left = re.findall(r"\b[A-Z][A-Z_]{5,}\b(?=\s|$)", README)
    placeholders = [w for w in left if w.endswith(("_TABLE", "_SECTION", "_OUTPUT", "_MINUTES"))]
    assert not placeholders, f"unfilled README placeholders: {placeholders}"
