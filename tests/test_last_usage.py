"""GetKeyLastUsage's table when several nodes flush at once, on real stores: an upsert, the latest
use wins, and a node never fails (or logs a traceback) because another wrote the same key first."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

from openkms.storage import Store


def use(key_id: str, when: float, operation: str = "Encrypt") -> dict[str, Any]:
    return {"key_id": key_id, "operation": operation, "used_at": when, "event_id": uuid.uuid4().hex,
            "request_id": uuid.uuid4().hex}


def test_concurrent_first_use_on_two_nodes(store_url: str | None, tmp_path: Path) -> None:
    url = store_url or f"sqlite:///{tmp_path / 'openkms.db'}"
    node_a, node_b = Store.open(url), Store.open(url)
    key_id = str(uuid.uuid4())
    errors: list[BaseException] = []
    try:
        # Node A has written the key's first use but not committed; node B writes its own first use
        # of the same key meanwhile (on PostgreSQL it waits on A's row, then must not fail).
        with node_a.begin() as tx:
            tx.audit.put_last_usage([use(key_id, 100.0, "Encrypt")])

            def flush_b() -> None:
                try:
                    with node_b.begin() as tx_b:
                        tx_b.audit.put_last_usage([use(key_id, 200.0, "Decrypt")])
                except BaseException as exc:  # reported below
                    errors.append(exc)

            b = threading.Thread(target=flush_b)
            b.start()
            b.join(0.5)  # B is blocked behind A's transaction (PostgreSQL) or busy-waiting (SQLite)
        b.join(30)
        assert not b.is_alive()
        assert errors == []
        with node_a.begin() as tx:
            assert tx.audit.last_usage(key_id).operation == "Decrypt"  # the later use
        # An older use flushed late does not replace a newer one.
        with node_a.begin() as tx:
            tx.audit.put_last_usage([use(key_id, 150.0, "Sign")])
        with node_b.begin() as tx:
            row = tx.audit.last_usage(key_id)
        assert (row.operation, row.used_at) == ("Decrypt", 200.0)
    finally:
        node_a.close()
        node_b.close()
