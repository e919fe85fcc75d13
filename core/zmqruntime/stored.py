"""A client's way to the stored results of a server: listed over the control socket, their
values read from the store's files where this process sees them (localstore: several
files at once, ahead of the caller), else sent by the server in ``results`` replies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from .connection import Connection
from .errors import ProtocolError
from .localstore import StoreReader
from .protocol import FINAL_STATES, ControlMessageType

#: results listed (or sent) per ``results`` request
RESULTS_BATCH = 1000

Span = tuple[str, int, int]  # (execution id, first index, index after the last)


class StoredResults:
    """Stored results of the server behind ``connection``."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._reader: StoreReader | bool | None = None  # False: the files are not seen here

    def close(self) -> None:
        if isinstance(self._reader, StoreReader):
            self._reader.close()

    def reader(self) -> StoreReader | None:
        """A reader of the server's result files, if this process sees them (checked once)."""
        if self._reader is None:
            self._reader = StoreReader.for_server(self.connection.server_info()) or False
        return self._reader if isinstance(self._reader, StoreReader) else None

    def one(self, exec_id: str, index: int) -> Any:
        """The value of result ``index``; IndexError if it is not stored (yet)."""
        reader = self.reader()
        body: dict[str, Any] = {"id": exec_id, "start": index, "limit": 1}
        if reader is not None:
            body["values"] = False  # a listing: the file is read here
        batch = self.connection.request(ControlMessageType.RESULTS, body)["results"]
        if not batch or batch[0]["index"] != index:
            raise IndexError(f"execution {exec_id} has no stored result {index}")
        if reader is None:
            return batch[0]["value"]
        run_id, entry, value = next(reader.read_ahead([(exec_id, batch[0])]))
        return self._with_value(run_id, entry, value)["value"]

    def runs(self, spans: list[Span]) -> Iterator[tuple[str, dict]]:
        """``(exec_id, {"index", "name", "value"[, "meta"]})`` of the stored results
        ``start <= index < stop`` of each span, in order; one not stored yet is waited
        for. Files seen here are read several at once, ahead of the caller."""
        reader = self.reader()
        if reader is None:
            for exec_id, start, stop in spans:
                for item in self._listed(exec_id, start, stop, values=True):
                    yield exec_id, item
            return
        listed = (
            (exec_id, entry)
            for exec_id, start, stop in spans
            for entry in self._listed(exec_id, start, stop, values=False)
        )
        for exec_id, entry, value in reader.read_ahead(listed):
            yield exec_id, self._with_value(exec_id, entry, value)

    def _listed(
        self, exec_id: str, start: int, stop: int, *, values: bool
    ) -> Iterator[dict[str, Any]]:
        """The server's entries of results ``start <= index < stop`` in batches, with
        their values unless ``values`` is False (a listing: the files are read here); a
        result not stored yet is waited for."""
        index = start
        pause = 0.002
        while index < stop:
            body = {"id": exec_id, "start": index, "limit": min(RESULTS_BATCH, stop - index)}
            if not values:
                body["values"] = False
            reply = self.connection.request(ControlMessageType.RESULTS, body)
            batch = reply["results"]
            if not batch:
                if reply["state"] in FINAL_STATES:
                    raise ProtocolError(
                        f"the server has no stored result {index} of {exec_id} "
                        f"(it stored {reply['n_results']})"
                    )
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
                continue
            pause = 0.002
            for item in batch:
                if item["index"] >= stop:
                    return
                yield item
                index = item["index"] + 1

    def _with_value(self, exec_id: str, entry: dict, value: Future) -> dict[str, Any]:
        """A listed result with its value: read from its file, or over the socket if that
        read failed (permissions, retention just removed it)."""
        try:
            got = value.result()
        except (OSError, ProtocolError, ValueError):
            body = {"id": exec_id, "start": entry["index"], "limit": 1}
            fetched = self.connection.request(ControlMessageType.RESULTS, body)["results"]
            if not fetched or fetched[0]["index"] != entry["index"]:
                raise ProtocolError(
                    f"the server has no stored result {entry['index']} of {exec_id}"
                ) from None
            return fetched[0]
        item = {"index": entry["index"], "name": entry["name"], "value": got}
        if "meta" in entry:
            item["meta"] = entry["meta"]
        return item
