"""The package's shape, checked from its sources (no import of the code under test):

- no import cycle between dynpose's subpackages and top-level modules (DESIGN.md's direction: cli -> serve / bench /
  router -> export / calibration -> runtime -> engines, models -> small shared modules);
- no function longer than 80 lines;
- one affine-warp crop primitive, one ONNX Runtime session opener, one engine-dir loader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dynpose"
MAX_FUNCTION_LINES = 80


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(PKG.rglob("*.py"))]


def _unit(path: Path) -> str:
    """The import-graph node of a file: its subpackage (dynpose/runtime/...) or its top-level module."""
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: [files importing it]} for every `dynpose.` import, lazy ones included (a function-level
    import is still a dependency; only imports under `if TYPE_CHECKING:` are left out: they never run)."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path, tree in _modules():
        src = _unit(path)
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "dynpose" and len(parts) > 1 and parts[1] != src and parts[1] != "__init__":
                    graph.setdefault(src, {}).setdefault(parts[1], []).append(str(path.relative_to(PKG.parent)))
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in graph.get(u, {}):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if state.get(v) is None and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if state.get(u) is None and (found := visit(u)):
            return found
    return None


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        where = "; ".join(f"{a} -> {b} in {graph[a][b][0]}" for a, b in zip(cycle, cycle[1:], strict=False))
        pytest.fail(f"import cycle {' -> '.join(cycle)} ({where})")


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {"c": []}}) is None


def test_layers_point_down() -> None:
    """The low layers never import the high ones (the runtime knows nothing of export, routers' training, the CLIs,
    the service or the benchmark)."""
    graph = import_graph()
    high = {"cli", "demo", "serve", "bench", "router", "export", "calibration"}
    for low in ("runtime", "engines", "models", "onnx_utils", "data", "fileio", "keypoints", "errors"):
        bad = sorted(set(graph.get(low, {})) & high)
        assert not bad, f"{low} imports {bad}: {[graph[low][b][0] for b in bad]}"


def test_no_function_over_80_lines() -> None:
    long = [
        f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions over 80 lines (split them): " + "; ".join(long)


def _calls(attr: str) -> list[str]:
    """Files that call `<anything>.attr(` or `attr(`."""
    out = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if name == attr:
                    out.append(str(path.relative_to(PKG)))
    return sorted(set(out))


def test_one_crop_primitive_one_session_opener_one_engine_loader() -> None:
    # the affine warp of person crops happens in preprocess.crop only (the detector resizes whole images)
    assert _calls("warpAffine") == ["runtime/preprocess.py"]
    assert _calls("InferenceSession") == ["onnx_utils.py"]
    # runners for an engine dir's entries are made by EngineSet.load only
    assert _calls("load_runner") == ["runtime/engine_set.py"]
