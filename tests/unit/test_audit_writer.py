"""The audit writer process's loop, run in a thread against a real SQLite store over real pipes:
periodic recovery of orphaned intents, and no second record when the call's own record comes late."""

from __future__ import annotations

import os
import select
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from openkms.audit import writer
from openkms.audit.chain import GENESIS
from openkms.storage import Store


def event(event_id: str, name: str = "DisableKey") -> dict[str, Any]:
    return {"eventID": event_id, "eventName": name, "userIdentity": {"accountId": "111122223333"},
            "resources": [], "requestID": str(uuid.uuid4())}


class Writer:
    def __init__(self, url: str, recover_before: float) -> None:
        self.to_writer_r, self.to_writer_w = os.pipe()
        self.from_writer_r, self.from_writer_w = os.pipe()
        self.reader = writer.FrameReader()
        self.thread = threading.Thread(target=writer.serve, args=("node-1", url, recover_before,
                                                                  self.to_writer_r, self.from_writer_w))
        self.thread.start()

    def frames(self, count: int, timeout: float = 10.0) -> list[Any]:
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            ready, _, _ = select.select([self.from_writer_r], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"the writer answered {got} and then nothing for {timeout} s"
            got += self.reader.feed(os.read(self.from_writer_r, 65536))
        return got

    def send(self, message: Any) -> None:
        writer.write_all(self.to_writer_w, writer.encode(message))

    def stop(self) -> None:
        os.close(self.to_writer_w)
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        for fd in (self.to_writer_r, self.from_writer_r, self.from_writer_w):
            os.close(fd)


def test_orphaned_intent_is_recorded_once_even_if_its_record_arrives_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "openkms.db"
    url = f"sqlite:///{db}"
    Store.open(url).close()
    monkeypatch.setattr(writer, "RECOVERY_GRACE", 0.3)
    monkeypatch.setattr(writer, "RECOVERY_INTERVAL", 0.2)
    orphan, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    with sqlite3.connect(db) as conn:
        for event_id, age in ((orphan, 5.0), (fresh, -60.0)):  # `fresh` stays younger than the grace
            conn.execute("INSERT INTO audit_pending (node_id, event_id, created, event) VALUES (?, ?, ?, ?)",
                         ("node-1", event_id, time.time() - age, orjson.dumps(event(event_id)).decode()))

    w = Writer(url, recover_before=0.0)  # nothing is older than the start: no recovery at start
    try:
        assert w.frames(1) == [["head", 0, GENESIS]]
        (head,) = w.frames(1)  # the periodic recovery, a few tenths of a second later
        assert head[0] == "head" and head[1] == 1
        w.send(["events", 1, [[time.time(), event(orphan)], [time.time(), event(fresh)]], [orphan, fresh]])
        (ack,) = w.frames(1)
        assert ack[:3] == ["ack", 1, True] and ack[3] == 2  # the orphan's late record is not written again
    finally:
        w.stop()
    with sqlite3.connect(db) as conn:
        records = conn.execute("SELECT event_id, record FROM audit_events ORDER BY seq").fetchall()
        assert [r[0] for r in records] == [orphan, fresh]
        assert orjson.loads(records[0][1])["event"]["additionalEventData"] == {"recoveredFromIntent": True}
        assert "additionalEventData" not in orjson.loads(records[1][1])["event"]
        assert conn.execute("SELECT COUNT(*) FROM audit_pending").fetchone() == (0,)
