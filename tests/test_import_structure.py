"""The package's import structure: no cycle, the façade on top, Qt and napari only in ``_qt/`` and the npe2 hooks.

Every ``import`` statement of every module under ``src/napari_cspt2d`` counts, including the ones inside functions
(a lazy import is still a dependency; a cycle hidden in a function is still a cycle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "napari_cspt2d"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE
#: Top-level names of the GUI stack: only ``_qt/`` and the npe2 hooks may import them.
GUI_LIBRARIES = {"qtpy", "napari", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "vispy"}
NPE2_HOOKS = {f"{PACKAGE}._reader", f"{PACKAGE}._writer", f"{PACKAGE}._sample_data"}
#: The core and what it must never import (the façade, the command line, the demo and sample, the GUI).
CORE = (f"{PACKAGE}.model", f"{PACKAGE}.io", f"{PACKAGE}.recon", f"{PACKAGE}.geometry", f"{PACKAGE}.errors")
ABOVE_THE_CORE = (f"{PACKAGE}.pyp", f"{PACKAGE}.cli", f"{PACKAGE}.demo", f"{PACKAGE}.sample", f"{PACKAGE}._qt")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def _within(name: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports(module: str) -> list[str]:
    """Every module ``module`` imports (absolute names; inside the package, the submodule when a name is one)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
            found += subs or [target]
    return found


GRAPH = {m: sorted({i for i in _imports(m) if i in MODULES and i != m}) for m in MODULES}


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_package():
    """The checks below would pass on an empty graph: make sure it holds the modules and their known edges."""
    assert f"{PACKAGE}.recon.pipeline" in GRAPH and f"{PACKAGE}.geometry" in GRAPH
    assert f"{PACKAGE}.geometry" in GRAPH[f"{PACKAGE}.model.tracks"]
    assert f"{PACKAGE}.recon.pipeline" in GRAPH[f"{PACKAGE}.pyp"]  # a lazy import inside a function counts


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []


def test_no_import_cycle_inside_the_package():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{m} imports {sorted(set(GRAPH[m]) & set(c))}" for m in c) + ")"
        for c in cycles)


def test_gui_libraries_only_in_qt_and_the_npe2_hooks():
    offenders = {m: sorted({i for i in _imports(m) if i.split(".")[0] in GUI_LIBRARIES})
                 for m in MODULES if not _within(m, {f"{PACKAGE}._qt"} | NPE2_HOOKS)}
    assert not {m: i for m, i in offenders.items() if i}


def test_the_core_never_imports_the_layers_above_it():
    """model/, io/, recon/, geometry and errors import neither the pyp façade, the CLI, the demo nor the GUI."""
    offenders = {m: [i for i in GRAPH[m] if _within(i, ABOVE_THE_CORE)] for m in MODULES if _within(m, CORE)}
    assert not {m: i for m, i in offenders.items() if i}


def test_geometry_is_the_foundation():
    """The geometry every layer projects through depends on nothing of the package but its errors."""
    assert GRAPH[f"{PACKAGE}.geometry"] == [f"{PACKAGE}.errors"]


@pytest.mark.parametrize("entry", ["pyp", "cli", "recon.pipeline", "recon.worker_preload"])
def test_the_headless_entry_points_load_no_gui(entry):
    """Importing the headless entry points (the seed's façade, the CLI, the pipeline, the workers' preload) loads
    neither Qt nor napari, in a fresh interpreter."""
    code = (f"import sys, {PACKAGE}.{entry}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(GUI_LIBRARIES)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


#: What opening the cockpit must not import on napari's GUI thread (the tabs' modules import them in a thread).
HEAVY_FOR_THE_GUI_THREAD = ("pandas", "scipy.fft", "scipy.spatial", "scipy.optimize", "mrcfile", f"{PACKAGE}.runs",
                            f"{PACKAGE}.recon", f"{PACKAGE}.io", f"{PACKAGE}.review", f"{PACKAGE}.pyp",
                            f"{PACKAGE}._reader", f"{PACKAGE}._qt._curation", f"{PACKAGE}._qt.run_widget")


def test_the_cockpit_module_imports_nothing_heavy():
    """napari's plugin loader imports the manifest's widget module on the GUI thread: beyond what napari itself
    imports, that module brings neither pandas, scipy's heavy parts, the readers, the run's driver nor the tabs
    (in a fresh interpreter, so that other tests' imports do not hide one)."""
    manifest = (SOURCE / "napari.yaml").read_text(encoding="utf-8")
    module = next(line.split(":")[1].strip() for line in manifest.splitlines()
                  if line.strip().startswith("python_name:") and line.strip().endswith(":Cockpit"))
    code = ("import sys, napari, napari.viewer, napari.qt.threading; before = set(sys.modules); "
            f"import {module}; "
            f"print(sorted(m for m in set(sys.modules) - before if m.startswith({HEAVY_FOR_THE_GUI_THREAD!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert module == f"{PACKAGE}._qt.cockpit"
    assert out.strip() == "[]"
