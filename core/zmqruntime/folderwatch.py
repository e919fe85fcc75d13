"""What a followed folder says: which files changed, on what filesystem, and whether a file
is complete yet. The follower (``acquisition.FolderFollower``) decides from this what to
yield and when.

- ``Watcher``: file events (inotify, or the platform's watcher) through watchfiles' Rust
  backend; what arrived while the run was busy with a file is taken without a wait.
- ``Poller``: waits only, for polling (network filesystems, where inotify does not see
  what other hosts write); the follower lists the folder itself.
- ``filesystem_of`` / ``is_remote_filesystem``: which of the two a folder needs.
- ``tiff_problem`` / ``default_check``: whether a TIFF parses and every page lies within
  the file (a file written in place grows past each part only once it is written).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import threading
import time
from pathlib import Path
from typing import Protocol, cast

#: watchfiles batching: the watcher looks for news every STEP ms, a batch lasts <= DEBOUNCE
#: (a file renamed into the folder is seen 2 steps after its event; a follower waiting for
#: files costs about 2 % of a core at 2 ms, 1 % at 5 ms, measured on a loaded 2-core machine)
WATCH_STEP_MS = 2
WATCH_DEBOUNCE_MS = 20

#: filesystems where inotify does not see what other hosts write: polled instead
REMOTE_FILESYSTEMS = frozenset(
    "nfs nfs4 cifs smb smb2 smb3 smbfs ncpfs afpfs afs 9p v9fs drvfs ceph glusterfs lustre"
    " gpfs beegfs ocfs2 gfs2 davfs webdav sshfs vboxsf vmhgfs prl_fs".split()
)
#: suffixes checked with tifffile before a file is yielded
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf2", ".tf8")
#: names never yielded: temporary files of writers that rename when done, editor leftovers
TEMPORARY_NAME = re.compile(
    r"^[.~]|~$|\.(tmp|temp|part|partial|crdownload|download|swp|lock)$", re.IGNORECASE
)

_tifffile_quiet = threading.local()


class StopEvent(Protocol):
    def is_set(self) -> bool: ...


# --------------------------------------------------------------------------- filesystem


def filesystem_of(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(type, mount options) of the filesystem holding ``path``; ("", "") if unknown."""
    import psutil

    target = os.path.realpath(path)
    best, found = "", ("", "")
    with contextlib.suppress(OSError, RuntimeError):
        for part in psutil.disk_partitions(all=True):
            mount = part.mountpoint
            inside = target == mount or target.startswith(mount.rstrip(os.sep) + os.sep)
            if inside and len(mount) >= len(best):
                best, found = mount, (part.fstype, part.opts)
    return found


def is_remote_filesystem(fstype: str, opts: str = "") -> bool:
    """Whether inotify may miss changes there (network and most FUSE filesystems)."""
    kind = fstype.lower()
    return (
        kind in REMOTE_FILESYSTEMS
        or kind.startswith("fuse.")
        or "remote" in opts.lower().split(",")
    )


def natural_key(name: str) -> tuple:
    """Sort key that compares the numbers in a name as numbers: frame_2 < frame_10."""
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


# --------------------------------------------------------------------------- TIFF check


class _QuietFilter(logging.Filter):
    """Drops tifffile's warnings in a thread that is checking a half-written file."""

    def filter(self, record: logging.LogRecord) -> bool:
        notes = getattr(_tifffile_quiet, "notes", None)
        if notes is None:
            return True
        notes.append(record.getMessage())
        return False


_quiet_filter = _QuietFilter()


def tiff_problem(path: Path) -> tuple[str | None, int]:
    """(why the TIFF is not complete yet or None, number of pages).

    Complete means: the file parses, and every page (its IFD, tag values and data) lies
    within the file (a file written in place grows past each part only once it is written).
    tifffile's warnings (say, a next-page offset past the end) count as problems.
    """
    try:
        import tifffile
    except ImportError:  # without tifffile, stability alone decides
        return None, 1
    logger = logging.getLogger("tifffile")
    if _quiet_filter not in logger.filters:
        logger.addFilter(_quiet_filter)
    notes: list[str] = []
    _tifffile_quiet.notes = notes
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            with tifffile.TiffFile(fh) as tif:
                pages = tif.pages
                n = len(pages)
                if n == 0:
                    return "no image in the file", 0
                fmt, fhandle = tif.tiff, tif.filehandle
                for i in range(n):
                    # TiffFile.pages gives TiffPage objects (TiffFrame only with useframes)
                    page = cast(tifffile.TiffPage, pages[i])
                    # the page's IFD (some writers put it after the data: last in the file)
                    fhandle.seek(page.offset)
                    head = fhandle.read(fmt.tagnosize)
                    if len(head) < fmt.tagnosize:
                        return f"page {i}: its IFD lies past the end of the file", n
                    tags = struct.unpack(fmt.tagnoformat, head)[0]
                    ends = [page.offset + fmt.tagnosize + tags * fmt.tagsize + fmt.offsetsize]
                    ends += [t.valueoffset + t.valuebytecount for t in page.tags.values()]
                    ends += [o + c for o, c in zip(page.dataoffsets, page.databytecounts)]
                    if max(ends) > size:
                        return f"page {i}: it ends at byte {max(ends)}, the file has {size}", n
        if notes:
            return notes[0], n
        return None, n
    except Exception as exc:  # any parse error means "not readable yet"
        return f"{type(exc).__name__}: {exc}", 0
    finally:
        _tifffile_quiet.notes = None


def default_check(path: Path) -> tuple[str | None, int] | None:
    """The content check of a file by its suffix: TIFF files are parsed, others are not."""
    if path.name.lower().endswith(TIFF_SUFFIXES):
        return tiff_problem(path)
    return None


# --------------------------------------------------------------------------- sources


class Watcher:
    """inotify (or the platform's watcher) through watchfiles' Rust backend."""

    def __init__(self, folder: Path, recursive: bool) -> None:
        from watchfiles._rust_notify import RustNotify

        self._notify = RustNotify([str(folder)], False, False, 0, recursive, True)

    def wait(self, timeout: float, stop: StopEvent) -> set[tuple[int, str]] | None:
        """Changes as (1 added / 2 modified / 3 deleted, path); empty on timeout, None on stop."""
        # Changes that arrived while the run was busy with the last file are taken at once:
        # watch() sleeps at least two steps before it returns even what is already there.
        got = self._notify.watch(0, 0, 1, stop)
        if got == "timeout":
            timeout_ms = max(1, int(timeout * 1000))
            got = self._notify.watch(WATCH_DEBOUNCE_MS, WATCH_STEP_MS, timeout_ms, stop)
        if got == "timeout":
            return set()
        if got == "stop":
            return None
        if got == "signal":
            raise KeyboardInterrupt
        return got

    def close(self) -> None:
        self._notify.close()


class Poller:
    """Polling: the follower lists the folder itself, this only waits."""

    def wait(self, timeout: float, stop: StopEvent) -> set[tuple[int, str]] | None:
        waiter = getattr(stop, "wait", None)
        if waiter is not None:
            waiter(timeout)
        else:
            deadline = time.monotonic() + timeout
            while not stop.is_set() and time.monotonic() < deadline:
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
        return None if stop.is_set() else set()

    def close(self) -> None:
        pass
