"""The import graph of python/pinpoint: one direction, no cycles, no private reach-ins.

Every ``import`` and ``from ... import`` in every module counts, including those inside
functions (a lazy import that closes a cycle is still a cycle in the design). Edges into a
package's own ``__init__`` from inside that package (``from . import __version__``) are not
counted: the package root re-exports its modules and imports them all. Importing
``pinpoint.a.b`` also imports the package ``pinpoint.a``.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "python"
PKG = ROOT / "pinpoint"

# Exceptions to the rules (none left; an entry needs a reason beside it):
LAGGING_PRIVATE: dict[str, set[str]] = {}
LAGGING_CYCLES: set[frozenset] = set()


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(importer: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(edges: set of modules imported, private: list of 'module.name' private names taken)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    edges, private = set(), []
    aliases: dict[str, str] = {}  # local name -> pinpoint module it stands for

    def add(target: str):
        parts = target.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c imports a, a.b and a.b.c
            mod = ".".join(parts[:k])
            if mod in modules and mod != name and not name.startswith(mod + "."):
                edges.add(mod)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "pinpoint":
                    add(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(name, is_pkg, node)
            if src.split(".")[0] != "pinpoint":
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in modules:  # `from . import evaluate`: the module itself
                    add(sub)
                    aliases[a.asname or a.name] = sub
                else:
                    add(src)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        private.append(f"{src}.{a.name}")
    for node in ast.walk(tree):  # `evaluate._progress` through a module alias
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                private.append(f"{aliases[node.value.id]}.{node.attr}")
    return edges, private


def _graph():
    modules = _modules()
    graph, private = {}, {}
    for name, path in modules.items():
        graph[name], private[name] = _imports(name, path, modules)
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(1000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph, _ = _graph()
    cycles = [c for c in _cycles(graph) if frozenset(c) not in LAGGING_CYCLES]
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_modules():
    _, private = _graph()
    bad = {m: sorted(set(p) - LAGGING_PRIVATE.get(m, set())) for m, p in private.items()}
    bad = {m: p for m, p in bad.items() if p}
    assert not bad, f"modules importing another module's private names: {bad}"


def test_the_checker_sees_cycles_and_reach_ins(tmp_path, monkeypatch):
    """The two checks above can fail: a planted cycle and a planted reach-in are found."""
    pkg = tmp_path / "pinpoint"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n__version__ = '0'\n")
    (pkg / "a.py").write_text("from .b import thing\nfrom . import __version__\n")
    (pkg / "b.py").write_text("def f():\n    from .a import _hidden\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import b\nx = b._secret\nfrom ..a import public\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    graph, private = _graph()
    assert _cycles(graph) == [["pinpoint.a", "pinpoint.b"]]
    assert "pinpoint" not in graph["pinpoint.a"]          # `from . import __version__` is not an edge
    assert graph["pinpoint.sub.c"] == {"pinpoint.a", "pinpoint.b"}
    assert private["pinpoint.b"] == ["pinpoint.a._hidden"]
    assert private["pinpoint.sub.c"] == ["pinpoint.b._secret"]


@pytest.mark.parametrize("module", ["pinpoint.data", "pinpoint.judges", "pinpoint.evaluate"])
def test_each_module_imports_alone(module):
    """Imported first in a fresh interpreter (an import cycle shows up as an ImportError there)."""
    env = dict(os.environ, PINPOINT_SELF_CHECK="0")
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_text_chat_data_and_judges_import_without_torch():
    """The bottom of the chain (text, chat) and the data layer and judges on it load neither torch
    nor transformers when imported: generation imports them when it runs."""
    code = ("import sys, pinpoint.text, pinpoint.chat, pinpoint.prompts, pinpoint.data, pinpoint.judges; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = dict(os.environ, PINPOINT_SELF_CHECK="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
