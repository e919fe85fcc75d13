"""Play images into a folder at a camera's pace, as acquisition software would.

``zmqruntime simulate-acquisition DIR --from SRC --fps 10 [--partial-writes]`` lets anyone
try ``ctx.follow_folder`` without a microscope. SRC is a folder of images or one file; a
multi-page TIFF is played page by page (one single-page TIFF per page). Files are written
under a hidden temporary name and renamed when complete (atomic), or, with
``partial_writes``, every other file is written in place in chunks with pauses, as
software that writes straight into the final name does.
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .folderwatch import TEMPORARY_NAME, TIFF_SUFFIXES, natural_key

#: with partial writes, a file written in place is written in this many chunks
CHUNKS = 4
#: ... and its writing is spread over this fraction of the frame interval
IN_PLACE_SHARE = 0.4


@dataclass
class Frame:
    name: str
    data: Callable[[], bytes]  # the file's bytes, made when it is played


def _tiff_pages(path: Path) -> int:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return len(tif.pages)


def _page_bytes(path: Path, index: int) -> bytes:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        image = tif.pages[index].asarray()
    out = io.BytesIO()
    tifffile.imwrite(out, image)
    return out.getvalue()


def source_frames(source: Path, pattern: str = "*") -> list[Frame]:
    """What to play: the files of a folder in name order, multi-page TIFFs page by page."""
    if source.is_dir():
        files = sorted(
            (p for p in source.glob(pattern) if p.is_file() and not TEMPORARY_NAME.search(p.name)),
            key=lambda p: natural_key(p.name),
        )
    elif source.is_file():
        files = [source]
    else:
        raise FileNotFoundError(f"nothing to play: no file or folder {source}")
    frames: list[Frame] = []
    for path in files:
        pages = _tiff_pages(path) if path.name.lower().endswith(TIFF_SUFFIXES) else 1
        if pages > 1:
            stem = path.name.split(".")[0]
            frames.extend(
                Frame(f"{stem}_t{i:04d}.tif", functools.partial(_page_bytes, path, i))
                for i in range(pages)
            )
        else:
            frames.append(Frame(path.name, path.read_bytes))
    if not frames:
        raise FileNotFoundError(f"nothing to play: no file matches {pattern!r} in {source}")
    return frames


def write_atomic(path: Path, data: bytes) -> None:
    """Write under a hidden temporary name in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_in_place(path: Path, data: bytes, chunks: int, pause: float) -> None:
    """Write straight into the final name, ``chunks`` pieces with ``pause`` s between."""
    step = -(-len(data) // chunks)
    with open(path, "wb") as fh:
        for i in range(chunks):
            if i:
                time.sleep(pause)
            fh.write(data[i * step : (i + 1) * step])
            fh.flush()


def simulate_acquisition(
    dest: str | os.PathLike[str],
    source: str | os.PathLike[str],
    *,
    fps: float = 10.0,
    partial_writes: bool = False,
    frames: int | None = None,
    pattern: str = "*",
    done_marker: str | None = "acquisition_done",
    log: str | os.PathLike[str] | None = None,
    echo: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Play ``source`` into ``dest``; one record per file (name, mode, finished epoch s).

    Frame i starts at ``i / fps`` s; a writer that falls behind does not sleep. With a
    ``log`` path, each record is appended there as a JSON line as soon as it is written.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, not {fps!r}")
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    todo = source_frames(Path(source), pattern)
    if frames is not None:
        todo = todo[:frames]
    interval = 1.0 / fps
    pause = interval * IN_PLACE_SHARE / CHUNKS
    records: list[dict[str, Any]] = []
    log_file = open(log, "a", buffering=1) if log else None  # noqa: SIM115 - closed below
    try:
        start = time.monotonic()
        for i, frame in enumerate(todo):
            data = frame.data()
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            target = folder / frame.name
            began = time.time()
            in_place = partial_writes and i % 2 == 1
            if in_place:
                write_in_place(target, data, CHUNKS, pause)
            else:
                write_atomic(target, data)
            record = {
                "index": i,
                "name": frame.name,
                "mode": "in place" if in_place else "renamed",
                "bytes": len(data),
                "started": began,
                "finished": time.time(),
            }
            records.append(record)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
            if echo is not None:
                echo(record)
        if done_marker:
            write_atomic(folder / done_marker, b"")
    finally:
        if log_file is not None:
            log_file.close()
    return records


def iter_records(log: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a ``log`` file written so far."""
    with open(log) as fh:
        for line in fh:
            if line.endswith("\n"):
                yield json.loads(line)
