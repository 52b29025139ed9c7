"""The audit writer: a child process of each server process that makes audit records durable.

Why a process: committing from a thread of the server process, every batch took the GIL several
times (driver calls, transaction handling), and each time the event loop stalled or handed it
over; under load that cost more than the writing itself. A child process has its own
interpreter, so the loop only writes one frame per batch to a pipe and reads a short answer; the
writer also does the chaining (canonical text and SHA-256 of each record), off the loop.

Protocol (both directions): frames of a 4-byte little-endian length and a JSON array.

  server -> writer  ["events", batch, [[event_time, event], ...], [event_id, ...]]
                    the second list names the calls that left an intent (below)
  writer -> server  ["head", seq, hash]              the chain's durable head: at start, and
                                                     after recording calls from their intents
                    ["ack", batch, ok, seq, hash]    one per batch, in order, with the durable
                                                     head after it

The writer takes every frame waiting in the pipe, chains all their events onto the durable head
and writes them in one transaction (group commit), then answers each batch. The head moves only
when the transaction commits: after a failed one, every batch in it is answered not ok and the
next transaction chains from the same head, so a failure leaves no gap in the chain. The writer
stops at end of input (the server closed the pipe or died) once the transaction in hand is done;
it ignores SIGINT and SIGTERM, which the server's process group receives on shutdown, so that the
server can hand over its last records first.

Intents: a call that changes state writes its intent (its event as known then) in the same
transaction as the change (`audit_pending`); the transaction that writes the call's record
deletes it. An intent left behind means the change committed but the record did not (the record
failed, the writer died, the server crashed in between). The writer records such calls from their
intents, marked `additionalEventData.recoveredFromIntent`: at start, those written before the
server started it (`recover-before`, a Unix time), and every RECOVERY_INTERVAL those older than
RECOVERY_GRACE, RECOVERY_CHUNK per transaction. A call so recorded whose own record still arrives
is not recorded again; and two writers of one node (a dead server's, finishing its last batch,
and its successor's) cannot both write a record: they would both take the same seq.

    python -m openkms.audit.writer <node-id> <recover-before>   (store URL in OPENKMS_AUDIT_WRITER_URL)
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
import time
from typing import Any

import orjson

log = logging.getLogger("openkms.audit.writer")

URL_VARIABLE = "OPENKMS_AUDIT_WRITER_URL"
HEADER = struct.Struct("<I")
MAX_READ = 1 << 20
# Intents older than this are orphans: no call takes that long between its state change and
# handing over its record. Looked for this often, and at start.
RECOVERY_GRACE = 60.0
RECOVERY_INTERVAL = 30.0
RECOVERY_CHUNK = 500  # intents per transaction


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


def serve(node_id: str, url: str, recover_before: float, fd_in: int = 0, fd_out: int = 1) -> None:
    from ..storage import Store
    from .chain import GENESIS, chain

    store = Store.open(url, prepare=False)
    appender = store.audit_appender()

    def durable_head() -> tuple[int, str]:
        with store.begin() as tx:
            head = tx.audit.head(node_id)
        return head if head is not None else (0, GENESIS)

    seq, head_hash = durable_head()
    recovered: set[str] = set()  # event ids this writer recorded from their intents

    def write(events: list[Any], pending: list[str]) -> bool:
        """Chain `events` onto the head and commit them, deleting the `pending` intents."""
        nonlocal seq, head_hash
        rows, new_seq, new_hash = chain(node_id, seq, head_hash, events)
        try:
            appender.append(rows, node_id, pending)
        except Exception as exc:  # reported to the server as failed batches
            log.error("audit batch of %d record(s) could not be written: %s", len(rows), type(exc).__name__)
            try:  # normally unchanged; but a commit can succeed and still report a lost connection
                seq, head_hash = durable_head()
            except Exception as exc:
                log.error("cannot read the audit chain's head: %s", type(exc).__name__)
            return False
        seq, head_hash = new_seq, new_hash
        return True

    def recover(before: float) -> bool:
        """Record the calls whose state change committed with its intent but whose own record
        was never written (the writer failed or died, the server crashed in between), a chunk
        per transaction. True if the head moved."""
        moved = False
        while True:
            try:
                with store.begin() as tx:
                    intents = tx.audit.pending(node_id, before, RECOVERY_CHUNK)
            except Exception as exc:
                log.error("cannot read the intents of unrecorded calls: %s", type(exc).__name__)
                return moved
            if not intents:
                return moved
            events = []
            for _, created, text in intents:
                event = orjson.loads(text)
                event["additionalEventData"] = {**(event.get("additionalEventData") or {}),
                                                "recoveredFromIntent": True}
                events.append((created, event))
            ids = [event_id for event_id, _, _ in intents]
            if not write(events, ids):  # the intents stay; tried again at the next recovery
                return moved
            recovered.update(ids)
            moved = True
            log.warning("recorded %d call(s) from the intents they left: their own records were not written",
                        len(ids))

    # The head first: the server waits for it, and the events it sends meanwhile wait in the pipe.
    write_all(fd_out, encode(["head", seq, head_hash]))
    if recover(recover_before):
        write_all(fd_out, encode(["head", seq, head_hash]))
    next_recovery = time.monotonic() + RECOVERY_INTERVAL
    reader = FrameReader()
    eof = False
    while not eof:
        frames: list[Any] = []
        while not frames or select.select([fd_in], [], [], 0)[0]:
            if not frames and not select.select([fd_in], [], [], max(0.0, next_recovery - time.monotonic()))[0]:
                break  # idle until the next recovery is due
            data = os.read(fd_in, MAX_READ)
            if not data:
                eof = True
                break
            frames += reader.feed(data)
        events = [timed for frame in frames if frame[0] == "events" for timed in frame[2]]
        if recovered:  # a call recorded from its intent already (its record came late) is not recorded twice
            events = [timed for timed in events if timed[1].get("eventID") not in recovered]
        pending = [event_id for frame in frames if frame[0] == "events" for event_id in frame[3]]
        ok = write(events, pending) if events else True
        answer = b"".join(encode(["ack", frame[1], ok and frame[0] == "events", seq, head_hash])
                          for frame in frames)
        if time.monotonic() >= next_recovery and not eof:
            next_recovery = time.monotonic() + RECOVERY_INTERVAL
            if recover(time.time() - RECOVERY_GRACE):
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
    if len(args) != 2 or not url:
        print(f"usage: {URL_VARIABLE}=<store-url> python -m openkms.audit.writer <node-id> <recover-before>",
              file=sys.stderr)
        return 2
    with contextlib.suppress(BrokenPipeError):  # the server is gone: nobody is waiting for answers
        serve(args[0], url, float(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
