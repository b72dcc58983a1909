"""The package's folders state its architecture: stages import only from their own stage or those below, and no module
imports another that (through any chain) imports it back. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "iqstar_lite"

# Lowest first: shared pieces at the top of the package, then each stage, then the entry points.
STAGES = ["shared", "data", "models", "algorithm", "evaluation", "runtimes", "export", "entry"]
ENTRY = {
    "iqstar_lite",
    "iqstar_lite.__main__",
    "iqstar_lite.api",
    "iqstar_lite.cli",
    "iqstar_lite.recipe",
    "iqstar_lite.chat",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def stage(module: str) -> str:
    if module in ENTRY:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else "shared"


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a.b import c`` counts ``a.b.c`` when that is a module)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "iqstar_lite":
                    edges[name].add(t)
    return edges


def test_no_import_from_a_higher_stage():
    mods = modules()
    assert {stage(m) for m in mods} == set(STAGES), "a stage folder appeared or went: update STAGES"
    upward = [
        f"{a} ({stage(a)}) -> {b} ({stage(b)})"
        for a, deps in imports(mods).items()
        for b in deps
        if STAGES.index(stage(b)) > STAGES.index(stage(a))
    ]
    assert not upward, "imports from a higher stage:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    edges = imports(modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path + [m, n]
            if n not in state and (cycle := visit(n, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :])


def test_the_layout_check_sees_a_violation(tmp_path, monkeypatch):
    """The check is not vacuous: an arrow from the algorithm up to export is found."""
    fake = {"iqstar_lite.algorithm.x": tmp_path / "x.py", "iqstar_lite.export.y": tmp_path / "y.py"}
    fake["iqstar_lite.algorithm.x"].write_text("from iqstar_lite.export.y import z\n")
    fake["iqstar_lite.export.y"].write_text("z = 1\n")
    edges = imports(fake)
    assert edges["iqstar_lite.algorithm.x"] == {"iqstar_lite.export.y"}
    assert STAGES.index(stage("iqstar_lite.export.y")) > STAGES.index(stage("iqstar_lite.algorithm.x"))
