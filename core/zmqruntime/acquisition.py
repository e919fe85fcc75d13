"""Follow the folder a microscope writes into: each complete file once, in acquisition order.

Acquisition software writes image files into a folder while the experiment runs, either
under a temporary name that it renames at the end (atomic: the file appears complete) or
in place, a chunk at a time. ``FolderFollower`` turns that folder into an iterator of
``pathlib.Path`` that yields each file exactly once and only when it is complete:

- a file that looks complete the first time it is seen, and whose writes were not seen
  (an atomic rename), is yielded at once;
- a file seen while it is being written is yielded once its size and modification time
  have not changed for ``settle`` seconds and, for a TIFF, the file parses and every
  page's data lies within the file;
- a file that stops changing but never becomes readable (a truncated TIFF) is logged and
  skipped after ``give_up`` seconds.

Changes are seen with inotify (or the platform's equivalent) through ``watchfiles``; on
network filesystems, where inotify sees nothing that another host writes, the folder is
polled instead (``poll=seconds`` forces it). A periodic rescan backs up the watcher.
Those sources, the filesystem detection and the TIFF check are in ``folderwatch``; this
module holds the follower's rules (order, settling, giving up, ending) and its progress.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import fnmatch
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (X as X: also importable from here, where they were before folderwatch was split off)
from .folderwatch import REMOTE_FILESYSTEMS as REMOTE_FILESYSTEMS
from .folderwatch import (
    TEMPORARY_NAME,
    Poller,
    StopEvent,
    Watcher,
    default_check,
    filesystem_of,
    is_remote_filesystem,
    natural_key,
)
from .folderwatch import TIFF_SUFFIXES as TIFF_SUFFIXES
from .folderwatch import tiff_problem as tiff_problem

#: with inotify, a file written in place must be unchanged this long (seconds)
DEFAULT_SETTLE = 0.2
#: a stable file that still does not parse is skipped after this long (seconds)
DEFAULT_GIVE_UP = 10.0
#: polling interval used when a remote filesystem is detected (seconds)
DEFAULT_REMOTE_POLL = 0.5
#: with inotify, the folder is also listed this often, in case an event was lost (seconds)
RESCAN_INTERVAL = 2.0
#: progress is reported at most this often while files arrive, and this often while idle
PROGRESS_MIN_INTERVAL = 0.25
PROGRESS_IDLE_INTERVAL = 1.0


class Verdict(enum.Enum):
    READY = "ready"  # complete: yield it
    WRITING = "writing"  # still changing (or not yet settled): later files wait for it
    SUSPECT = "suspect"  # stable but unreadable: later files no longer wait for it
    SKIP = "skip"  # unreadable for give_up seconds: skipped with a log line
    GONE = "gone"  # deleted or renamed away before it was complete


# --------------------------------------------------------------------------- progress


@dataclass
class FollowStats:
    """What the follower has seen so far; ``message()`` is the progress line."""

    seen: int = 0
    processed: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.monotonic)
    last_file: float | None = None  # when the newest file was first seen (monotonic)
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))

    def rate(self) -> float:
        """Files processed per second, over the last few."""
        if len(self.recent) < 2:
            return 0.0
        span = self.recent[-1] - self.recent[0]
        return (len(self.recent) - 1) / span if span > 0 else 0.0

    def since_last(self, now: float | None = None) -> float | None:
        if self.last_file is None:
            return None
        return (now if now is not None else time.monotonic()) - self.last_file

    def as_dict(self) -> dict[str, Any]:
        since = self.since_last()
        return {
            "seen": self.seen,
            "processed": self.processed,
            "skipped": self.skipped,
            "rate": round(self.rate(), 3),
            "since_last": None if since is None else round(since, 3),
        }

    def message(self) -> str:
        since = self.since_last()
        last = "no file yet" if since is None else f"last file {since:.1f} s ago"
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        return (
            f"{self.seen} files seen, {self.processed} processed{skipped}, "
            f"{self.rate():.1f}/s, {last}"
        )


# --------------------------------------------------------------------------- the follower


@dataclass
class _Candidate:
    """A file seen but not yet yielded."""

    path: Path
    order: tuple
    changed_at: float
    sig: tuple[int, int] | None = None  # (size, mtime_ns) at the last look
    looked: bool = False
    written: bool = False  # writes were seen: it must settle, no fast path
    verdict: tuple[str | None, int] | None = None  # cached check of this sig
    complete: bool = False  # found complete at first sight, unchanged since
    unreadable_since: float | None = None


class FolderFollower:
    """Iterate over the complete files of a folder as an acquisition writes them.

    ``for path in FolderFollower(folder, "*.tif*", done_marker="done.txt"): ...``

    Order: the order in which files appear; files that appear together (present at the
    start, or found by one poll or one batch of events) are ordered by modification
    time, then by name with numbers compared as numbers. A file still being written
    holds back the files after it, so the order holds even when a file written in
    place is followed at once by one that was renamed into the folder.

    Ends when ``done_marker`` (a file name in the folder) exists and every file seen
    is yielded or skipped, when nothing new appeared and nothing is pending for
    ``idle_timeout`` seconds, or at once when ``stop.is_set()``.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        pattern: str = "*.tif*",
        *,
        done_marker: str | None = None,
        idle_timeout: float | None = None,
        recursive: bool = False,
        poll: float | None = None,
        skip_existing: bool = False,
        settle: float | None = None,
        give_up: float = DEFAULT_GIVE_UP,
        wait_settle: bool = False,
        check: Callable[[Path], tuple[str | None, int] | None] | None = None,
        stop: StopEvent | None = None,
        log: Callable[[str], None] | None = None,
        progress: Callable[[FollowStats], None] | None = None,
    ) -> None:
        path = Path(os.path.expanduser(str(folder)))
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.is_dir():
            raise FileNotFoundError(f"cannot follow {str(folder)!r}: no folder {path}")
        if poll is not None and not poll > 0:
            raise ValueError(f"poll must be a number of seconds > 0, not {poll!r}")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, not {idle_timeout!r}")
        self.folder = path.resolve()
        self.pattern = pattern.lower()
        self.done_marker = done_marker
        self.idle_timeout = idle_timeout
        self.recursive = recursive
        self.skip_existing = skip_existing
        self.give_up = float(give_up)
        self.wait_settle = wait_settle
        self.check = check or default_check
        self.stop: StopEvent = stop if stop is not None else threading.Event()
        self._log = log or (lambda text: None)
        self._progress = progress
        self.stats = FollowStats()
        self.end_reason: str | None = None

        fstype, opts = filesystem_of(self.folder)
        if poll is not None:
            self.poll: float | None = float(poll)
            self.mode_reason = f"polling every {self.poll:g} s (asked for)"
        elif is_remote_filesystem(fstype, opts):
            self.poll = DEFAULT_REMOTE_POLL
            self.mode_reason = (
                f"polling every {self.poll:g} s: the folder is on {fstype}, "
                "where file events from other hosts are not seen"
            )
        else:
            self.poll = None
            self.mode_reason = "file events (inotify)" if os.name == "posix" else "file events"
        if settle is None:
            settle = (
                DEFAULT_SETTLE if self.poll is None else min(max(DEFAULT_SETTLE, self.poll), 1.0)
            )
        self.settle = float(settle)

        if self.check is default_check and ".tif" in self.pattern:
            with contextlib.suppress(ImportError):  # imported now, not with the first file
                import tifffile  # noqa: F401
        self._pending: dict[str, _Candidate] = {}
        self._finished: set[str] = set()  # yielded or skipped, never looked at again
        self._batch = 0
        self._rescan = True
        self._marker_seen = False

    @property
    def mode(self) -> str:
        """ "watch" (file events) or "poll"."""
        return "poll" if self.poll is not None else "watch"

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Path]:
        source = self._open_source()
        try:
            yield from self._follow(source)
        finally:
            source.close()

    def _open_source(self) -> Watcher | Poller:
        if self.poll is None:
            try:
                return Watcher(self.folder, self.recursive)
            except Exception as exc:  # e.g. the inotify watch limit: poll instead
                self.poll = DEFAULT_REMOTE_POLL
                self.mode_reason = f"polling every {self.poll:g} s: file events failed ({exc})"
        return Poller()

    def _follow(self, source: Watcher | Poller) -> Iterator[Path]:
        stats = self.stats
        existing = self._scan()
        if self.skip_existing:
            self._finished.update(str(p) for p in existing)
        else:
            self._discover(existing, time.monotonic())
        self._rescan = False
        how = " (skipped: only new files are followed)" if self.skip_existing else ""
        self._log(
            f"following {self.folder} ({self.pattern!r}, {self.mode_reason}): "
            f"{len(existing)} files there to begin with{how}"
        )
        last_report = 0.0
        last_scan = time.monotonic()
        activity = time.monotonic()  # last new file or yielded file, for idle_timeout
        while True:
            if self.stop.is_set():
                return self._end(f"stopped (cancelled) after {stats.processed} files")
            now = time.monotonic()
            if self._rescan or now - last_scan >= (self.poll or RESCAN_INTERVAL):
                if self._discover(self._scan(), now):
                    activity = now
                last_scan, self._rescan = now, False
            if self.done_marker and not self._marker_seen:
                self._marker_seen = (self.folder / self.done_marker).exists()
                if self._marker_seen:
                    self._log(f"done marker {self.done_marker!r} found")
                    if self._discover(self._scan(), now):  # what was written just before it
                        activity = now
            for path in self._ready(time.monotonic()):
                stats.recent.append(time.monotonic())
                yield path
                stats.processed += 1
                activity = time.monotonic()
                if activity - last_report >= PROGRESS_MIN_INTERVAL:
                    last_report = self._report()
                if self.stop.is_set():
                    return self._end(f"stopped (cancelled) after {stats.processed} files")
            now = time.monotonic()
            if self._marker_seen and not self._pending:
                return self._end(f"acquisition done: {stats.processed} files processed")
            if (
                self.idle_timeout is not None
                and not self._pending
                and now - activity >= self.idle_timeout
            ):
                return self._end(
                    f"no new file for {self.idle_timeout:g} s: stopping after "
                    f"{stats.processed} files"
                )
            if self._progress is not None and now - last_report >= PROGRESS_IDLE_INTERVAL:
                last_report = self._report()
            changes = source.wait(self._timeout(now, last_scan, activity, last_report), self.stop)
            if changes is None:
                continue  # stopped: reported at the top of the loop
            if changes and self._apply(changes, time.monotonic()):
                activity = time.monotonic()

    def _end(self, reason: str) -> None:
        self.end_reason = reason
        left = sorted(self._pending.values(), key=lambda c: c.order)
        if left:
            names = ", ".join(c.path.name for c in left[:5]) + (" ..." if len(left) > 5 else "")
            reason += f"; {len(left)} incomplete files left unprocessed: {names}"
        self._log(reason)
        self._report()

    def _report(self) -> float:
        if self._progress is not None:
            with contextlib.suppress(Exception):  # progress must never break the follower
                self._progress(self.stats)
        return time.monotonic()

    def _timeout(self, now: float, last_scan: float, activity: float, last_report: float) -> float:
        """Seconds until something is due: a settle deadline, a scan, idle end, progress."""
        due = [last_scan + (self.poll or RESCAN_INTERVAL)]
        for c in self._pending.values():
            if c.changed_at + self.settle > now:  # a file that may have settled by then
                due.append(c.changed_at + self.settle)
            if c.unreadable_since is not None:
                due.append(c.unreadable_since + self.give_up)
        if self.idle_timeout is not None:
            due.append(activity + self.idle_timeout)
        if self._progress is not None:
            due.append(last_report + PROGRESS_IDLE_INTERVAL)
        if self.done_marker and self.poll is not None:
            due.append(now + self.poll)  # the marker is looked for at each poll
        return min(max(0.001, min(due) - now), 1.0)

    # ------------------------------------------------------------------ discovery
    def _wanted(self, name: str) -> bool:
        if name == self.done_marker or TEMPORARY_NAME.search(name):
            return False
        return fnmatch.fnmatchcase(name.lower(), self.pattern)

    def _scan(self) -> list[Path]:
        """Matching files not yet known, anywhere in the followed tree."""
        found: list[Path] = []
        folders = [self.folder]
        while folders:
            folder = folders.pop()
            try:
                entries = os.scandir(folder)
            except OSError:
                continue  # removed meanwhile, or unreadable
            with entries:
                for entry in entries:
                    try:
                        if entry.is_dir():
                            if self.recursive:
                                folders.append(Path(entry.path))
                            continue
                    except OSError:
                        continue
                    path = entry.path
                    if path in self._pending or path in self._finished:
                        continue
                    if self._wanted(entry.name):
                        found.append(Path(path))
        return found

    def _discover(self, paths: list[Path], now: float, written: bool = False) -> bool:
        """Add new files as one batch, ordered by mtime then name; True if any was new."""
        keyed = []
        for path in paths:
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            keyed.append((mtime, natural_key(str(path.relative_to(self.folder))), path))
        if not keyed:
            return False
        keyed.sort(key=lambda item: item[:2])
        self._batch += 1
        for i, (_, _, path) in enumerate(keyed):
            self._pending[str(path)] = _Candidate(
                path, (self._batch, i), changed_at=now, written=written
            )
        self.stats.seen += len(keyed)
        self.stats.last_file = now
        return True

    def _apply(self, changes: set[tuple[int, str]], now: float) -> bool:
        """Take a batch of file events; True if a new file was among them."""
        new: list[Path] = []
        written: list[Path] = []
        for change, path in changes:
            if change == 3:  # deleted: the next look at it finds it gone
                continue
            candidate = self._pending.get(path)
            if candidate is not None:
                candidate.written = candidate.written or candidate.looked or change == 2
                candidate.changed_at = now
                candidate.verdict = None
                candidate.complete = False
                continue
            if path in self._finished:
                continue
            p = Path(path)
            name = p.name
            if self.done_marker and name == self.done_marker and p.parent == self.folder:
                continue  # looked for at the top of the loop
            if not self._wanted(name):
                if change == 1 and self.recursive and p.is_dir():
                    self._rescan = True  # files may have landed before its watch was set
                continue
            if not self.recursive and p.parent != self.folder:
                continue
            (written if change == 2 else new).append(p)
        found = self._discover(new, now)
        return self._discover(written, now, written=True) or found

    # ------------------------------------------------------------------ readiness
    def _ready(self, now: float) -> list[Path]:
        """Files to yield now, in order; skipped ones are logged and forgotten."""
        out: list[Path] = []
        blocked = False
        for key, c in sorted(self._pending.items(), key=lambda kv: kv[1].order):
            verdict = self._judge(c, now)
            if verdict is Verdict.WRITING:
                blocked = True
            elif verdict is Verdict.GONE:
                del self._pending[key]
                self.stats.seen -= 1
            elif verdict is Verdict.SKIP:
                del self._pending[key]
                self._finished.add(key)
                self.stats.skipped += 1
                why = c.verdict[0] if c.verdict else "unreadable"
                self._log(
                    f"skipped {c.path.name}: still not readable {self.give_up:g} s after "
                    f"it stopped changing ({why})"
                )
            elif verdict is Verdict.READY and not blocked:
                del self._pending[key]
                self._finished.add(key)
                out.append(c.path)
        return out

    def _judge(self, c: _Candidate, now: float) -> Verdict:
        try:
            st = os.stat(c.path)
        except FileNotFoundError:
            return Verdict.GONE
        except OSError:
            return Verdict.WRITING
        sig = (st.st_size, st.st_mtime_ns)
        if sig != c.sig:
            if c.sig is not None:
                c.written = True
            c.sig, c.changed_at, c.verdict, c.unreadable_since = sig, now, None, None
            c.complete = False
        if c.complete:
            return Verdict.READY  # waits for an earlier file, unchanged since it was checked
        first = not c.looked
        c.looked = True
        stable = now - c.changed_at >= self.settle
        fast = first and not c.written and not self.wait_settle
        if not (fast or stable):
            return Verdict.WRITING
        if c.verdict is None:
            checked = self.check(c.path)
            if checked is None:  # no content check for this kind of file: stability decides
                if fast:
                    c.written = True  # wait the settle interval
                    return Verdict.WRITING
                checked = (None if st.st_size > 0 else "the file is empty", 1)
            c.verdict = checked
        problem, pages = c.verdict
        if problem is None:
            if fast and pages > 1:
                c.written = True  # a stack may still grow page by page: let it settle
                return Verdict.WRITING
            with contextlib.suppress(OSError):
                st = os.stat(c.path)
                if (st.st_size, st.st_mtime_ns) != sig:  # changed while it was checked
                    return Verdict.WRITING
            c.complete = True
            return Verdict.READY
        if not stable:
            c.written = True  # half there at first sight: written in place
            return Verdict.WRITING
        if c.unreadable_since is None:
            c.unreadable_since = now
        if now - c.unreadable_since >= self.give_up:
            return Verdict.SKIP
        return Verdict.SUSPECT


# --------------------------------------------------------------------------- in a run


class _CancelView:
    """The run's cancel as a stop event; reading it marks the cancel as seen by the run."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    def is_set(self) -> bool:
        return self._ctx.cancelled

    def wait(self, timeout: float) -> bool:
        return self._ctx.wait(timeout)


def follow_in_context(
    ctx: Any, path: str | os.PathLike[str], pattern: str, **options: Any
) -> Iterator[Path]:
    """``ctx.follow_folder``: a FolderFollower wired to the run's cancel, log and progress."""
    from . import protocol

    def progress(stats: FollowStats) -> None:
        body = {"progress": None, "message": stats.message(), "acquisition": stats.as_dict()}
        ctx._send(protocol.EventKind.PROGRESS.value, body, False)

    options.setdefault("stop", _CancelView(ctx))
    options.setdefault("log", ctx.log)
    options.setdefault("progress", progress)
    return iter(FolderFollower(path, pattern, **options))
