"""The GUI's Qt-free model: endpoints, the run table, the one-slot frame box, logs."""

import time

import numpy as np
import pytest

from zmqruntime.formatting import fmt_duration
from zmqruntime_gui.model import (
    Endpoint,
    FollowBox,
    LogBuffer,
    RateMeter,
    RunKey,
    RunTable,
    ServerRow,
    ServerState,
    auto_levels,
    describe_result,
    downsample,
)


def test_endpoint_parse():
    assert Endpoint.parse("5555") == Endpoint("127.0.0.1", 5555)
    assert Endpoint.parse("scope.lab:6000") == Endpoint("scope.lab", 6000)
    assert Endpoint.parse("tcp://10.0.0.2:7000") == Endpoint("10.0.0.2", 7000)
    assert Endpoint.parse("[::1]:5555") == Endpoint("::1", 5555)
    assert Endpoint.parse("[::1]:5555").key == "[::1]:5555"
    assert Endpoint.parse("scope.lab") == Endpoint("scope.lab", 5555)
    assert Endpoint.parse("localhost:1").is_local
    assert not Endpoint.parse("scope.lab:1").is_local
    for bad in ("", "host:notaport", "host:70000", ":5555"):
        with pytest.raises(ValueError):
            Endpoint.parse(bad)


def test_server_row_states():
    row = ServerRow(Endpoint("h", 1), "remote")
    row.apply_ping({"rtt_ms": 1.25, "workers": 4, "workers_busy": 1, "queued": 3, "uptime": 75})
    assert row.state == ServerState.ALIVE
    assert (row.ping_text, row.workers_text, row.queued_text, row.uptime_text) == (
        "1.2 ms",
        "1/4",
        "3",
        "1m 15s",
    )
    row.apply_failure("no reply within 1.5 s")
    assert row.state == ServerState.DOWN and row.error == "no reply within 1.5 s"
    assert row.workers_text == "–" and row.ping_text == "timeout"
    row.apply_failure("nothing listens on h:1 (connection refused)")
    assert row.ping_text == "refused"


def status(exec_id, state="running", progress=None, created=1.0, **kw):
    return {"id": exec_id, "state": state, "progress": progress, "created": created, **kw}


def test_run_table_merges_lists_and_live_events():
    table = RunTable()
    table.update_server("a:1", [status("r1", created=1), status("r2", "queued", created=2)])
    table.update_server("b:2", [status("r1", "completed", 1.0, created=3)])
    assert table.take_dirty() == (True, True)
    assert table.ordered() == [RunKey("b:2", "r1"), RunKey("a:1", "r2"), RunKey("a:1", "r1")]
    assert table.ordered({"a:1"}) == [RunKey("a:1", "r2"), RunKey("a:1", "r1")]

    key = RunKey("a:1", "r1")
    table.apply_progress(key, 0.6, "frame 6/10")
    assert table.take_dirty() == (True, False)
    # an older poll never takes back progress that the stream already showed
    table.update_server("a:1", [status("r1", progress=0.5), status("r2", "queued", created=2)])
    assert table.rows[key].progress == 0.6
    # a final state sticks: a stale "running" from a slow poll does not revive the run
    table.apply_status(key, status("r1", "cancelled", 0.6))
    table.update_server("a:1", [status("r1", progress=0.7), status("r2", "queued", created=2)])
    assert table.rows[key].state == "cancelled"
    table.apply_progress(key, 0.9, None)
    assert table.rows[key].progress == 0.6


def test_run_table_keeps_a_just_submitted_run_until_listed():
    table = RunTable()
    table.update_server("a:1", [])
    new = RunKey("a:1", "fresh")
    table.apply_status(new, status("fresh", "queued", created=5))
    table.update_server("a:1", [])  # a list sent before the submit was answered
    assert new in table.rows
    table.update_server("a:1", [status("fresh", "running", created=5)])
    table.update_server("a:1", [])  # now it is gone from the server (purged)
    assert new not in table.rows


def test_follow_box_keeps_only_the_newest_frame():
    box = FollowBox(RunKey("s", "id"))
    assert box.take_frame("camera") is None
    for i in range(100):
        box.put_frame("camera", np.full((4, 4), i, np.uint16), seq=i, t=None)
    frame = box.take_frame("camera")
    assert frame.number == 100 and frame.image[0, 0] == 99
    assert box.take_frame("camera") is None  # nothing new since
    box.put_frame("other", np.zeros((2, 2)), seq=200, t=None)
    assert box.stream_names() == ["camera", "other"]
    assert box.received_count("camera") == 100
    box.put_progress(0.5, "half")
    box.put_log(0, "a")
    box.put_result(0, "x")
    box.put_status({"state": "completed"})
    progress, st, logs, results = box.take_news()
    assert progress == (0.5, "half", None, None) and st["state"] == "completed"
    assert logs == [(0, "a", None)] and results == [(0, "x")] and box.finished
    assert box.take_news() == (None, None, [], [])


def test_log_buffer_orders_live_and_fetched_entries():
    buf = LogBuffer()
    assert buf.add(0, "l0") == ["l0"]
    assert buf.add(2, "l2") == []  # entry 1 was dropped on the way
    assert buf.has_gap
    assert buf.extend([{"index": 0, "text": "l0"}, {"index": 1, "text": "l1"}]) == ["l1", "l2"]
    assert not buf.has_gap and buf.lines == ["l0", "l1", "l2"]
    assert buf.add(1, "l1") == []  # a duplicate is ignored


def test_rate_meter():
    meter = RateMeter(window=1.0)
    t0 = time.monotonic()
    assert meter.sample(0, t0) == 0.0
    for i in range(1, 31):
        rate = meter.sample(i * 10, t0 + i * 0.1)
    assert rate == pytest.approx(100.0, rel=0.05)


def test_auto_levels_on_a_subsample():
    rng = np.random.default_rng(0)
    image = rng.integers(100, 200, (2048, 2048), dtype=np.uint16)
    image[0, 0] = 60000  # a hot pixel does not stretch the range
    lo, hi = auto_levels(image)
    assert 100 <= lo < 110 and 190 < hi <= 200
    assert auto_levels(np.zeros((3, 3))) == (0.0, 1.0)


def test_formatting():
    assert fmt_duration(None) == "–"
    assert fmt_duration(3.25) == "3.2 s"
    assert fmt_duration(3725) == "1h 02m"
    assert (
        describe_result({"kind": "array", "dtype": "<u2", "shape": [512, 512], "nbytes": 524288})
        == "array 512×512 uint16 (524.3 kB)"
    )
    assert describe_result({"kind": "value", "value": {"frames": 60, "cells": [1, 2]}}) == (
        "{frames: 60, cells: [2 items]}"
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32])
def test_downsample_is_a_block_mean(dtype):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 100, (37, 50)).astype(dtype)
    for step in (1, 2, 3, 4):
        out = downsample(image, step)
        h, w = 37 // step, 50 // step
        ref = image[: h * step, : w * step].reshape(h, step, w, step).astype(np.float64)
        ref = ref.mean(axis=(1, 3))
        assert out.shape == (h, w) and out.dtype == image.dtype
        if np.issubdtype(dtype, np.integer):
            np.testing.assert_array_equal(out, np.floor(ref).astype(dtype))
        else:
            np.testing.assert_allclose(out, ref, rtol=1e-6)
    big = np.full((8, 8), 65535, np.uint16)
    assert downsample(big, 4).max() == 65535  # no overflow in the accumulator


def test_follow_box_prepares_only_what_the_view_will_take():
    box = FollowBox(RunKey("s", "id"))
    assert not box.prepare_newest()  # the view has not said what it wants yet
    box.want = ("camera", 512.0, 512.0, None, None)
    box.put_frame("camera", np.ones((2048, 2048), np.uint16), seq=0, t=None)
    assert box.prepare_newest()
    box.put_frame("camera", np.full((2048, 2048), 2, np.uint16), seq=1, t=None)
    assert not box.prepare_newest()  # frame 1 still waits for the view: no wasted work
    frame, step, shown = box.take_prepared("camera")
    assert frame.number == 1 and step == 4 and shown.shape == (512, 512) and shown[0, 0] == 1
    assert box.take_prepared("camera") is None
    assert box.prepare_newest()  # now the newest (frame 2) is prepared
    frame, step, shown = box.take_prepared("camera")
    assert frame.number == 2 and shown[0, 0] == 2
    assert box.take_frame("camera") is None  # taken through the prepared path
    # zoomed in on the same shape: full resolution
    box.want = ("camera", 512.0, 512.0, 0.25, (2048, 2048))
    box.put_frame("camera", np.zeros((2048, 2048), np.uint16), seq=2, t=None)
    assert box.prepare_newest()
    assert box.take_prepared("camera")[1] == 1


def test_eta_and_log_timestamps():
    import time as _time

    from zmqruntime_gui.model import RunRow, log_line

    row = RunRow(RunKey("h:1", "a"), {"state": "running", "started": 100.0, "progress": 0.25})
    assert row.eta(now=140.0) == pytest.approx(120.0)  # 40 s for a quarter: 120 s left
    assert row.eta(now=101.0) is None  # too early to tell
    row.status["state"] = "completed"
    assert row.eta(now=140.0) is None
    t = _time.mktime((2026, 1, 2, 13, 4, 5, 0, 0, -1)) + 0.25
    assert log_line("started", t) == "13:04:05.250  started"
    assert log_line("a\nb", t) == "13:04:05.250  a\n" + " " * 14 + "b"
    assert log_line("plain", None) == "plain"


def test_results_table_has_a_column_per_scalar_field():
    from zmqruntime_gui.model import column_table, numeric_columns, results_table, table_csv

    summaries = [
        {"index": 0, "name": "image", "kind": "array", "shape": [4, 4], "dtype": "<u2",
         "nbytes": 32},
        *[{"index": i, "name": "counts", "kind": "value",
           "value": {"image": f"0114f484{i}", "count": 10 * i, "mean_area": 1.5 * i}}
          for i in (1, 2, 3)],
        {"index": 4, "name": "return", "kind": "value", "value": 42},
        {"index": 5, "name": "big", "kind": "value", "nbytes": 90_000},
    ]  # fmt: skip
    columns, rows = results_table(summaries)
    assert columns == ["#", "name", "value", "image", "count", "mean_area"]
    assert [r.get("count") for r in rows] == [None, 10, 20, 30, None, None]
    assert rows[4]["value"] == 42 and "fetched on demand" in rows[5]["value"]
    assert numeric_columns(columns, rows) == ["#", "count", "mean_area"]
    csv_lines = table_csv(columns, rows).splitlines()
    assert csv_lines[0] == "#,name,value,image,count,mean_area"
    assert csv_lines[2] == "1,counts,,0114f4841,10,1.5"
    assert len(csv_lines) == 7

    table = column_table({"frame": [0, 1, 2], "cells": [5, 7, 6]})
    assert table == (["frame", "cells"], [{"frame": 0, "cells": 5}, {"frame": 1, "cells": 7},
                                          {"frame": 2, "cells": 6}])  # fmt: skip
    assert column_table({"a": [1, 2], "b": [1]}) is None  # not one length
    assert column_table({"a": [[1], [2]]}) is None  # not scalars
    assert column_table([1, 2]) is None
