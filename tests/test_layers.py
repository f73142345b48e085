"""The package's folders are its layers: no import circles (imports inside functions included), every import
goes to the same layer or one below, and no door imports another door (docs/architecture.md)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flexgen_lite"

# bottom to top; a module belongs to the longest prefix listed
LAYERS = [
    ("system", ["system"]),
    ("kernels", ["kernels"]),
    ("models", ["models"]),
    ("engine", ["engine"]),
    ("planning", ["planning"]),
    ("profiling", ["profiling"]),
    ("api", ["", "generation", "step_checks", "stragglers", "model_source", "block_shapes", "block_runs",
             "completion_text", "guided"]),
    ("shared by the doors", ["cli", "cli.options", "cli.checks", "cli.batch_io", "cli.run_record", "cli.breakdown",
                             "cli.chrome_trace", "cli.breakdown_flags", "openai_api"]),
    ("doors", ["cli.generate", "cli.quality", "cli.bench", "cli.report", "serve", "ray", "eval"]),
    ("entry", ["cli.main", "cli.doors", "cli.__main__"]),
]
DOORS = ["cli.generate", "cli.quality", "cli.bench", "cli.report", "serve", "ray", "eval"]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source (top level or inside functions)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name.removeprefix("flexgen_lite").lstrip(".") for a in node.names
                       if a.name.split(".")[0] == "flexgen_lite"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "flexgen_lite":
                target = node.module.removeprefix("flexgen_lite").lstrip(".")
            else:
                continue
            subs = [f"{target}.{a.name}".lstrip(".") for a in node.names]
            targets = [s for s in subs if s in known]
            if len(targets) < len(subs):  # names from the module itself (not only its submodules)
                targets.append(target)
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


@functools.cache
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def owner(name: str, table: list[tuple[str, list[str]]]) -> str:
    best, best_len = None, -1
    for label, prefixes in table:
        for prefix in prefixes:
            hit = name == prefix or (prefix and name.startswith(prefix + "."))
            if hit and len(prefix) > best_len:
                best, best_len = label, len(prefix)
    assert best is not None, f"flexgen_lite.{name} is in no layer: add it to LAYERS"
    return best


def test_the_walk_sees_imports_inside_functions():
    edges = graph()
    assert "profiling.measure" in edges["cli.main"]  # only imported inside cmd_profile and friends
    assert "planning.policy_search" in edges["generation"]


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert circles(graph()) == []


def test_every_import_goes_to_its_own_layer_or_below():
    rank = {label: i for i, (label, _) in enumerate(LAYERS)}
    upward = [f"{m} ({owner(m, LAYERS)}) imports {d} ({owner(d, LAYERS)})" for m, deps in graph().items()
              for d in deps if rank[owner(d, LAYERS)] > rank[owner(m, LAYERS)]]
    assert upward == []


@pytest.mark.parametrize("door", DOORS)
def test_no_door_imports_another(door):
    doors = [(d, [d]) for d in DOORS]
    mine = [m for m in graph() if m == door or m.startswith(door + ".")]
    assert mine
    crossing = [f"{m} imports {d}" for m in mine for d in graph()[m]
                if any(d == o or d.startswith(o + ".") for o in DOORS) and owner(d, doors) != door]
    assert crossing == []
