"""The install paths the README gives: the default (with the window) and the headless one."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomli = pytest.importorskip("tomli")
    tomllib = tomli

REPO = Path(__file__).resolve().parents[1]
GUI_ONLY = {"pyside6-essentials", "pyqtgraph"}


def name_of(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_default_install_has_the_window_and_headless_has_all_else() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    default = project["dependencies"]
    assert GUI_ONLY <= {name_of(r) for r in default}  # `pip install .` gives zmqruntime-gui
    assert "zmqruntime-gui" in project["scripts"]
    headless = [
        line.strip()
        for line in (REPO / "requirements-headless.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert headless == [r for r in default if name_of(r) not in GUI_ONLY]


def test_constraints_pin_every_python_the_project_supports() -> None:
    """Each pin that differs by Python version carries markers that cover 3.10 and 3.11+."""
    pins: dict[str, list[str]] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins.setdefault(name_of(line), []).append(line)
    for name in ("numpy", "scipy", "scikit-image", "pyside6-essentials", "pyzmq", "pytest"):
        assert name in pins, f"constraints.txt does not pin {name}"
    for name, lines in pins.items():
        if len(lines) > 1:
            markers = sorted(line.split(";", 1)[1].strip() for line in lines)
            assert markers == ['python_version < "3.11"', 'python_version >= "3.11"'], name


def test_the_package_version_is_the_one_pyproject_declares() -> None:
    """zmqruntime/_version.py and pyproject's [project] version name the same release."""
    import zmqruntime
    from zmqruntime._version import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert __version__ == project["version"]
    assert zmqruntime.__version__ == __version__
