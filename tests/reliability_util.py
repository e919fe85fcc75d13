"""Helpers shared by the reliability tests: pipelines that block, crash or report their pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

#: writes its worker's pid to ``config.pid_file``, logs a line, then sleeps (cooperatively)
BLOCKING = """
import os, time
def run(ctx, config):
    ctx.log("started")
    ctx.flush_logs()
    with open(config.pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(config.pid_file + ".tmp", config.pid_file)
    for _ in range(int(config.get("seconds", 60) / 0.05)):
        time.sleep(0.05)
    return "slept"
"""

#: returns its config value at once
QUICK = """
def run(ctx, config):
    return config.value
"""


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(0.02)


def read_pid(path: Path, timeout: float = 20.0) -> int:
    """The pid a pipeline wrote to ``path`` (written atomically)."""
    wait_for(path.exists, timeout, f"{path} to be written")
    return int(path.read_text())


def sigkill_server(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL a server process only (not its workers); return the orphaned workers."""
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    return workers
