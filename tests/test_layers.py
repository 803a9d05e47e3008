"""The layers of docs/design.md: imports point one way, and no module imports itself back.

Read from the source with ``ast`` (function-level imports count too), so a lazy upward import fails
here as well as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tsmd_ray"

# docs/design.md's lines, bottom first: a module may import the lines before its own, and its own package.
LAYERS = (
    ("", "errors", "checkpoint", "plots"),  # "": tsmd_ray/__init__.py
    ("config",),
    ("data",),
    ("models",),
    ("algorithms",),
    ("engine",),
    ("export",),
    ("training",),
    ("pretrain_worker",),
    ("preflight",),
    ("tracking", "flags"),
    ("tables",),
    ("grid",),
    ("diagnostics",),
    ("distributed",),
)
RANKS = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
ENTRY_POINTS = ("train", "evaluate", "tune", "adapt", "predict", "pretrain", "reproduce", "compare", "pipeline")
TOP = len(LAYERS)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """The tsmd_ray modules that ``path`` (module ``name``) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names = [a.name for a in node.names if a.name != "__doc__"]  # --help text of the own package
            found |= {f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names}
    return {m for m in found if m.startswith("tsmd_ray") and m != name}


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _part(name: str) -> str:
    """The top-level module or subpackage ``name`` belongs to ("" for tsmd_ray itself)."""
    return name.split(".")[1] if "." in name else ""


def _rank(name: str) -> int:
    part = _part(name)
    if part in ENTRY_POINTS or name.endswith("__main__"):
        return TOP
    return RANKS[part]


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 60 and "tsmd_ray.engine" in GRAPH["tsmd_ray.training"]  # the parser sees the package
    unranked = {_part(m) for m in MODULES} - set(RANKS) - set(ENTRY_POINTS) - {"__main__"}
    assert not unranked, f"add {sorted(unranked)} to RANKS (and to docs/design.md's layers)"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name: str) -> None:
    upward = [  # entry points may import anything; within a package only its __main__ is above the rest
        m for m in GRAPH[name]
        if _rank(name) < TOP and _rank(m) >= _rank(name) and (_part(m) != _part(name) or m.endswith("__main__"))
    ]
    assert not upward, f"{name} (rank {_rank(name)}) imports {upward} (ranks {[_rank(m) for m in upward]})"


def test_no_import_cycles() -> None:
    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name):], name]))
        if name not in done:
            for m in GRAPH.get(name, ()):
                visit(m, (*path, name))
            done.add(name)

    done: set[str] = set()
    for name in MODULES:
        visit(name, ())


def test_the_checker_resolves_relative_imports(tmp_path: Path) -> None:
    module = tmp_path / "episodes.py"
    module.write_text("def f():\n    from ..engine import MetaLearner\n")
    assert _imports(module, "tsmd_ray.data.episodes") == {"tsmd_ray.engine"}
    assert _rank("tsmd_ray.engine") >= _rank("tsmd_ray.data.episodes")  # an upward import
    package = tmp_path / "__init__.py"
    package.write_text("from . import arrow\nfrom .arrow import SPLITS\nfrom .. import config\n")
    assert _imports(package, "tsmd_ray.data") == {"tsmd_ray.data.arrow", "tsmd_ray.config"}
