"""Helpers of the GUI tests: screenshots and event-loop timing (fixtures: conftest.py)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtWidgets  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def screenshot(widget: QtWidgets.QWidget, name: str) -> Path:
    """Save a PNG of ``widget`` under test-artifacts/ (looked at by people, kept by CI)."""
    QtWidgets.QApplication.processEvents()
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"gui-{name}.png"
    assert widget.grab().save(str(path), "PNG"), f"could not write {path}"
    return path


def measure_timer_lateness(qtbot, seconds: float, interval_ms: int = 10) -> list[float]:
    """Lateness (ms) of each tick of a ``interval_ms`` timer while the event loop runs."""
    timer = QtCore.QTimer()
    timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
    timer.setInterval(interval_ms)
    lateness: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        lateness.append(max(0.0, (now - last[0]) * 1000 - interval_ms))
        last[0] = now

    timer.timeout.connect(tick)
    timer.start()
    qtbot.wait(int(seconds * 1000))
    timer.stop()
    return lateness


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
