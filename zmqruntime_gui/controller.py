"""The window's state and every action that touches a server, all off the GUI thread.

The controller owns the server rows, the run table, the followed run and the task
pool. Timers poll: servers once a second (registry + a ping per endpoint), runs twice
a second (one list request per live server). Every request runs in the pool and comes
back as a callback on the GUI thread; a request to a server that does not answer
costs a pool thread its timeout, never the event loop. Panels read the state and call
the actions; they never talk to the network themselves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import psutil
import shiboken6
from PySide6 import QtCore

from zmqruntime import FINAL_STATES, AuthenticationFailed, UnknownExecution, local

from . import net
from .follower import RunFollower
from .model import (
    LOST,
    Endpoint,
    FollowBox,
    RunKey,
    RunTable,
    ServerRow,
    ServerState,
)
from .tasks import TaskRunner

SERVER_POLL_MS = 1000
RUNS_POLL_MS = 500
NEWS_MS = 33  # ~30 Hz: how often the followed run's news reach the tables
SPAWN_GRACE = 60.0  # seconds a spawned server may take to answer before it counts as down
RUN_LIST_LIMIT = 200


class Controller(QtCore.QObject):
    """State plus actions; emits signals when something a panel shows has changed."""

    sigServersChanged = QtCore.Signal()
    sigMessage = QtCore.Signal(str)
    sigError = QtCore.Signal(str, str)  # title, text
    sigRunSubmitted = QtCore.Signal(object)  # RunKey
    sigFollowChanged = QtCore.Signal(object)  # FollowBox | None
    sigLogLines = QtCore.Signal(object, object)  # RunKey, [(index, text, time)]
    sigResultNotice = QtCore.Signal(object)  # RunKey
    sigRunFinished = QtCore.Signal(object, object)  # RunKey, status
    sigContactChanged = QtCore.Signal(object)  # Endpoint: its runs were lost or resolved

    def __init__(
        self,
        settings: QtCore.QSettings,
        runner: TaskRunner | None = None,
        connections: net.Connections | None = None,
        parent: QtCore.QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.settings = settings
        self.runner = runner or TaskRunner(parent=self)
        self.conns = connections or net.Connections()
        self.servers: dict[Endpoint, ServerRow] = {}
        self.registry: dict[Endpoint, local.ServerEntry] = {}
        self.spawned: dict[Endpoint, tuple[psutil.Process, float]] = {}
        self.stopping: set[Endpoint] = set()
        self.runs = RunTable()
        self.box: FollowBox | None = None
        self.follower: RunFollower | None = None
        self._refollow = False  # the followed run was out of contact: subscribe anew
        self._old_followers: list[RunFollower] = []
        self._registry_polled = False
        self._closed = False
        for text in self._remote_setting():
            try:
                ep = Endpoint.parse(text)
            except ValueError:
                continue
            self.servers[ep] = ServerRow(ep, "remote")
        self.key_dirs: dict[Endpoint, str] = {}  # per server, remembered in the settings
        for text, path in self._keys_setting().items():
            try:
                ep = Endpoint.parse(text)
            except ValueError:
                continue
            self.key_dirs[ep] = path
            self.conns.set_keys(ep, path)  # nothing connected yet: closes nothing

        self.server_timer = QtCore.QTimer(self)
        self.server_timer.setInterval(SERVER_POLL_MS)
        self.server_timer.timeout.connect(self.poll_servers)
        self.runs_timer = QtCore.QTimer(self)
        self.runs_timer.setInterval(RUNS_POLL_MS)
        self.runs_timer.timeout.connect(self.poll_runs)
        self.news_timer = QtCore.QTimer(self)
        self.news_timer.setInterval(NEWS_MS)
        self.news_timer.timeout.connect(self._drain_news)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.poll_servers()
        self.server_timer.start()
        self.runs_timer.start()
        self.news_timer.start()

    def close(self) -> None:
        """Stop timers and threads, then close every client. Bounded by the timeouts."""
        if self._closed:
            return
        self._closed = True
        for timer in (self.server_timer, self.runs_timer, self.news_timer):
            timer.stop()
        followers = [f for f in [self.follower, *self._old_followers] if f is not None]
        for f in followers:
            f.stop()
        self.runner.shutdown(wait_s=net.WORK_TIMEOUT + 2)
        for f in followers:
            f.wait(int((net.WORK_TIMEOUT + 2) * 1000))
        self.follower = None
        self._old_followers.clear()
        self.conns.close()

    # ------------------------------------------------------------------ servers
    def _remote_setting(self) -> list[str]:
        value = self.settings.value("servers/remote", [])
        if isinstance(value, str):
            return [value] if value else []
        return [str(v) for v in value] if isinstance(value, list) else []

    def _save_remotes(self) -> None:
        remotes = [ep.key for ep, row in self.servers.items() if row.origin == "remote"]
        self.settings.setValue("servers/remote", remotes)
        self.settings.setValue(
            "servers/key_dirs", json.dumps({ep.key: d for ep, d in self.key_dirs.items()})
        )
        self.settings.sync()

    def _keys_setting(self) -> dict[str, str]:
        try:
            value = json.loads(str(self.settings.value("servers/key_dirs", "") or "{}"))
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

    def key_dir(self, ep: Endpoint | None = None) -> str | None:
        """The key directory used for ``ep`` (its own, else ``--keys``), as text."""
        keys = (self.key_dirs.get(ep) if ep is not None else None) or self.conns.keys
        return str(keys) if keys else None

    def set_key_dir(self, ep: Endpoint, path: str | None) -> None:
        """Reach ``ep`` with the keys in ``path`` (None: the default); remembered."""
        if path:
            self.key_dirs[ep] = path
        else:
            self.key_dirs.pop(ep, None)
        self._save_remotes()
        if self.box is not None and self.box.key.server == ep.key:
            self.follow(None)  # its subscription goes with the old client
        # closing the old clients may wait for a request in flight: not on this thread
        self.runner.submit(lambda: self.conns.set_keys(ep, path or None), lambda _: self._probe(ep))

    def server_rows(self) -> list[ServerRow]:
        return sorted(self.servers.values(), key=lambda r: (r.origin != "local", r.endpoint))

    def alive_servers(self) -> list[Endpoint]:
        return [ep for ep, row in self.servers.items() if row.state == ServerState.ALIVE]

    def add_remote(self, ep: Endpoint, keys: str | None = None) -> bool:
        """Watch a server this window did not start, reached with the key directory
        ``keys`` if given (both remembered in the settings). For a server already in
        the list, only its keys change."""
        if ep in self.servers:
            if keys is not None and (keys or None) != self.key_dirs.get(ep):
                self.set_key_dir(ep, keys or None)
                self.sigMessage.emit(
                    f"{ep.key} is reached with the keys in {keys} now"
                    if keys
                    else f"{ep.key} is reached without keys of its own now"
                )
                return False
            self.sigMessage.emit(f"{ep.key} is already in the list")
            return False
        self.servers[ep] = ServerRow(ep, "remote")
        if keys:
            self.set_key_dir(ep, keys)
            self.sigServersChanged.emit()
            return True
        self._save_remotes()
        self.sigServersChanged.emit()
        self._probe(ep)
        return True

    def watch(self, ep: Endpoint) -> None:
        """Make sure ``ep`` has a row (local: not remembered; others: remembered) and ping it."""
        if ep not in self.servers:
            if ep.is_local:
                self.servers[ep] = ServerRow(ep, "local")
                self.sigServersChanged.emit()
            else:
                self.add_remote(ep)
                return
        self._probe(ep)

    def remove_server(self, ep: Endpoint) -> None:
        """Take a server off the list (a local one that still runs comes back)."""
        row = self.servers.pop(ep, None)
        if row is None:
            return
        if self.box is not None and self.box.key.server == ep.key:
            self.follow(None)
        self.runs.drop_server(ep.key)
        if ep in self.key_dirs:
            self.set_key_dir(ep, None)
        elif row.origin == "remote":
            self._save_remotes()
        self.sigServersChanged.emit()

    def poll_servers(self) -> None:
        if self._closed:
            return
        self.runner.submit(net.registry, self._on_registry, self._on_registry_error, "registry")
        for ep in list(self.servers):
            self._probe(ep)
        self._reap_spawned()

    def _on_registry(self, entries: dict[Endpoint, local.ServerEntry]) -> None:
        self.registry = entries
        changed = not self._registry_polled  # the first answer decides "no server yet"
        self._registry_polled = True
        for ep, entry in entries.items():
            row = self.servers.get(ep)
            if row is None:
                row = self.servers[ep] = ServerRow(ep, "local", pid=entry.pid)
                row.log_file = entry.log_file
                row.workers = entry.workers
                changed = True
                self._probe(ep)
            elif row.origin == "remote" and ep.is_local:
                row.origin = "local"  # a remembered loopback endpoint that we now know
                changed = True
        # a local server whose process is gone stays listed (with its runs) until the user
        # removes it: "stopped" if we asked, "exited" otherwise
        for ep, row in self.servers.items():
            if row.state == ServerState.DOWN and ep not in entries:
                state = self._why_down(ep, row)
                if state != row.state:
                    row.state = state
                    changed = True
        if changed:
            self.sigServersChanged.emit()

    def _on_registry_error(self, exc: BaseException) -> None:
        self.sigMessage.emit(f"cannot read the local server registry: {exc}")

    def _probe(self, ep: Endpoint) -> None:
        self.runner.submit(
            lambda: self.conns.probe(ep),
            lambda info: self._on_probe(ep, info),
            lambda exc: self._on_probe_failed(ep, exc),
            key=f"probe:{ep.key}",
        )

    def _on_probe(self, ep: Endpoint, info: dict[str, Any]) -> None:
        row = self.servers.get(ep)
        if row is None:
            return
        first_answer = row.last_ok is None
        if row.state == ServerState.STOPPED:
            self.stopping.discard(ep)  # it stopped and is back (started again)
        row.apply_ping(info)
        if ep in self.stopping:
            row.state = ServerState.STOPPING
        if first_answer and ep in self.spawned:
            self.sigMessage.emit(f"local server {ep.key} is up ({row.workers} workers)")
        if self.runs.lost_runs(ep.key):
            self._resolve_lost(ep)
        self.sigServersChanged.emit()

    def _on_probe_failed(self, ep: Endpoint, exc: BaseException) -> None:
        row = self.servers.get(ep)
        if row is None:
            return
        spawned = self.spawned.get(ep)
        starting = (
            spawned is not None
            and not net.has_exited(spawned[0])
            and row.last_ok is None
            and time.monotonic() - spawned[1] < SPAWN_GRACE
        )
        registered_recently = (
            ep in self.registry and time.time() - self.registry[ep].started < 10 and not row.last_ok
        )
        if spawned is not None and net.has_exited(spawned[0]) and row.last_ok is None:
            output = net.spawn_output(ep.port)
            message = "the server exited at once"
            row.apply_failure(message + (f": {output.splitlines()[-1]}" if output else ""))
            self.spawned.pop(ep, None)
            self.sigError.emit("Server did not start", f"{message}.\n\n{output[-2000:]}")
        elif isinstance(exc, (AuthenticationFailed, FileNotFoundError)):
            # refused keys, or a key directory without the files: the client's advice shows
            row.apply_failure(str(exc), auth=True)
        else:
            before = row.state
            row.apply_failure(str(exc), starting=starting or registered_recently)
            if row.state == ServerState.DOWN:
                row.state = self._why_down(ep, row)
            if row.state == ServerState.STOPPED and before != ServerState.STOPPED:
                self.sigMessage.emit(f"server {ep.key} stopped")
        lost = self.runs.mark_lost(ep.key, time.time())
        if lost:
            if self.box is not None and self.box.key in lost:
                self._refollow = True
            n = len(lost)
            self.sigMessage.emit(
                f"{ep.key} stopped answering: {n} run{'s' if n != 1 else ''} out of contact"
            )
            self.sigContactChanged.emit(ep)
        self.sigServersChanged.emit()

    def _why_down(self, ep: Endpoint, row: ServerRow) -> ServerState:
        """A server that does not answer: stopped as asked, exited, or just down."""
        if ep in self.stopping:
            return ServerState.STOPPED  # it did what we asked (Stop, Force kill)
        if row.origin == "local" and self._registry_polled and ep not in self.registry:
            return ServerState.EXITED  # its process is gone (the registry knows it)
        return ServerState.DOWN

    def _resolve_lost(self, ep: Endpoint) -> None:
        """The server answers again: ask it what became of each run out of contact."""
        keys = self.runs.lost_runs(ep.key)

        def work() -> dict[RunKey, dict[str, Any] | None]:
            client = self.conns.client(ep)
            found: dict[RunKey, dict[str, Any] | None] = {}
            for key in keys:
                try:
                    found[key] = client.get_status(key.exec_id)
                except UnknownExecution:
                    found[key] = None  # the server came back without it
            return found

        def done(found: dict[RunKey, dict[str, Any] | None]) -> None:
            for key, status in found.items():
                self.runs.resolve(key, status)
                box = self.box
                if box is None or box.key != key:
                    continue
                if status is None:
                    box.finished = True
                    self.sigRunFinished.emit(key, {"id": key.exec_id, "state": LOST})
                elif status.get("state") in FINAL_STATES:
                    box.put_status(status)  # drained as if the stream had said it
            self.sigContactChanged.emit(ep)

        self.runner.submit(work, done, lambda exc: None, key=f"resolve:{ep.key}")

    def _reap_spawned(self) -> None:
        for ep, (proc, _) in list(self.spawned.items()):
            row = self.servers.get(ep)
            if net.has_exited(proc) and (row is None or row.state in ServerState.gone()):
                del self.spawned[ep]

    def spawn_server(
        self, port: int, workers: int | None, on_ready: Callable | None = None
    ) -> None:
        """Start a local server; its row reads "starting" until it answers."""
        ep = Endpoint("127.0.0.1", port)
        if not net.port_is_free(port):
            self.sigError.emit(
                "Port in use",
                f"Port {port} or {port + 1} is already in use on this machine. Pick another port.",
            )
            return

        def spawned(proc: psutil.Process) -> None:
            # the server is detached (not our child): it outlives the window, nothing to reap
            self.spawned[ep] = (proc, time.monotonic())
            row = self.servers.get(ep)
            if row is None or row.origin != "local":
                self.servers[ep] = ServerRow(ep, "local", pid=proc.pid)
            else:
                row.state, row.last_ok, row.error = ServerState.STARTING, None, None
            self.sigMessage.emit(f"starting a local server on port {port} (pid {proc.pid})")
            self.sigServersChanged.emit()
            self._probe(ep)
            if on_ready is not None:
                self.when_alive(ep, on_ready)

        def failed(exc: BaseException) -> None:
            self.sigError.emit("Cannot start a server", str(exc))

        self.runner.submit(lambda: net.spawn_local(port, workers), spawned, failed)

    def when_alive(
        self, ep: Endpoint, callback: Callable[[Endpoint], None], timeout: float = SPAWN_GRACE
    ) -> None:
        """Call ``callback(ep)`` once ``ep`` answers a ping (checked on each change)."""
        deadline = time.monotonic() + timeout

        def check() -> None:
            row = self.servers.get(ep)
            if row is not None and row.state == ServerState.ALIVE:
                self.sigServersChanged.disconnect(check)
                callback(ep)
            elif time.monotonic() > deadline or row is None:
                self.sigServersChanged.disconnect(check)
                self.sigError.emit(
                    "Server not answering", f"{ep.key} did not answer within {timeout:g} s."
                )

        self.sigServersChanged.connect(check)
        check_now = self.servers.get(ep)
        if check_now is not None and check_now.state == ServerState.ALIVE:
            self.sigServersChanged.disconnect(check)
            callback(ep)

    def stop_server(self, ep: Endpoint) -> None:
        """Ask the server to shut down (running runs end as failed, queued ones stay)."""
        row = self.servers.get(ep)
        if row is None:
            return
        self.stopping.add(ep)
        row.state = ServerState.STOPPING
        self.sigServersChanged.emit()

        def done(reply: dict[str, Any]) -> None:
            self.sigMessage.emit(f"server {ep.key} (pid {reply.get('pid')}) is stopping")
            self._probe(ep)

        def failed(exc: BaseException) -> None:
            self.stopping.discard(ep)
            self.sigMessage.emit(f"stop {ep.key}: {exc}")
            self._probe(ep)

        self.runner.submit(lambda: self.conns.client(ep).shutdown(timeout=3.0), done, failed)

    def local_entry(self, ep: Endpoint) -> local.ServerEntry | None:
        return self.registry.get(ep)

    def kill_server(self, ep: Endpoint) -> None:
        """Kill a server this machine's registry knows (pid + create time checked)."""
        entry = self.registry.get(ep)
        if entry is None:
            self.sigError.emit(
                "Cannot force-kill",
                f"{ep.key} is not a server started on this machine, so it cannot be "
                "killed from here. Use Stop instead.",
            )
            return
        self.stopping.add(ep)

        def done(killed: bool) -> None:
            self.sigMessage.emit(
                f"killed server pid {entry.pid} on {ep.key} and its workers"
                if killed
                else f"server {ep.key} had already exited"
            )
            self._probe(ep)

        self.runner.submit(lambda: local.kill_server(entry), done)

    # ------------------------------------------------------------------ runs
    def poll_runs(self) -> None:
        if self._closed:
            return
        for ep in self.alive_servers():
            self._poll_runs_of(ep)

    def _poll_runs_of(self, ep: Endpoint) -> None:
        self.runner.submit(
            lambda: self.conns.client(ep).list_executions(limit=RUN_LIST_LIMIT),
            lambda runs: self._on_runs(ep, runs),
            lambda exc: None,  # the probe reports a server that stopped answering
            key=f"runs:{ep.key}",
        )

    def _on_runs(self, ep: Endpoint, executions: list[dict[str, Any]]) -> None:
        if ep not in self.servers:
            return
        self.runs.update_server(ep.key, executions)
        box = self.box
        if box is not None and box.key.server == ep.key:
            row = self.runs.rows.get(box.key)
            if row is not None and row.is_final and not box.finished:
                box.put_status(row.status)  # the final state event was missed: stop following

    def submit_run(
        self,
        ep: Endpoint,
        pipeline_code: str,
        config_code: str | None,
        *,
        config: dict[str, Any] | None = None,
        name: str | None = None,
        on_submitted: Callable[[RunKey], None] | None = None,
    ) -> None:
        """Queue a run on ``ep``; when accepted it is added to the table and followed."""

        def work() -> dict[str, Any]:
            client = self.conns.client(ep)
            exec_id = client.execute(pipeline_code, config_code, config=config, name=name)
            return client.get_status(exec_id)

        def done(status: dict[str, Any]) -> None:
            key = RunKey(ep.key, status["id"])
            self.runs.apply_status(key, status)
            self._probe(ep)
            self.sigMessage.emit(f"submitted {status.get('name')} ({status['id']}) to {ep.key}")
            self.sigRunSubmitted.emit(key)
            if on_submitted is not None:
                on_submitted(key)

        def failed(exc: BaseException) -> None:
            self.sigError.emit("Submit failed", f"{ep.key} did not accept the run:\n\n{exc}")

        self.runner.submit(work, done, failed)

    def cancel_runs(self, keys: list[RunKey]) -> None:
        for key in keys:
            row = self.runs.rows.get(key)
            if row is not None and row.is_final:
                continue
            self._cancel_run(key)

    def _cancel_run(self, key: RunKey) -> None:
        ep = Endpoint.parse(key.server)
        self.runner.submit(
            lambda: self.conns.client(ep).cancel(key.exec_id),
            lambda reply: self.sigMessage.emit(f"{key.exec_id}: {reply['message']}"),
            lambda exc: self.sigMessage.emit(f"cancel {key.exec_id} failed: {exc}"),
        )

    def fetch(
        self,
        key: RunKey,
        what: Callable[[Any], Any],
        on_done: Callable[[Any], None],
        on_error: Callable[[BaseException], None] | None = None,
        task_key: str | None = None,
        owner: QtCore.QObject | None = None,
    ) -> bool:
        """Run ``what(client)`` against the run's server in the pool. With ``owner``, the
        answer is dropped if the owner is gone by then (a dialog closed meanwhile)."""
        ep = Endpoint.parse(key.server)
        on_error = on_error or (lambda exc: self.sigMessage.emit(f"{key.exec_id}: {exc}"))
        if owner is not None:
            on_done, on_error = _while_alive(owner, on_done), _while_alive(owner, on_error)
        return self.runner.submit(lambda: what(self.conns.client(ep)), on_done, on_error, task_key)

    # ------------------------------------------------------------------ following
    def follow(self, key: RunKey | None) -> None:
        """Subscribe to ``key``'s live events (previews, progress, logs); None stops."""
        if self.box is not None and key == self.box.key and self.follower is not None:
            return
        if self.follower is not None:
            self._retire(self.follower)
            self.follower = None
        self.box = None
        self._refollow = False
        if key is not None:
            self.box = FollowBox(key)
            row = self.runs.rows.get(key)
            if row is not None and row.contact == "lost":
                self._refollow = True  # subscribe again once its server answers
            if row is not None and (row.is_final or row.contact == "gone"):
                self.box.finished = True  # nothing live will come: no thread needed
            else:
                try:
                    ep = Endpoint.parse(key.server)
                    follower = RunFollower(self.conns.client(ep), self.box, self)
                except Exception as exc:  # the window is closing
                    self.sigMessage.emit(str(exc))
                else:
                    self.follower = follower
                    follower.start()
        self.sigFollowChanged.emit(self.box)

    def _subscribe_again(self) -> None:
        """Follow the same run with a new subscription (its server was out of contact and
        may have been restarted, with a new data socket); the box and its frames stay."""
        self._refollow = False
        box = self.box
        if box is None:
            return
        if self.follower is not None:
            self._retire(self.follower)
            self.follower = None
        try:
            follower = RunFollower(self.conns.client(Endpoint.parse(box.key.server)), box, self)
        except Exception as exc:  # the window is closing
            self.sigMessage.emit(str(exc))
            return
        self.follower = follower
        follower.start()

    def _retire(self, follower: RunFollower) -> None:
        follower.stop()
        self._old_followers.append(follower)
        follower.finished.connect(lambda f=follower: self._forget_follower(f))

    def _forget_follower(self, follower: RunFollower) -> None:
        if follower in self._old_followers:
            self._old_followers.remove(follower)
            follower.deleteLater()

    def _drain_news(self) -> None:
        box = self.box
        if box is None:
            return
        if self._refollow:
            row = self.runs.rows.get(box.key)
            if row is not None and row.contact == "ok" and not box.finished:
                self._subscribe_again()
        progress, status, logs, results = box.take_news()
        key = box.key
        if progress is not None:
            self.runs.apply_progress(key, *progress)
        if logs:
            self.sigLogLines.emit(key, logs)
        if results:
            self.sigResultNotice.emit(key)
        if status is not None:
            self.runs.apply_status(key, status)
            if status.get("state") in FINAL_STATES:
                self.sigRunFinished.emit(key, status)
                self._probe(Endpoint.parse(key.server))  # its worker is free now: show it
        if box.error:
            self.sigMessage.emit(box.error)
            box.error = None


def _while_alive(owner: QtCore.QObject, callback: Callable[[Any], None]) -> Callable[[Any], None]:
    def call(value: Any) -> None:
        if shiboken6.isValid(owner):
            callback(value)

    return call
