"""ExecutionClient: submit runs, ask about them, fetch their results, follow them live.

Requests go through the client's :class:`~zmqruntime.connection.Connection` (every
request has a timeout; a socket whose request timed out is replaced, so a dead server
never leaves the client stuck). Threads may share a client (the GUI polls from a timer
while another thread streams).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import zmq

from . import shm
from .connection import Connection
from .errors import ExecutionCancelled, ExecutionFailed, ProtocolError
from .export import FORMATS, export_run
from .protocol import FINAL_STATES, ControlMessageType
from .stored import RESULTS_BATCH, StoredResults
from .stream import DirectorySink, MemorySink, Subscription, follow
from .transport import data_port_of, tcp_url

#: a long-poll wait is re-issued this often, so a dead server is noticed within
#: WAIT_CHUNK + LIVENESS_MARGIN seconds
WAIT_CHUNK = 1.0
LIVENESS_MARGIN = 2.0
#: arrays a final status brings along when this client reads the store's files itself
INLINE_WHEN_LOCAL = 256 * 1024
#: runs per execute_many / wait_many request: the server handles a request whole in one
#: loop turn, so 1,000 at a time held other clients' pings for up to ~100 ms; 100 keep
#: them in single milliseconds at the same throughput (benchmarks/bench_stream.py)
BATCH = 100


class ExecutionClient:
    """A connection to one zmqruntime server.

    ``auto_spawn`` starts a local server when nothing listens on a loopback port.
    ``keys`` is a key directory (see ``zmqruntime keys generate``) for CURVE servers.
    """

    def __init__(
        self,
        port: int = 5555,
        host: str = "127.0.0.1",
        *,
        auto_spawn: bool = True,
        timeout: float = 5.0,
        keys: str | Path | None = None,
        workers: int | None = None,
        data_dir: str | Path | None = None,
        spawn_timeout: float = 60.0,
    ) -> None:
        #: the control channel: requests, their timeouts, the server it may spawn
        self.connection = Connection(
            host,
            port,
            timeout=timeout,
            keys=keys,
            auto_spawn=auto_spawn,
            workers=workers,
            data_dir=data_dir,
            spawn_timeout=spawn_timeout,
        )
        conn = self.connection
        self.host, self.port, self.endpoint = conn.host, conn.port, conn.endpoint
        self.timeout, self.keys, self.security = conn.timeout, conn.keys, conn.security
        self.auto_spawn, self.workers, self.data_dir = auto_spawn, workers, conn.data_dir
        self.spawn_timeout = spawn_timeout
        #: stored results: listed over the control socket, read from the files if seen here
        self.stored = StoredResults(self.connection)

    @property
    def spawned(self) -> psutil.Process | None:
        """The server process this client started (None if it found one running)."""
        return self.connection.spawned

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close every socket of this client, including those of unfinished streams."""
        self.connection.close()
        self.stored.close()

    def __enter__(self) -> ExecutionClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExecutionClient({self.endpoint!r})"

    # ------------------------------------------------------------------ public API
    def execute(
        self,
        pipeline_code: str,
        config_code: str | None = None,
        *,
        config: dict[str, Any] | None = None,
        name: str | None = None,
        retries: int = 0,
        resources: dict[str, float] | None = None,
    ) -> str:
        """Queue a run and return its id at once. ``pipeline_code`` defines run(ctx, config).

        ``resources`` (e.g. ``{"GPU": 1}``): Dask worker resources the run needs, on a
        server started with ``--dask``; the run waits for a worker that has them.
        """
        if not isinstance(pipeline_code, str):
            raise TypeError("pipeline_code must be Python source code (a str)")
        body = {
            "pipeline_code": pipeline_code,
            "config_code": config_code,
            "config": config,
            "name": name,
            "retries": int(retries),
        }
        if resources:
            body["resources"] = dict(resources)
        return self.connection.request(ControlMessageType.EXECUTE, body)["id"]

    def execute_many(
        self,
        pipeline_code: str,
        configs: list[dict[str, Any] | None],
        config_code: str | None = None,
        *,
        names: list[str | None] | None = None,
        retries: int = 0,
    ) -> list[str]:
        """Queue one run per config (in batches of requests); ids in config order."""
        if not isinstance(pipeline_code, str):
            raise TypeError("pipeline_code must be Python source code (a str)")
        ids: list[str] = []
        for start in range(0, len(configs), BATCH):
            body = {
                "pipeline_code": pipeline_code,
                "config_code": config_code,
                "configs": list(configs[start : start + BATCH]),
                "names": None if names is None else list(names[start : start + BATCH]),
                "retries": int(retries),
            }
            ids += self.connection.request(ControlMessageType.EXECUTE_MANY, body)["ids"]
        return ids

    def gather(
        self,
        exec_ids: list[str],
        timeout: float | None = None,
        *,
        return_exceptions: bool = False,
    ) -> list[dict[str, list[Any]]]:
        """Wait for many runs and return their results, in the order of ``exec_ids``.

        Results come with the final states in few round trips. A failed or cancelled run
        raises (ExecutionFailed / ExecutionCancelled) unless ``return_exceptions``, which
        puts the exception in its place instead.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        out: dict[str, Any] = {}
        for start in range(0, len(exec_ids), BATCH):
            chunk = list(exec_ids[start : start + BATCH])
            while True:
                wait = _poll_chunk(deadline)
                reply = self.connection.request(
                    ControlMessageType.WAIT_MANY,
                    {
                        "ids": chunk,
                        "timeout": wait,
                        "with_results": True,
                        "max_bytes": self._inline_results_bytes(),
                    },
                    timeout=wait + LIVENESS_MARGIN,
                )
                statuses = reply["statuses"]
                if all(s["state"] in FINAL_STATES for s in statuses):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    left = sum(s["state"] not in FINAL_STATES for s in statuses)
                    raise TimeoutError(
                        f"{left} of {len(exec_ids)} runs not finished after {timeout:g} s"
                    )
            stored = reply.get("results", {})
            sinks: dict[str, MemorySink] = {}
            left_out: list[tuple[str, int, int]] = []  # left out of the reply for size
            for status in statuses:
                exec_id = status["id"]
                try:
                    raise_for_status(status)
                except (ExecutionFailed, ExecutionCancelled) as exc:
                    if not return_exceptions:
                        raise
                    out[exec_id] = exc
                    continue
                sinks[exec_id] = MemorySink()
                items = stored.get(exec_id)
                if items is None:
                    left_out.append((exec_id, 0, status["n_results"]))
                    continue
                for item in items:
                    sinks[exec_id].add(item["index"], item["name"], item["value"])
            for exec_id, item in self.stored.runs(left_out):  # their files read ahead
                sinks[exec_id].add(item["index"], item["name"], item["value"])
            out.update((exec_id, sink.close()) for exec_id, sink in sinks.items())
        return [out[i] for i in exec_ids]

    def get_status(self, exec_id: str) -> dict[str, Any]:
        """The run's status dict; raises UnknownExecution for an id never issued."""
        return self.connection.request(ControlMessageType.STATUS, {"id": exec_id})

    def wait(
        self, exec_id: str, timeout: float | None = None, *, _with_results: bool = False
    ) -> dict[str, Any]:
        """Block until the run ends and return its final status.

        Raises TimeoutError after ``timeout`` seconds, ServerUnavailable if the server
        stops answering (noticed within a few seconds).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            chunk = _poll_chunk(deadline)
            status = self.connection.request(
                ControlMessageType.WAIT,
                {
                    "id": exec_id,
                    "timeout": chunk,
                    "with_results": _with_results,
                    "max_bytes": self._inline_results_bytes(),
                },
                timeout=chunk + LIVENESS_MARGIN,
            )
            if status["state"] in FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"execution {exec_id} still {status['state']} after {timeout:g} s"
                )

    def get_results(
        self,
        exec_id: str,
        timeout: float | None = None,
        *,
        directory: str | Path | None = None,
        format: str = "npy",
    ) -> dict[str, list[Any]]:
        """Wait for the run, then return ``{name: [value, ...]}`` in emit order.

        With ``directory``, each result is written there as it arrives (arrays as .npy,
        plus index.json) and the dict holds file paths instead of arrays. Arrays returned
        in memory may be views on received buffers: ``.copy()`` one before changing it. On
        the server's host, finished results are read from the store's files directly.

        ``format="ome-zarr"`` or ``"ome-tiff"`` (with ``directory``) writes images instead
        (``zmqruntime.export``): one per array result name, a name's same-shaped results
        stacked along ``t``, values in values.csv/values.json, all listed in manifest.json;
        the dict then holds each image's path for array names.
        """
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
        if format != "npy":
            if directory is None:
                raise ValueError(f"format={format!r} writes files: give directory=")
            status = self.wait(exec_id, timeout)
            raise_for_status(status)
            return export_run(
                directory,
                exec_id,
                self._listing(exec_id, status["n_results"]),
                lambda index: self.get_result(exec_id, index),
                format,
            )
        # in memory, small results come with the final status: one request fewer
        status = self.wait(exec_id, timeout, _with_results=directory is None)
        raise_for_status(status)
        sink: MemorySink | DirectorySink = (
            DirectorySink(Path(directory), exec_id) if directory is not None else MemorySink()
        )
        items = status.pop("results", None)
        if items is None:
            items = self.fetch_results(exec_id, 0, status["n_results"])
        for item in items:
            sink.add(item["index"], item["name"], item["value"], item.get("meta"))
        return sink.close()

    def cancel(self, exec_id: str) -> dict[str, Any]:
        """Ask the run to stop; returns ``{"cancelled": bool, "state", "message"}``."""
        return self.connection.request(ControlMessageType.CANCEL, {"id": exec_id})

    def list_executions(
        self, limit: int = 200, states: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Recent runs, newest first."""
        body = {"limit": limit, "states": states}
        return self.connection.request(ControlMessageType.LIST, body)["executions"]

    def get_logs(self, exec_id: str, start: int = 0) -> list[dict[str, Any]]:
        """Stored log lines of a run: ``[{"index", "t", "text"}]``."""
        return self.connection.request(ControlMessageType.LOGS, {"id": exec_id, "start": start})[
            "logs"
        ]

    def get_source(self, exec_id: str) -> dict[str, Any]:
        """What the run was submitted with: ``pipeline_code``, ``config_code``, ``config``."""
        return self.connection.request(ControlMessageType.SOURCE, {"id": exec_id})

    def list_results(
        self, exec_id: str, start: int = 0, limit: int = RESULTS_BATCH
    ) -> list[dict[str, Any]]:
        """What a run stored so far, without the bytes: ``[{"index", "name", "kind", ...}]``.

        Arrays list ``dtype``, ``shape`` and ``nbytes``; small plain values come inline as
        ``value``. Fetch one result's value with :meth:`get_result`.
        """
        body = {"id": exec_id, "start": start, "limit": limit, "values": False}
        return self.connection.request(ControlMessageType.RESULTS, body)["results"]

    def get_result_meta(self, exec_id: str, index: int) -> dict[str, Any] | None:
        """The image metadata the pipeline stated for stored result ``index`` (or None).

        A dict as ``zmqruntime.imagemeta.ImageMeta.to_dict`` gives it: ``axes``, and
        where known ``scale``, ``units``, ``channels``, ``kind``; ``ImageMeta.from_dict``
        reads it. ``list_results`` entries carry the same dict as ``meta``.
        """
        batch = self.list_results(exec_id, index, 1)
        if not batch or batch[0]["index"] != index:
            raise IndexError(f"execution {exec_id} has no stored result {index}")
        return batch[0].get("meta")

    def _listing(self, exec_id: str, n_results: int) -> Iterator[dict[str, Any]]:
        """The listing of results ``0 .. n_results-1``, fetched in batches."""
        index = 0
        while index < n_results:
            batch = self.list_results(exec_id, index, RESULTS_BATCH)
            if not batch:
                raise ProtocolError(f"the server lists no result {index} of {exec_id}")
            yield from batch
            index = batch[-1]["index"] + 1

    def get_result(self, exec_id: str, index: int) -> Any:
        """The value of one stored result, by index (running runs included); a client
        that sees the server's files reads it from there (exports, the window, napari)."""
        return self.stored.one(exec_id, index)

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Server facts (workers, queue, data port...) plus ``rtt_ms``, the round trip."""
        t0 = time.perf_counter()
        info = self.connection.request(ControlMessageType.PING, {}, timeout=timeout)
        info["rtt_ms"] = (time.perf_counter() - t0) * 1000
        return info

    def shutdown(self, timeout: float | None = None) -> dict[str, Any]:
        """Ask the server to stop (running runs end as failed; queued ones wait for a restart)."""
        return self.connection.request(ControlMessageType.SHUTDOWN, {}, timeout=timeout)

    def stream(
        self, exec_id: str, *, previews: bool = True, poll_interval: float = 0.5
    ) -> Iterator[dict[str, Any]]:
        """Live events of one run (``kind``: state, progress, log, result, preview).

        Every result comes exactly once and in order, even those emitted before the
        call or dropped on the way; the last event is the final ``state``.
        """
        sub = self.subscribe(exec_id)
        try:
            yield from follow(
                sub,
                exec_id,
                self._probe_status,
                self.fetch_results,
                previews=previews,
                poll_interval=poll_interval,
            )
        finally:
            sub.close()

    def subscribe(
        self, topic: str = "", *, hwm: int = 16, local: bool | None = None
    ) -> Subscription:
        """Subscribe to the events of run ``topic`` ("" = every run); caller closes it.

        On the server's host (checked with the server's probe) this reads the server's
        local socket, and large arrays come through shared memory; elsewhere, or with
        ``local=False``, the TCP data port. ``hwm`` is how many events may wait in this
        process: a viewer that only wants the newest frame passes a small one, so
        frames it would drop anyway are dropped before they cost a copy.
        """
        info = self.connection.server_info()
        where = info.get("data_local") or {}
        use_local = local is not False and shm.probe_matches(where.get("shm_probe"))
        rings = shm.RingReader() if use_local else None
        sock = self.connection.zctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if self.security:
            self.security.apply(sock)
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        if rings is not None:
            sock.connect(where["url"])
        else:
            sock.connect(tcp_url(self.host, info.get("data_port", data_port_of(self.port))))
        return Subscription(sock, rings)

    def events(self, topic: str = "", *, hwm: int = 16) -> zmq.Socket:
        """A plain SUB socket on the TCP data port for ``topic``; caller closes it.

        For code with its own ZeroMQ poll loop; events are ``protocol.parse_event(frames)``
        and always carry their bytes. ``subscribe`` is the faster way on the same host.
        """
        return self.subscribe(topic, hwm=hwm, local=False).socket

    def fetch_results(self, exec_id: str, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Stored results ``start <= index < stop`` as result events, in batches.

        A result is streamed before its file is written; one not stored yet is waited for.
        A client that sees the server's files reads them itself (see localstore).
        """
        for run_id, item in self.stored.runs([(exec_id, start, stop)]):
            yield {"kind": "result", "id": run_id, "seq": None, "fetched": True, **item}

    # ------------------------------------------------------------------ internals
    def _probe_status(self, exec_id: str) -> dict[str, Any]:
        """get_status with the budget of one wait chunk: a quiet stream notices a dead
        server as fast as wait() does (within poll_interval + 3 s by default)."""
        timeout = min(self.timeout, WAIT_CHUNK + LIVENESS_MARGIN)
        return self.connection.request(ControlMessageType.STATUS, {"id": exec_id}, timeout=timeout)

    def _inline_results_bytes(self) -> int:
        """How many bytes of arrays a final status may bring along: few when this client
        reads the files itself (faster than the socket), else the server's default."""
        return INLINE_WHEN_LOCAL if self.stored.reader() is not None else 0


def _poll_chunk(deadline: float | None) -> float:
    """How long the next long poll may park: one chunk, cut short by the caller's deadline."""
    if deadline is None:
        return WAIT_CHUNK
    return min(WAIT_CHUNK, max(0.0, deadline - time.monotonic()))


def raise_for_status(status: dict[str, Any]) -> None:
    """Turn a failed or cancelled final status into the matching exception."""
    if status["state"] == "failed":
        raise ExecutionFailed(
            f"execution {status['id']} failed: {status.get('error')}",
            traceback=status.get("traceback"),
            status=status,
        )
    if status["state"] == "cancelled":
        raise ExecutionCancelled(
            f"execution {status['id']} was cancelled: {status.get('message')}", status=status
        )
