"""Pagination as KMS does it: `Limit` and an opaque `Marker` / `NextMarker`, with `Truncated`."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import InvalidMarkerException, ValidationException
from .context import Params, Result

T = TypeVar("T")


def encode_marker(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode()


def decode_marker(marker: str | None) -> str | None:
    if marker is None:
        return None
    try:
        return base64.urlsafe_b64decode(marker.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidMarkerException("The marker is not valid.") from None


def limit_of(p: Params, default: int, most: int | None = None) -> int:
    limit = p.get("Limit") or default
    if most is not None and limit > most:
        raise ValidationException(f"Limit must be between 1 and {most}.")
    return int(limit)


def page(items: Sequence[T], limit: int, key: Callable[[T], str], field: str,
         render: Callable[[T], Any]) -> Result:
    """One page of `items`, which holds up to `limit + 1` of them (one more tells there are more)."""
    result: Result = {field: [render(i) for i in items[:limit]], "Truncated": len(items) > limit}
    if len(items) > limit:
        result["NextMarker"] = encode_marker(key(items[limit - 1]))
    return result
