"""Shared-memory frames: large arrays that skip the sockets between processes of one host.

A worker copies a large array (a result's private copy, a preview frame) into a ring
of shared memory and sends only a descriptor of where the bytes lie. A watcher on the
same host maps the ring read-only and copies the bytes out; the server relays the
descriptor, and reads the bytes from the ring itself only for watchers elsewhere. So
an 8 MiB camera frame costs two memory copies instead of four trips through sockets.

The ring is a memfd: it has no name, and the kernel frees it with its last user, so a
killed worker or watcher cannot leave a segment behind. Others reach it through
``/proc/<pid>/fd/<fd>``, which only the same user on the same host can open.

A reader never blocks the writer. Before the bytes of an allocation are written, the
ring publishes its new *head* (a byte position that counts up forever) in its first
page; a copy is valid if the head, read after the copy, has not passed the copy's start
by a whole capacity (a sequence lock). That rests on x86-64's ordering of stores and of
loads, so rings are only used on x86-64 Linux; elsewhere arrays travel in the sockets.
A result's region is reused only once the result is on disk, and results waiting for the
disk hold at most half the ring: the other half keeps the newest results already written,
so a watcher on the host may lag the disk writer by half a ring and still read them
here. One that lags further fetches them from the store (from the disk, competing with the
writer); a preview it lagged on is dropped (newest wins).
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import platform
import secrets
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: the ring's first page holds its id (bytes 0-15) and its head (bytes 64-71)
HEADER = 4096
#: arrays at least this large travel through the ring; smaller ones are cheaper in a socket
MIN_BYTES = 256 * 1024
#: bytes of a worker's ring by default; results not yet on disk hold their room (the
#: write-behind, at most HELD_SHARE of it), and a watcher that lags by more than a ring
#: reads from the store. 128 MiB: 64 MiB of write-behind (as the 64 MiB ring had) and
#: 64 MiB behind it for late watchers (issue 19: with 64 MiB, all of it write-behind in a
#: disk-bound run, a watcher scheduled late by some 30 ms fell off the ring for the rest
#: of the run on a loaded 2-core machine)
RING_BYTES = 128 * 1024 * 1024
#: the share of the ring that results waiting for the disk may hold
HELD_SHARE = 0.5
BLOCK = 4096
_ID_BYTES = 16
_HEAD_AT = 64
#: how many rings (one per worker) a reader keeps mapped
MAX_MAPPED = 16

Descriptor = list  # [ring id, pid, fd, [[position, nbytes], ...]]


def enabled() -> bool:
    """Whether this process may use rings (x86-64 Linux, and ZMQRUNTIME_SHM is not 0)."""
    return (
        sys.platform.startswith("linux")
        and platform.machine() in ("x86_64", "AMD64")
        and hasattr(os, "memfd_create")
        and os.environ.get("ZMQRUNTIME_SHM", "1") != "0"
    )


#: the kernel's setting for transparent huge pages in shared memory (Linux)
THP_SHMEM = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


def shared_huge_pages(setting: Path | None = None) -> bool | None:
    """Whether rings get 2 MiB pages: the selected value of ``setting`` (``[advise]`` in
    ``always within_size [advise] never deny force``) lets a mapping ask for them. None
    where there is no such setting."""
    try:
        text = (setting or THP_SHMEM).read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    if start < 0 or end < start:
        return None
    return text[start + 1 : end] in ("always", "within_size", "advise", "force")


def huge_pages_hint() -> str | None:
    """What to tell the user when rings are used but get no huge pages (else None)."""
    if not enabled() or shared_huge_pages() is not False:
        return None
    return (
        f"shared memory gets no huge pages here ({THP_SHMEM} is not 'advise'): results "
        "are written to disk from the workers' rings about a quarter slower; see "
        "docs/deployment.md, section 9"
    )


def ring_bytes() -> int:
    """The ring size: ZMQRUNTIME_SHM_MB (MiB, at least 16) or the default."""
    try:
        mib = int(os.environ.get("ZMQRUNTIME_SHM_MB", ""))
    except ValueError:
        return RING_BYTES
    return max(16, mib) * 1024 * 1024


def try_ring(capacity: int | None = None) -> Ring | None:
    """A ring if rings are enabled and the kernel grants one; else None (sockets only)."""
    if not enabled():
        return None
    try:
        return Ring(capacity or ring_bytes())
    except OSError as exc:  # memfd refused (a sandbox, a memory limit): degrade, don't die
        print(f"zmqruntime: no shared memory ({exc}); arrays travel in sockets", file=sys.stderr)
        return None


def try_probe() -> Probe | None:
    """The server's probe if rings are enabled and a memfd can be made; else None."""
    if not enabled():
        return None
    try:
        return Probe()
    except OSError:
        return None


def _round_up(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


class Ring:
    """A worker's ring: page-aligned regions handed out in order, reused once freed."""

    def __init__(self, capacity: int = RING_BYTES) -> None:
        self.capacity = _round_up(capacity)
        self.fd = os.memfd_create("zmqruntime-ring", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, HEADER + self.capacity)
        self._map = mmap.mmap(self.fd, HEADER + self.capacity)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # 2 MiB pages where the system allows them for shared memory (transparent huge
            # pages, shmem_enabled "advise"): results are written to disk straight from
            # here, and O_DIRECT writes from 2 MiB pages ran about 40% faster than from
            # 4 KiB ones on the reference machine (docs/deployment.md)
            with contextlib.suppress(OSError):
                self._map.madvise(mmap.MADV_HUGEPAGE)
        self.id = secrets.token_bytes(_ID_BYTES)
        self.pid = os.getpid()
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._bytes[:_ID_BYTES] = np.frombuffer(self.id, dtype=np.uint8)
        self._head_cell = self._bytes[_HEAD_AT : _HEAD_AT + 8].view(np.uint64)
        self._base = self._bytes.ctypes.data + HEADER
        self._head = 0  # end of the newest allocation
        self._tail = 0  # start of the oldest region still in use
        self._regions: collections.deque[list] = collections.deque()  # [start, end, in use]
        self._live: dict[int, int] = {}  # address of a region in use -> its position
        self._held = 0  # bytes of regions in use (results not yet on disk)
        self._cond = threading.Condition()

    def alloc(self, nbytes: int, wait: bool) -> np.ndarray | None:
        """A page-aligned uint8 region of at least ``nbytes`` (padded to whole pages).

        With ``wait`` it blocks until freed room suffices (results waiting for the disk),
        and until the regions in use leave room under HELD_SHARE of the ring, so that
        the newest written results stay readable for watchers that lag; without, it
        returns None instead. None too for arrays too large for the ring.
        """
        size = _round_up(max(nbytes, 1))
        if size > self.capacity // 2:
            return None
        with self._cond:
            while True:
                start = self._head
                phys = start % self.capacity
                if phys + size > self.capacity:  # no room before the end: go round
                    start += self.capacity - phys
                if start + size - self._tail <= self.capacity and (
                    not wait or self._held + size <= max(size, self.capacity * HELD_SHARE)
                ):
                    break
                if not wait:
                    return None
                self._cond.wait()
            if start != self._head:
                self._regions.append([self._head, start, False])  # the skipped end
            self._regions.append([start, start + size, True])
            self._held += size
            self._head = start + size
            self._head_cell[0] = self._head  # published before the region is written
            self._trim()
            region = self._bytes[HEADER + start % self.capacity :][:size]
            self._live[region.ctypes.data] = start
            return region

    def free(self, buf: Any) -> None:
        """Give back the region that ``buf`` starts at; its bytes stay readable until
        the ring comes round to them."""
        address = _address(buf)
        with self._cond:
            start = self._live.pop(address, None) if address is not None else None
            if start is None:
                return
            for entry in self._regions:
                if entry[0] == start:
                    entry[2] = False
                    self._held -= entry[1] - entry[0]
                    break
            self._trim()
            self._cond.notify_all()

    def _trim(self) -> None:
        while self._regions and not self._regions[0][2]:
            self._regions.popleft()
        self._tail = self._regions[0][0] if self._regions else self._head

    def position_of(self, buf: Any) -> int | None:
        """The position of the live region whose first byte ``buf`` starts at, if any."""
        address = _address(buf)
        with self._cond:
            return self._live.get(address) if address is not None else None

    def describe(self, buffers: Sequence[Any]) -> Descriptor | None:
        """The descriptor of ``buffers`` if every one starts a live region, else None."""
        spans = []
        for buf in buffers:
            position = self.position_of(buf)
            if position is None:
                return None
            spans.append([position, memoryview(buf).nbytes])
        return [self.id, self.pid, self.fd, spans]

    def close(self) -> None:
        del self._head_cell, self._bytes
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)


def _address(buf: Any) -> int | None:
    if isinstance(buf, np.ndarray):
        return int(buf.ctypes.data)
    try:
        return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)
    except (TypeError, ValueError):
        return None


class _Mapped:
    def __init__(self, path: str, ring_id: bytes) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        self.capacity = len(self.map) - HEADER
        self.head = self.bytes[_HEAD_AT : _HEAD_AT + 8].view(np.uint64)
        self.valid = bytes(self.bytes[:_ID_BYTES]) == ring_id

    def close(self) -> None:
        del self.head, self.bytes
        with contextlib.suppress(BufferError):  # a view still in use: the GC unmaps it
            self.map.close()


class RingReader:
    """Maps workers' rings and copies arrays out of them (client and server side)."""

    def __init__(self, drop_pages: bool = False) -> None:
        self._maps: collections.OrderedDict[tuple, _Mapped] = collections.OrderedDict()
        self._lock = threading.Lock()  # the server reads in one thread, forgets in another
        # a long-lived reader (the server) unmaps what it read, so its resident size
        # never counts the workers' rings; a client keeps them mapped (faster reads)
        self._drop_pages = drop_pages and hasattr(mmap, "MADV_DONTNEED")

    def read(self, descriptor: Descriptor) -> list[np.ndarray] | None:
        """Private copies of the described buffers, or None if the ring came round over
        them (or is gone: the worker exited). Raises ValueError for a malformed one."""
        with self._lock:
            return self._read(descriptor)

    def _read(self, descriptor: Descriptor) -> list[np.ndarray] | None:
        try:
            ring_id, pid, fd, spans = descriptor
            key = (bytes(ring_id), int(pid), int(fd))
            spans = [(int(p), int(n)) for p, n in spans]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad shared-memory descriptor: {exc}") from None
        mapped = self._mapped(key)
        if mapped is None:
            return None
        out = []
        for position, nbytes in spans:
            start = HEADER + position % mapped.capacity
            if nbytes < 0 or start + nbytes > len(mapped.map):
                raise ValueError("shared-memory span outside its ring")
            out.append(mapped.bytes[start : start + nbytes].copy())
            if self._drop_pages and nbytes:
                mapped.map.madvise(mmap.MADV_DONTNEED, start, _round_up(nbytes))
        oldest = min((p for p, _ in spans), default=0)
        if int(mapped.head[0]) > oldest + mapped.capacity:
            return None  # overwritten while (or before) we copied
        return out

    def _mapped(self, key: tuple) -> _Mapped | None:
        mapped = self._maps.get(key)
        if mapped is not None:
            self._maps.move_to_end(key)
            return mapped
        ring_id, pid, fd = key
        try:
            mapped = _Mapped(f"/proc/{pid}/fd/{fd}", ring_id)
        except (OSError, ValueError):
            return None
        if not mapped.valid:  # pid and fd reused by another process: not our ring
            mapped.close()
            return None
        self._maps[key] = mapped
        while len(self._maps) > MAX_MAPPED:
            self._maps.popitem(last=False)[1].close()
        return mapped

    def forget(self, pid: int) -> None:
        """Unmap the rings of a process that exited (their memory is freed with it)."""
        with self._lock:
            for key in [k for k in self._maps if k[1] == pid]:
                self._maps.pop(key).close()

    def close(self) -> None:
        with self._lock:
            while self._maps:
                self._maps.popitem()[1].close()


class Probe:
    """Lets a client tell whether it shares this host (and user) with the server."""

    def __init__(self) -> None:
        self.token = secrets.token_bytes(_ID_BYTES)
        self.fd = os.memfd_create("zmqruntime-probe", os.MFD_CLOEXEC)
        os.write(self.fd, self.token)

    def describe(self) -> list:
        return [os.getpid(), self.fd, self.token]

    def close(self) -> None:
        os.close(self.fd)


def probe_matches(description: Any) -> bool:
    """True if this process can open the server's probe: rings will be readable here."""
    if not enabled():
        return False
    try:
        pid, fd, token = description
        with open(f"/proc/{int(pid)}/fd/{int(fd)}", "rb") as fh:
            return fh.read(_ID_BYTES) == bytes(token)
    except (OSError, TypeError, ValueError):
        return False
