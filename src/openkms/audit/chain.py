"""The hash chain's record format, shared by the writer (which chains records) and `verify`.

Record n of a node's chain is stored as the canonical JSON (sorted keys)

    {"event": <CloudTrail-shaped event>, "node": <node id>, "prev": <hash of record n-1>, "seq": n}

and its hash is SHA-256 of exactly that text; record 1's "prev" is GENESIS (64 zeros).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import orjson

GENESIS = "0" * 64


def canonical(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()


def record_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def index_columns(event: dict[str, Any]) -> tuple[Any, ...]:
    """The copies of an event's fields that queries filter on, in storage column order
    (event_id, event_name, caller_account, owner_account, principal_arn, key_id, error_code).
    The writer stores them and `verify` recomputes them, so editing a column is detected."""
    identity = event.get("userIdentity") or {}
    resources = event.get("resources") or []
    key_arn = resources[0]["ARN"] if resources else None
    return (event["eventID"], event["eventName"], identity.get("accountId"),
            resources[0]["accountId"] if resources else None, identity.get("arn"),
            key_arn.rsplit("/", 1)[1] if key_arn else None, event.get("errorCode"))


def chain(node_id: str, seq: int, prev: str, timed_events: Iterable[tuple[float, dict[str, Any]]]
          ) -> tuple[list[tuple[Any, ...]], int, str]:
    """Chain `(event_time, event)` pairs onto the record (`seq`, hash `prev`): the storage rows
    (AuditAppender.COLUMNS order), and the new head's seq and hash."""
    rows = []
    for event_time, event in timed_events:
        seq += 1
        text = canonical({"event": event, "node": node_id, "prev": prev, "seq": seq})
        prev = record_hash(text)
        rows.append((node_id, seq, event_time, *index_columns(event), text, prev))
    return rows, seq, prev
