"""import-linter's contracts (pyproject.toml): the runtime never imports Qt or the GUI, and
the GUI imports only the runtime's public surface (the package root and the declared public
modules)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
GUI_CONTRACT = "The GUI imports only the runtime's public modules"


def lint_imports(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    beside_python = Path(sys.executable).parent / "lint-imports"
    exe = str(beside_python) if beside_python.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports (import-linter, in the test extra) is not installed"
    return subprocess.run(
        [exe, "--no-cache", *args], cwd=REPO, capture_output=True, text=True, timeout=180, env=env
    )


def test_the_runtime_never_imports_qt_and_the_gui_only_its_public_modules():
    proc = lint_imports()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{GUI_CONTRACT} KEPT" in proc.stdout
    assert "2 kept, 0 broken" in proc.stdout


def test_the_gui_contract_catches_an_internal_import(tmp_path):
    """The contract as pyproject declares it, run on a stand-in GUI package (another name:
    the editable install's finder would serve the real one first): imports of the root and
    of each declared public module pass, an import of an internal module (protocol) breaks
    it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["name"] == GUI_CONTRACT]
    contract = json.loads(json.dumps(contract).replace("zmqruntime_gui", "standin_gui"))
    lines = ["[tool.importlinter]", 'root_packages = ["zmqruntime", "standin_gui"]', ""]
    lines.append("[[tool.importlinter.contracts]]")
    lines += [f"{key} = {json.dumps(value)}" for key, value in contract.items()]
    (tmp_path / "contract.toml").write_text("\n".join(lines) + "\n")
    gui = tmp_path / "standin_gui"
    gui.mkdir()
    (gui / "__init__.py").write_text("")
    public = [rule.split(" -> ")[1] for rule in contract["ignore_imports"]]
    (gui / "fine.py").write_text(
        "from zmqruntime import FINAL_STATES, ExecutionClient, __version__\n"
        + "".join(f"import {module}\n" for module in public)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "core")])}
    config_file = str(tmp_path / "contract.toml")
    kept = lint_imports("--config", config_file, env=env)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "KEPT" in kept.stdout
    (gui / "bad.py").write_text("from zmqruntime.protocol import FINAL_STATES\n")
    broken = lint_imports("--config", config_file, env=env)
    assert broken.returncode != 0, broken.stdout
    assert "standin_gui.bad -> zmqruntime.protocol" in broken.stdout, broken.stdout
