"""Which keys a request touched, for the record's `resources`. Set per request by the API layer."""

from __future__ import annotations

from contextvars import ContextVar

touched: ContextVar[list[tuple[str, str]] | None] = ContextVar("openkms_touched_keys", default=None)


def note_key(arn: str, owner_account: str) -> None:
    keys = touched.get()
    if keys is not None and (arn, owner_account) not in keys:
        keys.append((arn, owner_account))
