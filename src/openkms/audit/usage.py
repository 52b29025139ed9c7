"""Last successful cryptographic use of each key (GetKeyLastUsage), tracked off the hot path:
a dict update per call, flushed to the store in batches by the audit writer's thread."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from ..storage import Store


class UsageTracker:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: dict[str, tuple[str, float, str, str]] = {}
        self._lock = threading.Lock()

    def record(self, key_id: str, operation: str, when: float, event_id: str, request_id: str) -> None:
        with self._lock:
            self._pending[key_id] = (operation, when, event_id, request_id)

    def flush(self) -> None:
        """Store the pending uses. Called from another thread than `record`: entries stay pending
        (and visible to `last`) until written, and one recorded meanwhile is not lost."""
        with self._lock:
            pending = dict(self._pending)
        if not pending:
            return
        with self._store.begin() as tx:
            tx.audit.put_last_usage([{"key_id": k, "operation": op, "used_at": when, "event_id": ev,
                                      "request_id": req} for k, (op, when, ev, req) in pending.items()])
        with self._lock:
            for key_id, use in pending.items():
                if self._pending.get(key_id) is use:
                    del self._pending[key_id]

    def last(self, key_id: str) -> dict[str, Any] | None:
        hit = self._pending.get(key_id)
        if hit is None:
            with self._store.begin() as tx:
                row = tx.audit.last_usage(key_id)
            if row is None:
                return None
            hit = (row.operation, row.used_at, row.event_id, row.request_id)
        op, when, event_id, request_id = hit
        return {"Operation": op, "Timestamp": datetime.fromtimestamp(when, UTC), "CloudTrailEventId": event_id,
                "KmsRequestId": request_id}
