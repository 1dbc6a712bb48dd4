"""The package layout: no import cycle between modules, and data flowing one way. Imports are read with `ast` from
the source (every import statement, at the top or inside a function), so a hidden import counts too."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data_prep", "repro")

# Stages in data-flow order; a module may import from its own stage or an earlier one. Modules not listed here
# (repro.config, repro.errors, repro.io, repro.views, the package roots) are shared by every stage.
STAGES = [
    ("data_prep",),
    ("repro.data", "repro.hints"),
    ("repro.models", "repro.lease", "repro.rundir", "repro.engine"),
    ("repro.runs", "repro.bundle", "repro.bundle_merge"),
    ("repro.launch",),
    ("repro.claims", "repro.experiments", "repro.plan", "repro.runner", "repro.analysis", "repro.bench"),
    ("repro.report",),
    ("repro.cli", "repro.__main__"),
]
# The model registry holds the one list of model names that the config validates against; it imports neither torch
# nor the config, so every stage may read it.
SHARED = {"repro", "repro.config", "repro.errors", "repro.io", "repro.views", "repro.models.registry", "repro.schema",
          "repro.scales", "repro.record"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (`from a import b` counts as a.b when that is a module, else a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import repro.engine.train` imports the module; a symbol maps to its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph_here() -> dict[str, set[str]]:
    mods = project_modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    """{module: project modules it imports}. Parsed in a fresh interpreter: CPython 3.11's ast.parse can fail with
    "AST constructor recursion depth mismatch" late in a long test run (it did in CI, in a fresh thread too)."""
    out = subprocess.run([sys.executable, __file__, "--graph"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return {m: set(ts) for m, ts in json.loads(out.stdout).items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def stage_of(module: str) -> int | None:
    """The module's stage; None for the shared modules (every stage may read them)."""
    if module in SHARED:
        return None
    for i, prefixes in enumerate(STAGES):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from repro.engine import train\nfrom . import io\nimport repro.runs as store\n")
    known = {"repro", "repro.io", "repro.runs", "repro.engine", "repro.engine.train"}
    assert imports_of("repro.m", src, known) == {"repro.engine.train", "repro.io", "repro.runs"}


def test_no_import_cycle():
    graph = import_graph()
    assert "repro.engine.train" in graph["repro.engine.distributed"]  # the graph is not empty by mistake
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_from_a_later_stage():
    graph = import_graph()
    unplaced = [m for m in graph if stage_of(m) is None and m not in SHARED]
    assert not unplaced, f"modules with no stage: {unplaced}; add them to STAGES or SHARED"
    backwards = [f"{m} ({stage_of(m)}) imports {t} ({stage_of(t)})" for m, targets in graph.items()
                 for t in targets if stage_of(m) is not None and stage_of(t) is not None and stage_of(t) > stage_of(m)]
    shared_up = [f"{m} imports {t}" for m in SHARED & set(graph) for t in graph[m] if t not in SHARED]
    assert not backwards and not shared_up, "\n".join(backwards + shared_up)


# Data preparation is the earlier stage and a package of its own: it reads nothing of repro but this leaf, which
# reads nothing of the project at all.
PREP_MAY_READ = {"repro", "repro.errors", "repro.io"}


def test_data_prep_reads_only_the_shared_leaf():
    graph = import_graph()
    prep = {m: ts for m, ts in graph.items() if m == "data_prep" or m.startswith("data_prep.")}
    assert "data_prep.prepare" in prep and "repro.io" in graph["data_prep.prepare"]  # the graph sees these edges
    outside = [f"{m} imports {t}" for m, ts in prep.items() for t in ts
               if not (t == "data_prep" or t.startswith("data_prep.")) and t not in PREP_MAY_READ]
    assert not outside, "\n".join(outside)
    assert all(not graph[leaf] - {"repro"} for leaf in PREP_MAY_READ - {"repro"}), \
        {leaf: graph[leaf] for leaf in PREP_MAY_READ - {"repro"}}


def test_the_benchmarks_are_not_in_the_core_package_top_level():
    top = {p.stem for p in (ROOT / "repro").glob("*.py")}
    assert not {t for t in top if t.startswith("bench")}, top
    assert (ROOT / "repro" / "bench" / "cpu.py").is_file() and (ROOT / "repro" / "bench" / "gpu.py").is_file()


@pytest.mark.parametrize("leaf", ["repro.io", "repro.engine.parallel", "repro.record", "repro.engine.preempt"])
def test_leaf_modules_stay_leaves(leaf):
    graph = import_graph()
    assert graph[leaf] <= SHARED, f"{leaf} imports {sorted(graph[leaf] - SHARED)}"


if __name__ == "__main__" and sys.argv[1:] == ["--graph"]:
    print(json.dumps({m: sorted(ts) for m, ts in _graph_here().items()}))
