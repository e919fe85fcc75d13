"""The live preview: the newest frame of the followed run, drawn by pyqtgraph.

A timer (every 15 ms) takes the newest frame from the follower's one-slot box and
draws it if it is new; frames that arrived in between were already replaced in the
box, never queued. Levels are fixed between frames (autolevels once, or continuously
from a subsample), the histogram redraws a few times a second, and the received and
displayed rates are shown side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6 import QtCore, QtGui, QtWidgets

from zmqruntime.imagemeta import ImageMeta

from .calibration import ScaleBar, meta_of, physical_text, write_ome_snapshot
from .channels import ChannelControls, composite, layout_of, plane_of
from .model import FollowBox, Frame, RateMeter, auto_levels, display_step, downsample
from .widgets import (
    icon,
    labelled,
    level_field,
    make_action,
    make_button,
    make_toolbar,
    named,
)

FRAME_MS = 15  # draw up to ~60 new frames per second
CONTINUOUS_LEVELS_S = 0.1  # continuous levels follow the frames this often (no flicker)
STATS_MS = 250
HISTOGRAM_MS = 250
COLOUR_MAPS = ("grey", "viridis", "inferno", "magma", "plasma", "turbo", "CET-L4")


class CountingImageItem(pg.ImageItem):
    """An ImageItem that counts the distinct frames it actually painted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.frame_serial = 0
        self._painted_serial = 0
        self.painted = 0
        #: called after each paint that showed a new frame (benchmarks time it to the pixel)
        self.on_new_paint: Callable[[], None] | None = None

    def set_frame(
        self, image: np.ndarray, levels: tuple[float, float] | None, new: bool = True
    ) -> None:
        """Show ``image``; ``new=False`` for a redraw of the same frame (not counted)."""
        if new:
            self.frame_serial += 1
        if levels is None:
            self.setImage(image, autoLevels=False)
        else:
            self.setImage(image, autoLevels=False, levels=levels)

    def paint(self, painter, *args) -> None:
        super().paint(painter, *args)
        if self.image is not None and self._painted_serial != self.frame_serial:
            self._painted_serial = self.frame_serial
            self.painted += 1
            if self.on_new_paint is not None:
                self.on_new_paint()


class PreviewPanel(QtWidgets.QWidget):
    """Image view with stream choice, levels, colour map, pause and snapshots."""

    sigStatus = QtCore.Signal(str)
    sigDemoRequested = QtCore.Signal()
    #: the follower thread prepared a frame: draw it now, not at the next frame tick
    sigFrameReady = QtCore.Signal()

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.box: FollowBox | None = None
        self.title = ""
        self.frame: Frame | None = None  # the frame on screen (live)
        self.static: np.ndarray | None = None  # an array shown from the results panel
        self.static_meta: ImageMeta | None = None  # its image metadata, if it has any
        #: the plane drawn of a multi-channel or stacked array: (c, rows, cols) or (rows, cols)
        self.plane: np.ndarray | None = None
        self.levels: tuple[float, float] | None = None
        self.needs_autolevel = True
        self._levels_at = 0.0  # when continuous levels were last computed (monotonic)
        self._levels_stale = False  # a frame was drawn with levels of an earlier one
        self.run_progress = ""  # where the run is, by its own progress
        self.recv_meter = RateMeter(1.0)
        self.disp_meter = RateMeter(1.0)
        self.received_fps = 0.0
        self.displayed_fps = 0.0
        self._setting_levels = False
        self._histogram_stale = False
        self._shown_shape: tuple[int, ...] | None = None
        self._shown_step = 1
        # a slider per z/t axis and a box and levels per channel (channels.py)
        self.channels = ChannelControls()

        # -- controls
        bar = make_toolbar()
        self.stream_combo = QtWidgets.QComboBox()
        self.stream_combo.setMinimumContentsLength(10)
        self.stream_combo.setSizeAdjustPolicy(
            QtWidgets.QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.stream_combo.setToolTip("Which preview stream of the run to show")
        self.stream_combo.currentTextChanged.connect(self._stream_picked)
        #: the user chose the stream; until then the window shows the first by name
        self._stream_chosen = False
        bar.addWidget(labelled("Stream", self.stream_combo))
        bar.addSeparator()
        self.act_pause = make_action(
            self, "pause", "Pause", self._pause_toggled, icon_name="pause", checkable=True,
            shortcuts=[QtGui.QKeySequence(QtCore.Qt.Key.Key_Space)],
            tip="Freeze the view; the run goes on (Space)",
        )  # fmt: skip
        bar.addAction(self.act_pause)
        self.act_autolevel = make_action(
            self, "auto_levels", "Auto levels", self.autolevel_once, icon_name="levels",
            shortcuts=["Ctrl+L"], tip="Set the display range from the current frame once (Ctrl+L)",
        )  # fmt: skip
        bar.addAction(self.act_autolevel)
        self.continuous = named(QtWidgets.QCheckBox("Continuous"), "continuous_levels")
        self.continuous.setToolTip(
            "Keep the display range at the 0.1–99.9 percentiles of the frames as they come "
            "(a few times a second, from a subsample); off: the range stays as set"
        )
        self.continuous.setChecked(True)
        bar.addWidget(self.continuous)
        # manual display range and gamma: typing a value turns Continuous off
        self.level_min = self._level_field("levels_min", "Lowest value shown black")
        self.level_max = self._level_field("levels_max", "Highest value shown white")
        self.gamma = named(QtWidgets.QDoubleSpinBox(), "levels_gamma")
        self.gamma.setRange(0.1, 5.0)
        self.gamma.setSingleStep(0.1)
        self.gamma.setDecimals(2)
        self.gamma.setValue(1.0)
        self.gamma.setKeyboardTracking(False)
        self.gamma.setToolTip("Gamma: below 1 brightens faint structures, above 1 darkens them")
        self.gamma.valueChanged.connect(self._gamma_changed)
        for label, field in (("Min", self.level_min), ("Max", self.level_max), ("γ", self.gamma)):
            bar.addWidget(labelled(label, field))
        bar.addSeparator()
        self.cmap_combo = QtWidgets.QComboBox()
        self.cmap_combo.addItems(COLOUR_MAPS)
        self.cmap_combo.currentTextChanged.connect(self.set_colour_map)
        bar.addWidget(labelled("Colours", self.cmap_combo))
        bar.addSeparator()
        self.act_tiff = make_action(
            self, "snapshot_tiff", "Snapshot", self.snapshot_tiff, icon_name="camera",
            shortcuts=["Ctrl+S"], tip="Save the current frame, raw, as TIFF (Ctrl+S)",
        )  # fmt: skip
        bar.addAction(self.act_tiff)
        self.act_png = make_action(
            self, "save_view_png", "Save view", self.save_view_png, icon_name="save",
            shortcuts=["Ctrl+Shift+S"],
            tip="Save the view as shown (colours, levels) as PNG (Ctrl+Shift+S)",
        )  # fmt: skip
        bar.addAction(self.act_png)
        self.toolbar = bar

        # -- image, histogram/LUT
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground("#15171b")
        self.view = self.graphics.addViewBox(row=0, col=0)
        self.view.setAspectLocked(True)
        self.view.invertY(True)  # row 0 at the top, as a camera image
        self.view.setMenuEnabled(False)
        self.image = CountingImageItem(axisOrder="row-major")
        self.view.addItem(self.image)
        self.scale_bar = ScaleBar(self.view)  # shown while frames carry a pixel size
        # the view is fitted once per new image shape; after that only the user zooms
        # (an automatic re-fit on every bounds change would fight the resolution steps)
        self.view.disableAutoRange()
        self.view.sigRangeChanged.connect(self._range_changed)
        self.hist = pg.HistogramLUTItem()
        self.hist.setImageItem(self.image)
        # the histogram follows the image on our clock, not on every frame
        self.image.sigImageChanged.disconnect(self.hist.imageChanged)
        self.hist.sigLevelsChanged.connect(self._levels_dragged)
        self.hist.sigLookupTableChanged.connect(self._apply_gamma)
        self.graphics.addItem(self.hist, row=0, col=1)
        self.graphics.scene().sigMouseMoved.connect(self._mouse_moved)
        self._cursor_scene: QtCore.QPointF | None = None  # the mouse over the image
        self.graphics.installEventFilter(self)

        self.placeholder = named(QtWidgets.QLabel(), "placeholder")
        self.placeholder.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setWordWrap(True)
        self.demo_button = make_button(
            "preview_demo", "Run the demo acquisition", self.sigDemoRequested.emit,
            icon_name="demo", primary=True,
            tip="A simulated camera on a local server, with live preview",
        )  # fmt: skip
        self.empty_page = named(QtWidgets.QWidget(), "placeholderPage")
        empty_layout = QtWidgets.QVBoxLayout(self.empty_page)
        empty_layout.addStretch(1)
        empty_layout.addWidget(self.placeholder)
        empty_layout.addWidget(self.demo_button, 0, QtCore.Qt.AlignmentFlag.AlignHCenter)
        empty_layout.addStretch(1)
        self.stack = QtWidgets.QStackedWidget()
        self.stack.addWidget(self.empty_page)
        self.stack.addWidget(self.graphics)
        self.channels.sigChanged.connect(self._redraw_planes)
        self.channels.sigLevelsTyped.connect(lambda: self.continuous.setChecked(False))

        # -- status line
        self.info = named(QtWidgets.QLabel(), "previewInfo")
        self.info.setTextFormat(QtCore.Qt.TextFormat.RichText)
        self.cursor_label = named(QtWidgets.QLabel(), "previewCursor")
        self.cursor_label.setAlignment(QtCore.Qt.AlignmentFlag.AlignRight)
        # both wrap instead of widening the window (or running into each other)
        self.info.setWordWrap(True)
        self.cursor_label.setWordWrap(True)
        info_row = QtWidgets.QHBoxLayout()
        info_row.setContentsMargins(8, 2, 8, 4)
        info_row.addWidget(self.info, 1)
        info_row.addWidget(self.cursor_label)

        # -- shown over the image while the followed run's server does not answer
        self.banner = named(QtWidgets.QFrame(), "lostBanner")
        self.banner_text = named(QtWidgets.QLabel(), "lostBannerText")
        self.banner_text.setWordWrap(True)
        banner_layout = QtWidgets.QHBoxLayout(self.banner)
        banner_layout.setContentsMargins(10, 6, 10, 6)
        banner_layout.addWidget(self.banner_text, 1)
        self.banner.hide()

        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(bar)
        layout.addWidget(self.banner)
        layout.addWidget(self.stack, 1)
        layout.addWidget(self.channels)
        layout.addLayout(info_row)

        self.frame_timer = QtCore.QTimer(self)
        self.frame_timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
        self.frame_timer.setInterval(FRAME_MS)
        self.frame_timer.timeout.connect(self.update_frame)
        self.frame_timer.start()
        self.sigFrameReady.connect(self.update_frame, QtCore.Qt.ConnectionType.QueuedConnection)
        self.stats_timer = QtCore.QTimer(self)
        self.stats_timer.setInterval(STATS_MS)
        self.stats_timer.timeout.connect(self.update_stats)
        self.stats_timer.start()
        self.hist_timer = QtCore.QTimer(self)
        self.hist_timer.setInterval(HISTOGRAM_MS)
        self.hist_timer.timeout.connect(self._update_histogram)
        self.hist_timer.start()
        self.set_source(None)

    # ------------------------------------------------------------------ sources
    def set_source(self, box: FollowBox | None, title: str = "", state: str | None = None) -> None:
        """Follow ``box``'s frames (None: nothing). ``state`` words the empty view."""
        self.box = box
        if box is not None:
            box.on_prepared = self.sigFrameReady.emit  # called on the follower thread
        self.title = title
        self.frame = None
        self.static = None
        self.static_meta = None
        self._forget_planes()
        self.needs_autolevel = True
        self.recv_meter.reset()
        self.disp_meter.reset()
        self.received_fps = self.displayed_fps = 0.0
        self.stream_combo.blockSignals(True)
        self.stream_combo.clear()
        self.stream_combo.blockSignals(False)
        self._stream_chosen = False
        self.image.clear()
        self.image.frame_serial += 1
        self._shown_shape = None
        if box is None:
            self._show_placeholder(
                "<h3>No run selected</h3>Select a run in the Runs panel to watch its live "
                "preview, or submit one with <b>Ctrl+N</b>.",
                demo=True,
            )
        elif box.finished or state in ("completed", "failed", "cancelled"):
            self._show_placeholder(
                f"<h3>{title} — {state or 'finished'}</h3>This run has ended, so there are no "
                "live frames. Pick an array in the Results panel to view it here."
            )
        else:
            self._show_placeholder(f"<h3>{title}</h3>Waiting for the first preview frame…")
        self.update_stats()

    def set_banner(self, text: str | None) -> None:
        """A warning over the image (the run's server stopped answering); None hides it."""
        if not text:
            self.banner.hide()
            return
        if self.banner_text.text() != text:
            self.banner_text.setText(text)
        self.banner.show()

    def run_ended(self, state: str) -> None:
        """The followed run ended: keep its last frame, or say why there is none."""
        if self.frame is None and self.static is None:
            self._show_placeholder(
                f"<h3>{self.title} — {state}</h3>The run ended without a preview frame. "
                "Its stored results are in the Results panel."
            )

    def show_array(self, array: np.ndarray, title: str, meta: dict | None = None) -> None:
        """Show a stored array (a result) instead of the live stream; ``meta`` is its image
        metadata (axes, scale, channels): channels as a composite, z/t with sliders."""
        array = np.asarray(array)
        self.box = None
        self.frame = None
        self.static = array
        self.static_meta = meta_of(meta, array.shape)
        self.scale_bar.update(self.static_meta, array.shape[-1])
        self.title = title
        self.stream_combo.clear()
        self.needs_autolevel = True
        if not self._draw_planes(array, self.static_meta):
            while array.ndim > 2 and not (array.ndim == 3 and array.shape[-1] in (3, 4)):
                array = array[0]  # not an image by its axes: its first plane
            self.levels = auto_levels(array)
            self._display(array, self.levels)
        self._histogram_stale = True
        self._update_histogram()
        self.update_stats()

    def _show_placeholder(self, html: str, demo: bool = False) -> None:
        self.cursor_label.setText("")  # nothing shown: nothing under the mouse
        self.placeholder.setText(html)
        self.demo_button.setVisible(demo)
        self.stack.setCurrentWidget(self.empty_page)
        self._update_actions()

    def _update_actions(self) -> None:
        shown = self.stack.currentWidget() is self.graphics
        for act in (self.act_autolevel, self.act_tiff, self.act_png):
            act.setEnabled(shown)
        for field in (self.level_min, self.level_max, self.gamma):
            field.setEnabled(shown)  # nothing shown: no levels to type
        # a composite: each channel has its own levels, under the image; the one Min and
        # Max leave the toolbar meanwhile (their toolbar actions hold the labelled fields)
        composite = self.channels.composite
        for field in (self.level_min, self.level_max):
            field.setEnabled(shown and not composite)
            for act in self.toolbar.actions():
                if self.toolbar.widgetForAction(act) is field.parentWidget():
                    act.setVisible(not composite)
        self.act_pause.setEnabled(self.box is not None)

    def current_stream(self) -> str:
        return self.stream_combo.currentText()

    def _stream_picked(self, name: str) -> None:
        # only a choice changes the combo with its signals on (the panel blocks them)
        if name:
            self._stream_chosen = True
        self._stream_changed(name)

    def _stream_changed(self, name: str) -> None:
        self.needs_autolevel = True
        self.recv_meter.reset()
        self.cursor_label.setText("")  # the readout was of the other stream's frame

    def _refresh_streams(self) -> None:
        if self.box is None:
            return
        names = self.box.stream_names()
        existing = [self.stream_combo.itemText(i) for i in range(self.stream_combo.count())]
        if names != existing:
            # the first stream by name until the user picks one: which stream a watcher
            # happened to receive first must not decide what the window shows
            current = self.current_stream()
            keep = current if self._stream_chosen and current in names else (names or [""])[0]
            self.stream_combo.blockSignals(True)
            self.stream_combo.clear()
            self.stream_combo.addItems(names)
            self.stream_combo.setCurrentText(keep)
            self.stream_combo.blockSignals(False)
            if keep != current:
                self._stream_changed(keep)

    # ------------------------------------------------------------------ frame clock
    def update_frame(self) -> None:
        """Draw the newest frame of the chosen stream, if there is a new one."""
        box = self.box
        if box is None or self.act_pause.isChecked():
            return
        if not self.current_stream():
            self._refresh_streams()
            if not self.current_stream():
                return
        stream = self.current_stream()
        box.want = self._want(stream)
        prepared = box.take_prepared(stream)
        if prepared is not None:
            frame, step, shown = prepared
        elif box.preparer_alive:
            return  # the follower thread prepares the next one
        else:  # no follower (the run ended, or a box fed directly): prepare here
            taken = box.take_frame(stream)
            if taken is None:
                return
            frame, step, shown = taken, None, None
        self.frame = frame
        image = frame.image
        meta = meta_of(frame.meta, image.shape)
        self.scale_bar.update(meta, image.shape[-1])
        if self._draw_planes(image, meta):  # channels or a stack: a composite or a plane
            self._histogram_stale = not self.channels.composite
            return
        now = time.monotonic()
        continuous_due = (
            self.continuous.isChecked() and now - self._levels_at >= CONTINUOUS_LEVELS_S
        )
        if self.needs_autolevel or continuous_due:
            self.levels = auto_levels(shown if shown is not None else image, max_samples=65_536)
            self._levels_at = now
            self._levels_stale = False
            self.needs_autolevel = False
        else:
            self._levels_stale = self.continuous.isChecked()  # caught up by update_stats
        self._display(image, self.levels, step, shown)
        self._histogram_stale = True

    def _want(self, stream: str) -> tuple:
        size = self.view.size()
        pixel_size = None
        if self._shown_shape is not None:
            px_w, px_h = self.view.viewPixelSize()
            pixel_size = min(px_w, px_h)
        return (stream, size.width(), size.height(), pixel_size, self._shown_shape)

    def _display(
        self,
        image: np.ndarray,
        levels: tuple[float, float] | None,
        step: int | None = None,
        shown: np.ndarray | None = None,
        new: bool = True,
    ) -> None:
        """Draw ``image``, block-averaged to about the screen's resolution.

        A 2048² frame in a 600-pixel view is drawn from a 512² mean of 4x4 blocks: the
        eye sees the same picture and the event loop does a sixteenth of the work. The
        follower thread usually prepared ``shown`` already. The item keeps the full
        frame's coordinates, so the cursor reads raw pixels.
        """
        first = self._shown_shape != image.shape
        if shown is None or step is None:
            size = self.view.size()
            pixel_size = None
            if not first:
                pixel_size = min(self.view.viewPixelSize())
            step = display_step(
                image.shape, size.width(), size.height(), pixel_size, self._shown_shape
            )
            shown = downsample(image, step)
        self._shown_shape = image.shape
        self._shown_step = step
        self.image.set_frame(shown, levels, new)
        self.image.setRect(QtCore.QRectF(0, 0, shown.shape[1] * step, shown.shape[0] * step))
        if self.stack.currentWidget() is not self.graphics:
            self.stack.setCurrentWidget(self.graphics)
            self._update_actions()
        if first:
            self.view.autoRange(padding=0.0)
        self._update_cursor()  # the value under a still mouse is this frame's

    def _range_changed(self, *args) -> None:
        """After a zoom, redraw the shown frame at the new resolution."""
        active = self.channels.active and self.plane is not None
        array = self.plane if active else self.displayed_array()
        if array is None or array.shape[-2:] != self._shown_shape:
            return
        size = self.view.size()
        shape = array.shape[-2:]
        step = display_step(
            shape, size.width(), size.height(), min(self.view.viewPixelSize()), shape
        )
        if step != self._shown_step:
            if active:
                self._redraw_planes()
            else:
                self._display(array, self.levels, new=False)

    def _update_histogram(self) -> None:
        if not self._histogram_stale or self.image.image is None:
            return
        self._histogram_stale = False
        self._setting_levels = True
        try:
            self.hist.imageChanged(autoLevel=False)
            if self.levels is not None:
                self.hist.setLevels(*self.levels)
        finally:
            self._setting_levels = False

    def _levels_dragged(self, hist) -> None:
        """The user moved the histogram's region: manual levels, continuous off."""
        if self._setting_levels:
            return
        lo, hi = self.hist.getLevels()
        self.levels = (float(lo), float(hi))
        self._show_levels(*self.levels)
        if self.continuous.isChecked():
            self.continuous.setChecked(False)

    def update_stats(self) -> None:
        if (
            self._levels_stale
            and self.continuous.isChecked()
            and self.frame is not None
            and not self.channels.composite
        ):
            # the last frame came sooner than continuous levels follow: its levels now
            self._levels_stale = False
            self._levels_at = time.monotonic()
            self.levels = auto_levels(self.image.image, max_samples=65_536)
            self.image.setLevels(self.levels)
            self._histogram_stale = True
        box = self.box
        if box is not None:
            self._refresh_streams()
            stream = self.current_stream()
            self.received_fps = self.recv_meter.sample(box.received_count(stream) if stream else 0)
        else:
            self.received_fps = 0.0
        self.displayed_fps = self.disp_meter.sample(self.image.painted)
        parts = []
        if self.title:
            parts.append(f"<b>{self.title}</b>")
        if self.static is not None:
            a = self.static
            parts.append(f"{'×'.join(map(str, a.shape))} {a.dtype}")
        if self.run_progress and self.static is None and box is not None:
            parts.append(self.run_progress)  # the run's own frame index, from its progress
        if self.static is None and self.frame is not None:
            f = self.frame
            parts.append(f"{'×'.join(map(str, f.image.shape))} {f.image.dtype}")
        if box is not None:
            # what this window got and drew (newest wins: it may skip frames)
            count = self.frame.number if self.frame is not None else 0
            parts.append(f"{count} received, <b>{self.received_fps:.1f}</b> fps")
            parts.append(f"displayed <b>{self.displayed_fps:.1f}</b> fps")
            if self.act_pause.isChecked():
                parts.append("<span style='color:#e5c07b'>paused</span>")
        shown = self.frame is not None or self.static is not None
        if self.levels is not None and shown and not self.channels.composite:
            spec = ".0f" if self._integer_image() else ".4g"
            parts.append(f"levels {self.levels[0]:{spec}}–{self.levels[1]:{spec}}")
            self._show_levels(*self.levels)
        self.info.setText("  ·  ".join(parts))

    def set_run_progress(self, text: str | None) -> None:
        """Where the run itself is ("frame 95 of 3000 · 2m 10s left"), from its progress;
        the frame count beside it is what this window received."""
        self.run_progress = text or ""

    # ------------------------------------------------------------------ channels, planes
    def _shown_meta(self) -> ImageMeta | None:
        """The image metadata of what is shown (the live frame's or the result's)."""
        if self.static is not None:
            return self.static_meta
        if self.frame is not None:
            return meta_of(self.frame.meta, self.frame.image.shape)
        return None

    def _forget_planes(self) -> None:
        self.plane = None
        if self.channels.set_layout(None):
            self.hist.show()
            self._update_actions()

    def _draw_planes(self, array: np.ndarray, meta: ImageMeta | None, new: bool = True) -> bool:
        """Draw the chosen plane of a multi-channel or stacked array (a composite of the
        channels, or one plane with the histogram); False for a plain 2-D or RGB image."""
        layout = layout_of(array.shape, meta)
        if layout is None or layout.plain:
            self._forget_planes()
            return False
        if self.channels.set_layout(layout, bool(np.issubdtype(array.dtype, np.integer))):
            self.needs_autolevel = True
            self.hist.setVisible(layout.channel is None)
            self._update_actions()
        plane = plane_of(array, layout, self.channels.index)
        self.plane = plane
        now = time.monotonic()
        due = self.continuous.isChecked() and now - self._levels_at >= CONTINUOUS_LEVELS_S
        if layout.channel is None:  # a z or t stack: this plane, drawn as a 2-D frame
            if self.needs_autolevel or due:
                self.levels = auto_levels(plane, max_samples=65_536)
                self._levels_at = now
                self.needs_autolevel = False
            self._display(plane, self.levels, new=new)
            return True
        size = self.view.size()
        shape = plane.shape[1:]
        pixel = min(self.view.viewPixelSize()) if self._shown_shape == shape else None
        step = display_step(shape, size.width(), size.height(), pixel, self._shown_shape)
        shown = [downsample(p, step) for p in plane]
        if self.needs_autolevel or due:
            self.channels.auto_levels(shown)
            self._levels_at = now
            self.needs_autolevel = False
        rgb = composite(
            shown, self.channels.levels, layout.colours, self.channels.visible(), self.gamma.value()
        )
        self._display(plane[0], (0.0, 255.0), step, rgb, new=new)
        return True

    def _redraw_planes(self) -> None:
        """A slider, a channel's box or levels, gamma or the zoom changed: draw again."""
        array = self.displayed_array()
        if array is None or not self.channels.active:
            return
        if self.continuous.isChecked():  # another plane or zoom: levels of what is shown now
            self.needs_autolevel = True
        if not self._draw_planes(array, self._shown_meta(), new=False):
            return
        if not self.channels.composite:
            self._histogram_stale = True
            self._update_histogram()
        self.update_stats()

    # ------------------------------------------------------------------ levels, gamma
    def _level_field(self, name: str, tip: str) -> QtWidgets.QDoubleSpinBox:
        return level_field(name, tip, self._levels_typed)

    def _integer_image(self) -> bool:
        array = self.displayed_array()
        return array is not None and np.issubdtype(array.dtype, np.integer)

    def _show_levels(self, low: float, high: float) -> None:
        """The fields follow the levels (not while the user types in them); whole numbers
        for an integer image."""
        decimals = 0 if self._integer_image() else 3
        for field, value in ((self.level_min, low), (self.level_max, high)):
            if field.decimals() != decimals and not field.hasFocus():
                field.setDecimals(decimals)
            if not field.hasFocus() and field.value() != value:
                field.blockSignals(True)
                field.setValue(value)
                field.blockSignals(False)

    def _levels_typed(self) -> None:
        low, high = self.level_min.value(), self.level_max.value()
        shown_as = 0.5 * 10 ** -self.level_min.decimals()  # the fields round the levels
        if self.levels is not None and all(
            abs(a - b) <= shown_as for a, b in zip((low, high), self.levels)
        ):
            return  # left without a change (focus out): the levels stay as they are
        if high <= low:
            self.sigStatus.emit("the maximum must be above the minimum")
            self._show_levels(*(self.levels or (low, low + 1)))
            return
        self.set_levels(low, high)

    def _gamma_changed(self) -> None:
        if self.channels.composite:
            self._redraw_planes()  # the composite bends each channel by gamma itself
            return
        if abs(self.gamma.value() - 1.0) < 1e-6:
            self.hist.gradientChanged()  # the colour map's own table again
        else:
            self._apply_gamma()

    def _apply_gamma(self, *_) -> None:
        """The colour map's table, bent by gamma (value ** gamma within the levels)."""
        gamma = self.gamma.value()
        if abs(gamma - 1.0) < 1e-6:
            return
        base = self.hist.gradient.getLookupTable(512)
        index = np.round(np.linspace(0.0, 1.0, len(base)) ** gamma * (len(base) - 1))
        self.image.setLookupTable(base[index.astype(np.intp)])

    # ------------------------------------------------------------------ controls
    def displayed_array(self) -> np.ndarray | None:
        if self.static is not None:
            return self.static
        return self.frame.image if self.frame is not None else None

    def autolevel_once(self) -> None:
        array = self.plane if self.channels.active else self.displayed_array()
        if array is None:
            return
        if self.channels.composite:
            self.channels.auto_levels(array)
            self._redraw_planes()
            return
        self.levels = auto_levels(array)
        self.image.setLevels(self.levels)
        self._histogram_stale = True
        self._update_histogram()

    def set_levels(self, low: float, high: float) -> None:
        """Manual display range (what dragging the histogram's region does)."""
        self.continuous.setChecked(False)
        self.hist.setLevels(low, high)  # -> _levels_dragged -> self.levels
        self.image.setLevels((low, high))
        self.levels = (float(low), float(high))
        self._show_levels(*self.levels)

    def set_colour_map(self, name: str) -> None:
        if self.cmap_combo.currentText() != name:
            self.cmap_combo.setCurrentText(name)
            return
        if name == "grey":
            self.hist.gradient.loadPreset("grey")
        else:
            self.hist.gradient.setColorMap(pg.colormap.get(name))

    def _pause_toggled(self) -> None:
        paused = self.act_pause.isChecked()
        self.act_pause.setText("Resume" if paused else "Pause")
        self.act_pause.setIcon(icon("play" if paused else "pause"))
        self.update_stats()

    def pixel_at(self, x: float, y: float) -> tuple[int, int, Any] | None:
        """(column, row, raw value) of the shown array at view coordinates, if inside."""
        array = self.displayed_array()
        if array is None:
            return None
        col, row = int(np.floor(x)), int(np.floor(y))
        if self.channels.active and self.plane is not None:
            rows, cols = self.plane.shape[-2:]
            if 0 <= row < rows and 0 <= col < cols:
                return col, row, self.plane[..., row, col]
            return None
        if 0 <= row < array.shape[0] and 0 <= col < array.shape[1]:
            return col, row, array[row, col]
        return None

    def _mouse_moved(self, scene_pos: QtCore.QPointF) -> None:
        self._cursor_scene = QtCore.QPointF(scene_pos)
        self._update_cursor()

    def eventFilter(self, watched: QtCore.QObject, event: QtCore.QEvent) -> bool:
        if watched is self.graphics and event.type() == QtCore.QEvent.Type.Leave:
            self._cursor_scene = None  # the mouse left the image: no readout
            self._update_cursor()
        return False

    def _update_cursor(self) -> None:
        """The readout under the mouse, from the frame shown now (so it never tells a
        value of an earlier frame, or of another stream)."""
        if self._cursor_scene is None or self.stack.currentWidget() is not self.graphics:
            self.cursor_label.setText("")
            return
        point = self.view.mapSceneToView(self._cursor_scene)
        hit = self.pixel_at(point.x(), point.y())
        if hit is None:
            self.cursor_label.setText("")
            return
        col, row, value = hit
        if self.channels.composite and self.plane is not None:
            value_text = self.channels.readout(self.plane, row, col)
        else:
            value_text = "value <b>" + (
                ", ".join(f"{v:g}" for v in np.ravel(value)) if np.ndim(value) else f"{value:g}"
            ) + "</b>"  # fmt: skip
        where = physical_text(self._shown_meta(), col, row)
        self.cursor_label.setText(f"x {col}  y {row} {where} {value_text}")

    def snapshot_tiff(self, path: str | Path | None = None) -> Path | None:
        """Write the current frame, raw (dtype and shape intact), to an OME-TIFF file with
        its pixel size (when the frame carries one), run id, stream name and frame number."""
        array = self.displayed_array()
        if array is None:
            self.sigStatus.emit("no frame to save yet")
            return None
        if path is None:
            default = f"{self.title or 'frame'}-{self.frame.number if self.frame else 0}.tif"
            path, _ = QtWidgets.QFileDialog.getSaveFileName(
                self, "Save frame as TIFF", default, "TIFF images (*.tif *.tiff)"
            )
            if not path:
                return None
        frame = self.frame if self.static is None else None
        write_ome_snapshot(
            path,
            array,
            self._shown_meta(),
            run_id=self.box.key.exec_id if self.box is not None else None,
            stream=self.current_stream() or self.title or "frame",
            frame=frame.number if frame is not None else None,
        )
        path = Path(path)
        self.sigStatus.emit(f"frame saved to {path}")
        return path

    def save_view_png(self, path: str | Path | None = None) -> Path | None:
        """Save the image view as shown (levels, colour map, zoom) to PNG."""
        if path is None:
            path, _ = QtWidgets.QFileDialog.getSaveFileName(
                self, "Save view as PNG", f"{self.title or 'view'}.png", "PNG images (*.png)"
            )
            if not path:
                return None
        path = Path(path)
        if not self.graphics.grab().save(str(path), "PNG"):
            self.sigStatus.emit(f"could not write {path}")
            return None
        self.sigStatus.emit(f"view saved to {path}")
        return path
