"""The package's structure: no import circles, registries complete on import, ruff clean, one command."""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from helpers import REPO

PACKAGE = REPO / "promptlearn"


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """promptlearn module -> the promptlearn modules it imports anywhere (top level, TYPE_CHECKING blocks and
    inside functions alike)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 20 and "promptlearn.runner" in graph["promptlearn.commands"]
    cycle = find_cycle({k: v - {"promptlearn"} for k, v in graph.items()})  # the root only re-exports registries
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_trainer_does_not_know_methods():
    assert not {m for m in import_graph()["promptlearn.trainer"] if m.startswith("promptlearn.methods")}


@pytest.mark.subprocess
def test_registries_are_complete_on_import():
    code = ("import promptlearn.methods as m, promptlearn.data as d, promptlearn.config as c; "
            "print(len(m.METHODS), len(d.DATASETS), sorted(c.SECTIONS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 2)
    assert int(out[0]) >= 7 and int(out[1]) >= 17
    assert all(name in out[2] for name in ("coop", "clip_adapter", "tip_adapter"))


@pytest.mark.subprocess
def test_ruff_is_clean():
    """Line length and import order (pyproject.toml's [tool.ruff]); ruff comes with the dev extra."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_a_registry_whose_filling_import_fails_says_so_at_every_read(monkeypatch):
    """A broken plug-in or module import is its own error at every read, not 'unknown method' after the first."""
    from promptlearn.registry import Registry

    registry = Registry("thing", filled_by="promptlearn_no_such_module_for_the_test")
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError, match="promptlearn_no_such_module_for_the_test"):
            registry.get("x")
