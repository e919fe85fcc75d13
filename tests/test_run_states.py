"""The server's run states as data (zmqruntime.runstate) and its socket-free core
(zmqruntime.server_core.RunCore), driven in memory: no sockets, no processes."""

from __future__ import annotations

import time

import pytest

from zmqruntime import protocol
from zmqruntime.errors import UnknownExecution
from zmqruntime.protocol import EventKind
from zmqruntime.runstate import (
    FINAL,
    INITIAL,
    TRANSITIONS,
    IllegalTransition,
    RunState,
    check_transition,
)
from zmqruntime.server_core import RunCore, Waiter
from zmqruntime.store import Store

PIPELINE = "def run(ctx, config):\n    return 1\n"


def test_the_table_names_every_state_and_its_values_are_the_wire_states():
    assert set(TRANSITIONS) == set(RunState)
    assert tuple(s.value for s in RunState) == protocol.STATES
    assert {s.value for s in FINAL} == protocol.FINAL_STATES
    assert INITIAL is RunState.QUEUED


def test_walk_every_pair_of_states_against_the_table():
    legal = {
        (RunState.QUEUED, RunState.RUNNING),
        (RunState.QUEUED, RunState.CANCELLED),
        (RunState.QUEUED, RunState.FAILED),
        (RunState.RUNNING, RunState.QUEUED),
        (RunState.RUNNING, RunState.COMPLETED),
        (RunState.RUNNING, RunState.FAILED),
        (RunState.RUNNING, RunState.CANCELLED),
    }
    for old in RunState:
        for new in RunState:
            if (old, new) in legal:
                assert check_transition("r", old, new) is new
            else:
                with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
                    check_transition("r", old.value, new.value)
    # final states are sinks, and every state is reachable from the initial one
    assert all(not TRANSITIONS[s] for s in FINAL)
    seen, todo = {INITIAL}, [INITIAL]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(RunState)


class Harness:
    """A RunCore on a real store in a temp dir, with lists for what it says."""

    def __init__(self, path) -> None:
        self.store = Store(path)
        self.events: list[tuple[str, EventKind, dict]] = []
        self.answered: list[Waiter] = []
        self.core = RunCore(
            self.store,
            lambda run, kind, body: self.events.append((run.id, kind, body)),
            self.answered.append,
        )

    def states(self, exec_id: str) -> list[str]:
        return [
            b["status"]["state"] for i, k, b in self.events if i == exec_id and k is EventKind.STATE
        ]

    def commit_and_announce(self) -> None:
        assert self.store.commit()
        self.core.announce()


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.store.close()


def test_a_run_goes_queued_running_completed_and_each_change_is_stored_and_published(h):
    run = h.core.submit(PIPELINE, None, {"a": 1}, "r1", 0)
    assert list(h.core.queue) == [run.id] and h.states(run.id) == ["queued"]
    assert h.core.next_task(run)["config"] == {"a": 1}
    h.core.queue.popleft()
    h.core.start(run)
    assert h.store.get(run.id)["state"] == "running" and run.record["attempts"] == 1
    h.core.finish(run, RunState.COMPLETED, message="completed")
    # final: out of the live runs at once, published only after the commit
    assert run.id not in h.core.runs and h.states(run.id) == ["queued", "running"]
    h.commit_and_announce()
    assert h.states(run.id) == ["queued", "running", "completed"]
    stored = h.store.get(run.id)
    assert stored["state"] == "completed" and stored["progress"] == 1.0
    assert h.core.record(run.id)["state"] == "completed"  # from the store now
    with pytest.raises(IllegalTransition):  # a final state is final
        h.core.start(run)
    assert h.store.get(run.id)["state"] == "completed"


def test_an_illegal_move_changes_nothing(h):
    run = h.core.submit(PIPELINE, None, None, None, 0)
    with pytest.raises(IllegalTransition, match="queued -> completed"):
        h.core.finish(run, RunState.COMPLETED)
    assert run.record["state"] == "queued" and h.store.get(run.id)["state"] == "queued"
    assert run.id in h.core.runs and h.states(run.id) == ["queued"]


def test_a_lost_run_is_retried_while_retries_remain_then_fails(h):
    run = h.core.submit(PIPELINE, None, None, None, 1)
    h.core.queue.popleft()
    h.core.start(run)
    h.core.run_lost(run, "the worker process died (killed by signal SIGKILL)")
    assert run.record["state"] == "queued" and list(h.core.queue) == [run.id]
    assert run.record["message"].startswith("retrying:")
    assert h.core.next_task(run)["pipeline_code"] == PIPELINE  # read back from the store
    h.core.queue.popleft()
    h.core.start(run)
    h.core.run_lost(run, "the worker process died again")
    h.commit_and_announce()
    assert h.states(run.id) == ["queued", "running", "queued", "running", "failed"]
    assert h.store.get(run.id)["error"] == "the worker process died again"
    assert h.store.get(run.id)["attempts"] == 2


def test_cancel_while_queued_and_a_cancel_deadline(h):
    queued = h.core.submit(PIPELINE, None, None, None, 0)
    running = h.core.submit(PIPELINE, None, None, None, 0)
    h.core.queue.remove(running.id)
    h.core.start(running)
    h.core.cancel_queued(queued)
    assert list(h.core.queue) == []
    assert h.core.request_cancel(running, grace=0.0)
    assert not h.core.request_cancel(running, grace=0.0)  # once
    assert h.core.cancels_due(time.monotonic() + 1) == [running]
    reason = "cancelled: the pipeline did not stop within 2 s, so its worker was killed"
    assert h.core.overdue(time.monotonic() + 1, 2.0) == [(running, reason, "cancelled")]
    running.fail_reason = "disk full"  # a run the server fails: it ends failed
    assert h.core.overdue(time.monotonic() + 1, 2.0) == [(running, "disk full", "failed")]
    running.fail_reason = None
    h.core.run_lost(running, "cancelled: killed", RunState.CANCELLED)
    h.commit_and_announce()
    assert h.states(queued.id)[-1] == "cancelled" and h.states(running.id)[-1] == "cancelled"


def test_parked_waiters_are_answered_when_their_runs_end_or_time_out(h):
    a = h.core.submit(PIPELINE, None, None, None, 0)
    b = h.core.submit(PIPELINE, None, None, None, 0)
    later = time.monotonic() + 60
    both = Waiter([b"c"], 1, set(), later, [a.id, b.id], False, 0, single=False)
    short = Waiter([b"c"], 2, set(), time.monotonic() + 0.01, [a.id], False, 0, single=True)
    assert h.core.park(both) and h.core.park(short)
    with pytest.raises(UnknownExecution):
        h.core.park(Waiter([b"c"], 3, set(), later, ["nope"], False, 0, single=True))
    h.core.expire_waiters(time.monotonic() + 1)
    assert h.answered == [short]
    for run in (a, b):
        h.core.queue.remove(run.id)
        h.core.start(run)
    h.core.finish(a, RunState.COMPLETED)
    h.commit_and_announce()
    assert h.answered == [short]  # b still runs
    h.core.finish(b, RunState.FAILED, error="boom")
    h.commit_and_announce()
    assert h.answered == [short, both] and both.answered
    # a wait on runs that have ended is due at once
    assert not h.core.park(Waiter([b"c"], 4, set(), later, [a.id], False, 0, single=True))


def test_recovery_requeues_or_fails_what_a_previous_server_left_running(tmp_path):
    first = Harness(tmp_path)
    retried = first.core.submit(PIPELINE, None, None, "retried", 1)
    lost = first.core.submit(PIPELINE, None, None, "lost", 0)
    waiting = first.core.submit(PIPELINE, None, None, "waiting", 0)
    for run in (retried, lost):
        first.core.queue.remove(run.id)
        first.core.start(run)
    assert first.store.commit()
    first.store.close()  # the server died here

    second = Harness(tmp_path)
    assert second.core.recover() == 2
    assert set(second.core.queue) == {retried.id, waiting.id}
    assert second.core.record(retried.id)["message"] == "requeued after a server restart"
    second.commit_and_announce()
    assert second.store.get(lost.id)["state"] == "failed"
    assert "interrupted" in second.store.get(lost.id)["error"]
    assert second.states(lost.id) == ["failed"]
    second.store.close()
