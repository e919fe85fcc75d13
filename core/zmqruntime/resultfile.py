"""Result files: their names and places (:class:`ResultFiles`, :class:`RunFiles`), and
writing array results to .npy files fast: aligned copies and O_DIRECT.

The store owns a data dir's result files (``Store.files``): a worker asks it for a run's
writer (``ResultFiles.writer``: names and makes the files), the server for a reader
(``ResultFiles.reader``: loads an indexed result, or plans the read the prefetch thread
does off the loop).

Page-cache writes of large frames cost more CPU than sending them (on the machines we
measured, about 1.3 ms of kernel time per MB), so on Linux array results are written
with O_DIRECT from a page-aligned copy: the disk's DMA does the work. The files are
ordinary .npy files (header padded to one 4 KiB block), readable by ``np.load``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from . import protocol

BLOCK = 4096
#: where the array data starts in every .npy file written here (the header fills one block)
NPY_DATA_OFFSET = BLOCK
_MAGIC = b"\x93NUMPY\x01\x00"
#: a non-array result that holds arrays (or is large) is one file of protocol.dumps bytes
VALUE_FILE_SUFFIX = ".zmqv"


#: the file suffix of each kind of result kept in a file
SUFFIXES = {"array": ".npy", "bytes": ".bin", "value": VALUE_FILE_SUFFIX}

#: a stored array the prefetch thread reads before a reply leaves: file, data offset, buffer
Read = tuple[Path, int, np.ndarray]


class RunFiles:
    """One run's result files (``DATA_DIR/results/<id>/<index><suffix>``)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)

    # -- the writer's side
    def new_file(self, index: int, kind: str) -> Path:
        """Where result ``index`` of ``kind`` (array, bytes, value) is written."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.dir / f"{index}{SUFFIXES[kind]}"

    @staticmethod
    def write(path: Path, value: Any) -> None:
        """Write a result file: an array as .npy (O_DIRECT when it can), else bytes."""
        if isinstance(value, np.ndarray):
            write_npy(path, value)
        else:
            write_bytes(path, value)

    # -- the reader's side
    def load(self, entry: dict[str, Any], reads: list[Read] | None = None) -> Any:
        """The value of an indexed result. An array with a known data offset comes back
        as an empty aligned buffer and its read is appended to ``reads`` (the server's
        prefetch thread fills it off the loop); without ``reads`` it is read here."""
        kind = entry.get("kind")
        if kind == "array" and entry.get("offset") and entry.get("shape") and entry["nbytes"]:
            out = aligned_empty(
                tuple(entry["shape"]),
                protocol.dtype_from_wire(entry["dtype"]),
                entry.get("order", "C"),
            )
            read = (self.dir / entry["file"], int(entry["offset"]), out)
            if reads is None:
                read_into(*read)
            else:
                reads.append(read)
            return out
        if kind == "array":
            path = self.dir / entry["file"]
            if int(entry.get("nbytes", 1)) == 0:
                return np.load(path)
            return np.load(path, mmap_mode="r")  # sent straight from the page cache
        if kind == "bytes":
            return (self.dir / entry["file"]).read_bytes()
        if "file" in entry:  # a value holding arrays: decoded here
            return read_value(self.dir / entry["file"])
        return entry.get("value")


class ResultFiles:
    """A data dir's result files: one :class:`RunFiles` per run under ``results/``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "results"

    def run_dir(self, exec_id: str) -> Path:
        return self.root / exec_id

    def writer(self, exec_id: str) -> RunFiles:
        """For the worker running ``exec_id``: it names and writes the run's files."""
        return RunFiles(self.run_dir(exec_id))

    def reader(self, exec_id: str) -> RunFiles:
        """For the server (and its prefetch thread): it reads the run's files back."""
        return RunFiles(self.run_dir(exec_id))


def read_value(path: Path) -> object:
    """A value result stored in a ``.zmqv`` file (arrays are read-only views on its bytes)."""
    return protocol.loads(Path(path).read_bytes())


def _round_up(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def aligned_copy(arr: np.ndarray, room: np.ndarray | None = None) -> np.ndarray:
    """A private copy of ``arr`` (same order) whose data starts on a 4 KiB boundary.

    The copy lets a pipeline reuse its buffer as soon as ``emit`` returns, and the
    alignment (plus padding to whole blocks) is what O_DIRECT needs. ``room``, if
    given, is where the copy goes: page-aligned uint8 memory of whole blocks (a
    shared-memory region).
    """
    order = "F" if (arr.flags.f_contiguous and not arr.flags.c_contiguous) else "C"
    out = aligned_empty(arr.shape, arr.dtype, order, room)
    np.copyto(out, arr, casting="no")
    return out


def aligned_empty(
    shape: tuple, dtype: np.dtype, order: str = "C", room: np.ndarray | None = None
) -> np.ndarray:
    """An uninitialised array whose data starts on a 4 KiB boundary and is followed by
    padding to whole blocks (what O_DIRECT reads and writes need); in ``room`` if given."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if room is None:
        raw = np.empty(_round_up(nbytes) + BLOCK, dtype=np.uint8)
        offset = (-raw.ctypes.data) % BLOCK
    else:
        raw, offset = room, 0
    view = raw[offset : offset + nbytes]
    return np.ndarray(shape, dtype=dtype, buffer=view, order=cast(Any, order))


def read_into(path: Path, offset: int, out: np.ndarray) -> None:
    """Fill ``out`` (from :func:`aligned_empty`) with the bytes at ``offset`` of ``path``.

    O_DIRECT where it works: result files are written that way, so they are seldom in the
    page cache, and a direct read here is about twice as fast as faulting pages in.
    """
    nbytes = out.nbytes
    if nbytes == 0:
        return
    if hasattr(os, "O_DIRECT") and offset % BLOCK == 0:
        try:
            padded = _base_buffer(out)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            pass
        else:
            try:
                got = _read_all(fd, padded, offset, nbytes)
            except OSError:
                got = -1
            finally:
                os.close(fd)
            if got >= nbytes:
                return
    with open(path, "rb") as fh:
        fh.seek(offset)
        if fh.readinto(_raw_bytes(out)) != nbytes:
            raise OSError(f"{path} is shorter than its index says")


def _read_all(fd: int, data: memoryview, offset: int, nbytes: int) -> int:
    """Read from ``offset`` until ``nbytes`` arrived or the file ends; bytes read."""
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [data[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _header(arr: np.ndarray) -> bytes:
    fortran = bool(arr.flags.f_contiguous and not arr.flags.c_contiguous)
    descr = np.lib.format.dtype_to_descr(arr.dtype)
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {tuple(arr.shape)!r}, }}"
    room = BLOCK - len(_MAGIC) - 2
    if len(text) + 1 > room:
        raise ValueError("array header too long for one block")
    body = text.ljust(room - 1).encode("latin1") + b"\n"
    return _MAGIC + len(body).to_bytes(2, "little") + body


def write_npy(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` (ideally from :func:`aligned_copy`) as a .npy file at ``path``."""
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        arr = np.ascontiguousarray(arr)
    header = _header(arr)
    data = _raw_bytes(arr)
    if hasattr(os, "O_DIRECT") and arr.ctypes.data % BLOCK == 0 and arr.nbytes >= BLOCK:
        with contextlib.suppress(OSError):
            _write_direct(path, header, data, arr)
            return
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
        fh.write(header)  # readable by this user only, like the O_DIRECT path's files
        fh.write(data)


def write_bytes(path: Path, data: bytes) -> None:
    """Write a bytes or value result file, readable by this user only (as .npy files are)."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
        fh.write(data)


def _raw_bytes(arr: np.ndarray) -> memoryview:
    if arr.nbytes == 0:
        return memoryview(b"")
    buf, _ = protocol.array_to_buffer(arr)
    return buf


def _write_direct(path: Path, header: bytes, data: memoryview, arr: np.ndarray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        block = np.empty(2 * BLOCK, dtype=np.uint8)
        start = (-block.ctypes.data) % BLOCK
        head = block[start : start + BLOCK]
        head[: len(header)] = np.frombuffer(header, dtype=np.uint8)
        _write_all(fd, head.data, 0)
        # the copy is padded to whole blocks: write them all, then cut the file to size
        padded: np.ndarray = np.ndarray(
            (_round_up(arr.nbytes),), dtype=np.uint8, buffer=_base_buffer(arr), offset=0
        )
        _write_all(fd, padded.data, BLOCK)
        os.ftruncate(fd, BLOCK + arr.nbytes)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _base_buffer(arr: np.ndarray) -> memoryview:
    """The memory from arr's first byte to the end of its padded allocation."""
    base = arr
    while isinstance(base.base, np.ndarray):
        base = base.base
    start = arr.ctypes.data - base.ctypes.data
    flat = base.reshape(-1).view(np.uint8) if base.flags.c_contiguous else None
    if flat is None or start + _round_up(arr.nbytes) > flat.nbytes:
        raise OSError("array is not padded for direct writes")
    return flat[start : start + _round_up(arr.nbytes)].data


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


#: array results waiting for the disk may hold at most this much memory before emit blocks
WRITE_BEHIND_BYTES = 64 * 1024 * 1024

Stored = Callable[[int, str, dict[str, Any]], None]


class ResultWriter:
    """Writes results to disk behind the live stream, in emit order.

    ``emit`` hands a private copy here and streams it at once; this thread writes the
    file and then calls ``stored`` so the server indexes it. Memory is bounded: emit
    blocks while more than WRITE_BEHIND_BYTES wait. A small value with nothing queued
    ahead of it is stored inline (no thread hop on the latency path).
    """

    def __init__(
        self,
        stored: Stored,
        limit: int = WRITE_BEHIND_BYTES,
        release: Callable[[Any], None] | None = None,
    ) -> None:
        self._stored = stored
        self._release = release  # gives a shared-memory copy back once it is on disk
        self._limit = limit
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._pending_bytes = 0
        self._busy = False
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="result-writer", daemon=True)
        self._thread.start()

    def submit(
        self, index: int, name: str, meta: dict, path: Path | None, value: Any, nbytes: int
    ) -> None:
        with self._cond:
            if self.error is not None:
                raise _stored_failed(self.error)
            inline = path is None and not self._queue and not self._busy
            if inline:
                self._busy = True
            else:
                while self._pending_bytes > self._limit and self.error is None:
                    self._cond.wait()
                self._queue.append((index, name, meta, path, value, nbytes))
                self._pending_bytes += nbytes
                self._cond.notify_all()
                return
        try:
            self._stored(index, name, meta)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                while self._busy:
                    self._cond.wait()
                index, name, meta, path, value, nbytes = self._queue[0]
                self._busy = True
            try:
                if path is not None and self.error is None:
                    RunFiles.write(path, value)
                if self.error is None:
                    self._stored(index, name, meta)
            except BaseException as exc:  # a full disk fails the run, not the worker
                if isinstance(exc, OSError) and path is not None:
                    from .store import StorageFailed, storage_failure  # the store imports us

                    path.unlink(missing_ok=True)  # a partial file: give its space back
                    run_dir = path.parent  # DATA_DIR/results/<id>
                    what = f"result {index} of run {run_dir.name}"
                    exc = StorageFailed(storage_failure(what, run_dir.parent.parent, exc))
                self.error = exc
            finally:
                if self._release is not None and isinstance(value, np.ndarray):
                    self._release(value)
                with self._cond:
                    self._queue.popleft()
                    self._pending_bytes -= nbytes
                    self._busy = False
                    self._cond.notify_all()

    def start_run(self, stored: Stored) -> None:
        """Direct the next results to ``stored`` (the writer is idle between runs)."""
        self.flush_quietly()
        self._stored = stored
        self.error = None

    def flush_quietly(self) -> None:
        with self._cond:
            while self._queue or self._busy:
                self._cond.wait()

    def flush(self) -> None:
        """Wait until every submitted result is stored (or failed)."""
        with self._cond:
            while self._queue or self._busy:
                self._cond.wait()
        if self.error is not None:
            raise _stored_failed(self.error)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)


def _stored_failed(error: BaseException) -> OSError:
    from .store import StorageFailed  # the store imports this module

    """What emit (and the end of a run) raise once a result could not be stored."""
    if isinstance(error, StorageFailed):  # "disk full while storing result 12 of run ..."
        return StorageFailed(str(error))
    return OSError(f"storing results failed: {error}")
