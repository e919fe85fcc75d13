"""What a pipeline sees: the ``ctx`` and ``config`` handed to ``run(ctx, config)``."""

from __future__ import annotations

import io
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import protocol, shm
from .errors import ExecutionCancelled, RunEnded
from .imagemeta import meta_for
from .resultfile import NPY_DATA_OFFSET, ResultWriter, RunFiles, aligned_copy

#: bytes results larger than this are written to a file instead of the index
INLINE_BYTES_LIMIT = 1 << 20
#: other values whose encoding is larger than this, or that hold arrays, go to a file too
INLINE_VALUE_LIMIT = 64 * 1024
#: a log line that grows past this without a newline is cut and stored in pieces
MAX_LOG_LINE_CHARS = 16 * 1024
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
        results_dir: Path | RunFiles,
        cancel_event: threading.Event,
        writer: ResultWriter,
        ring: shm.Ring | None = None,
    ) -> None:
        self.execution_id = execution_id
        self._send = send
        #: the run's result files (the store's writer for it): names and places
        self._files = results_dir if isinstance(results_dir, RunFiles) else RunFiles(results_dir)
        self._writer = writer
        self._ring = ring
        self._cancel = cancel_event
        self._n_results = 0
        self.cancel_observed = False
        self._last_progress = 0.0
        self._log_lock = threading.Lock()
        self._log_buffer: list[str] = []
        self._log_chars = 0
        self._log_dropped = 0
        self._closed = False
        self._emit_lock = threading.Lock()
        #: the line a pipeline is writing without a newline yet (tqdm's \r updates)
        self.live_line: Callable[[], str | None] | None = None
        self._live_line_sent: str | None = None

    # -- cancellation
    @property
    def cancelled(self) -> bool:
        """True once a cancel was requested: stop at the next convenient point.

        A pipeline that has seen True is trusted to wind down (save partial results...):
        it is not interrupted, only killed if still running after the grace period.
        """
        if self._cancel.is_set():
            self.cancel_observed = True
            return True
        return False

    def check_cancelled(self) -> None:
        """Raise ExecutionCancelled if a cancel was requested."""
        if self.cancelled:
            raise ExecutionCancelled(f"execution {self.execution_id} was cancelled")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, returning True at once if a cancel arrives (then stop)."""
        self._cancel.wait(max(0.0, float(seconds)))
        return self.cancelled

    # -- acquisition
    def follow_folder(
        self,
        path: str | Path,
        pattern: str = "*.tif*",
        *,
        done_marker: str | None = None,
        idle_timeout: float | None = None,
        recursive: bool = False,
        poll: float | None = None,
        skip_existing: bool = False,
        **options: Any,
    ) -> Iterator[Path]:
        """Each file that lands in ``path``, once, in acquisition order, once complete.

        Ends when ``done_marker`` appears, after ``idle_timeout`` s without a new file,
        or at once on cancel; reports files seen/processed as progress. See
        ``zmqruntime.acquisition.FolderFollower`` for ``settle``, ``give_up`` and the rest.
        """
        from .acquisition import follow_in_context

        return follow_in_context(
            self,
            path,
            pattern,
            done_marker=done_marker,
            idle_timeout=idle_timeout,
            recursive=recursive,
            poll=poll,
            skip_existing=skip_existing,
            **options,
        )

    # -- results
    @property
    def n_results(self) -> int:
        return self._n_results

    def emit(
        self,
        name: str,
        value: Any,
        *,
        copy: bool = True,
        axes: str | None = None,
        scale: Mapping[str, float] | Sequence[float] | None = None,
        units: str | Mapping[str, str] | None = None,
        channels: Sequence[str | Mapping[str, Any]] | None = None,
        kind: str | None = None,
    ) -> None:
        """Store a result and stream it to watchers.

        ``value`` is a numpy array, bytes, or any msgpack-able structure holding arrays at
        any depth, tuples, dicts with non-str keys, complex numbers, None (see README,
        "What comes back"). One the codec cannot carry raises TypeError here, naming the
        result. Arrays are copied once, so the pipeline may reuse its buffer right away;
        the copy (in shared memory for large arrays, where watchers on this host read it)
        is streamed at once and written to disk behind the stream. ``copy=False`` sends
        and writes a top-level array itself through the sockets: then it must not change
        afterwards, and on one host it is slower than the copy.

        An array may say what it is physically (``zmqruntime.imagemeta``): ``axes`` over
        ``tczyx`` (default: ``yx`` for 2-D, then ``zyx``, ``czyx``, ``tczyx``), ``scale``
        (pixel size per axis: ``{"y": 0.65, "x": 0.65}`` or one number per axis),
        ``units`` (default micrometer and second), ``channels`` (names, or ``{"name",
        "color"}`` dicts, one per index of axis ``c``) and ``kind`` (``"labels"`` for
        segmentation masks). Metadata that does not fit the array raises ValueError here.
        """
        given: object = name  # checked at run time: pipelines are not type-checked
        if not isinstance(given, str) or not given:
            raise TypeError("a result name must be a non-empty str")
        image = meta_for(value, axes=axes, scale=scale, units=units, channels=channels, kind=kind)
        with self._emit_lock:  # a thread the run left behind cannot slip in after close()
            self._check_open("emit")
            index = self._n_results
            meta, wire_value, path, to_write, nbytes = self._prepare_result(
                index, name, value, copy
            )
            body = {"name": name, "index": index, "value": wire_value}
            if image is not None:
                meta["meta"] = body["meta"] = image
            self._n_results += 1
            self.flush_logs()
            self._send(protocol.EventKind.RESULT.value, body, True)
            self._writer.submit(index, name, meta, path, to_write, nbytes)

    def close(self) -> None:
        """The run has ended: from now on every method refuses (RunEnded), so that a
        thread the pipeline left running can never file a value under another run."""
        with self._emit_lock:
            self._closed = True

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RunEnded(
                f"run {self.execution_id} has ended: its ctx refuses {what}() "
                "(a thread of the pipeline outlived run(); nothing was stored)"
            )

    def _prepare_result(
        self, index: int, name: str, value: Any, copy: bool = True
    ) -> tuple[dict, Any, Path | None, Any, int]:
        """``(index entry, value to stream, file, what the file gets, bytes waiting)``."""
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"result {name!r}: arrays of Python objects cannot be results")
            room = None
            if copy and self._ring is not None and value.nbytes >= shm.MIN_BYTES:
                room = self._ring.alloc(value.nbytes, wait=True)  # None if it cannot fit
            data = aligned_copy(value, room) if copy else value
            path = self._files.new_file(index, "array")
            meta = {
                "kind": "array",
                "file": path.name,
                "dtype": protocol.dtype_to_wire(value.dtype),
                "shape": list(value.shape),
                "order": "F" if value.flags.f_contiguous and not value.flags.c_contiguous else "C",
                "nbytes": int(value.nbytes),
                "offset": NPY_DATA_OFFSET,  # the server maps the data without reading the file
            }
            return meta, data, path, data, int(value.nbytes)
        if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > INLINE_BYTES_LIMIT:
            raw = bytes(value)
            path = self._files.new_file(index, "bytes")
            meta = {"kind": "bytes", "file": path.name, "nbytes": len(raw)}
            return meta, raw, path, raw, len(raw)
        packed, buffers = protocol.check_value(value, f"result {name!r} (index {index})")
        if buffers or len(packed) > INLINE_VALUE_LIMIT:
            # arrays inside a structure: one self-contained file; what streams is decoded
            # from its bytes, so the pipeline may change its arrays once emit returns
            blob = protocol.blob(packed, buffers)
            path = self._files.new_file(index, "value")
            meta = {"kind": "value", "file": path.name, "nbytes": len(blob)}
            return meta, protocol.loads(blob), path, blob, len(blob)
        if isinstance(value, np.generic):
            value = protocol.unpack(packed, buffers)  # the plain Python scalar it travels as
        elif isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        return {"kind": "value", "value": value}, value, None, None, 0

    # -- live only
    def preview(
        self,
        name: str,
        array: np.ndarray,
        *,
        axes: str | None = None,
        scale: Mapping[str, float] | Sequence[float] | None = None,
        units: str | Mapping[str, str] | None = None,
        channels: Sequence[str | Mapping[str, Any]] | None = None,
        kind: str | None = None,
    ) -> None:
        """Show a frame live; never stored, and dropped when watchers lag (newest wins).

        Takes the image metadata keywords of :meth:`emit` (checked the same way)."""
        self._check_open("preview")
        array = np.asarray(array)
        body: dict[str, Any] = {"name": name, "value": array}
        image = meta_for(array, axes=axes, scale=scale, units=units, channels=channels, kind=kind)
        if image is not None:
            body["meta"] = image
        self._send(protocol.EventKind.PREVIEW.value, body, False)

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report progress as ``done`` of ``total`` (or a fraction 0..1 when total is None)."""
        self._check_open("progress")
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
        self._check_open("log")
        self._append_log(str(text).rstrip("\n"))

    def _append_log(self, text: str) -> None:
        with self._log_lock:
            if self._log_chars + len(text) > LOG_FLUSH_MAX_CHARS:
                self._log_dropped += 1
                return
            self._log_buffer.append(text)
            self._log_chars += len(text)

    def flush_logs(self) -> None:
        """Send the coalesced lines (stored), then the line being written, if it changed
        (``partial``: shown live, never stored; its last version is stored once it ends)."""
        with self._log_lock:
            lines = self._log_buffer
            if self._log_dropped:
                lines.append(
                    f"[zmqruntime: {self._log_dropped} log lines dropped: too much output]"
                )
            self._log_buffer, self._log_chars, self._log_dropped = [], 0, 0
        if lines:
            self._live_line_sent = None
            self._send(protocol.EventKind.LOG.value, {"text": "\n".join(lines)}, True)
        live = self.live_line() if self.live_line is not None else None
        if live and live != self._live_line_sent:
            self._live_line_sent = live
            self._send(protocol.EventKind.LOG.value, {"text": live, "partial": True}, False)


class LogWriter(io.TextIOBase):
    """A stdout/stderr stand-in that turns print() into log lines of the run.

    Each write costs time in proportion to its own length (a progress bar's many small
    writes stay linear). A ``\r`` starts the current line over, as on a terminal: the
    newest version is shown live (see :meth:`Context.flush_logs`) and the last one is
    stored when the line ends. A line longer than MAX_LOG_LINE_CHARS is stored in pieces.
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()
        self._chunks: list[str] = []
        self._chars = 0
        ctx.live_line = self.current_line

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        pieces = s.split("\n")
        with self._lock:
            for i, piece in enumerate(pieces):
                if i:
                    self._end_line()
                if i < len(pieces) - 1 and piece.endswith("\r"):
                    piece = piece[:-1]  # "\r\n" ends a line, it does not clear it
                cut = piece.rfind("\r")
                if cut >= 0:
                    self._chunks, self._chars = [], 0
                    piece = piece[cut + 1 :]
                if piece:
                    self._chunks.append(piece)
                    self._chars += len(piece)
                    if self._chars >= MAX_LOG_LINE_CHARS:
                        self._end_line()
        return len(s)

    def _end_line(self) -> None:
        self._ctx._append_log("".join(self._chunks))
        self._chunks, self._chars = [], 0

    def current_line(self) -> str | None:
        """The line being written (no newline yet), or None."""
        with self._lock:
            if not self._chunks:
                return None
            if len(self._chunks) > 1:
                self._chunks = ["".join(self._chunks)]
            return self._chunks[0]

    def flush(self) -> None:
        """Called when the run ends (and by print(flush=True)): nothing is stored until then."""

    def close_run(self) -> None:
        """The run ended: store the unfinished line's last version."""
        with self._lock:
            if self._chunks:
                self._end_line()
