"""What the API layer knows of the request being served, for the layers below it: which keys the
request touched (the audit record's `resources`), and which request it is (its id, operation and
caller, which an external key store passes on to its proxy as requestMetadata). Set per request by
the API layer (api/app.py); unset outside a request (the scheduler, unit tests)."""

from __future__ import annotations

from contextvars import ContextVar
from typing import NamedTuple

touched: ContextVar[list[tuple[str, str]] | None] = ContextVar("openkms_touched_keys", default=None)


class RequestInfo(NamedTuple):
    request_id: str  # the x-amzn-RequestId the caller sees, and the audit record's requestID
    operation: str  # the KMS operation (Encrypt, GenerateDataKey, ...)
    principal_arn: str | None  # the verified caller


current_request: ContextVar[RequestInfo | None] = ContextVar("openkms_current_request", default=None)


def note_key(arn: str, owner_account: str) -> None:
    keys = touched.get()
    if keys is not None and (arn, owner_account) not in keys:
        keys.append((arn, owner_account))
