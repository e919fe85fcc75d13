"""Shared fixtures: real servers on free loopback ports, torn down with their workers.

Every test session gets its own runtime dir (registry, spawn locks) and data root, so
tests never touch a user's servers; at the end, any server still registered there is
killed and reported as a leak.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # GUI tests never need a display

from zmqruntime import ExecutionClient, local  # noqa: E402
from zmqruntime.transport import free_port, port_accepts_tcp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # the full sets, where CI keeps them
EXAMPLE_DATA = REPO / "tests" / "data"  # the committed subset (same layout)
FULL_SETS = ("dsb2018_stage1_fluo_nuclei", "bbbc016_transfluor_plate", "cell_migration_timelapse")


@pytest.fixture(scope="session", autouse=True)
def isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("zmqruntime-env")
    saved = {k: os.environ.get(k) for k in ("ZMQRUNTIME_RUNTIME_DIR", "ZMQRUNTIME_DATA_DIR")}
    os.environ["ZMQRUNTIME_RUNTIME_DIR"] = str(root / "runtime")
    os.environ["ZMQRUNTIME_DATA_DIR"] = str(root / "data")
    yield root
    leaked = local.list_servers()
    for entry in leaked:
        local.kill_server(entry)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert not leaked, f"tests left servers running: {[e.port for e in leaked]}"


@dataclass
class ServerProcess:
    """A ``zmqruntime serve`` subprocess; ``client()`` gives clients that it closes."""

    port: int
    proc: subprocess.Popen
    data_dir: Path
    clients: list[ExecutionClient] = field(default_factory=list)
    keys: Path | None = None  # CURVE key dir of a secured server; its clients use it

    def client(self, **kwargs) -> ExecutionClient:
        kwargs.setdefault("auto_spawn", False)
        if self.keys is not None:
            kwargs.setdefault("keys", self.keys)
        c = ExecutionClient(port=self.port, **kwargs)
        self.clients.append(c)
        return c

    def stop(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()
        self.clients.clear()
        kill_tree(self.proc)


def kill_tree(proc: subprocess.Popen, graceful: float = 5.0) -> None:
    """Stop a server process: SIGTERM (graceful), then SIGKILL it and its workers."""
    try:
        parent = psutil.Process(proc.pid)
        children = parent.children(recursive=True)
    except psutil.Error:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=graceful)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=5)


def start_server(
    data_dir: Path,
    workers: int = 2,
    port: int | None = None,
    extra: list[str] | None = None,
    timeout: float = 30.0,
    keys: Path | None = None,
    executor: str = "native",
) -> ServerProcess:
    """Start ``zmqruntime serve`` and wait for its workers; ``keys`` serves with CURVE;
    ``executor="dask"`` runs the runs on a local Dask cluster of ``workers`` processes."""
    port = port or free_port()
    if keys is not None:
        extra = [*(extra or []), "--keys", str(keys)]
    if executor == "dask":
        extra = [*(extra or []), "--dask", f"local:{workers}"]
        timeout = max(timeout, 90.0)  # a Dask cluster starts its processes one by one
    cmd = [
        sys.executable,
        "-m",
        "zmqruntime",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--data-dir",
        str(data_dir),
        *(extra or []),
    ]
    data_dir.mkdir(parents=True, exist_ok=True)
    out = open(data_dir / "stdout.txt", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + timeout
    while not port_accepts_tcp("127.0.0.1", port):
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}: {(data_dir / 'stdout.txt').read_text()}"
            )
        if time.monotonic() > deadline:
            kill_tree(proc)
            raise RuntimeError("server did not open its port")
        time.sleep(0.02)
    server = ServerProcess(port, proc, data_dir, keys=keys)
    # wait until every worker is ready, so timing-sensitive tests start from a full pool
    c = server.client()
    while c.ping()["workers_ready"] < workers:
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("workers did not start")
        time.sleep(0.02)
    return server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = start_server(tmp_path / "server")
    yield s
    s.stop()


@pytest.fixture
def client(server: ServerProcess) -> ExecutionClient:
    return server.client()


#: the public contract holds on native workers and on a Dask cluster (serve --dask local:N):
#: tests that take ``any_server``, ``any_client`` or ``make_any_server`` run on both
EXECUTORS = ("native", "dask")


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> str:
    if request.param == "dask":
        pytest.importorskip("distributed", reason="pip install 'zmqruntime[dask]' for Dask")
    return request.param


@pytest.fixture
def any_server(tmp_path: Path, executor: str) -> Iterator[ServerProcess]:
    s = start_server(tmp_path / "server", executor=executor)
    yield s
    s.stop()


@pytest.fixture
def any_client(any_server: ServerProcess) -> ExecutionClient:
    return any_server.client()


@pytest.fixture
def make_any_server(make_server, executor: str):
    """make_server on the test's executor."""
    return lambda name="s", **kwargs: make_server(name, executor=executor, **kwargs)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:
    """Factory for tests that need special servers (several, custom flags, restarts)."""
    started: list[ServerProcess] = []

    def make(name: str = "s", **kwargs) -> ServerProcess:
        s = start_server(tmp_path / name, **kwargs)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def example_data() -> Path:
    """The subset of the real microscopy images committed in tests/data (always there)."""
    if not EXAMPLE_DATA.is_dir():
        pytest.fail(f"test data missing: expected the committed subset at {EXAMPLE_DATA}")
    return EXAMPLE_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full sets of real images: $ZMQRUNTIME_EXAMPLE_DATA, else ../shared/data beside
    the checkout. Absent, a test that needs them skips (a bare clone has only the subset);
    a variable that names no folder is an error."""
    chosen = os.environ.get("ZMQRUNTIME_EXAMPLE_DATA")
    if chosen:
        path = Path(chosen).expanduser().resolve()
        if not path.is_dir():
            pytest.fail(f"ZMQRUNTIME_EXAMPLE_DATA={chosen!r} is not a folder")
        return path
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"full example data absent: set ZMQRUNTIME_EXAMPLE_DATA=DIR (the folder that "
            f"holds {', '.join(FULL_SETS)}) or place it at {SHARED_DATA}"
        )
    return SHARED_DATA


# --------------------------------------------------------------------------- GUI tests
# Offscreen Qt (no display needed); Qt itself is imported only by the GUI fixtures.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture
def gui_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A settings file of this test only (also for anything that asks for defaults)."""
    from PySide6 import QtCore

    path = tmp_path / "gui-settings.ini"
    monkeypatch.setenv("ZMQRUNTIME_GUI_SETTINGS", str(path))
    QtCore.QSettings.setPath(
        QtCore.QSettings.Format.IniFormat, QtCore.QSettings.Scope.UserScope, str(tmp_path)
    )
    QtCore.QSettings.setPath(
        QtCore.QSettings.Format.NativeFormat, QtCore.QSettings.Scope.UserScope, str(tmp_path)
    )
    return QtCore.QSettings(str(path), QtCore.QSettings.Format.IniFormat)


@pytest.fixture
def themed_app(qapp):
    from zmqruntime_gui.app import apply_theme

    apply_theme(qapp)
    return qapp


@pytest.fixture
def make_window(qtbot, themed_app, gui_settings) -> Iterator:
    """Factory of main windows on the test's settings; all are closed at the end."""
    from zmqruntime_gui.main_window import MainWindow

    windows = []

    def make(settings=None) -> MainWindow:
        w = MainWindow(settings or gui_settings)
        qtbot.addWidget(w)
        w.resize(1500, 940)
        w.show()
        qtbot.waitExposed(w)
        windows.append(w)
        return w

    yield make
    for w in windows:
        w.close()
        assert w.controller.follower is None and not w.controller._old_followers


@pytest.fixture
def window(make_window):
    return make_window()
