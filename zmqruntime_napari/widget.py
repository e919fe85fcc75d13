"""The "zmqruntime live" dock widget: a run's previews stream into napari Image layers.

A :class:`~zmqruntime_napari.follower.PreviewFollower` thread does all network work; a
QTimer on napari's thread takes the newest frame of each stream and sets it as its
layer's data (one layer per stream, or per channel of a ``c`` axis), scaled by the
frame's image metadata. Newest frame wins: napari's event loop never waits on the network.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy import QtCore, QtWidgets

from zmqruntime.imagemeta import ImageMeta, default_axes

from .follower import Frame, PreviewFollower
from .layers import layer_data

TICK_MS = 30


class LiveWidget(QtWidgets.QWidget):
    """Pick a server (``host:port``) and a run (blank: the newest), then Follow."""

    def __init__(
        self,
        napari_viewer: Any,
        address: str = "127.0.0.1:5555",
        exec_id: str = "",
        keys: str | None = None,
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.keys = keys
        self.follower: PreviewFollower | None = None
        self.shown = 0
        self._layers: dict[str, list[Any]] = {}  # stream -> its layers (one per channel)
        self._shapes: dict[str, tuple] = {}  # stream -> (shape, dtype, meta) they were built for

        self.address = QtWidgets.QLineEdit(address)
        self.address.setToolTip("the server: host:port (its control port)")
        self.run_id = QtWidgets.QLineEdit(exec_id)
        self.run_id.setPlaceholderText("newest running run")
        self.follow_button = QtWidgets.QPushButton("Follow")
        self.follow_button.clicked.connect(self.toggle)
        self.status = QtWidgets.QLabel("not following")
        self.status.setWordWrap(True)
        form = QtWidgets.QFormLayout(self)
        form.addRow("Server", self.address)
        form.addRow("Run", self.run_id)
        form.addRow(self.follow_button)
        form.addRow(self.status)

        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self.tick)
        self.destroyed.connect(self._stop_follower)

    # -- actions
    def toggle(self) -> None:
        if self.follower is not None:
            self.stop()
        else:
            self.start()

    def start(self) -> None:
        host, _, port = self.address.text().strip().rpartition(":")
        try:
            port_number = int(port)
        except ValueError:
            self.status.setText(f"'{self.address.text()}' is not host:port")
            return
        exec_id = self.run_id.text().strip() or None
        self.follower = PreviewFollower(host or "127.0.0.1", port_number, exec_id, keys=self.keys)
        self.follower.start()
        self.shown = 0
        self.follow_button.setText("Stop")
        self.status.setText("waiting for a run…" if exec_id is None else f"following {exec_id}")
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()
        self._stop_follower()
        self.follow_button.setText("Follow")

    def _stop_follower(self) -> None:
        if self.follower is not None:
            self.follower.stop(wait=None)  # ends within one poll; never block napari
            self.follower = None

    # -- the timer
    def tick(self) -> None:
        follower = self.follower
        if follower is None:
            return
        for frame in follower.take():
            self._show(frame)
            self.shown += 1
        if follower.exec_id and not self.run_id.text().strip():
            self.run_id.setText(follower.exec_id)
        where = f"{follower.host}:{follower.port}"
        if follower.error:
            self.status.setText(f"{where}: {follower.error}")
        elif follower.exec_id:
            state = follower.state or "…"
            self.status.setText(
                f"{follower.exec_id} on {where}: {state}; "
                f"{follower.received} frames received, {self.shown} shown"
            )
        if follower.done:
            self.stop()
            self.status.setText(self.status.text() + " (ended)")

    def _show(self, frame: Frame) -> None:
        value = np.asarray(frame.value)
        try:
            meta = (
                ImageMeta.from_dict(frame.meta, value.shape)
                if frame.meta
                else ImageMeta.build(value.shape, axes=default_axes(value.ndim))
            )
        except ValueError:
            return  # not an image napari can place (1-D...): skip it
        axes, order = meta.canonical()
        data = np.transpose(value, order)
        key = (data.shape, data.dtype.str, frame.meta)
        layers = self._layers.get(frame.name)
        if (
            layers
            and self._shapes.get(frame.name) == key
            and all(layer in self.viewer.layers for layer in layers)
        ):
            if len(layers) == 1:
                layers[0].data = data
            else:
                for i, layer in enumerate(layers):
                    layer.data = np.take(data, i, axis=axes.index("c"))
            return
        for layer in layers or []:
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        from . import add_layers

        spec = layer_data(data, meta, axes, f"live {frame.name}", {"stream": frame.name})
        self._layers[frame.name] = add_layers(self.viewer, [spec])
        self._shapes[frame.name] = key
