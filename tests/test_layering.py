"""The code's layers, checked from the source: library → `flag_model.ui` → pages → app.py, and no import points up.
Pages stay thin (≤ 120 lines, no numpy/pandas/torch) and the page registry is the one list of pages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from app_pages import PAGES

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "flag_model"
UI = LIB / "ui"
PAGE_DIR = REPO / "app_pages"
MAX_PAGE_LINES = 120
NO_ARRAYS_IN_PAGES = ("numpy", "pandas", "torch")


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Absolute dotted names of every module `path` imports (relative imports resolved against `package`, by
    default the file's own; `from a import b` gives both `a` and `a.b`, since b may be a module), including
    imports inside functions."""
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _hits(path: Path, banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(path) if any(m == b or m.startswith(b + ".") for b in banned))


def test_import_resolution_sees_every_form(tmp_path):
    """The checker below can fail: relative, nested and `from . import x` imports are all resolved."""
    fake = tmp_path / "probe.py"
    fake.write_text("from ..ui import x\nfrom .. import ui\ndef f():\n    import streamlit as st\nimport app_pages\n")
    got = imported_modules(fake, "flag_model.analysis")
    assert {"flag_model.ui", "flag_model.ui.x", "streamlit", "app_pages"} <= got


LIBRARY_FILES = sorted(p for p in LIB.rglob("*.py") if UI not in p.parents)


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_library_never_imports_ui_streamlit_or_pages(path):
    assert not _hits(path, ("streamlit", "flag_model.ui", "app_pages", "app")), "imports from a layer above it"


@pytest.mark.parametrize("path", sorted(UI.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_ui_never_imports_pages(path):
    assert not _hits(path, ("app_pages", "app")), "flag_model.ui imports a page"


PAGE_FILES = sorted(p for p in PAGE_DIR.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", PAGE_FILES, ids=lambda p: p.name)
def test_pages_are_thin(path):
    """A page wires widgets to library calls: at most 120 lines and no array library of its own."""
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_PAGE_LINES, f"{path.name} has {lines} lines (at most {MAX_PAGE_LINES})"
    assert not _hits(path, NO_ARRAYS_IN_PAGES), "a page does arithmetic itself: move it into flag_model"
    assert not _hits(path, ("app_pages",)), "pages do not import each other"


def test_registry_lists_every_page_once():
    files = [p.file for p in PAGES]
    assert len(set(files)) == len(files) and sum(p.default for p in PAGES) == 1
    assert sorted(files) == [str(p.relative_to(REPO)) for p in PAGE_FILES]
    assert len({p.title for p in PAGES}) == len(PAGES)


def test_app_builds_navigation_from_the_registry():
    """app.py names no page file itself: its st.Page calls come from the registry."""
    tree = ast.parse((REPO / "app.py").read_text())
    literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert not [s for s in literals if s.endswith(".py")]
    assert "app_pages" in imported_modules(REPO / "app.py")
