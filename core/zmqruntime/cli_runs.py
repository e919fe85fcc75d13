"""The ``zmqruntime`` subcommands about runs: submit, status, cancel, results, watch, demo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli_common import (
    EXIT_CANCELLED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_RUN_FAILED,
    console,
    elapsed,
    err,
    exit_for,
    make_client,
    parse_set,
    short,
    state_markup,
)
from .errors import (
    ExecutionCancelled,
    ExecutionFailed,
)
from .formatting import fmt_duration, fmt_time
from .protocol import FINAL_STATES
from .stream import load_directory


def print_final(status: dict[str, Any]) -> None:
    console.print(
        f"{status['id']}: {state_markup(status['state'])} in "
        f"{fmt_duration(elapsed(status))}, {status['n_results']} result(s)"
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


def cmd_submit(args: argparse.Namespace) -> int:
    pipeline = args.pipeline.read_text()
    config_code = args.config.read_text() if args.config else None
    overrides = parse_set(args.set or [])
    with make_client(args, spawn=True) as client:
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
        print_final(status)
        return exit_for(status)


def cmd_status(args: argparse.Namespace) -> int:
    with make_client(args) as client:
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
                    value = fmt_time(value)
                elif key == "state":
                    value = state_markup(value)
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
                state_markup(s["state"]),
                prog,
                fmt_duration(elapsed(s)),
                str(s["n_results"]),
                fmt_time(s["created"]),
            )
        console.print(table if runs else f"no runs on {client.endpoint}")
        return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        reply = client.cancel(args.id)
        console.print(f"{args.id}: {reply['message']}", markup=False)
        if args.wait and reply["cancelled"]:
            status = client.wait(args.id)
            print_final(status)
        return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    with make_client(args) as client:
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
    with make_client(args) as client:
        status = follow_run(client, args.id, show_logs=not args.quiet)
        print_final(status)
        return exit_for(status)


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
        print_final(status)
        if status["state"] != "completed":
            return exit_for(status)
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
                shown = v.name if isinstance(v, Path) else short(v)
                console.print(f"  {name:15s} {shown}", markup=False)
        console.print(f"  {'counts table':15s} {table_path.name}", markup=False)
        return EXIT_OK
    finally:
        if client.spawned is not None and not args.keep_server:
            client.shutdown()
            client.spawned.wait(timeout=15)
            console.print("stopped the server the demo started (--keep-server keeps it)")
        client.close()
