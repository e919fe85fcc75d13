"""The ``zmqruntime`` command: serve, submit, watch and manage runs from a terminal."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import local
from ._version import __version__
from .errors import (
    ExecutionCancelled,
    ExecutionFailed,
    ServerUnavailable,
    UnknownExecution,
    ZmqRuntimeError,
)
from .export import FORMATS
from .protocol import FINAL_STATES
from .stream import load_directory

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_UNKNOWN_ID = 4
EXIT_CANCELLED = 5
EXIT_OUTPUT = 6  # the run is fine, but its results could not be written where asked

EPILOG = """\
exit codes: 0 ok, 1 the run failed (or an error), 2 bad usage, 3 no server answered
(serve: its data dir or port is taken by another server or program),
4 unknown execution id, 5 the run was cancelled, 6 the results could not be written (disk
full, no permission: the run and its stored results are unchanged).

examples:
  zmqruntime demo                          simulated acquisition, results in ./zmqruntime-demo-*
  zmqruntime serve --port 5555 --workers 4
  zmqruntime submit my_pipeline.py --config my_config.py --wait
  zmqruntime watch 3f2a9c1d0b7e4a55
  zmqruntime results 3f2a9c1d0b7e4a55 --out results/
"""

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


# --------------------------------------------------------------------------- helpers


def _connection_args(p: argparse.ArgumentParser, spawn_flag: bool = False) -> None:
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("ZMQRUNTIME_PORT", 5555)),
        help="server control port (default 5555, or $ZMQRUNTIME_PORT)",
    )
    p.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p.add_argument("--keys", type=Path, help="CURVE key directory for a secured server")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for each reply (default 5)"
    )
    p.add_argument(
        "--server",
        action="append",
        metavar="tcp://HOST:PORT",
        help="use a pool of servers instead of --host/--port (repeatable)",
    )
    p.add_argument(
        "--servers-file",
        type=Path,
        metavar="FILE",
        help="pool endpoints, one per line ('#' starts a comment)",
    )
    if spawn_flag:
        p.add_argument(
            "--no-spawn",
            action="store_true",
            help="fail instead of starting a local server when none answers",
        )


def _client(args: argparse.Namespace, spawn: bool = False):
    from .client import ExecutionClient

    servers = list(getattr(args, "server", None) or [])
    if servers or getattr(args, "servers_file", None):  # a pool has the client's contract
        from .pool import ExecutionPool
        from .transport import read_servers_file

        try:
            if args.servers_file:
                servers += read_servers_file(args.servers_file)
            return ExecutionPool(servers, keys=args.keys, timeout=args.timeout)
        except ValueError as exc:
            err.print(f"zmqruntime: {exc}", markup=False)
            raise SystemExit(EXIT_USAGE) from None
    return ExecutionClient(
        port=args.port,
        host=args.host,
        keys=args.keys,
        timeout=args.timeout,
        auto_spawn=spawn and not getattr(args, "no_spawn", False),
        workers=getattr(args, "workers", None),
    )


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _elapsed(status: dict[str, Any]) -> float | None:
    if not status.get("started"):
        return None
    return (status.get("finished") or time.time()) - status["started"]


STATE_STYLE = {
    "queued": "yellow",
    "running": "cyan",
    "completed": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def _state(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def _parse_set(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"zmqruntime: --set expects NAME=VALUE, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _exit_for(status: dict[str, Any]) -> int:
    return {"completed": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(status["state"], EXIT_RUN_FAILED)


def _print_final(status: dict[str, Any]) -> None:
    console.print(
        f"{status['id']}: {_state(status['state'])} in "
        f"{_fmt_duration(_elapsed(status))}, {status['n_results']} result(s)"
    )
    if status["state"] == "failed":
        if status.get("traceback"):
            err.print(status["traceback"].rstrip(), markup=False)
        err.print(f"error: {status.get('error')}", markup=False)
    elif status["state"] == "cancelled" and status.get("message"):
        console.print(f"  {status['message']}", markup=False)


def follow_run(client, exec_id: str, show_logs: bool = True) -> dict[str, Any]:
    """Show a live progress bar and log lines until the run ends; return its final status.

    Every stored log line is shown once and in order, also those written before this watch
    began or dropped on the way (fetched from the server, as stream() does for results).
    """
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[message]}"),
        console=console,
        transient=False,
    )
    final: dict[str, Any] | None = None
    next_log: int | None = None  # None: the stored lines before this watch not shown yet

    def show(text: str) -> None:
        for line in text.splitlines():
            progress.console.print(f"[dim]│[/] {line}", markup=True, highlight=False)

    def catch_up(upto: int | None) -> None:
        """Show stored lines from ``next_log`` up to (not including) ``upto``."""
        nonlocal next_log
        start = next_log or 0
        while upto is None or start < upto:
            batch = [
                e for e in client.get_logs(exec_id, start) if upto is None or e["index"] < upto
            ]
            if not batch:
                break
            for entry in batch:
                show(entry["text"])
                start = entry["index"] + 1
        next_log = start

    with progress:
        task = progress.add_task(exec_id, total=1.0, message="")
        for event in client.stream(exec_id, previews=False):  # subscribed before the 1st
            if show_logs and next_log is None:
                catch_up(None)
            kind = event["kind"]
            if kind == "progress" and event.get("progress") is not None:
                progress.update(
                    task, completed=event["progress"], message=event.get("message") or ""
                )
            elif kind == "progress" and event.get("message"):  # no fraction: a folder followed
                progress.update(task, message=event["message"])
            elif kind == "log" and event.get("partial"):  # a progress bar being redrawn
                progress.update(task, message=event["text"].strip()[-60:])
            elif kind == "log" and show_logs:
                index = event.get("index")
                if index is None:  # live only (the run's stored log is full)
                    show(event["text"])
                elif index >= (next_log or 0):
                    catch_up(index)  # lines dropped on the way, if any
                    show(event["text"])
                    next_log = index + 1
            elif kind == "state":
                status = event["status"]
                progress.update(task, description=f"{exec_id} {status['state']}")
                if status["state"] in FINAL_STATES:
                    if show_logs:
                        catch_up(None)
                    if status["state"] == "completed":
                        progress.update(task, completed=1.0)
                    final = status
    assert final is not None
    return final


def _short(value: Any, width: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# --------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import ExecutionServer, InsecureBindRefused

    executor = None
    if args.dask is not None or args.dask_adapt is not None:
        from .dask_executor import DaskExecutor, ExecutorUnavailable, parse_adapt

        try:
            if args.dask is None:
                raise ExecutorUnavailable("--dask-adapt needs --dask")
            executor = DaskExecutor(
                args.dask, parse_adapt(args.dask_adapt), args.dask_host, args.dask_contact
            )
        except ExecutorUnavailable as exc:
            err.print(f"zmqruntime serve: {exc}", markup=False)
            return EXIT_USAGE
    try:
        server = ExecutionServer(
            port=args.port,
            host=args.host,
            workers=args.workers,
            data_dir=args.data_dir,
            cancel_grace=args.cancel_grace,
            keys=args.keys,
            insecure=args.insecure,
            heartbeat_timeout=args.heartbeat_timeout,
            keep_days=args.keep_days,
            max_store_gb=args.max_store_gb,
            retention_interval=args.retention_interval,
            min_free_mb=args.min_free_mb,
            executor=executor,
        )
    except (InsecureBindRefused, FileNotFoundError) as exc:
        err.print(f"zmqruntime serve: {exc}", markup=False)
        return EXIT_USAGE
    try:
        server.serve_forever()
    except local.StartRefused as exc:  # the data dir's lock or a port is taken
        err.print(f"zmqruntime serve: {exc}", markup=False)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    pipeline = args.pipeline.read_text()
    config_code = args.config.read_text() if args.config else None
    overrides = _parse_set(args.set or [])
    with _client(args, spawn=True) as client:
        exec_id = client.execute(
            pipeline,
            config_code,
            config=overrides or None,
            name=args.name or args.pipeline.stem,
            retries=args.retries,
        )
        if not args.wait:
            print(exec_id)
            return EXIT_OK
        console.print(f"submitted {exec_id} to {client.endpoint}")
        status = follow_run(client, exec_id)
        _print_final(status)
        return _exit_for(status)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.id:
            status = client.get_status(args.id)
            if args.json:
                print(json.dumps(status, indent=2))
                return EXIT_OK
            table = Table(show_header=False, box=None)
            for key in (
                "id",
                "name",
                "state",
                "progress",
                "message",
                "error",
                "created",
                "started",
                "finished",
                "n_results",
                "n_logs",
                "attempts",
            ):
                value = status.get(key)
                if key in ("created", "started", "finished"):
                    value = _fmt_time(value)
                elif key == "state":
                    value = _state(value)
                elif key == "progress" and value is not None:
                    value = f"{value:.0%}"
                table.add_row(key, "-" if value is None else str(value))
            console.print(table)
            if status.get("traceback"):
                err.print(status["traceback"].rstrip(), markup=False)
            return EXIT_OK
        runs = client.list_executions(limit=args.limit)
        if args.json:
            print(json.dumps(runs, indent=2))
            return EXIT_OK
        table = Table(title=f"runs on {client.endpoint}")
        for col in ("id", "name", "state", "progress", "elapsed", "results", "created"):
            table.add_column(col)
        for s in runs:
            prog = "-" if s["progress"] is None else f"{s['progress']:.0%}"
            table.add_row(
                s["id"],
                s["name"] or "",
                _state(s["state"]),
                prog,
                _fmt_duration(_elapsed(s)),
                str(s["n_results"]),
                _fmt_time(s["created"]),
            )
        console.print(table if runs else f"no runs on {client.endpoint}")
        return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.cancel(args.id)
        console.print(f"{args.id}: {reply['message']}", markup=False)
        if args.wait and reply["cancelled"]:
            status = client.wait(args.id)
            _print_final(status)
        return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            results = client.get_results(args.id, directory=args.out, format=args.format)
        except OSError as exc:
            err.print(f"zmqruntime: could not write the results to {args.out}: {exc}", markup=False)
            return EXIT_OUTPUT
        except ExecutionFailed as exc:
            err.print(str(exc), markup=False)
            return EXIT_RUN_FAILED
        except ExecutionCancelled as exc:
            err.print(str(exc), markup=False)
            return EXIT_CANCELLED
    n = sum(len(v) for v in results.values())
    if args.format == "npy":
        index = Path(args.out) / "index.json"
        console.print(f"{n} result(s) of {args.id} written to {args.out} (index: {index})")
    else:
        index = Path(args.out) / "manifest.json"
        console.print(
            f"{args.format} export of {args.id} written to {args.out} (manifest: {index})"
        )
        console.print("images, or values, per result name:")
    for name, values in results.items():
        console.print(f"  {name}: {len(values)}", markup=False)
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = follow_run(client, args.id, show_logs=not args.quiet)
        _print_final(status)
        return _exit_for(status)


def cmd_servers(args: argparse.Namespace) -> int:
    from .client import ExecutionClient

    entries = local.list_servers()
    if args.json:
        print(json.dumps([e.__dict__ for e in entries], indent=2))
        return EXIT_OK
    if not entries:
        console.print("no local zmqruntime servers running (start one with 'zmqruntime serve')")
        return EXIT_OK
    table = Table(title="local zmqruntime servers")
    columns = (
        "port",
        "pid",
        "executor",
        "workers busy/total",
        "queued",
        "disk free / min",
        "uptime",
        "log",
    )
    for col in columns:
        table.add_column(col)
    problems = []
    for e in entries:
        busy, queued, disk, executor = "?", "?", "?", "?"
        try:
            with ExecutionClient(port=e.port, host=e.host, auto_spawn=False, timeout=1.0) as c:
                info = c.ping()
            busy, queued = f"{info['workers_busy']}/{info['workers']}", str(info["queued"])
            executor = _executor_cell(info.get("executor"))
            disk, problem = _disk_cell(info.get("storage"))
            if problem:
                problems.append(f"port {e.port}: {problem}")
        except ZmqRuntimeError:
            busy = "[red]not answering[/]"
        table.add_row(
            str(e.port),
            str(e.pid),
            executor,
            busy,
            queued,
            disk,
            _fmt_duration(time.time() - e.started),
            e.log_file,
        )
    console.print(table)
    for problem in problems:
        err.print(f"[red]{escape(problem)}[/]")
    return EXIT_OK


def _executor_cell(executor: dict[str, Any] | None) -> str:
    """``native``, or ``dask local (2 workers, 2 threads)`` with pending jobs, the problem
    and the dashboard link, for ``servers``."""
    if not executor or executor.get("kind") != "dask":
        return "native"
    lines = [f"dask {executor.get('cluster') or executor.get('spec')}"]
    if executor.get("problem"):
        lines.append(f"[red]{escape(executor['problem'])}[/]")
    elif not executor.get("ready"):
        lines.append("connecting")
    else:
        figures = f"{executor.get('workers', 0)} workers, {executor.get('threads', 0)} threads"
        if executor.get("pending_jobs") is not None:
            figures += f", {executor['pending_jobs']} jobs pending"
        lines.append(figures)
    if executor.get("dashboard"):
        lines.append(escape(executor["dashboard"]))
    return "\n".join(lines)


def _disk_cell(storage: dict[str, Any] | None) -> tuple[str, str | None]:
    """``12.3 GB / 100.0 MB`` (red when runs are refused) and the problem, if any."""
    from .store import fmt_bytes

    if not storage:
        return "?", None
    cell = f"{fmt_bytes(storage['free_bytes'])} / {fmt_bytes(storage['min_free_bytes'])}"
    if not storage.get("accepting_runs", True):
        cell = f"[red]{cell} (refusing runs)[/]"
    return cell, storage.get("problem")


def cmd_stop(args: argparse.Namespace) -> int:
    from .client import ExecutionClient

    entry = local.find_server(args.port)
    if args.force:
        if entry is None:
            err.print(
                f"no zmqruntime server started on this machine is registered on port "
                f"{args.port}; nothing killed (only servers this runtime started are)"
            )
            return EXIT_UNAVAILABLE
        local.kill_server(entry)
        console.print(f"killed server pid {entry.pid} on port {args.port} and its workers")
        return EXIT_OK
    try:
        with ExecutionClient(
            port=args.port, host="127.0.0.1", auto_spawn=False, timeout=args.timeout, keys=args.keys
        ) as client:
            reply = client.shutdown()
    except ServerUnavailable as exc:
        err.print(f"zmqruntime stop: {exc}", markup=False)
        return EXIT_UNAVAILABLE
    pid = reply.get("pid")
    if entry is not None and not local.wait_until(lambda: not entry.is_alive(), args.timeout):
        err.print(
            f"server pid {pid} did not exit within {args.timeout:g} s; use --force to kill it"
        )
        return EXIT_RUN_FAILED
    console.print(f"server on port {args.port} (pid {pid}) stopped")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from .transport import generate_keys

    try:
        paths = generate_keys(args.dir)
    except FileExistsError as exc:
        err.print(f"zmqruntime keys generate: {exc}", markup=False)
        return EXIT_USAGE
    console.print(f"CURVE keys written to {args.dir}:")
    for label, path in paths.items():
        console.print(f"  {label:14s} {path}", markup=False)
    console.print("serve with:   zmqruntime serve --host 0.0.0.0 --keys " + str(args.dir))
    console.print("connect with: ExecutionClient(host=..., keys=...) or --keys " + str(args.dir))
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    from .store import Store

    if args.keep_days is None and args.max_store_gb is None:
        err.print("zmqruntime purge: give --keep-days and/or --max-store-gb")
        return EXIT_USAGE
    data_dir = args.data_dir or local.default_data_dir(args.port)
    store = Store(data_dir)
    max_bytes = int(args.max_store_gb * 1e9) if args.max_store_gb is not None else None
    n = store.purge(args.keep_days, max_bytes)
    store.close()
    console.print(f"removed {n} finished run(s) from {data_dir}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .client import ExecutionClient
    from .resources import example

    pipeline, config_code = example("acquisition")
    config = {
        "frames": args.frames,
        "size": args.size,
        "n_cells": args.cells,
        "frame_interval": args.interval,
    }
    client = ExecutionClient(port=args.port, host="127.0.0.1", workers=args.workers)
    try:
        console.print(
            f"[bold]zmqruntime demo[/]: a simulated fluorescence acquisition "
            f"({args.frames} frames of {args.size}x{args.size} uint16)"
        )
        info = client.ping()
        how = "spawned" if client.spawned else "reusing"
        console.print(
            f"{how} local server on {client.endpoint} (pid {info['pid']}, "
            f"{info['workers']} workers, log {info['log_file']})"
        )
        exec_id = client.execute(pipeline, config_code, config=config, name="demo-acquisition")
        console.print(f"run {exec_id} submitted; following it live (Ctrl-C cancels)")
        try:
            status = follow_run(client, exec_id)
        except KeyboardInterrupt:
            client.cancel(exec_id)
            status = client.wait(exec_id, timeout=30)
        _print_final(status)
        if status["state"] != "completed":
            return _exit_for(status)
        out = args.out or Path.cwd() / f"zmqruntime-demo-{exec_id}"
        results = client.get_results(exec_id, directory=out)
        counts = load_directory(out)["counts"][0]
        table_path = Path(out) / "counts.csv"
        columns = list(counts)
        rows = zip(*(counts[c] for c in columns))
        table_path.write_text(
            ",".join(columns)
            + "\n"
            + "".join(",".join(f"{v:g}" for v in row) + "\n" for row in rows)
        )
        cells = counts["cells"]
        visible = counts["cells_visible"]
        console.print(
            f"cells counted per frame: min {min(cells)}, mean "
            f"{sum(cells) / len(cells):.1f}, max {max(cells)} (simulated visible: "
            f"mean {sum(visible) / len(visible):.1f})"
        )
        console.print(f"results written to [bold]{out}[/]:")
        for name, values in results.items():
            for v in values:
                shown = v.name if isinstance(v, Path) else _short(v)
                console.print(f"  {name:15s} {shown}", markup=False)
        console.print(f"  {'counts table':15s} {table_path.name}", markup=False)
        return EXIT_OK
    finally:
        if client.spawned is not None and not args.keep_server:
            client.shutdown()
            client.spawned.wait(timeout=15)
            console.print("stopped the server the demo started (--keep-server keeps it)")
        client.close()


def cmd_simulate_acquisition(args: argparse.Namespace) -> int:
    from .simulate import simulate_acquisition

    def echo(record: dict[str, Any]) -> None:
        if not args.quiet:
            console.print(f"  {record['name']}  ({record['mode']})", markup=False)

    marker = args.done_marker or None
    console.print(f"playing {args.source} into {args.dir} at {args.fps:g} frames/s", markup=False)
    records = simulate_acquisition(
        args.dir,
        args.source,
        fps=args.fps,
        partial_writes=args.partial_writes,
        frames=args.frames,
        pattern=args.pattern,
        done_marker=marker,
        log=args.log,
        echo=echo,
    )
    done = f", then {marker!r}" if marker else ""
    console.print(f"wrote {len(records)} files into {args.dir}{done}", markup=False)
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zmqruntime",
        description="Run Python pipelines on local or remote servers over ZeroMQ: submit, "
        "watch, cancel and fetch results.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zmqruntime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "serve",
        help="run a server in the foreground",
        description="Run a server: control on PORT, data on PORT+1.",
    )
    p.add_argument("--port", type=int, default=5555, help="control port (default 5555)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; others need --keys or --insecure)",
    )
    p.add_argument("--workers", type=int, help="worker processes (default: number of cores)")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="records, results and log (default: per-port dir in the user data dir)",
    )
    p.add_argument(
        "--cancel-grace",
        type=float,
        default=2.0,
        help="seconds a cancelled pipeline gets before its worker is killed",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=10.0,
        help="seconds without a worker heartbeat before it is declared hung",
    )
    p.add_argument("--keys", type=Path, help="CURVE key directory: require allowed clients")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback bind without keys (trusted networks only)",
    )
    p.add_argument("--keep-days", type=float, help="remove finished runs older than this")
    p.add_argument("--max-store-gb", type=float, help="cap on stored results, oldest go first")
    p.add_argument(
        "--retention-interval",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how often --keep-days/--max-store-gb are applied while serving (default 600)",
    )
    p.add_argument(
        "--min-free-mb",
        type=float,
        default=100.0,
        metavar="MB",
        help="refuse new runs (queued ones wait) while the data dir has less free space "
        "than this; accepted again once space is back (default 100, 0: never refuse)",
    )
    p.add_argument(
        "--dask",
        metavar="SPEC",
        help="run the runs on a Dask cluster instead of worker processes: a scheduler "
        "ADDRESS (tcp://head:8786), local:N (a local cluster of N worker processes), or "
        "slurm|pbs|lsf|sge|htcondor (dask-jobqueue, configured by jobqueue.yaml or "
        "DASK_JOBQUEUE__... variables); needs pip install 'zmqruntime[dask]'",
    )
    p.add_argument(
        "--dask-adapt",
        metavar="MIN:MAX",
        help="adaptive scaling of the cluster --dask starts, in workers (jobs for a job "
        "queue; default 0:1 there)",
    )
    p.add_argument(
        "--dask-host",
        metavar="HOST",
        help="address the Dask tasks' report sockets bind (CURVE always; default --host)",
    )
    p.add_argument(
        "--dask-contact",
        metavar="NAME",
        help="host name Dask workers reach those sockets by (default --dask-host; the "
        "machine's name for a wildcard)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "submit",
        help="submit a pipeline file",
        description="Submit PIPELINE (a .py defining run(ctx, config)).",
    )
    p.add_argument("pipeline", type=Path)
    p.add_argument("--config", type=Path, help="config file: its public names are the config")
    p.add_argument(
        "--set", action="append", metavar="NAME=VALUE", help="override a config value (repeatable)"
    )
    p.add_argument("--name", help="a name for the run (default: the file's stem)")
    p.add_argument(
        "--retries", type=int, default=0, help="resubmit this many times if the worker dies"
    )
    p.add_argument("--wait", action="store_true", help="follow the run until it ends")
    p.add_argument("--workers", type=int, help="workers of a server spawned for this")
    _connection_args(p, spawn_flag=True)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="status of one run, or a table of recent runs")
    p.add_argument("id", nargs="?")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="print JSON")
    _connection_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a run")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    _connection_args(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("results", help="write a run's results to a directory")
    p.add_argument("id")
    p.add_argument("--out", type=Path, required=True, help="directory (created if needed)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="npy",
        help="npy: one file per result + index.json; ome-zarr / ome-tiff: one image per array "
        "result name (same-shaped results stacked along t), values in values.csv, manifest.json",
    )
    _connection_args(p)
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("watch", help="follow a run: progress bar and log lines")
    p.add_argument("id")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    _connection_args(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("servers", help="list the local servers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_servers)

    p = sub.add_parser(
        "stop",
        help="stop a local server",
        description="Stop the local server on PORT: graceful by default; "
        "--force kills it by pid (checked against its start time).",
    )
    p.add_argument("port", type=int)
    p.add_argument("--force", action="store_true", help="kill the server and its workers")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--keys", type=Path)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("keys", help="CURVE keys for secured servers")
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    g = ks.add_parser("generate", help="create server and client key pairs in DIR")
    g.add_argument("dir", type=Path)
    g.set_defaults(func=cmd_keys)

    p = sub.add_parser("purge", help="remove old finished runs from a server's store")
    p.add_argument("--keep-days", type=float)
    p.add_argument("--max-store-gb", type=float)
    p.add_argument("--port", type=int, default=5555, help="whose default data dir")
    p.add_argument("--data-dir", type=Path)
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser(
        "demo",
        help="run the bundled simulated acquisition",
        description="Spawn (or reuse) a local server, run a simulated "
        "fluorescence acquisition with live progress, and write "
        "its results to a directory.",
    )
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--size", type=int, default=512, help="frame edge in pixels")
    p.add_argument("--cells", type=int, default=40)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between frames")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--workers", type=int, default=2, help="workers of a spawned server")
    p.add_argument("--out", type=Path, help="results directory (default ./zmqruntime-demo-ID)")
    p.add_argument(
        "--keep-server", action="store_true", help="leave a server the demo spawned running"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "simulate-acquisition",
        help="play images into a folder at a camera's pace (try follow_folder)",
        description="Write the images of SOURCE (a folder, or a multi-page TIFF played page "
        "by page) into DIR one by one at --fps, as acquisition software does: each under a "
        "hidden temporary name renamed when complete, or with --partial-writes every other "
        "file written in place in chunks. Ends with an empty done-marker file.",
    )
    p.add_argument("dir", type=Path, help="the folder to write into (created if needed)")
    p.add_argument("--from", dest="source", type=Path, required=True, help="images to play")
    p.add_argument("--fps", type=float, default=10.0, help="files per second (default 10)")
    p.add_argument(
        "--partial-writes", action="store_true", help="write every other file in place, in chunks"
    )
    p.add_argument("--frames", type=int, help="play at most this many files")
    p.add_argument("--pattern", default="*", help="which files of a SOURCE folder (default *)")
    p.add_argument(
        "--done-marker",
        default="acquisition_done",
        metavar="NAME",
        help="file written at the end (default acquisition_done; '' for none)",
    )
    p.add_argument("--log", type=Path, help="append one JSON line per file written")
    p.add_argument("--quiet", action="store_true", help="no line per file")
    p.set_defaults(func=cmd_simulate_acquisition)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UnknownExecution as exc:
        err.print(f"zmqruntime: {exc}", markup=False)
        code = EXIT_UNKNOWN_ID
    except ServerUnavailable as exc:
        err.print(f"zmqruntime: {exc}", markup=False)
        code = EXIT_UNAVAILABLE
    except (ZmqRuntimeError, OSError) as exc:
        err.print(f"zmqruntime: {exc}", markup=False)
        code = EXIT_RUN_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
