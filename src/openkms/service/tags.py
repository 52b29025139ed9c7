"""Tags on keys: TagResource, UntagResource, ListResourceTags."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import LimitExceededException, TagException
from ..model import Caller
from .context import Context, Params, Result
from .paging import decode_marker, limit_of, page
from .states import check_not_pending_deletion

MAX_TAGS_PER_KEY = 50


def checked_tags(tags: list[Mapping[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for tag in tags:
        k, v = tag["TagKey"], tag["TagValue"]
        if k.lower().startswith("aws:"):
            raise TagException("Tag keys beginning with 'aws:' are reserved.")
        if k in out:
            raise TagException(f"Duplicate tag key {k}.")
        out[k] = v
    return out


def tag_conditions(tags: Mapping[str, str]) -> dict[str, Any]:
    conditions: dict[str, Any] = {f"aws:RequestTag/{k}": v for k, v in tags.items()}
    if tags:
        conditions["aws:TagKeys"] = list(tags)
    return conditions


def tag_resource(ctx: Context, caller: Caller, p: Params) -> Result:
    tags = checked_tags(p["Tags"])
    key = ctx.keys.authorized(caller, p["KeyId"], "TagResource", allow_alias=False, extra=tag_conditions(tags))
    check_not_pending_deletion(key)
    with ctx.store.begin() as tx:
        existing = dict(tx.tags.for_key(key.key_id))
        if len(set(existing) | set(tags)) > MAX_TAGS_PER_KEY:
            raise LimitExceededException(f"A key can have at most {MAX_TAGS_PER_KEY} tags.")
        for k, v in tags.items():
            tx.tags.put(key.key_id, k, v)
    return {}


def untag_resource(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "UntagResource", allow_alias=False,
                              extra={"aws:TagKeys": list(p["TagKeys"])})
    check_not_pending_deletion(key)
    with ctx.store.begin() as tx:
        for k in p["TagKeys"]:
            tx.tags.remove(key.key_id, k)
    return {}


def list_resource_tags(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "ListResourceTags", allow_alias=False)
    limit = limit_of(p, 50, most=50)
    after = decode_marker(p.get("Marker"))
    with ctx.store.begin() as tx:
        tags = [(k, v) for k, v in tx.tags.for_key(key.key_id) if after is None or k > after]
    return page(tags, limit, lambda t: t[0], "Tags", lambda t: {"TagKey": t[0], "TagValue": t[1]})
