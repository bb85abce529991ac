"""The library's layers import one way: a package may import only packages below it.

The order is the one docs/ARCHITECTURE.md draws. The test reads every module's imports (top level
and inside functions alike: a lazy import is still a dependency) with `ast`, so a new upward import
fails here with the file and line that made it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "uniperceiver"

#: Lowest first. `errors` and `utils` are the floor; `bench` measures everything, so it is the top.
LAYERS: list[str] = [
    "errors",
    "utils",
    "tokenizers",
    "modeling",
    "metrics",
    "data",
    "tasks",
    "config",
    "evaluation",
    "engine",
    "bench",
]
#: Third-party packages of the face (the command line) that the library must never import.
FACE_ONLY = {"typer", "rich", "upctl"}


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if rel.parts else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "uniperceiver":
                out.extend((node.lineno, f"uniperceiver.{a.name}") for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return out


def _modules() -> list[Path]:
    """Every module inside a package (the top-level `__init__.py` only names the version)."""
    return sorted(p for p in ROOT.rglob("*.py") if p.parent != ROOT or p.name != "__init__.py")


def test_every_package_has_a_layer() -> None:
    packages = {_package_of(p) for p in _modules()}
    assert packages - set(LAYERS) == set(), "add new packages to LAYERS (and docs/ARCHITECTURE.md)"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    here = _package_of(path)
    rank = LAYERS.index(here)
    bad = []
    for line, module in _imports(path):
        top = module.split(".")[0]
        if top in FACE_ONLY:
            bad.append(f"{path.name}:{line} imports {module} (the library must not import the command line)")
        if top != "uniperceiver" or "." not in module:
            continue
        target = module.split(".")[1]
        if target in LAYERS and LAYERS.index(target) > rank:
            bad.append(f"{path.name}:{line} ({here}) imports {module} ({target} is above {here})")
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a lazy upward import inside a function is found."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from uniperceiver.engine import trainer\n    import rich\n")
    assert [m for _, m in _imports(src)] == ["uniperceiver.engine", "rich"]


def test_architecture_doc_draws_the_enforced_order() -> None:
    """docs/ARCHITECTURE.md's layer picture lists the packages of LAYERS, top to bottom."""
    doc = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
    block = doc.split("<!-- layers:", 1)[1].split("<!-- /layers -->", 1)[0]
    drawn = [line.split()[0] for line in block.splitlines() if line.startswith("  ") and line[2] != " "]
    assert drawn == list(reversed(LAYERS))
