"""Rotation: EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus, RotateKeyOnDemand,
ListKeyRotations, and the scheduled rotation of keys that are due.

A rotation adds a version and makes it current; ciphertexts name their version, so older ones
still decrypt. Keys whose material is imported rotate only to material imported for the purpose.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from ..errors import DisabledException, KMSInvalidStateException, LimitExceededException, UnsupportedOperationException
from ..model import Caller, Key, KeyState, KeyVersion
from ..storage import Tx
from .context import Context, Params, Result
from .paging import decode_marker, encode_marker, limit_of
from .states import check_not_pending_deletion, check_usable

MAX_ON_DEMAND_ROTATIONS = 10  # per key, as in AWS


def _not_rotatable(key: Key) -> UnsupportedOperationException:
    return UnsupportedOperationException(f"{key.arn} is not a symmetric encryption key; it cannot rotate.")


def _rotatable(ctx: Context, caller: Caller, key_ref: str, action: str) -> Key:
    key = ctx.keys.authorized(caller, key_ref, action, allow_alias=False)
    if not key.spec.rotatable:
        raise _not_rotatable(key)
    if key.origin.in_custom_key_store:
        raise UnsupportedOperationException(f"{key.arn} is in a custom key store: it cannot rotate.")
    check_not_pending_deletion(key)
    return key


def enable_key_rotation(ctx: Context, caller: Caller, p: Params) -> Result:
    key = _rotatable(ctx, caller, p["KeyId"], "EnableKeyRotation")
    if key.origin.imports_material:
        raise UnsupportedOperationException(
            f"{key.arn} has imported key material: automatic rotation is not available; "
            "import new material and use RotateKeyOnDemand.")
    check_usable(key, ctx.now())
    period = p.get("RotationPeriodInDays") or 365
    ctx.save(dataclasses.replace(key, rotation_period_days=period, next_rotation=ctx.now() + timedelta(days=period)))
    return {}


def disable_key_rotation(ctx: Context, caller: Caller, p: Params) -> Result:
    key = _rotatable(ctx, caller, p["KeyId"], "DisableKeyRotation")
    if key.state is KeyState.DISABLED:
        raise DisabledException(f"{key.arn} is disabled.")
    ctx.save(dataclasses.replace(key, rotation_period_days=None, next_rotation=None))
    return {}


def get_key_rotation_status(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "GetKeyRotationStatus")
    if not key.spec.rotatable:
        raise _not_rotatable(key)
    result: Result = {"KeyId": key.arn, "KeyRotationEnabled": key.rotation_period_days is not None}
    if key.rotation_period_days is not None:
        result["RotationPeriodInDays"] = key.rotation_period_days
        result["NextRotationDate"] = key.next_rotation
    return result


def rotate_key_on_demand(ctx: Context, caller: Caller, p: Params) -> Result:
    key = _rotatable(ctx, caller, p["KeyId"], "RotateKeyOnDemand")
    check_usable(key, ctx.now())
    with ctx.store.begin() as tx:
        key = tx.keys.get(key.key_id, for_update=True) or key
        versions = tx.versions.for_key(key.key_id)
        if sum(v.rotation_type == "ON_DEMAND" for v in versions) >= MAX_ON_DEMAND_ROTATIONS:
            raise LimitExceededException(
                f"{key.arn} has had {MAX_ON_DEMAND_ROTATIONS} on-demand rotations, the most allowed.")
        key = add_version(ctx, tx, key, versions, "ON_DEMAND")
    return {"KeyId": key.key_id}


def add_version(ctx: Context, tx: Tx, key: Key, versions: list[KeyVersion], rotation_type: str) -> Key:
    """Make a new version current, inside the caller's transaction; returns the updated key."""
    now = ctx.now()
    if key.origin.imports_material:
        pending = [v for v in versions if v.version > key.current_version and v.has_material]
        if not pending:
            raise KMSInvalidStateException(
                f"{key.arn} has no new key material to rotate to: import it with ImportType NEW_KEY_MATERIAL.")
        new = pending[0]
        tx.versions.set_rotation(key.key_id, new.version, rotation_type, now)
        key = dataclasses.replace(key, current_version=new.version, valid_to=new.valid_to,
                                  expiration_model=new.expiration_model)
    else:
        version = max((v.version for v in versions), default=0) + 1
        stored = ctx.keystores.for_key(key).create_version(key, version)
        tx.versions.insert(KeyVersion(key.key_id, version, now, stored.material_id, True,
                                      rotation_type=rotation_type), stored.locator)
        key = dataclasses.replace(key, current_version=version)
    tx.keys.update(key)
    return key


def _material_state(key: Key, v: KeyVersion) -> str:
    if v.version == key.current_version:
        return "CURRENT"
    return "PENDING_ROTATION" if v.version > key.current_version else "NON_CURRENT"


def list_key_rotations(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "ListKeyRotations", allow_alias=False)
    if not key.spec.rotatable:
        raise _not_rotatable(key)
    limit = limit_of(p, 100)
    after = decode_marker(p.get("Marker"))
    start = int(after) if after and after.isdigit() else 0
    with ctx.store.begin() as tx:
        versions = tx.versions.for_key(key.key_id)
    if p.get("IncludeKeyMaterial") != "ALL_KEY_MATERIAL":
        versions = [v for v in versions if v.rotation_type is not None]
    versions = [v for v in versions if v.version > start]
    shown = versions[:limit]
    entries = []
    for v in shown:
        entry: Result = {"KeyId": key.key_id, "KeyMaterialId": v.material_id,
                         "KeyMaterialState": _material_state(key, v)}
        if v.rotation_type is not None:
            entry["RotationType"] = v.rotation_type
            entry["RotationDate"] = v.rotated or v.created
        if key.origin.imports_material:
            entry["ImportState"] = v.import_state
            entry["ExpirationModel"] = v.expiration_model
            entry["ValidTo"] = v.valid_to
            entry["KeyMaterialDescription"] = v.description
        entries.append(entry)
    result: Result = {"Rotations": entries, "Truncated": len(versions) > limit}
    if len(versions) > limit:
        result["NextMarker"] = encode_marker(str(shown[-1].version))
    return result


def rotate_due_keys(ctx: Context, now: datetime) -> list[str]:
    """Rotate every key whose automatic rotation is due. Each due key is rotated once, by one node:
    the rows are locked for the transaction and other nodes skip locked rows."""
    rotated: list[str] = []
    with ctx.store.begin() as tx:
        for key in tx.keys.due_for_rotation(now):
            period = timedelta(days=key.rotation_period_days or 365)
            next_rotation = (key.next_rotation or now) + period
            if next_rotation <= now:  # the node was down for a whole period: rotate once
                next_rotation = now + period
            if key.state is KeyState.ENABLED and not key.origin.imports_material:
                key = add_version(ctx, tx, key, tx.versions.for_key(key.key_id), "AUTOMATIC")
                rotated.append(key.key_id)
            # Disabled keys and keys pending deletion do not rotate; their schedule moves on.
            tx.keys.update(dataclasses.replace(key, next_rotation=next_rotation))
    return rotated
