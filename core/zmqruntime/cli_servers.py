"""The ``zmqruntime`` subcommands about servers and hosts: serve, servers, stop, keys,
purge, simulate-acquisition."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.markup import escape
from rich.table import Table

from . import local
from .cli_common import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    console,
    err,
)
from .errors import (
    ServerUnavailable,
    ZmqRuntimeError,
)
from .formatting import fmt_bytes, fmt_duration


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
            fmt_duration(time.time() - e.started),
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
