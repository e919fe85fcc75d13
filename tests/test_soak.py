"""Soak: 4 concurrent client processes submit many small runs; every run completes exactly
once (none lost, none duplicated) and the server's memory stays flat.

The short version (4 x 250 runs) runs by default. The full one (4 x 2,500 = 10,000 runs)
is marked slow and runs with ``pytest -m slow tests/test_soak.py`` or with
ZMQRUNTIME_SOAK=full; ZMQRUNTIME_SOAK_RUNS sets its runs per client.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

CLIENTS = 4

#: one client process: submits its runs in windows of 50, then collects each result
CLIENT = """
import json, sys
from zmqruntime import ExecutionClient

port, k, n, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
PIPELINE = "def run(ctx, config):\\n    return [config.k, config.i]\\n"
done = []
with ExecutionClient(port=port, auto_spawn=False, timeout=30) as c:
    for start in range(0, n, 50):
        batch = []
        for i in range(start, min(start + 50, n)):
            # a distinct config_code per run, like one config file per well of a plate
            exec_id = c.execute(PIPELINE, f"k = {k}\\ni = {i}\\n", name=f"c{k}-{i}")
            batch.append((exec_id, i))
        for exec_id, i in batch:
            done.append([exec_id, k, i, c.get_results(exec_id, timeout=300)["return"][0]])
with open(out, "w") as f:
    json.dump(done, f)
"""


class RssSampler:
    """Samples the RSS of a process (and, separately, of its children) in a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.server: list[float] = []
        self.workers: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.server.append(self.proc.memory_info().rss / 1e6)
                self.workers.append(sum(c.memory_info().rss for c in self.proc.children()) / 1e6)
            except psutil.Error:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def growth(samples: list[float]) -> tuple[float, float, float]:
        """(early, late, growth) in MB: medians of the second and the last fifth.

        The first fifth is warm-up (imports, SQLite cache, allocator arenas filling)."""
        fifth = max(1, len(samples) // 5)
        early = statistics.median(samples[fifth : 2 * fifth])
        late = statistics.median(samples[-fifth:])
        return early, late, late - early


def soak(make_server, tmp_path: Path, per_client: int, rss_limit_mb: float) -> None:
    s = make_server("soak", workers=2)
    c = s.client()
    sampler = RssSampler(s.proc.pid)
    t0 = time.monotonic()
    outs = [tmp_path / f"client{k}.json" for k in range(CLIENTS)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(s.port), str(k), str(per_client), str(out)]
        )
        for k, out in enumerate(outs)
    ]
    try:
        for p in procs:
            assert p.wait(timeout=3600) == 0, "a client process failed"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        sampler.stop()
    elapsed = time.monotonic() - t0
    total = CLIENTS * per_client

    # every client got every one of its runs back, with its own result
    seen: dict[str, tuple[int, int]] = {}
    for k, out in enumerate(outs):
        done = json.loads(out.read_text())
        assert len(done) == per_client
        assert sorted(i for _, _, i, _ in done) == list(range(per_client))
        for exec_id, kk, i, result in done:
            assert kk == k and result == [k, i]
            assert exec_id not in seen, "one id for two runs"
            seen[exec_id] = (k, i)
    assert len(seen) == total

    # and the server ran each exactly once: as many records as submissions, all completed
    records = c.list_executions(limit=total + 100)
    assert len(records) == total, f"{len(records)} records for {total} submissions"
    assert {r["id"] for r in records} == set(seen)
    assert all(r["state"] == "completed" for r in records)
    assert all(r["attempts"] == 1 and r["n_results"] == 1 for r in records)
    assert len({r["name"] for r in records}) == total
    info = c.ping()
    assert info["queued"] == 0 and info["running"] == 0

    server = RssSampler.growth(sampler.server)
    workers = RssSampler.growth(sampler.workers)
    print(
        f"\n  soak: {total} runs from {CLIENTS} clients in {elapsed:.1f} s "
        f"({total / elapsed:.0f} runs/s), all completed exactly once"
        f"\n  server RSS: {server[0]:.1f} -> {server[1]:.1f} MB ({server[2]:+.1f} MB), "
        f"peak {max(sampler.server):.1f} MB, {len(sampler.server)} samples"
        f"\n  workers RSS (both): {workers[0]:.1f} -> {workers[1]:.1f} MB ({workers[2]:+.1f} MB)"
    )
    assert server[2] < rss_limit_mb, f"server RSS grew by {server[2]:.1f} MB"
    assert workers[2] < rss_limit_mb, f"worker RSS grew by {workers[2]:.1f} MB"


def test_soak_short(make_server, tmp_path):
    soak(make_server, tmp_path, per_client=250, rss_limit_mb=15)


def _full_requested(config: pytest.Config) -> bool:
    return "slow" in (config.option.markexpr or "") or os.environ.get("ZMQRUNTIME_SOAK") == "full"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_full(make_server, tmp_path, request):
    if not _full_requested(request.config):
        pytest.skip("the 10,000-run soak runs with -m slow or ZMQRUNTIME_SOAK=full")
    per_client = int(os.environ.get("ZMQRUNTIME_SOAK_RUNS", 2500))
    soak(make_server, tmp_path, per_client=per_client, rss_limit_mb=15)


def test_the_workers_code_cache_forgets_evicted_sources():
    import linecache

    from zmqruntime.worker import CodeCache

    cache = CodeCache(max_entries=4)
    before = set(linecache.cache)
    for i in range(100):  # one config file per run, as in the soak
        code = cache(f"i = {i}\n", "<config>")
        ns: dict = {}
        exec(code, ns)
        assert ns["i"] == i
    assert cache(f"i = {99}\n", "<config>") is code  # a repeated source compiles once
    added = set(linecache.cache) - before
    assert len(added) == 4, f"linecache holds {len(added)} sources for a cache of 4"
    for name in added:
        linecache.cache.pop(name)
