"""Invariant 8: the runtime never imports Qt or the GUI; the GUI's model layer neither."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import zmqruntime

FORBIDDEN = ("PySide6", "pyqtgraph", "zmqruntime_gui", "shiboken6")


def _imported_after(modules: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout.split()


def test_runtime_modules_never_import_qt_or_the_gui():
    package_dir = Path(zmqruntime.__file__).parent
    modules = ["zmqruntime"] + [
        f"zmqruntime.{m.name}"
        for m in pkgutil.iter_modules([str(package_dir)])
        if m.name != "__main__"  # runs the CLI when imported
    ]
    assert "zmqruntime.client" in modules and "zmqruntime.server" in modules
    loaded = _imported_after(modules)
    assert set(modules) <= set(loaded)
    leaked = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert leaked == [], f"the runtime imported {leaked}"


def test_gui_model_and_net_layers_are_qt_free():
    loaded = _imported_after(["zmqruntime_gui.model", "zmqruntime_gui.net"])
    assert "zmqruntime_gui.model" in loaded
    leaked = [m for m in loaded if m.split(".")[0] in ("PySide6", "pyqtgraph", "shiboken6")]
    assert leaked == [], f"the GUI's model layer imported {leaked}"
