"""The packages type-check clean: mypy, run with pyproject's [tool.mypy], reports no error.

The wheel ships ``py.typed`` for zmqruntime, so its annotations are what users' type checkers
read. The check runs in-process (``mypy.api``) from the repository root, where the
configuration's relative paths (``files``, ``mypy_path``) point; its incremental cache is the
default ``.mypy_cache/`` there (git-ignored): about 20 s cold on 2 cores, a few seconds warm.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "pyproject.toml"


def run_mypy(*args: str) -> tuple[str, int]:
    stdout, stderr, status = api.run(["--config-file", str(CONFIG), *args])
    return stdout + stderr, status


def test_the_runtime_the_gui_and_the_napari_plugin_have_no_type_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)
    report, status = run_mypy()
    errors = [line for line in report.splitlines() if ": error:" in line]
    assert status == 0 and not errors, f"mypy found {len(errors)} error(s):\n{report}"
    assert "Success: no issues found" in report, report
    checked = int(report.split("in ")[-1].split()[0])  # "... no issues found in N source files"
    assert checked >= 50, f"mypy checked only {checked} files: {report}"


def test_the_configuration_checks_unannotated_code_and_unused_ignores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The strictness the packages are held to is in force: bodies of unannotated functions
    are checked, and a ``# type: ignore`` that hides nothing is an error itself."""
    monkeypatch.chdir(REPO)
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def unannotated():\n    return 1 + 'one'\n\nx: int = 1  # type: ignore[assignment]\n"
    )
    report, status = run_mypy(str(probe))
    assert status == 1, report
    assert 'probe.py:2: error: Unsupported operand types for + ("int" and "str")' in report
    assert 'probe.py:4: error: Unused "type: ignore" comment' in report
