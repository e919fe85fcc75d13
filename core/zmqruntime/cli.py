"""The ``zmqruntime`` command: serve, submit, watch and manage runs from a terminal."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._version import __version__
from .cli_common import (
    EXIT_RUN_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_UNKNOWN_ID,
    err,
)
from .cli_runs import (
    cmd_cancel,
    cmd_demo,
    cmd_results,
    cmd_status,
    cmd_submit,
    cmd_watch,
)
from .cli_servers import (
    cmd_keys,
    cmd_purge,
    cmd_serve,
    cmd_servers,
    cmd_simulate_acquisition,
    cmd_stop,
)
from .errors import (
    ServerUnavailable,
    UnknownExecution,
    ZmqRuntimeError,
)
from .export import FORMATS

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


# --------------------------------------------------------------------------- commands


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
        help="npy: one file per result + index.json; ome-zarr (NGFF 0.4, Zarr v2), "
        "ome-zarr-0.5 (NGFF 0.5, Zarr v3: needs zarr 3) or ome-tiff: one image per array "
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
