"""The audit writer: a child process of each server process that makes audit records durable.

Why a process: the event loop builds each record (canonical text and hash) and must then wait
for it to be committed. Committed from a thread of the same process, every batch takes the GIL
several times (driver calls, transaction handling), and each time it does the event loop stalls
or hands over; under load that cost more than the writing itself. A child process has its own
interpreter, so the loop only writes one frame per batch to a pipe and reads a short answer.

Protocol (both directions): frames of a 4-byte little-endian length and a JSON array.

  server -> writer  ["rows", batch, [row, ...]]   rows in AuditAppender.COLUMNS order
  writer -> server  ["head", seq, hash]           the chain's durable head: once at start, and
                                                  after every transaction that failed
                    ["ack", batch, ok]            one per batch, in order

The writer takes every frame waiting in the pipe, writes the rows of all of them in one
transaction (group commit) and then answers each batch. A batch must continue the chain exactly
where the durable head (plus the batches accepted before it in the same transaction) ends; one
that does not, because it was chained onto a batch that failed, is refused. After a failed
transaction the writer re-reads the head from the store and sends it, and the server chains on
from there. The writer stops at end of input (the server closed the pipe or died) once the
transaction in hand is done; it ignores SIGINT and SIGTERM, which the server's process group
receives on shutdown, so that the server can hand over its last records first.

    python -m openkms.audit.writer <node-id>     (store URL in OPENKMS_AUDIT_WRITER_URL)
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import struct
import sys
from typing import Any

import orjson

log = logging.getLogger("openkms.audit.writer")

URL_VARIABLE = "OPENKMS_AUDIT_WRITER_URL"
HEADER = struct.Struct("<I")
MAX_READ = 1 << 20


def encode(message: Any) -> bytes:
    body = orjson.dumps(message)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into decoded frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        frames = []
        pos = 0
        while len(self._buf) - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf, pos)
            if len(self._buf) - pos - HEADER.size < size:
                break
            start = pos + HEADER.size
            frames.append(orjson.loads(bytes(self._buf[start:start + size])))
            pos = start + size
        del self._buf[:pos]
        return frames


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a pipe takes what fits)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve(node_id: str, url: str, fd_in: int = 0, fd_out: int = 1) -> None:
    from ..storage import Store
    from .log import GENESIS

    store = Store.open(url, prepare=False)
    appender = store.audit_appender()

    def durable_head() -> tuple[int, str]:
        with store.begin() as tx:
            head = tx.audit.head(node_id)
        return head if head is not None else (0, GENESIS)

    seq, head_hash = durable_head()
    expected = seq + 1
    write_all(fd_out, encode(["head", seq, head_hash]))
    reader = FrameReader()
    eof = False
    while not eof:
        frames: list[Any] = []
        while not frames or select.select([fd_in], [], [], 0)[0]:
            data = os.read(fd_in, MAX_READ)
            if not data:
                eof = True
                break
            frames += reader.feed(data)
        accepted: list[int] = []
        refused: set[int] = set()
        rows: list[Any] = []
        next_seq = expected
        for kind, batch, batch_rows in frames:
            if kind != "rows" or not batch_rows or batch_rows[0][1] != next_seq:
                refused.add(batch)
                continue
            accepted.append(batch)
            rows += batch_rows
            next_seq = batch_rows[-1][1] + 1
        failed = False
        if rows:
            try:
                appender.append(rows)
                expected = next_seq
                seq, head_hash = rows[-1][1], rows[-1][-1]
            except Exception as exc:  # reported to the server as failed batches
                log.error("audit batch of %d record(s) could not be written: %s", len(rows), type(exc).__name__)
                failed = True
        answer = b"".join(encode(["ack", batch, batch not in refused and not failed])
                          for _, batch, _ in frames)
        if failed:
            try:
                seq, head_hash = durable_head()
            except Exception as exc:  # then the head as last written here
                log.error("cannot read the audit chain's head: %s", type(exc).__name__)
            expected = seq + 1
            answer += encode(["head", seq, head_hash])
        if answer:
            write_all(fd_out, answer)
    appender.close()
    store.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # The loop makes no reference cycles; py-spy put a tenth of the writer's samples in the
    # collector, walking the decoded frames' many short-lived objects.
    gc.disable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    url = os.environ.pop(URL_VARIABLE, "")
    if len(args) != 1 or not url:
        print(f"usage: {URL_VARIABLE}=<store-url> python -m openkms.audit.writer <node-id>", file=sys.stderr)
        return 2
    with contextlib.suppress(BrokenPipeError):  # the server is gone: nobody is waiting for answers
        serve(args[0], url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
