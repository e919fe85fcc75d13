"""The execute/status/results contract, as a ``typing.Protocol``.

:class:`~zmqruntime.client.ExecutionClient` (one server) and
:class:`~zmqruntime.pool.ExecutionPool` (many) both implement it, so code written against
:class:`ExecutionAPI` (the CLI's commands, a script's helpers) takes either::

    def run_plate(api: ExecutionAPI, wells: list[str]) -> list[dict]:
        ids = [api.execute(PIPELINE, config={"well": w}) for w in wells]
        return [api.get_results(i) for i in ids]

Each implementation may add keyword arguments with defaults (``resources=`` of the
client's ``execute``) and methods of its own (``execute_many``, ``map``); mypy checks the
two against this class (``pool.py`` ends with the check) and tests/test_api_contract.py
compares the signatures at run time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class ExecutionAPI(Protocol):
    """Submit runs, follow them, and fetch what they stored, by run id."""

    def execute(
        self,
        pipeline_code: str,
        config_code: str | None = None,
        *,
        config: dict[str, Any] | None = None,
        name: str | None = None,
        retries: int = 0,
    ) -> str:
        """Queue a run; return its id at once."""
        ...

    def get_status(self, exec_id: str) -> dict[str, Any]:
        """The run's status dict (``state``, ``progress``, ``n_results``...)."""
        ...

    def wait(self, exec_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the run ends; its final status."""
        ...

    def get_results(
        self,
        exec_id: str,
        timeout: float | None = None,
        *,
        directory: str | Path | None = None,
        format: str = "npy",
    ) -> dict[str, list[Any]]:
        """Wait for the run, then ``{name: [value, ...]}`` (a failed run raises)."""
        ...

    def cancel(self, exec_id: str) -> dict[str, Any]:
        """Ask the run to stop: ``{"cancelled", "state", "message"}``."""
        ...

    def stream(
        self, exec_id: str, *, previews: bool = True, poll_interval: float = 0.5
    ) -> Iterator[dict[str, Any]]:
        """Live events of one run, ending with its final ``state`` event."""
        ...

    def list_executions(
        self, limit: int = 200, states: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Recent runs, newest first."""
        ...

    def get_logs(self, exec_id: str, start: int = 0) -> list[dict[str, Any]]:
        """Stored log lines of a run."""
        ...

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Facts about the server(s)."""
        ...

    def close(self) -> None:
        """Close every connection."""
        ...
