"""Aliases: CreateAlias, UpdateAlias, DeleteAlias, ListAliases. An alias lives in one account and
names a key of that account; it never resolves from another account."""

from __future__ import annotations

from ..errors import AlreadyExistsException, InvalidAliasNameException, NotFoundException, ValidationException
from ..model import ALIAS_NAME_RE, Alias, Caller, Key, alias_arn
from .context import Context, Params, Result
from .paging import decode_marker, limit_of, page
from .states import check_not_pending_deletion


def _check_alias_name(name: str) -> None:
    if not ALIAS_NAME_RE.match(name):
        raise InvalidAliasNameException(
            f"Alias name {name} must begin with 'alias/' and contain only letters, digits, /, _ and -.")
    if name == "alias/aws" or name.startswith("alias/aws/"):
        raise InvalidAliasNameException("Alias names beginning with 'alias/aws/' are reserved.")


def _own_key(caller: Caller, key: Key) -> Key:
    """Aliases live in one account and point at keys of that account only."""
    if key.account_id != caller.account_id:
        raise NotFoundException(f"Key '{key.arn}' does not exist")
    return key


def _not_found(ctx: Context, caller: Caller, name: str) -> NotFoundException:
    return NotFoundException(f"Alias {alias_arn(ctx.region, caller.account_id, name)} is not found.")


def create_alias(ctx: Context, caller: Caller, p: Params) -> Result:
    name = p["AliasName"]
    _check_alias_name(name)
    key = _own_key(caller, ctx.keys.authorized(caller, p["TargetKeyId"], "CreateAlias", allow_alias=False))
    check_not_pending_deletion(key)
    now = ctx.now()
    with ctx.store.begin() as tx:
        if tx.aliases.get(caller.account_id, name) is not None:
            raise AlreadyExistsException(
                f"An alias with the name {alias_arn(ctx.region, caller.account_id, name)} already exists")
        tx.aliases.insert(Alias(caller.account_id, name, key.key_id, now, now))
    return {}


def update_alias(ctx: Context, caller: Caller, p: Params) -> Result:
    name = p["AliasName"]
    _check_alias_name(name)
    key = _own_key(caller, ctx.keys.authorized(caller, p["TargetKeyId"], "UpdateAlias", allow_alias=False))
    check_not_pending_deletion(key)
    with ctx.store.begin() as tx:
        alias = tx.aliases.get(caller.account_id, name)
        if alias is None:
            raise _not_found(ctx, caller, name)
        current = tx.keys.get(alias.target_key_id)
        if current is not None and (current.key_usage is not key.key_usage or current.key_spec != key.key_spec):
            raise ValidationException(
                "The new target key must have the same key spec and key usage as the current one.")
        if current is not None:  # the caller needs UpdateAlias on the key it moves the alias away from too
            ctx.keys.decide(caller, current, "UpdateAlias")
        tx.aliases.retarget(caller.account_id, name, key.key_id, ctx.now())
    return {}


def delete_alias(ctx: Context, caller: Caller, p: Params) -> Result:
    name = p["AliasName"]
    with ctx.store.begin() as tx:
        alias = tx.aliases.get(caller.account_id, name)
        if alias is None:
            raise _not_found(ctx, caller, name)
        target = tx.keys.get(alias.target_key_id)
    if target is not None:
        ctx.keys.decide(caller, target, "DeleteAlias")
    with ctx.store.begin() as tx:
        tx.aliases.delete(caller.account_id, name)
    return {}


def list_aliases(ctx: Context, caller: Caller, p: Params) -> Result:
    limit = limit_of(p, 50, most=100)
    ctx.access.authorize_identity(caller, "ListAliases")
    # ListAliases is authorized by identity policies alone (above); the key only filters.
    key_id = _own_key(caller, ctx.keys.find(caller, p["KeyId"], allow_alias=False)[0]).key_id \
        if p.get("KeyId") else None
    with ctx.store.begin() as tx:
        aliases = tx.aliases.for_account(caller.account_id, key_id, decode_marker(p.get("Marker")), limit + 1)
    return page(aliases, limit, lambda a: a.name, "Aliases", lambda a: {
        "AliasName": a.name, "AliasArn": alias_arn(ctx.region, a.account_id, a.name),
        "TargetKeyId": a.target_key_id, "CreationDate": a.created, "LastUpdatedDate": a.updated})
