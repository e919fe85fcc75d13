"""Writing array results to .npy files fast: aligned copies and O_DIRECT.

Page-cache writes of large frames cost more CPU than sending them (on the machines we
measured, about 1.3 ms of kernel time per MB), so on Linux array results are written
with O_DIRECT from a page-aligned copy: the disk's DMA does the work. The files are
ordinary .npy files (header padded to one 4 KiB block), readable by ``np.load``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from . import protocol

BLOCK = 4096
#: where the array data starts in every .npy file written here (the header fills one block)
NPY_DATA_OFFSET = BLOCK
_MAGIC = b"\x93NUMPY\x01\x00"
#: a non-array result that holds arrays (or is large) is one file of protocol.dumps bytes
VALUE_FILE_SUFFIX = ".zmqv"


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
    return np.ndarray(shape, dtype=dtype, buffer=view, order=order)


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
        _write_all(fd, memoryview(head), 0)
        # the copy is padded to whole blocks: write them all, then cut the file to size
        padded = np.ndarray(
            (_round_up(arr.nbytes),), dtype=np.uint8, buffer=_base_buffer(arr), offset=0
        )
        _write_all(fd, memoryview(padded), BLOCK)
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
    return memoryview(flat[start : start + _round_up(arr.nbytes)])


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)
