"""The server's control requests: one handler per ControlMessageType, in one table.

A request's body arrives decoded and checked (:mod:`zmqruntime.messages`); the request
being served travels as an :class:`Exchange` argument (route, request id, and the stored
arrays its reply needs read off the loop), never as attributes of the server.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import messages as m
from . import protocol
from ._version import __version__
from .errors import ProtocolError, UnknownExecution
from .protocol import ControlMessageType, ErrorCode, EventKind
from .resultfile import Read
from .runstate import RunState
from .server_core import Waiter

if TYPE_CHECKING:
    from .server import ExecutionServer

log = logging.getLogger("zmqruntime.server")

NO_REPLY = object()  # a handler that parks the request (long-poll wait) returns this
#: a listed "value" result carries its value only when it is at most this large (packed)
SUMMARY_VALUE_BYTES = 4096
#: what varies between two bad requests of one kind: quoted text, bytes, numbers
_VARYING = re.compile(r"b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"|0x[0-9a-f]+|\d+")


class RunsRefused(Exception):
    """No new runs for now (the disk is nearly full): answered with ErrorCode.NO_SPACE."""


@dataclass
class Exchange:
    """The control request being served: where its reply goes, and what it needs read."""

    route: list[bytes]
    req: Any
    #: stored arrays the reply needs read (path, offset, buffer): the prefetch thread
    #: fills them off the loop before the reply is sent
    reads: list[Read] = field(default_factory=list)


class ControlHandlers:
    """The handlers of one server's control requests (see :data:`HANDLERS`)."""

    def __init__(self, server: ExecutionServer) -> None:
        self.server = server
        self._bad_input_logged: set[str] = set()

    def respond(self, ex: Exchange, frames: list[Any]) -> list[Any] | None:
        """The reply to one request (its frames after the route), or None when it is
        parked; every error becomes an error reply, never an exception."""
        req = None
        try:
            msg_type, req, body = protocol.parse_request(frames)
            protocol.check_request_size(sum(len(f) for f in frames))  # frames are not copied
            ex.req = req
            result = self.handle(ex, msg_type, body)
            return None if result is NO_REPLY else protocol.reply(req, result)
        except ProtocolError as exc:
            self._note_bad_input(str(exc))
            req = exc.req if exc.req is not None else req
            code, message = ErrorCode(exc.code), str(exc)
        except UnknownExecution as exc:
            code, message = ErrorCode.UNKNOWN_EXECUTION, str(exc)
        except RunsRefused as exc:  # not bad input: the request was fine, the disk is not
            code, message = ErrorCode.NO_SPACE, str(exc)
        except (KeyError, TypeError, ValueError) as exc:
            self._note_bad_input(f"{type(exc).__name__}: {exc}")
            code, message = ErrorCode.BAD_REQUEST, f"bad request: {type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug must cost one reply, never the server
            self._note_bad_input(f"internal error: {type(exc).__name__}: {exc}", exc_info=True)
            code, message = ErrorCode.INTERNAL, f"internal error: {exc}"
        ex.reads.clear()  # an error reply carries no stored arrays
        return protocol.error_reply(req, code, message)

    def _note_bad_input(self, what: str, exc_info: bool = False) -> None:
        """Count a bad request; log the first of each kind (quoted values and numbers
        stripped), so a flood of garbage cannot flood the log."""
        self.server.bad_messages += 1
        key = " ".join(_VARYING.sub("_", what).split()[:3])  # "field _ must", "unknown request"
        if key not in self._bad_input_logged and len(self._bad_input_logged) < 200:
            self._bad_input_logged.add(key)
            if exc_info:
                log.exception("%s (logged once per kind)", what[:500])
                return
            log.warning("bad request (logged once per kind): %s", what[:500])

    def handle(self, ex: Exchange, msg_type: ControlMessageType, body: dict[str, Any]) -> Any:
        """Decode ``body`` and call the handler of ``msg_type``; NO_REPLY when parked."""
        request = m.decode_request(msg_type, body)
        return HANDLERS[msg_type](self, ex, request)

    # ------------------------------------------------------------------ handlers
    def ping(self, ex: Exchange, r: m.Ping) -> dict:
        srv = self.server
        native = srv.supervisor
        busy = native.busy() if native is not None else 0
        ready = native.ready() if native is not None else 0
        workers, queued = srv.n_workers, len(srv.core.queue)
        executor: dict[str, Any] = {"kind": "native", "workers": workers}
        if srv.executor is not None:  # the cluster's workers; runs submitted, not started
            executor = srv.executor.info()
            workers = ready = executor.get("workers", 0)
            busy, queued = srv.core.count(RunState.RUNNING), srv.core.count(RunState.QUEUED)
        return {
            "server": "zmqruntime",
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "host": srv.host,
            "port": srv.port,
            "data_port": srv.data_port,
            "workers": workers,
            "workers_ready": ready,
            "workers_busy": busy,
            "executor": executor,
            "queued": queued,
            "running": busy,
            "uptime": time.time() - srv._started,
            "data_dir": str(srv.data_dir),
            "store_token": srv.store_token,
            "log_file": str(srv.log_file),
            "secure": srv.security is not None,
            "data_local": srv._data_local_info(),
            "cancel_grace": srv.cancel_grace,
            "bad_messages": srv.bad_messages,
            "storage": srv.disk.info(),
            "time": time.time(),
        }

    def execute(self, ex: Exchange, r: m.Execute) -> dict:
        srv = self.server
        if r.resources and srv.executor is None:
            raise ProtocolError(
                "field 'resources' needs a server whose runs execute on Dask "
                "(zmqruntime serve --dask ...); this server runs them on its own workers"
            )
        srv.disk.check_accepting()
        run = srv._submit(r.pipeline_code, r.config_code, r.config, r.name, r.retries, r.resources)
        srv._dispatch()
        return {"id": run.id, "status": dict(run.record)}

    def execute_many(self, ex: Exchange, r: m.ExecuteMany) -> dict:
        srv = self.server
        srv.disk.check_accepting()
        names = r.names
        ids = [
            srv._submit(
                r.pipeline_code, r.config_code, config, names[i] if names else None, r.retries
            ).id
            for i, config in enumerate(r.configs)
        ]
        srv._dispatch()
        return {"ids": ids}

    def status(self, ex: Exchange, r: m.Status) -> dict:
        return dict(self.server.core.record(r.id))

    def wait(self, ex: Exchange, r: m.WaitFor) -> Any:
        """Long poll (``wait`` and ``wait_many``): answered when the runs end or at the
        timeout; with ``with_results``, stored results of completed runs ride along."""
        waiter = Waiter(
            ex.route,
            ex.req,
            set(),
            time.monotonic() + r.timeout,
            list(r.ids),
            r.with_results,
            r.max_bytes,
            single=isinstance(r, m.Wait),
        )
        if r.timeout <= 0 or not self.server.core.park(waiter):
            return self.waiter_reply(waiter, ex)
        return NO_REPLY

    def waiter_reply(self, waiter: Waiter, ex: Exchange) -> dict[str, Any]:
        core, store = self.server.core, self.server.store
        statuses = [dict(core.record(i)) for i in waiter.ids]
        reply: dict[str, Any] = dict(statuses[0]) if waiter.single else {"statuses": statuses}
        if waiter.with_results:
            results: dict[str, list] = {}
            truncated: list[str] = []
            budget = waiter.max_bytes
            for status in statuses:
                if status["state"] != RunState.COMPLETED or status["n_results"] == 0:
                    continue
                entries = list(store.results(status["id"]))
                size = sum(int(e.get("nbytes", 0)) for e in entries)
                if size > budget:
                    truncated.append(status["id"])
                    continue
                budget -= size
                files = store.files.reader(status["id"])
                results[status["id"]] = [
                    _with_meta(
                        {"index": e["index"], "name": e["name"], "value": files.load(e, ex.reads)},
                        e,
                    )
                    for e in entries
                ]
            if waiter.single:
                if results:
                    reply["results"] = results[waiter.ids[0]]
            else:
                reply.update(results=results, truncated=truncated)
        return reply

    def answer(self, waiter: Waiter) -> None:
        """The reply to a parked request (RunCore marks it answered)."""
        ex = Exchange(waiter.route, waiter.req)
        self.server._send(ex, protocol.reply(waiter.req, self.waiter_reply(waiter, ex)))

    def list_runs(self, ex: Exchange, r: m.ListRuns) -> dict:
        core = self.server.core
        records = self.server.store.list(limit=r.limit, states=r.states)
        live = {run.id: run.record for run in (*core.runs.values(), *core.unsaved.values())}
        return {"executions": [dict(live.get(rec["id"], rec)) for rec in records]}

    def cancel(self, ex: Exchange, r: m.Cancel) -> dict:
        srv = self.server
        record = srv.core.record(r.id)
        run = srv.core.runs.get(r.id)
        if run is None or RunState(record["state"]).final:
            return {
                "cancelled": False,
                "state": record["state"],
                "message": f"execution {r.id} already {record['state']}; nothing to cancel",
            }
        if run.state is RunState.QUEUED:
            if srv.executor is not None:  # submitted to Dask, not started: withdrawn
                srv.executor.cancel(run)
            srv.core.cancel_queued(run)
            return {"cancelled": True, "state": "cancelled", "message": "cancelled while queued"}
        if srv.core.request_cancel(run, srv.cancel_grace):
            srv._cancel_on_worker(run)
            run.record["message"] = "cancel requested"
            srv._publish(
                run,
                EventKind.PROGRESS,
                {"progress": run.record["progress"], "message": "cancel requested"},
            )
        return {
            "cancelled": True,
            "state": "running",
            "message": f"cancel requested; the worker is killed after {srv.cancel_grace:g} s "
            "if the pipeline does not stop",
        }

    def results(self, ex: Exchange, r: m.Results) -> dict:
        store = self.server.store
        record = self.server.core.record(r.id)
        if r.values is False:  # a listing: what each result is, without its bytes
            listing = [_result_summary(e) for e in store.results(r.id, r.start, r.limit)]
            return {"results": listing, "n_results": record["n_results"], "state": record["state"]}
        files = store.files.reader(r.id)  # arrays are read off the loop (see _send)
        out, total_bytes = [], 0
        for entry in store.results(r.id, r.start, r.limit):
            value = files.load(entry, ex.reads)
            out.append(
                _with_meta({"index": entry["index"], "name": entry["name"], "value": value}, entry)
            )
            total_bytes += int(entry.get("nbytes", 0))
            if total_bytes >= r.max_bytes:
                break
        return {"results": out, "n_results": record["n_results"], "state": record["state"]}

    def logs(self, ex: Exchange, r: m.Logs) -> dict:
        record = self.server.core.record(r.id)
        logs = self.server.store.logs(r.id, r.start, r.limit)
        return {"logs": logs, "n_logs": record["n_logs"]}

    def source(self, ex: Exchange, r: m.Source) -> dict:
        """The code and config a run was submitted with (for a details view or a re-run)."""
        self.server.core.record(r.id)
        pipeline_code, config_code, config = self.server.store.code_of(r.id)
        return {
            "id": r.id,
            "pipeline_code": pipeline_code,
            "config_code": config_code,
            "config": config,
        }

    def shutdown(self, ex: Exchange, r: m.Shutdown) -> dict:
        self.server._stopping = True
        return {"stopping": True, "pid": os.getpid()}


#: the handler of each control request type (a new request: a member, a dataclass in
#: messages.REQUESTS, and a line here)
HANDLERS: dict[ControlMessageType, Callable[[ControlHandlers, Exchange, Any], Any]] = {
    ControlMessageType.PING: ControlHandlers.ping,
    ControlMessageType.EXECUTE: ControlHandlers.execute,
    ControlMessageType.EXECUTE_MANY: ControlHandlers.execute_many,
    ControlMessageType.STATUS: ControlHandlers.status,
    ControlMessageType.WAIT: ControlHandlers.wait,
    ControlMessageType.WAIT_MANY: ControlHandlers.wait,
    ControlMessageType.LIST: ControlHandlers.list_runs,
    ControlMessageType.CANCEL: ControlHandlers.cancel,
    ControlMessageType.RESULTS: ControlHandlers.results,
    ControlMessageType.LOGS: ControlHandlers.logs,
    ControlMessageType.SOURCE: ControlHandlers.source,
    ControlMessageType.SHUTDOWN: ControlHandlers.shutdown,
}


def _result_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """Index, name and kind of a stored result, with dtype/shape/nbytes; small values inline."""
    out = {"index": entry["index"], "name": entry["name"], "kind": entry.get("kind", "value")}
    for key in ("dtype", "shape", "nbytes", "meta", "order", "file", "offset"):
        if key in entry:
            out[key] = entry[key]
    if out["kind"] == "value" and "file" not in entry:
        packed, _ = protocol.pack(entry.get("value"))
        out["nbytes"] = len(packed)
        if len(packed) <= SUMMARY_VALUE_BYTES:
            out["value"] = entry.get("value")
    return out


def _with_meta(item: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A result item with the image metadata its pipeline stated (protocol.md §4.2), if any."""
    if "meta" in entry:
        item["meta"] = entry["meta"]
    return item
