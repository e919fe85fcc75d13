"""What the window shows, without Qt and without the network.

Plain data and the few thread-safe boxes that the network threads fill and the GUI
timers read. Nothing here blocks for long or talks to a server, so all of it can be
tested without a display, and the Qt panels stay thin views over it.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zmqruntime import FINAL_STATES, STATES
from zmqruntime.formatting import fmt_bytes, fmt_duration
from zmqruntime.local import is_loopback

#: what the window shows for a run whose server stopped answering: its true state is
#: unknown until the server answers again (the last known progress stays on screen)
CONNECTION_LOST = "connection lost"
#: a run whose server answered again without knowing it (restarted with another store)
LOST = "lost"

#: colours of run states and server states, readable on the dark theme
STATE_COLOURS = {
    "queued": "#e5c07b",
    "running": "#61afef",
    "completed": "#98c379",
    "failed": "#e06c75",
    "cancelled": "#b48ead",
    CONNECTION_LOST: "#d19a66",
    LOST: "#7f848e",
}

DEFAULT_PORT = 5555


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True, order=True)
class Endpoint:
    """Where a server's control channel listens: ``host:port``."""

    host: str
    port: int

    @property
    def key(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_local(self) -> bool:
        return is_loopback(self.host)

    @classmethod
    def parse(cls, text: str, default_host: str = "127.0.0.1") -> Endpoint:
        """``"5555"``, ``"host:5555"``, ``"[::1]:5555"`` or ``"tcp://host:5555"``."""
        text = text.strip()
        if text.startswith("tcp://"):
            text = text[len("tcp://") :]
        if not text:
            raise ValueError("an endpoint needs a port, e.g. 'myscope.lab:5555'")
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port_text = rest.lstrip(":")
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        elif text.isdigit():
            host, port_text = default_host, text
        else:
            host, port_text = text, str(DEFAULT_PORT)
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"{port_text!r} is not a port number") from None
        if not 0 < port < 65535:
            raise ValueError(f"port {port} is out of range (1..65534)")
        if not host:
            raise ValueError("the host is empty")
        return cls(host, port)

    def __str__(self) -> str:
        return self.key


class ServerState(str, enum.Enum):
    ALIVE = "alive"
    STARTING = "starting"
    STOPPING = "stopping"
    #: we asked it to stop (or Force kill) and it did: expected, not an alarm
    STOPPED = "stopped"
    #: a server of this machine whose process is gone, without our asking
    EXITED = "exited"
    #: it does not answer (a remote one, or a local process that hangs)
    DOWN = "down"
    #: it answers, but refused this window's CURVE keys (or the keys are missing)
    AUTH_FAILED = "authentication failed"

    @classmethod
    def gone(cls) -> tuple[ServerState, ...]:
        """The states of a server that does not answer (runs there are out of contact)."""
        return (cls.DOWN, cls.EXITED, cls.STOPPED)


SERVER_STATE_COLOURS = {
    ServerState.ALIVE: "#98c379",
    ServerState.STARTING: "#e5c07b",
    ServerState.STOPPING: "#e5c07b",
    ServerState.STOPPED: "#7f848e",
    ServerState.EXITED: "#be5046",
    ServerState.DOWN: "#e06c75",
    ServerState.AUTH_FAILED: "#c678dd",
}


@dataclass
class ServerRow:
    """One line of the servers panel: what the last ping (or its failure) said."""

    endpoint: Endpoint
    origin: str  # "local" (from this machine's registry or spawned here) or "remote"
    state: ServerState = ServerState.STARTING
    ping_ms: float | None = None
    workers: int | None = None
    workers_busy: int | None = None
    queued: int | None = None
    uptime: float | None = None
    pid: int | None = None
    log_file: str | None = None
    error: str | None = None
    last_ok: float | None = None  # time.time() of the last answered ping
    executor: dict[str, Any] | None = None  # ping's "executor": native, or the Dask cluster

    @property
    def key(self) -> str:
        return self.endpoint.key

    def apply_ping(self, info: dict[str, Any]) -> None:
        self.state = ServerState.ALIVE
        self.ping_ms = info.get("rtt_ms")
        self.workers = info.get("workers")
        self.workers_busy = info.get("workers_busy")
        self.queued = info.get("queued")
        self.uptime = info.get("uptime")
        self.pid = info.get("pid", self.pid)
        self.log_file = info.get("log_file", self.log_file)
        self.executor = info.get("executor")
        self.error = None
        self.last_ok = time.time()

    def apply_failure(self, error: str, starting: bool = False, auth: bool = False) -> None:
        if auth:
            self.state = ServerState.AUTH_FAILED
        else:
            self.state = ServerState.STARTING if starting else ServerState.DOWN
        self.ping_ms = None
        self.workers_busy = None
        self.queued = None
        self.error = error

    @property
    def workers_text(self) -> str:
        if self.workers is None or self.state != ServerState.ALIVE:
            return "–"
        return f"{self.workers_busy or 0}/{self.workers}"

    @property
    def ping_text(self) -> str:
        if self.ping_ms is not None:
            return f"{self.ping_ms:.1f} ms"
        if self.state == ServerState.AUTH_FAILED:
            return "keys refused"
        if self.state in (ServerState.DOWN, ServerState.EXITED) and self.error:
            if "refused" in self.error:
                return "refused"
            if "no reply" in self.error:
                return "timeout"
        return "–"

    @property
    def answers(self) -> bool:
        return self.state in (ServerState.ALIVE, ServerState.STOPPING)

    @property
    def queued_text(self) -> str:
        return "–" if self.queued is None else str(self.queued)

    @property
    def uptime_text(self) -> str:
        return fmt_duration(self.uptime) if self.state == ServerState.ALIVE else "–"


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunKey:
    """A run is named by its server and its id (ids are only unique per server)."""

    server: str
    exec_id: str


@dataclass
class RunRow:
    key: RunKey
    status: dict[str, Any]
    #: "ok"; "lost": its server stopped answering (``status`` is the last known one);
    #: "gone": the server answered again and does not know the run
    contact: str = "ok"
    lost_at: float | None = None  # time.time() when its server stopped answering

    @property
    def state(self) -> str:
        """The state the server last reported."""
        return self.status.get("state", "queued")

    @property
    def display_state(self) -> str:
        """What the window shows: the state, "connection lost" or "lost"."""
        if self.contact == "gone":
            return LOST
        if self.contact == "lost" and not self.is_final:
            return CONNECTION_LOST
        return self.state

    @property
    def is_live(self) -> bool:
        """Unfinished on a server that answers: its elapsed time ticks, it can be cancelled."""
        return not self.is_final and self.contact == "ok"

    @property
    def name(self) -> str:
        return self.status.get("name") or self.key.exec_id

    @property
    def progress(self) -> float | None:
        return self.status.get("progress")

    @property
    def message(self) -> str:
        return self.status.get("message") or ""

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def cancellable(self) -> bool:
        """Whether Cancel can reach this run: unfinished, on a server that answers."""
        return self.is_live

    @property
    def progress_text(self) -> str:
        """The progress as "37 %", or "95 of 600 (16 %)" when the pipeline reports counts."""
        progress = self.progress
        if progress is None:
            return ""
        done, total = self.status.get("done"), self.status.get("total")
        if done is not None and total:
            return f"{fmt_count(done)} of {fmt_count(total)} ({progress:.0%})"
        return f"{progress:.0%}"

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the pace so far (running, some progress, a few seconds in)."""
        progress, spent = self.progress, self.elapsed(now)
        if not self.is_live or self.state != "running" or not progress or progress >= 1:
            return None
        if spent is None or spent < 2.0:
            return None
        return spent * (1.0 - progress) / progress

    def elapsed(self, now: float | None = None) -> float | None:
        """Run time so far; a run out of contact stops at the last moment it was seen."""
        if self.contact != "ok" and not self.is_final and self.lost_at is not None:
            now = self.lost_at
        return elapsed(self.status, now)


class RunTable:
    """All runs the window knows, merged from every server's list and the live stream.

    Updates only mark the table dirty; the view redraws from it on its own clock, so a
    burst of a thousand progress events costs one redraw.
    """

    def __init__(self) -> None:
        self.rows: dict[RunKey, RunRow] = {}
        self._pinned: set[RunKey] = set()  # known here before any list of its server said so
        self.dirty = False
        self.structure_changed = False

    def update_server(self, server: str, executions: list[dict[str, Any]]) -> None:
        """Replace what ``server``'s list says (its newest runs) into the table."""
        seen = set()
        for status in executions:
            key = RunKey(server, status["id"])
            seen.add(key)
            row = self.rows.get(key)
            if row is None:
                self.rows[key] = RunRow(key, dict(status))
                self.structure_changed = True
            elif _newer(status, row.status) or row.contact != "ok":
                row.status = _merge_live(dict(status), row.status)
                row.contact, row.lost_at = "ok", None
            else:
                continue
            self.dirty = True
        # runs that fell out of the server's list window (or were purged) leave the table;
        # runs out of contact stay until resolve() tells what became of them
        self._pinned -= seen
        gone = [k for k in self.rows if k.server == server and k not in seen]
        for key in gone:
            if key in self._pinned or self.rows[key].contact != "ok":
                continue
            del self.rows[key]
            self.structure_changed = self.dirty = True

    def drop_server(self, server: str) -> None:
        for key in [k for k in self.rows if k.server == server]:
            del self.rows[key]
            self._pinned.discard(key)
            self.structure_changed = self.dirty = True

    def mark_lost(self, server: str, at: float) -> list[RunKey]:
        """``server`` stopped answering: its unfinished runs are out of contact."""
        lost = []
        for key, row in self.rows.items():
            if key.server == server and not row.is_final and row.contact == "ok":
                row.contact, row.lost_at = "lost", at
                lost.append(key)
        if lost:
            self.dirty = True
        return lost

    def lost_runs(self, server: str) -> list[RunKey]:
        return [k for k, r in self.rows.items() if k.server == server and r.contact == "lost"]

    def resolve(self, key: RunKey, status: dict[str, Any] | None) -> None:
        """The server answers again: ``status`` of the run, or None if it does not know it."""
        row = self.rows.get(key)
        if row is None:
            return
        if status is None:
            row.contact = "gone"
        else:
            row.status = _merge_live(dict(status), row.status)
            row.contact, row.lost_at = "ok", None
        self._pinned.add(key)  # kept until the next list of its server says otherwise
        self.dirty = True

    def apply_progress(
        self,
        key: RunKey,
        progress: float | None,
        message: str | None,
        done: float | None = None,
        total: float | None = None,
    ) -> None:
        row = self.rows.get(key)
        if row is None or row.is_final:
            return
        row.contact, row.lost_at = "ok", None  # the server spoke: it is there
        row.status["progress"] = progress
        if total is not None:
            row.status["done"], row.status["total"] = done, total
        if message is not None:
            row.status["message"] = message
        if row.state == "queued":
            row.status["state"] = "running"
        self.dirty = True

    def apply_status(self, key: RunKey, status: dict[str, Any]) -> None:
        row = self.rows.get(key)
        if row is None:
            self.rows[key] = RunRow(key, dict(status))
            self._pinned.add(key)
            self.structure_changed = True
        elif _newer(status, row.status) or status.get("state") in FINAL_STATES:
            row.status = _merge_live(dict(status), row.status)
            row.contact, row.lost_at = "ok", None
        self.dirty = True

    def ordered(self, servers: set[str] | None = None) -> list[RunKey]:
        """Newest first; only runs of ``servers`` when given."""
        rows = [r for r in self.rows.values() if servers is None or r.key.server in servers]
        rows.sort(key=lambda r: (r.status.get("created") or 0.0, r.key.exec_id), reverse=True)
        return [r.key for r in rows]

    def take_dirty(self) -> tuple[bool, bool]:
        """(anything changed, rows added or removed) since the last call."""
        out = (self.dirty, self.structure_changed)
        self.dirty = self.structure_changed = False
        return out


_STATE_RANK = {state: i for i, state in enumerate(STATES)}


def _newer(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether ``new`` may replace ``old``: never go back from a final state."""
    if old.get("state") in FINAL_STATES and new.get("state") not in FINAL_STATES:
        return False
    return new != old


def _merge_live(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """A polled status of a running run never takes back progress the stream showed.

    The server's record has no counts (``done`` of ``total``); the stream's total stays,
    and ``done`` follows the polled fraction (which the worker computed as done/total).
    """
    if new.get("state") == old.get("state") == "running":
        if (new.get("progress") or 0.0) < (old.get("progress") or 0.0):
            new["progress"] = old.get("progress")
            new["message"] = old.get("message")
        total = old.get("total")
        if total and "total" not in new and new.get("progress") is not None:
            done = new["progress"] * total
            new["total"], new["done"] = total, round(done) if float(total).is_integer() else done
    return new


def elapsed(status: dict[str, Any], now: float | None = None) -> float | None:
    started = status.get("started")
    if not started:
        return None
    end = status.get("finished") or (now if now is not None else time.time())
    return max(0.0, end - started)


def fmt_count(n: int | float) -> str:
    """A progress count: 95, 2.5."""
    return f"{n:g}" if isinstance(n, float) and not n.is_integer() else f"{int(n)}"


def describe_result(summary: dict[str, Any]) -> str:
    """A one-line description of a listed result: shape and dtype, or a short value."""
    kind = summary.get("kind")
    if kind == "array":
        shape = "×".join(str(s) for s in summary.get("shape", []))
        dtype = np.dtype(summary["dtype"]).name if isinstance(summary.get("dtype"), str) else "?"
        return f"array {shape} {dtype} ({fmt_bytes(summary.get('nbytes'))})"
    if kind == "bytes":
        return f"bytes ({fmt_bytes(summary.get('nbytes'))})"
    if "value" in summary:
        return short_repr(summary["value"])
    return f"value ({fmt_bytes(summary.get('nbytes'))}, fetched on demand)"


def short_repr(value: Any, limit: int = 120) -> str:
    if isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {_brief(v)}" for k, v in value.items()) + "}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _brief(value: Any) -> str:
    if isinstance(value, list):
        return f"[{len(value)} items]"
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}"
    return repr(value)


# --------------------------------------------------------------------------- result tables

#: the first columns of the results table; scalar fields of dict results follow
RESULT_COLUMNS = ("#", "name", "value")


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, np.number, np.bool_))


def plain(value: Any) -> Any:
    """A numpy scalar as the Python one (for sorting, CSV and plots)."""
    return value.item() if isinstance(value, (np.number, np.bool_)) else value


def results_table(summaries: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per stored result: its index, name and what it is, plus a column for each
    scalar field of dict results (a table of counts shows the counts)."""
    columns = list(RESULT_COLUMNS)
    rows = []
    for summary in summaries:
        row: dict[str, Any] = {
            "#": summary["index"],
            "name": summary["name"],
            "value": describe_result(summary),
        }
        value = summary.get("value")
        if summary.get("kind") == "value" and "value" in summary and is_scalar(value):
            row["value"] = plain(value)
        elif (table := column_table(value)) is not None:
            row["value"] = f"table of {len(table[1])} rows: {', '.join(table[0])}"
        elif isinstance(value, dict):
            rest = {k: v for k, v in value.items() if not is_scalar(v)}
            row["value"] = short_repr(rest) if rest else ""  # the fields are columns
            for key, field_value in value.items():
                name = str(key)
                if is_scalar(field_value) and name not in RESULT_COLUMNS:
                    if name not in columns:
                        columns.append(name)
                    row[name] = plain(field_value)
        rows.append(row)
    return columns, rows


def column_table(value: Any) -> tuple[list[str], list[dict[str, Any]]] | None:
    """A dict of equal-length lists of scalars (a pipeline's table of counts per frame) as
    rows, or None if ``value`` is not one."""
    if not isinstance(value, dict) or not value:
        return None
    columns = [str(k) for k in value]
    lists = list(value.values())
    if not all(isinstance(v, (list, tuple, np.ndarray)) and np.ndim(v) == 1 for v in lists):
        return None
    n = len(lists[0])
    if n == 0 or any(len(v) != n for v in lists):
        return None
    if not all(is_scalar(x) for v in lists for x in v):
        return None
    rows = [{c: plain(v[i]) for c, v in zip(columns, lists)} for i in range(n)]
    return columns, rows


def numeric_columns(columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """The columns whose every present value is a number (booleans aside)."""
    out = []
    for c in columns:
        values = [r[c] for r in rows if r.get(c) is not None]
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out.append(c)
    return out


def table_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """The whole table as CSV text (a header line, then one line per row)."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return out.getvalue()


# --------------------------------------------------------------------------- live data


@dataclass
class Frame:
    """One preview frame as received: the array is a read-only view on the message."""

    name: str
    image: np.ndarray
    number: int  # how many frames of this stream this watcher received, this one included
    seq: int | None
    t: float | None  # when the server relayed it (epoch seconds)
    received: float  # time.monotonic() on arrival
    meta: dict[str, Any] | None = None  # its image metadata (zmqruntime.imagemeta), if sent


class FollowBox:
    """What the follower thread leaves for the GUI: newest frame per stream, news, logs.

    A one-slot box per preview stream (a new frame replaces the unread one: never a
    queue of frames), the newest progress and state, and the log lines and result
    notices in arrival order (bounded; the logs view refetches any gap by index).
    """

    MAX_PENDING_LOGS = 2000

    def __init__(self, key: RunKey) -> None:
        self.key = key
        self._lock = threading.Lock()
        self._frames: dict[str, Frame] = {}
        self._taken: dict[str, int] = {}
        #: set by the view: (stream, view width px, view height px, image px per screen
        #: px or None, shape now shown); tells the follower how to prepare frames
        self.want: tuple[str, float, float, float | None, tuple | None] | None = None
        self._prepared: dict[str, tuple[Frame, int, np.ndarray]] = {}
        self.preparer_alive = False
        self.preparer: object | None = None  # the follower thread that prepares frames
        #: called (on the follower thread) once a frame is prepared: the view draws it at
        #: once instead of at its next frame tick (a queued Qt signal in the GUI)
        self.on_prepared: Callable[[], None] | None = None
        self.received: collections.Counter[str] = collections.Counter()
        self._progress: tuple[float | None, str | None, Any, Any] | None = None
        self._status: dict[str, Any] | None = None
        self._logs: list[tuple[int | None, str, float | None]] = []
        self._results: list[tuple[int, str]] = []
        self.error: str | None = None
        self.finished = False

    # -- written by the follower thread
    def put_frame(
        self,
        name: str,
        image: np.ndarray,
        seq: int | None,
        t: float | None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        with self._lock:
            self.received[name] += 1
            number = self.received[name]
            self._frames[name] = Frame(name, image, number, seq, t, time.monotonic(), meta)

    def put_progress(
        self, progress: float | None, message: str | None, done: Any = None, total: Any = None
    ) -> None:
        """The newest progress: a fraction, and ``done`` of ``total`` when the run counts."""
        with self._lock:
            self._progress = (progress, message, done, total)

    def put_status(self, status: dict[str, Any]) -> None:
        with self._lock:
            self._status = status
            if status.get("state") in FINAL_STATES:
                self.finished = True

    def put_log(self, index: int | None, text: str, t: float | None = None) -> None:
        """A live log entry: its index in the run's log, text and time (epoch seconds)."""
        with self._lock:
            if len(self._logs) < self.MAX_PENDING_LOGS:
                self._logs.append((index, text, t))

    def put_result(self, index: int, name: str) -> None:
        with self._lock:
            self._results.append((index, name))

    # -- read by GUI timers
    def stream_names(self) -> list[str]:
        with self._lock:
            return sorted(self._frames)

    def received_count(self, name: str) -> int:
        with self._lock:
            return self.received[name]

    def take_frame(self, name: str) -> Frame | None:
        """The newest frame of ``name`` if it was not taken before, else None."""
        with self._lock:
            frame = self._frames.get(name)
            if frame is None or self._taken.get(name) == frame.number:
                return None
            self._taken[name] = frame.number
            return frame

    def prepare_newest(self) -> bool:
        """Downsample the newest frame of the wanted stream for display (follower thread).

        Runs only when the view took the previously prepared frame, so a view slower
        than the camera costs no preparation of frames it will never show.
        """
        want = self.want
        if want is None:
            return False
        name = want[0]
        with self._lock:
            frame = self._frames.get(name)
            if frame is None or self._taken.get(name) == frame.number:
                return False
            prepared = self._prepared.get(name)
            if prepared is not None and prepared[0].number != self._taken.get(name):
                return False  # the last one still waits for the view
        step = display_step(frame.image.shape, *want[1:])
        shown = downsample(frame.image, step)
        with self._lock:
            self._prepared[name] = (frame, step, shown)
        if self.on_prepared is not None:
            self.on_prepared()
        return True

    def take_prepared(self, name: str) -> tuple[Frame, int, np.ndarray] | None:
        """(frame, step, downsampled image) prepared by the follower and not taken yet."""
        with self._lock:
            prepared = self._prepared.get(name)
            if prepared is None or self._taken.get(name) == prepared[0].number:
                return None
            newest = self._frames.get(name)
            if newest is not None and newest.number < prepared[0].number:
                return None  # cannot happen; keeps the order obvious
            self._taken[name] = prepared[0].number
            return prepared

    def take_news(
        self,
    ) -> tuple[
        tuple[float | None, str | None, Any, Any] | None,
        dict[str, Any] | None,
        list[tuple[int | None, str, float | None]],
        list[tuple[int, str]],
    ]:
        """(newest progress, newest status, log lines, result notices) since the last call."""
        with self._lock:
            out = (self._progress, self._status, self._logs, self._results)
            self._progress, self._status, self._logs, self._results = None, None, [], []
            return out


class RateMeter:
    """Events per second over a sliding window, from counts sampled now and then."""

    def __init__(self, window: float = 1.0) -> None:
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def sample(self, count: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        if now - t0 <= 0:
            return 0.0
        return max(0, count - c0) / (now - t0)

    def reset(self) -> None:
        self._samples.clear()


def auto_levels(
    image: np.ndarray, low: float = 0.1, high: float = 99.9, max_samples: int = 262_144
) -> tuple[float, float]:
    """Display levels from percentiles of a strided subsample (fast on 2048² frames)."""
    if image.size == 0:
        return 0.0, 1.0
    step = max(1, int(np.sqrt(image.size / max_samples)))
    sub = image[::step, ::step] if image.ndim >= 2 else image[::step]
    sub = sub[np.isfinite(sub)] if np.issubdtype(sub.dtype, np.floating) else sub
    if sub.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sub, [low, high])
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def display_step(
    shape: tuple[int, ...],
    view_width: float,
    view_height: float,
    pixel_size: float | None = None,
    shown_shape: tuple[int, ...] | None = None,
) -> int:
    """How many image pixels to average per drawn pixel (at least 1).

    ``pixel_size`` is image pixels per screen pixel at the current zoom, valid for
    frames of ``shown_shape``; otherwise the whole frame is assumed to fit the view.
    """
    if len(shape) != 2:
        return 1
    if pixel_size is not None and tuple(shown_shape or ()) == tuple(shape):
        ratio = pixel_size
    elif view_width >= 2 and view_height >= 2:
        ratio = max(shape[0] / view_height, shape[1] / view_width)
    else:
        return 1
    return max(1, int(ratio))


def downsample(image: np.ndarray, step: int) -> np.ndarray:
    """Mean of ``step`` x ``step`` blocks (edges that do not fill a block are dropped).

    Summed from strided views into a wide integer accumulator: a few milliseconds for
    a 2048² uint16 frame, where numpy's reshape-and-reduce takes ten times longer.
    """
    step = min(int(step), 255)
    if step <= 1 or image.ndim != 2:
        return image
    h, w = image.shape[0] // step, image.shape[1] // step
    if h == 0 or w == 0:
        return image
    view = image[: h * step, : w * step]
    integer = np.issubdtype(image.dtype, np.integer)
    if integer and np.issubdtype(image.dtype, np.unsignedinteger) and image.dtype.itemsize <= 2:
        acc_dtype: Any = np.uint32  # 65535 * 255² still fits
    elif integer:
        acc_dtype = np.int64 if np.issubdtype(image.dtype, np.signedinteger) else np.uint64
    else:
        acc_dtype = np.float64
    # rows first (whole contiguous rows added), then the columns of the row sums: a
    # third less time than adding step² strided views (9 vs 14 ms for 2048² uint16, /4)
    rows = view.reshape(h, step, w * step)
    sums = rows[:, 0, :].astype(acc_dtype)
    for i in range(1, step):
        sums += rows[:, i, :]
    cols = sums.reshape(h, w, step)
    acc = cols[:, :, 0].copy()
    for j in range(1, step):
        acc += cols[:, :, j]
    if integer:
        acc //= step * step
    else:
        acc /= step * step
    return acc.astype(image.dtype)


def log_line(text: str, t: float | None) -> str:
    """``HH:MM:SS.mmm  text`` (local time); lines after the first are indented under it."""
    if t is None:
        return text
    stamp = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"
    return stamp + "  " + text.replace("\n", "\n" + " " * (len(stamp) + 2))


@dataclass
class LogBuffer:
    """The log entries of one run by index, so live ones and fetched ones merge in order.

    A live entry that arrives after a gap waits in ``pending`` until the missing ones
    are fetched from the server, so the view never shows lines out of order or twice.
    """

    key: RunKey | None = None
    lines: list[str] = field(default_factory=list)
    pending: dict[int, str] = field(default_factory=dict)

    @property
    def next_index(self) -> int:
        return len(self.lines)

    @property
    def has_gap(self) -> bool:
        return bool(self.pending)

    def add(self, index: int | None, text: str, t: float | None = None) -> list[str]:
        """Add a live entry; returns the entries that can now be shown, in order (each
        stamped with its time when ``t`` is known)."""
        if index is None:
            index = self.next_index
        if index >= self.next_index:
            self.pending[index] = log_line(text, t)
        return self._drain()

    def extend(self, entries: list[dict[str, Any]]) -> list[str]:
        """Entries fetched from the server (``{"index", "t", "text"}``); the new ones."""
        for entry in entries:
            if entry["index"] >= self.next_index:
                self.pending[entry["index"]] = log_line(entry["text"], entry.get("t"))
        return self._drain()

    def _drain(self) -> list[str]:
        new = []
        while self.next_index in self.pending:
            text = self.pending.pop(self.next_index)
            self.lines.append(text)
            new.append(text)
        return new
