"""bench/'s shape: no import circle among its modules, and every committed suite expands to the
trial ids recorded before bench/ was rearranged (tests/data/suite_ids.json), so committed
results stay valid."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))

from record_suite_ids import RECORD, expansion  # noqa: E402


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The bench modules `path` imports anywhere in it (module level, inside functions, under
    TYPE_CHECKING): `from a.b import c` counts as a.b.c when that is a module, else as a.b.
    A submodule's implicit import of its own package is left out: a package's __init__ may
    import its submodules, which is how Python packages work, not a circle."""
    own = module_name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != own}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """bench module -> the bench modules it imports, for the bench/ folder under `root`."""
    files = sorted((root / "bench").rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imports(p, root, modules) for p in files}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_circle_through_a_function_level_import(tmp_path):
    """The checker itself: a circle closed by an import inside a function is found."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "a.py").write_text("from bench import b\n")
    (tmp_path / "bench" / "b.py").write_text("def f():\n    from bench.a import thing\n")
    (tmp_path / "bench" / "c.py").write_text("import bench.a\n")
    edges = graph(tmp_path)
    assert edges["bench.c"] == {"bench.a"}
    assert find_cycle(edges) == ["bench.a", "bench.b", "bench.a"]
    del edges["bench.b"]
    assert find_cycle(edges) is None


def test_no_import_circle_among_bench_modules():
    edges = graph()
    assert len(edges) > 20 and sum(map(len, edges.values())) > 40  # the parse found the imports
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


RECORDED = json.loads(RECORD.read_text(encoding="utf-8"))


@pytest.mark.parametrize("suite", sorted(RECORDED))
def test_committed_suite_expands_to_the_recorded_trial_ids(suite):
    path = ROOT / suite
    assert path.exists(), f"{suite} was recorded but is gone: its committed results would be orphaned"
    assert expansion(path) == RECORDED[suite]
