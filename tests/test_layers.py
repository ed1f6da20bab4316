"""The package layout is the architecture: imports flow one way and no module imports in a circle.

``scripts -> commands -> webui | lab -> merge | clora | testing -> sd -> lora -> families -> errors``. A module may
import its own package and any package below it, never one beside or above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lib_loraclr"
RANK = {
    "": 0,
    "errors": 0,
    "families": 0.5,
    "lora": 1,
    "sd": 2,
    "merge": 3,
    "clora": 3,
    "testing": 3,
    "webui": 4,
    "lab": 4,
    "commands": 5,
    "cli": 5,
    "__main__": 6,
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("lib_loraclr", *parts)).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every lib_loraclr module ``path`` imports, at any depth (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lib_loraclr"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [
                n
                if (ROOT / (n.removeprefix("lib_loraclr.").replace(".", "/") + ".py")).exists()
                else node.module
                for n in names
            ]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("lib_loraclr")]
        found.update(names)
    return found


GRAPH = {_module(p): _imports(p) for p in ROOT.rglob("*.py")}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_rank() -> None:
    assert {_package(m) for m in GRAPH} <= set(RANK)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_flow_down(module: str) -> None:
    here = _package(module)
    wrong = [
        dep
        for dep in GRAPH[module]
        if _package(dep) not in ("", "errors", here) and RANK[_package(dep)] >= RANK[here]
    ]
    assert not wrong, f"{module} imports beside or above itself: {wrong}"


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH.get(module, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path[path.index(dep) :], dep])
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The checks above must be able to fail: feed them a graph that breaks both rules."""
    saved = dict(GRAPH)
    try:
        GRAPH["lib_loraclr.sd.model"] = {"lib_loraclr.merge.engine"}
        GRAPH["lib_loraclr.merge.engine"] = {"lib_loraclr.sd.model"}
        with pytest.raises(AssertionError, match="beside or above"):
            test_imports_flow_down("lib_loraclr.sd.model")
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_no_module_is_too_long() -> None:
    """Small files with one job: past about 400 lines a module is doing two."""
    long = {
        _module(p): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert not long, long
