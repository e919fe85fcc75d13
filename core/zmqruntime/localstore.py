"""Reading a server's finished results straight from its files, for a client that can.

A finished result is a file in the server's data dir. A client that sees the very same
files (the server's host, or a shared filesystem) reads them itself, with O_DIRECT where
the disk allows, instead of having the server read them and push the bytes through the
control socket: that is about twice the work and competes with every other client's
requests. Whether a client sees the same files is proven, not guessed: the server writes
a random token into ``DATA_DIR/server.lock`` and reports the same token in ``ping``.
Anything that cannot be read here (permissions, a file retention just removed) is fetched
over the socket as before: the caller falls back on OSError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import local, protocol
from .resultfile import aligned_empty, read_into, read_value

#: ZMQRUNTIME_DIRECT_READ=0 turns direct reads off (every result then comes over the socket)
ENV_SWITCH = "ZMQRUNTIME_DIRECT_READ"


class StoreReader:
    """Reads result files of one server's store, given the entries of a results listing."""

    def __init__(self, data_dir: Path) -> None:
        self.results_dir = Path(data_dir) / "results"

    @classmethod
    def for_server(cls, ping: dict[str, Any]) -> StoreReader | None:
        """A reader if this process sees the files of the server that answered ``ping``."""
        if os.environ.get(ENV_SWITCH, "1") == "0":
            return None
        token, data_dir = ping.get("store_token"), ping.get("data_dir")
        if not token or not data_dir:
            return None
        holder = local.DataDirLock(Path(data_dir)).holder()
        if not holder or holder.get("token") != token:
            return None  # another machine's path, or another server's dir
        reader = cls(Path(data_dir))
        return reader if os.access(reader.results_dir, os.R_OK | os.X_OK) else None

    def read(self, exec_id: str, entry: dict[str, Any]) -> Any:
        """The value of a listed result; raises OSError (or ProtocolError) if it cannot."""
        if "file" not in entry:
            if "value" in entry:
                return entry["value"]
            raise OSError("a value not included in the listing")
        path = self.results_dir / exec_id / Path(entry["file"]).name
        kind = entry.get("kind")
        if kind == "array":
            if "shape" not in entry or "dtype" not in entry:
                raise OSError("an array result listed without its dtype and shape")
            out = aligned_empty(
                tuple(entry["shape"]),
                protocol.dtype_from_wire(entry["dtype"]),
                entry.get("order", "C"),
            )
            if out.nbytes and "offset" not in entry:
                raise OSError("an array result without its data offset")
            read_into(path, int(entry.get("offset", 0)), out)
            return out
        if kind == "bytes":
            return path.read_bytes()
        return read_value(path)
