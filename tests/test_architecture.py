"""The package's shape, checked from its sources (no import of the code under test):

- no import cycle between dynpose's subpackages and top-level modules, and imports only downward: cli -> serve /
  bench / router -> export (with its INT8 calibration) -> video -> io -> runtime -> engines, models -> small shared
  modules;
- no function longer than 80 lines, and none outside `cli/` with more than 8 parameters;
- one affine-warp crop primitive, one ONNX Runtime session opener, one engine-dir loader, and one planner: person
  crops and their centre/scale are computed in `runtime/plan.py` only (executors, calibration, router data and the
  benchmarks call it);
- the engine dir's roles are spelled only in `roles.py` (`Role`): no "router", "small", "large" or "detector" string
  literal anywhere else.
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


# Each unit with the units it must never import (what sits above it).
ABOVE = {
    "demo": {"cli"},
    "export": {"cli", "demo", "serve", "bench", "router"},
    "video": {"cli", "demo", "serve", "bench", "router", "export"},
    "io": {"cli", "demo", "serve", "bench", "router", "export", "video"},
    "runtime": {"cli", "demo", "serve", "bench", "router", "export", "video", "io"},
}
SHARED = ("engines", "models", "onnx_utils", "data", "fileio", "keypoints", "errors", "roles", "paths")


def test_layers_point_down() -> None:
    """The low layers never import the high ones (the runtime knows nothing of files, video, export, routers'
    training, the CLIs, the service or the benchmark; io knows nothing of the run loop)."""
    graph = import_graph()
    rules = {**ABOVE, **dict.fromkeys(SHARED, ABOVE["runtime"] | {"runtime"})}
    for low, high in rules.items():
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


MAX_PARAMETERS = 8


def test_no_function_outside_the_cli_takes_more_than_8_parameters() -> None:
    """Beyond 8 parameters a function wants an options object (the CLIs' click commands take one per flag)."""
    many = []
    for path, tree in _modules():
        if path.relative_to(PKG).parts[0] == "cli":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                if len(names) > MAX_PARAMETERS:
                    many.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({len(names)} parameters)")
    assert not many, "functions with more than 8 parameters (pass an options object): " + "; ".join(many)


ROLE_NAMES = {"router", "small", "large", "detector"}


def test_roles_are_spelled_only_in_the_role_module() -> None:
    found = [
        f"{path.relative_to(PKG.parent)}:{node.lineno} {node.value!r}"
        for path, tree in _modules()
        if path.relative_to(PKG) != Path("roles.py")
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ROLE_NAMES
    ]
    assert not found, "role names as string literals (use dynpose.roles.Role): " + "; ".join(found)


def test_person_crops_and_their_geometry_come_from_the_planner_only() -> None:
    """No second place computes router crops or per-model crops: the crop primitive and the box -> centre/scale
    geometry (`runtime/preprocess.py`) are imported by `runtime/plan.py` alone (everyone else asks the plan, or its
    `crop_boxes` / `crop_at` / `box_geometry` for boxes outside a plan)."""
    primitives = {"crop", "box_to_center_scale"}
    users = sorted(
        f"{path.relative_to(PKG)} imports {alias.name}"
        for path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "dynpose.runtime.preprocess"
        for alias in node.names
        if alias.name in primitives and path.relative_to(PKG) != Path("runtime/plan.py")
    )
    assert not users, "person crops or their geometry computed outside the planner: " + "; ".join(users)
    assert not [
        p for p, t in _modules() for n in ast.walk(t) if isinstance(n, ast.Import) and "preprocess" in ast.unparse(n)
    ]


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
    # the affine warp of person crops happens in preprocess.crop only (the detector resizes whole images; the key-frame
    # planner warps a whole-frame grey thumbnail to undo the camera's motion, no crop)
    assert _calls("warpAffine") == ["runtime/preprocess.py", "video/keyframes.py"]
    assert _calls("InferenceSession") == ["onnx_utils.py"]
    # runners for an engine dir's entries are made by EngineSet.load only
    assert _calls("load_runner") == ["runtime/engine_set.py"]
