"""import-linter's contract (pyproject.toml): the runtime never imports Qt or the GUI."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_runtime_never_imports_qt_import_linter():
    beside_python = Path(sys.executable).parent / "lint-imports"
    exe = str(beside_python) if beside_python.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports (import-linter, in the test extra) is not installed"
    proc = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout
