"""What a pipeline sees: the ``ctx`` and ``config`` handed to ``run(ctx, config)``."""

from __future__ import annotations

import io
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import protocol
from .errors import ExecutionCancelled

#: bytes results larger than this are written to a file instead of the index
INLINE_BYTES_LIMIT = 1 << 20
#: at most this many progress events per second leave a worker (the last one always does)
PROGRESS_RATE_HZ = 50.0
#: a print loop cannot push more than this much log text per flush
LOG_FLUSH_MAX_CHARS = 64 * 1024

SendEvent = Callable[[str, dict[str, Any], bool], None]


class Config(types.SimpleNamespace):
    """A run's configuration: attribute access (``config.sigma``) and mapping access."""

    def __getitem__(self, key: str) -> Any:
        return self.__dict__[key]

    def __contains__(self, key: object) -> bool:
        return key in self.__dict__

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dict__)

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)

    def keys(self):  # noqa: ANN201 - mirrors dict.keys
        return self.__dict__.keys()

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_config(config_code: str | None, config: dict | None, compile_cached) -> Config:
    """Run ``config_code`` in a fresh namespace; its public non-module names are the config."""
    values: dict[str, Any] = {}
    if config_code:
        ns: dict[str, Any] = {"__name__": "__zmqruntime_config__"}
        exec(compile_cached(config_code, "<config>"), ns)
        values = {
            k: v
            for k, v in ns.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType)
        }
    if config:
        values.update(config)
    return Config(**values)


class Context:
    """Handed to ``run(ctx, config)``: emit results, previews, progress and logs.

    Every method sends at once (logs are coalesced), so a watcher sees a run live.
    """

    def __init__(
        self,
        execution_id: str,
        send: SendEvent,
        results_dir: Path,
        cancel_event: threading.Event,
    ) -> None:
        self.execution_id = execution_id
        self._send = send
        self._results_dir = results_dir
        self._cancel = cancel_event
        self._n_results = 0
        self._last_progress = 0.0
        self._log_lock = threading.Lock()
        self._log_buffer: list[str] = []
        self._log_chars = 0
        self._log_dropped = 0

    # -- cancellation
    @property
    def cancelled(self) -> bool:
        """True once a cancel was requested: stop at the next convenient point."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise ExecutionCancelled if a cancel was requested."""
        if self._cancel.is_set():
            raise ExecutionCancelled(f"execution {self.execution_id} was cancelled")

    # -- results
    @property
    def n_results(self) -> int:
        return self._n_results

    def emit(self, name: str, value: Any) -> None:
        """Store a result (array, bytes, or msgpack-able value) and stream it to watchers."""
        if not isinstance(name, str) or not name:
            raise TypeError("a result name must be a non-empty str")
        index = self._n_results
        meta, wire_value = self._store_result(index, value)
        self._n_results += 1
        self.flush_logs()
        self._send(
            protocol.EventKind.RESULT.value,
            {"name": name, "index": index, "meta": meta, "value": wire_value},
            True,
        )

    def _store_result(self, index: int, value: Any) -> tuple[dict[str, Any], Any]:
        if isinstance(value, (np.generic, complex)):
            # numpy scalars become plain numbers, except complex ones (msgpack has none)
            is_complex = isinstance(value, complex) or value.dtype.kind == "c"
            value = np.asarray(value) if is_complex else value.item()
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError("arrays of Python objects cannot be results")
            path = self._file(f"{index}.npy")
            np.save(path, value, allow_pickle=False)
            meta = {
                "kind": "array",
                "file": path.name,
                "dtype": protocol.dtype_to_wire(value.dtype),
                "shape": list(value.shape),
                "nbytes": int(value.nbytes),
            }
            return meta, value
        if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > INLINE_BYTES_LIMIT:
            path = self._file(f"{index}.bin")
            path.write_bytes(value)
            return {"kind": "bytes", "file": path.name, "nbytes": len(value)}, bytes(value)
        try:
            protocol.pack(value)
        except TypeError as exc:
            raise TypeError(f"result {index}: {exc}") from None
        return {"kind": "value", "value": value}, value

    def _file(self, name: str) -> Path:
        self._results_dir.mkdir(parents=True, exist_ok=True)
        return self._results_dir / name

    # -- live only
    def preview(self, name: str, array: np.ndarray) -> None:
        """Show a frame live; never stored, and dropped when watchers lag (newest wins)."""
        array = np.asarray(array)
        self._send(protocol.EventKind.PREVIEW.value, {"name": name, "value": array}, False)

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report progress as ``done`` of ``total`` (or a fraction 0..1 when total is None)."""
        fraction = float(done) / float(total) if total else float(done)
        fraction = min(max(fraction, 0.0), 1.0)
        now = time.monotonic()
        last = fraction >= 1.0
        if not last and now - self._last_progress < 1.0 / PROGRESS_RATE_HZ:
            return
        self._last_progress = now
        body: dict[str, Any] = {"progress": fraction, "message": message}
        if total is not None:
            body.update(done=done, total=total)
        self._send(protocol.EventKind.PROGRESS.value, body, False)

    # -- logs
    def log(self, text: str) -> None:
        """Add a log line; lines are coalesced and sent a few times per second."""
        self._append_log(str(text).rstrip("\n"))

    def _append_log(self, text: str) -> None:
        with self._log_lock:
            if self._log_chars + len(text) > LOG_FLUSH_MAX_CHARS:
                self._log_dropped += 1
                return
            self._log_buffer.append(text)
            self._log_chars += len(text)

    def flush_logs(self) -> None:
        with self._log_lock:
            if not self._log_buffer and not self._log_dropped:
                return
            lines = self._log_buffer
            if self._log_dropped:
                lines.append(
                    f"[zmqruntime: {self._log_dropped} log lines dropped: too much output]"
                )
            self._log_buffer, self._log_chars, self._log_dropped = [], 0, 0
        self._send(protocol.EventKind.LOG.value, {"text": "\n".join(lines)}, True)


class LogWriter(io.TextIOBase):
    """A stdout/stderr stand-in that turns print() into log lines of the run."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        data = self._partial + s
        *lines, self._partial = data.split("\n")
        for line in lines:
            self._ctx._append_log(line)
        return len(s)

    def flush(self) -> None:
        if self._partial:
            self._ctx._append_log(self._partial)
            self._partial = ""
