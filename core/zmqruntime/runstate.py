"""A run's states and the one table of legal moves between them.

Like h11's ``_state.py``: the legal moves are data, in one dict, and a move that is not
in it raises :class:`IllegalTransition`. The server changes a run's state only through
:meth:`zmqruntime.server_core.RunCore.transition`, which checks this table.

::

    (submitted) ──▶ queued ──▶ running ──▶ completed / failed / cancelled
                      │  ▲        │
                      │  └────────┘  retried after its worker died (or a restart)
                      └──────────────▶ cancelled (withdrawn) / failed (a Dask task that
                                       failed before its pipeline started)
"""

from __future__ import annotations

import enum


class RunState(str, enum.Enum):
    """The ``state`` of a run, as stored and as sent on the wire (the value)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL

    def __str__(self) -> str:
        return self.value


FINAL = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED})

#: the state a run is submitted in (the only way into the table)
INITIAL = RunState.QUEUED

#: every legal move: state -> the states a run in it may go to
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset(
        {
            RunState.RUNNING,  # a worker (or a Dask task) starts it
            RunState.CANCELLED,  # cancelled while queued
            RunState.FAILED,  # its Dask task failed before the pipeline started
        }
    ),
    RunState.RUNNING: frozenset(
        {
            RunState.QUEUED,  # its worker died and it has retries left, or a restart
            RunState.COMPLETED,
            RunState.FAILED,
            RunState.CANCELLED,
        }
    ),
    RunState.COMPLETED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow (a bug in the server, never bad input)."""

    def __init__(self, exec_id: str, old: RunState, new: RunState) -> None:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old])) or "none: it is final"
        super().__init__(
            f"run {exec_id}: illegal state change {old.value} -> {new.value} "
            f"(from {old.value}: {allowed})"
        )
        self.old, self.new = old, new


def check_transition(exec_id: str, old: RunState | str, new: RunState | str) -> RunState:
    """``new`` as a RunState if ``old -> new`` is in the table; else IllegalTransition."""
    old, new = RunState(old), RunState(new)
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(exec_id, old, new)
    return new
