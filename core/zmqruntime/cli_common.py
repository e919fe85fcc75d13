"""What the ``zmqruntime`` command's subcommands share: exit codes, the consoles, the
client (or pool) the connection options name, and how states and times are printed."""

from __future__ import annotations

import argparse
import ast
import time
from typing import Any

from rich.console import Console

#: exit codes (the epilog of `zmqruntime --help` lists them)
EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_UNKNOWN_ID = 4
EXIT_CANCELLED = 5
EXIT_OUTPUT = 6  # the run is fine, but its results could not be written where asked

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def make_client(args: argparse.Namespace, spawn: bool = False):
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


def elapsed(status: dict[str, Any]) -> float | None:
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


def state_markup(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def parse_set(pairs: list[str]) -> dict[str, Any]:
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


def exit_for(status: dict[str, Any]) -> int:
    return {"completed": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(status["state"], EXIT_RUN_FAILED)


def short(value: Any, width: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
