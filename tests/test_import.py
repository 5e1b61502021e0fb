"""`import pinpoint` is light: public names load from their modules on first use."""
from __future__ import annotations

import subprocess
import sys
import types

HEAVY = ("matplotlib", "pinpoint.organism", "pinpoint.organism.train", "pinpoint.tune", "transformer_lens", "nnsight",
         "peft", "transformers")


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **_keep_env()})
    return proc.stdout.strip()


def _keep_env():
    import os

    return {k: v for k, v in os.environ.items() if k.startswith(("PYTHON", "VIRTUAL_ENV", "HOME"))}


def test_import_pinpoint_loads_no_training_code_peers_or_matplotlib():
    out = _run(f"import sys, pinpoint; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out == "[]"


def test_public_names_resolve_on_first_use():
    out = _run("import sys, pinpoint as pp\n"
               "print(pp.HeadSet.__module__, 'pinpoint.tune' in sys.modules)\n"
               "print(pp.organism.__name__, 'pinpoint.organism.train' in sys.modules)\n"
               "from pinpoint import PromptPair, spec_for\n"
               "print(PromptPair.__module__, spec_for.__module__)")
    assert out.splitlines() == ["pinpoint.heads False", "pinpoint.organism True", "pinpoint.prompts pinpoint.models"]


def test_function_names_that_are_also_submodules_stay_functions(monkeypatch):
    import importlib

    import pinpoint as pp

    for name in ("locate", "tune", "evaluate"):
        mod = importlib.import_module(f"pinpoint.{name}")  # binding the submodule does not replace the function
        fn = getattr(pp, name)
        assert isinstance(fn, types.FunctionType) and fn is getattr(mod, name)
    sentinel = object()
    monkeypatch.setattr(pp, "tune", sentinel)  # a user's own binding is kept (and undone)
    assert pp.tune is sentinel
    monkeypatch.undo()
    assert pp.tune is importlib.import_module("pinpoint.tune").tune
    out = _run("import pinpoint.tune, pinpoint.locate, pinpoint as pp; print(pp.tune.__module__, pp.locate.__name__)")
    assert out == "pinpoint.tune locate"


def test_all_names_exist_and_unknown_names_raise():
    import pinpoint as pp

    for name in pp.__all__:
        assert getattr(pp, name) is not None, name
    try:
        pp.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown attribute did not raise")
    assert "locate" in dir(pp) and "HeadScores" in dir(pp)
