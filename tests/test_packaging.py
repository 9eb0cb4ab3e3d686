"""The package as pip installs it: the console script, the one home of the dependency pins, nothing read from
beside the package (an installed copy has no checkout around it), and the demo cache outside it."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import flag_model
from flag_model import demo

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGE = REPO / "flag_model"


def _requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = project.get("optional-dependencies", {})
    return [Requirement(r) for r in [*project["dependencies"], *(r for group in extras.values() for r in group)]]


def test_console_script_is_the_cli_main(capsys):
    target = PYPROJECT["project"]["scripts"]["flag-trader"]
    module, _, attr = target.partition(":")
    main = getattr(importlib.import_module(module), attr)
    assert callable(main)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("inspect", "demo", "predict", "bench", "diff", "convert", "whatif", "hypotheses"):
        assert command in out


def test_every_dependency_is_pinned_and_installed_at_its_pin():
    wrong = []
    for req in _requirements():
        pins = [s for s in req.specifier if s.operator == "=="]
        assert len(pins) == 1, f"{req} is not pinned with == (the reconstruction tests are exact to these versions)"
        installed = importlib.metadata.version(req.name)
        # `==2.13.0` also admits a local build label such as 2.13.0+cpu (PEP 440), as pip does.
        if not req.specifier.contains(installed, prereleases=True):
            wrong.append(f"{req.name}: pinned {req.specifier}, installed {installed}")
    assert not wrong, "the venv does not match pyproject.toml; run pip install -e '.[test]': " + "; ".join(wrong)
    torch = next(r for r in _requirements() if r.name == "torch")
    assert str(torch.specifier) == "==2.13.0", "torch stays pinned to the CPU wheel 2.13.0"


def test_requirements_txt_holds_no_second_list_of_pins():
    lines = [
        line.strip()
        for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    torch_pin = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch"))
    assert torch_pin == "torch==2.13.0"  # the CPU wheel; an unpinned torch pulls gigabytes of CUDA packages
    assert lines == [torch_pin, "-e .[test]"], (
        f"dependencies live in pyproject.toml (only the torch pin is repeated); requirements.txt has {lines}"
    )


def test_the_library_reads_nothing_from_beside_the_package():
    """No module locates files through its own path (`__file__`, `parents[...]`) or a `shared` folder beside the
    repository: installed into site-packages there is neither. Data files would have to be declared package data
    and read with importlib.resources; there are none."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"__file__", r"\.parents\[", r"['\"]shared['\"]"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert not offenders, offenders
    data_files = [
        p.relative_to(REPO)
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert not data_files, f"non-Python files in the package need [tool.setuptools.package-data]: {data_files}"


def test_every_package_folder_is_a_regular_package():
    """setuptools' find includes what it finds; a folder without __init__.py is only a namespace package."""
    missing = [
        d.relative_to(REPO)
        for d in [PACKAGE, *PACKAGE.rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")) and not (d / "__init__.py").exists()
    ]
    assert not missing, missing
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["flag_model*"]


def test_demo_cache_is_per_user_and_never_inside_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv("FLAG_TRADER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "flag_trader"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_dir() == tmp_path / "home" / ".cache" / "flag_trader"
    package_dir = Path(flag_model.__file__).resolve().parent
    assert package_dir not in demo.demo_path("tiny").resolve().parents
    monkeypatch.setenv("FLAG_TRADER_CACHE", str(tmp_path / "mine"))
    assert demo.demo_path("tiny").parent == tmp_path / "mine"


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_while_waiting_unless_told_otherwise(given, expected):
    """Importing the package first (as the app and the CLI do) makes torch's OpenMP threads sleep instead of spin
    while they wait, so a busy shared server does not lose its cores to spinning; an explicit setting wins."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, flag_model, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected
