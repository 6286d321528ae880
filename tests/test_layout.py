"""The package layout: proxy/ imports form no circle, wings import only downward, and every
console script resolves. Imports are read from the source (every ``import`` statement, inside
functions too), so a circle dodged by a lazy import is still a circle here."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "proxy"

# the wings, by layer: a wing imports its own modules and wings of lower layers (the design notes;
# README 'Architecture')
LAYERS = {
    "config": 0,
    "records": 0,
    "analysis": 0,
    "kernels": 0,
    "spikes": 0,  # the contract
    "model": 1,
    "optim": 1,
    "data": 1,
    "report": 1,
    "frames": 1,
    "train": 2,
    "forensics": 3,
    "verdict": 3,
    "demo": 3,
}
# within the contract layer: config registers analysis' run-dir naming with OmegaConf and reads stored
# configs through the records' readers of untrusted files; the kernel benchmark writes its result
# through the records' one writer
CONTRACT_EDGES = {("config", "analysis"), ("config", "records"), ("kernels", "records"), ("spikes", "config")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The proxy modules the file at ``path`` (module ``name``) imports, anywhere in it."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule pkg.sub where there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # proxy.x.y (an attribute) -> proxy.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, name, known) for name, path in mods.items()}


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "proxy"


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 30 and "proxy.train.trainer" in graph  # the walk found the package
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_wings_import_only_downward():
    wrong = []
    for module, targets in import_graph().items():
        source = wing(module)
        if source == "proxy":  # the package front page imports nothing of its own
            assert not targets, f"proxy/__init__.py imports {targets}"
            continue
        for target in targets:
            dest = wing(target)
            if dest == source or (source, dest) in CONTRACT_EDGES:
                continue
            if LAYERS[dest] >= LAYERS[source]:
                wrong.append(f"{module} (layer {LAYERS[source]}) imports {target} (layer {LAYERS[dest]})")
    assert not wrong, "\n".join(wrong)


def test_every_module_belongs_to_a_wing():
    assert {wing(m) for m in modules()} - {"proxy"} == set(LAYERS)


def test_console_scripts_resolve():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the project runs on 3.10 too
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {
        "proxy-train",
        "proxy-prepare",
        "proxy-report",
        "proxy-demo",
        "proxy-verdict",
        "proxy-inspect",
    }
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_the_tests_mirror_the_package():
    """Each proxy/ subpackage has its tests in tests/<subpackage>/; the other test folders are the
    studies' (experiments/) and the device scripts' (benchmarks/); fixtures hold data only."""
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert subpackages <= folders, f"no tests folder for {sorted(subpackages - folders)}"
    assert folders <= subpackages | {"experiments", "benchmarks", "fixtures"}, sorted(folders - subpackages)
    assert not list((ROOT / "tests" / "fixtures").rglob("*.py"))
