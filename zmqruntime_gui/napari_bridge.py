"""'Open in napari': a run's array results as napari layers, from the window.

The layers come from ``zmqruntime_napari`` (the optional extra ``zmqruntime[napari]``):
physical scale per axis, one coloured layer per channel, ``kind="labels"`` as Labels
layers, a name's same-shaped results stacked along t. The listing and the arrays are
fetched off the GUI thread (the controller's fetch); the viewer is made on the GUI thread,
in this application (napari runs on the same Qt, through qtpy). Without napari the action
says how to install it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from PySide6 import QtCore, QtWidgets

from .controller import Controller
from .model import RunKey

INSTALL = 'pip install "zmqruntime[napari]"'


def napari_installed() -> bool:
    """Whether napari and the plugin import (the first call takes napari's import time)."""
    try:
        import napari  # noqa: F401

        import zmqruntime_napari  # noqa: F401
    except ImportError:
        return False
    return True


def run_specs(client: Any, exec_id: str) -> list[Any]:
    """The run's array results as layer specs (worker thread; the run may be running:
    what it stored so far)."""
    from zmqruntime_napari.layers import run_layers

    return run_layers(client, exec_id, wait=False)


class NapariOpener(QtCore.QObject):
    """Opens runs in napari viewers and keeps them (closed with the window)."""

    sigStatus = QtCore.Signal(str)
    sigOpened = QtCore.Signal(object)  # the viewer

    def __init__(self, controller: Controller, parent: QtWidgets.QWidget) -> None:
        super().__init__(parent)
        self.controller = controller
        self.widget = parent
        self.viewers: list[Any] = []
        #: makes the viewer (keyword ``title``); None: ``napari.Viewer``. Tests give
        #: napari's own ``ViewerModel`` where no OpenGL canvas can be drawn.
        self.viewer_factory: Callable[..., Any] | None = None

    def open_run(self, key: RunKey) -> bool:
        """Fetch ``key``'s array results and open them in a new napari viewer; False (after
        saying how to install it) when napari is not installed."""
        if not napari_installed():
            QtWidgets.QMessageBox.information(
                self.widget,
                "napari is not installed",
                "Opening results in napari needs napari and this project's napari plugin:\n\n"
                f"    {INSTALL}\n\n"
                "(in the environment this window runs in), then open the run again.",
            )
            self.sigStatus.emit(f"napari is not installed: {INSTALL}")
            return False
        self.sigStatus.emit(f"fetching the arrays of {key.exec_id} for napari…")
        self.controller.fetch(
            key,
            lambda c: run_specs(c, key.exec_id),
            lambda specs: self._show(key, specs),
            lambda exc: self.sigStatus.emit(f"cannot open {key.exec_id} in napari: {exc}"),
            owner=self,
        )
        return True

    def _show(self, key: RunKey, specs: list[Any]) -> None:
        if not specs:
            self.sigStatus.emit(f"{key.exec_id} has no array results to open in napari")
            return
        os.environ.setdefault("QT_API", "pyside6")  # napari's qtpy on this window's Qt
        import napari

        from zmqruntime_napari import add_layers

        factory = self.viewer_factory or napari.Viewer
        viewer = factory(title=f"zmqruntime run {key.exec_id}")
        layers = add_layers(viewer, specs)
        self.viewers.append(viewer)
        self.sigStatus.emit(f"{key.exec_id} opened in napari ({len(layers)} layers)")
        self.sigOpened.emit(viewer)

    def close_all(self) -> None:
        for viewer in self.viewers:
            try:
                viewer.close()
            except RuntimeError:  # closed by the user already
                pass
            except AttributeError:  # napari's Qt-free ViewerModel (tests) has no window
                pass
        self.viewers.clear()
