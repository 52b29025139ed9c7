"""Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from datetime import UTC, datetime
from typing import Any

import orjson

from ..access import grant_from_row, principal_arn
from ..audit.context import note_key
from ..errors import AccessDeniedException, InvalidGrantTokenException, NotFoundException, ValidationException
from ..model import Caller
from ..policy import Grant, root_arn
from .context import Context, Params, Result
from .paging import decode_marker, limit_of, page
from .states import check_not_pending_deletion, dry_run, require

PRINCIPAL_ARN_RE = re.compile(r"^(arn:aws[a-z-]*:(iam|sts)::\d{12}:\S+|\d{12})$")


def _same(a: Grant, b: Grant) -> bool:
    return (a.grantee_principal, a.operations, a.retiring_principal, a.encryption_context_subset,
            a.encryption_context_equals) == (b.grantee_principal, b.operations, b.retiring_principal,
                                             b.encryption_context_subset, b.encryption_context_equals)


def create_grant(ctx: Context, caller: Caller, p: Params) -> Result:
    require(p, "GranteePrincipal")  # newer models also allow a service principal instead
    operations = sorted(set(p["Operations"]))
    if not operations:
        raise ValidationException("A grant needs at least one operation.")
    grantee, retiring = p["GranteePrincipal"], p.get("RetiringPrincipal")
    for principal in filter(None, (grantee, retiring)):
        if not PRINCIPAL_ARN_RE.match(principal):
            raise ValidationException(f"{principal} is not a valid principal ARN.")
    constraints = p.get("Constraints") or None
    extra: dict[str, Any] = {"kms:GrantOperations": operations, "kms:GranteePrincipal": grantee,
                             "kms:GrantIsForAWSResource": False}
    if retiring:
        extra["kms:RetiringPrincipal"] = retiring
    if constraints:
        extra["kms:GrantConstraintType"] = sorted(constraints)
    grant = Grant(grantee_principal=grantee, operations=frozenset(operations), retiring_principal=retiring,
                  encryption_context_subset=(constraints or {}).get("EncryptionContextSubset"),
                  encryption_context_equals=(constraints or {}).get("EncryptionContextEquals"))
    # `new_grant`: a caller whose CreateGrant permission comes from a grant may only create grants
    # at least as narrow as that grant (AWS's rule); the decision checks it.
    key = ctx.keys.authorized(caller, p["KeyId"], "CreateGrant", allow_alias=False, extra=extra, new_grant=grant)
    check_not_pending_deletion(key)
    dry_run(p)
    token = base64.urlsafe_b64encode(os.urandom(48)).decode()
    name = p.get("Name")
    with ctx.store.begin() as tx:
        if name:
            for row in tx.grants.by_name(key.key_id, name):
                if _same(grant_from_row(row, key.arn), grant):
                    # Idempotent retry: the same grant, as AWS answers for a repeated Name.
                    return {"GrantToken": token, "GrantId": row.grant_id}
        grant_id = os.urandom(32).hex()
        tx.grants.insert({"grant_id": grant_id, "key_id": key.key_id, "name": name, "grantee_principal": grantee,
                          "retiring_principal": retiring, "issuing_account": root_arn(caller.account_id),
                          "operations": orjson.dumps(operations).decode(),
                          "constraints": orjson.dumps(constraints).decode() if constraints else None,
                          "token_hash": hashlib.sha256(token.encode()).hexdigest(),
                          "created": ctx.now().timestamp()})
    return {"GrantToken": token, "GrantId": grant_id}


def _entry(row: Any, key_arn: str) -> Result:
    grant = grant_from_row(row, key_arn)
    entry: Result = {"KeyId": key_arn, "GrantId": row.grant_id,
                     "CreationDate": datetime.fromtimestamp(row.created, UTC),
                     "GranteePrincipal": grant.grantee_principal, "IssuingAccount": row.issuing_account,
                     "Operations": sorted(grant.operations)}
    if grant.name:
        entry["Name"] = grant.name
    if grant.retiring_principal:
        entry["RetiringPrincipal"] = grant.retiring_principal
    constraints = {k: dict(v) for k, v in (("EncryptionContextSubset", grant.encryption_context_subset),
                                           ("EncryptionContextEquals", grant.encryption_context_equals))
                   if v is not None}
    if constraints:
        entry["Constraints"] = constraints
    return entry


def list_grants(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "ListGrants", allow_alias=False)
    limit = limit_of(p, 50)
    after = decode_marker(p.get("Marker"))
    with ctx.store.begin() as tx:
        rows = [r for r in tx.grants.for_key(key.key_id)
                if (p.get("GrantId") is None or r.grant_id == p["GrantId"])
                and (p.get("GranteePrincipal") is None or r.grantee_principal == p["GranteePrincipal"])
                and (after is None or r.grant_id > after)]
    rows.sort(key=lambda r: r.grant_id)
    return page(rows, limit, lambda r: str(r.grant_id), "Grants", lambda r: _entry(r, key.arn))


def list_retirable_grants(ctx: Context, caller: Caller, p: Params) -> Result:
    require(p, "RetiringPrincipal")
    ctx.access.authorize_identity(caller, "ListRetirableGrants")
    limit = limit_of(p, 50)
    with ctx.store.begin() as tx:
        rows = tx.grants.retirable_by(p["RetiringPrincipal"], decode_marker(p.get("Marker")), limit + 1)
        arns = {}
        for r in rows:
            k = tx.keys.get(r.key_id)
            arns[r.key_id] = k.arn if k else r.key_id
    return page(rows, limit, lambda r: str(r.grant_id), "Grants", lambda r: _entry(r, arns[r.key_id]))


def retire_grant(ctx: Context, caller: Caller, p: Params) -> Result:
    """By the grant's retiring principal, by its grantee if the grant allows RetireGrant, or by the
    key's account: by grant token, or by key ARN and grant id. (The grant decides, not the policies.)"""
    with ctx.store.begin() as tx:
        if p.get("GrantToken"):
            row = tx.grants.by_token_hash(hashlib.sha256(p["GrantToken"].encode()).hexdigest())
            if row is None:
                raise InvalidGrantTokenException("The grant token is not valid.")
        elif p.get("KeyId") and p.get("GrantId"):
            row = tx.grants.get(p["GrantId"])
            if row is None:
                raise NotFoundException(f"Grant {p['GrantId']} does not exist.")
        else:
            raise ValidationException("Specify GrantToken, or KeyId and GrantId.")
        key = tx.keys.get(row.key_id)
    if key is None or (p.get("KeyId") and p["KeyId"] not in (key.key_id, key.arn)):
        raise NotFoundException("The grant does not exist for that key.")
    grant = grant_from_row(row, key.arn)
    me = {caller.principal.arn, principal_arn(caller)}
    allowed = (grant.retiring_principal in me or (grant.grantee_principal in me and "RetireGrant" in grant.operations)
               or (caller.principal.is_admin and caller.account_id == key.account_id))
    if not allowed:
        raise AccessDeniedException(
            f"User: {caller.principal.arn} is not authorized to perform: kms:RetireGrant on resource: {key.arn} "
            "because it is neither the grant's retiring principal nor its grantee")
    note_key(key.arn, key.account_id)
    dry_run(p)
    with ctx.store.begin() as tx:
        tx.grants.delete(row.grant_id, key.key_id)
    return {}


def revoke_grant(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "RevokeGrant", allow_alias=False)
    dry_run(p)
    with ctx.store.begin() as tx:
        row = tx.grants.get(p["GrantId"])
        if row is None or row.key_id != key.key_id:
            raise NotFoundException(f"Grant {p['GrantId']} does not exist for {key.arn}.")
        tx.grants.delete(row.grant_id, key.key_id)
    return {}
