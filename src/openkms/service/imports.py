"""BYOK, keys whose material the customer imports (Origin EXTERNAL): GetParametersForImport,
ImportKeyMaterial, DeleteImportedKeyMaterial, and the scheduled expiry of material past ValidTo.

The key store makes the wrapping key and unwraps the customer's material into itself; the service
sees only an opaque ImportedMaterial and its id.
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime, timedelta

from ..crypto import wrap
from ..crypto.material import ImportedMaterial
from ..errors import (
    ExpiredImportTokenException,
    IncorrectKeyMaterialException,
    InvalidImportTokenException,
    KMSInvalidStateException,
    NotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from ..model import Caller, Key, KeyState, KeyVersion
from ..storage import Tx
from .context import Context, Params, Result
from .states import check_not_pending_deletion

IMPORT_PARAMETERS_VALID = timedelta(hours=24)
MAX_IMPORT_VALIDITY = timedelta(days=365)


def _importable(ctx: Context, caller: Caller, key_ref: str, action: str) -> Key:
    key = ctx.keys.authorized(caller, key_ref, action, allow_alias=False)
    if not key.origin.imports_material:
        raise UnsupportedOperationException(f"{key.arn} was not created with Origin EXTERNAL.")
    check_not_pending_deletion(key)
    return key


def get_parameters_for_import(ctx: Context, caller: Caller, p: Params) -> Result:
    key = _importable(ctx, caller, p["KeyId"], "GetParametersForImport")
    wrap.check_supported(p["WrappingKeySpec"], p["WrappingAlgorithm"])
    importer = ctx.keystores.importer(key)
    valid_to = ctx.now() + IMPORT_PARAMETERS_VALID
    token = importer.new_import_token(key.key_id, valid_to)
    token_id = hashlib.sha256(token).hexdigest()
    public_der, sealed_private = importer.new_wrapping_key(token_id, p["WrappingKeySpec"])
    with ctx.store.begin() as tx:
        tx.import_tokens.insert(token_id, key.key_id, p["WrappingAlgorithm"], p["WrappingKeySpec"], sealed_private,
                                valid_to)
    return {"KeyId": key.arn, "ImportToken": token, "PublicKey": public_der, "ParametersValidTo": valid_to}


def _expired() -> ExpiredImportTokenException:
    return ExpiredImportTokenException("The import token has expired; call GetParametersForImport again.")


def _unwrapped(ctx: Context, key: Key, p: Params) -> ImportedMaterial:
    """The customer's material, from a valid import token of this key."""
    importer = ctx.keystores.importer(key)
    token_id = hashlib.sha256(p["ImportToken"]).hexdigest()
    with ctx.store.begin() as tx:
        token = tx.import_tokens.get(token_id)
    if token is None:
        # Purged once expired; the token itself still says when it expired, if it is ours.
        expiry = importer.import_token_expiry(key.key_id, p["ImportToken"])
        if expiry is not None and expiry <= ctx.now():
            raise _expired()
        raise InvalidImportTokenException("The import token is not valid for this key.")
    if token.key_id != key.key_id:
        raise InvalidImportTokenException("The import token is not valid for this key.")
    if token.valid_to <= ctx.now().timestamp():
        raise _expired()
    return importer.unwrap_import(key, token_id, bytes(token.sealed_private_key), token.wrapping_algorithm,
                                  p["EncryptedKeyMaterial"])


def _expiration(ctx: Context, p: Params) -> tuple[str, datetime | None]:
    model, valid_to = p.get("ExpirationModel"), p.get("ValidTo")
    if model is None:
        model = "KEY_MATERIAL_EXPIRES" if valid_to is not None else "KEY_MATERIAL_DOES_NOT_EXPIRE"
    if model == "KEY_MATERIAL_DOES_NOT_EXPIRE":
        if valid_to is not None:
            raise ValidationException("ValidTo is not allowed with ExpirationModel KEY_MATERIAL_DOES_NOT_EXPIRE.")
        return model, None
    if valid_to is None:
        raise ValidationException("ValidTo is required with ExpirationModel KEY_MATERIAL_EXPIRES.")
    now = ctx.now()
    if valid_to <= now or valid_to > now + MAX_IMPORT_VALIDITY:
        raise ValidationException("ValidTo must be in the future and at most 365 days away.")
    return model, valid_to


def import_key_material(ctx: Context, caller: Caller, p: Params) -> Result:
    key = _importable(ctx, caller, p["KeyId"], "ImportKeyMaterial")
    material = _unwrapped(ctx, key, p)
    model, valid_to = _expiration(ctx, p)
    if p.get("KeyMaterialId") and p["KeyMaterialId"] != material.material_id:
        raise IncorrectKeyMaterialException("The key material is not the material KeyMaterialId names.")
    with ctx.store.begin() as tx:
        key = tx.keys.get(key.key_id, for_update=True) or key
        version = _place(ctx, tx, key, material, p, model, valid_to)
        first = key.current_version == 0  # the key never had material: version 1 becomes current
        if first or version == key.current_version:
            state = KeyState.ENABLED if key.state is KeyState.PENDING_IMPORT else key.state
            key = dataclasses.replace(key, current_version=version, state=state, valid_to=valid_to,
                                      expiration_model=model)
        tx.keys.update(key)
    return {"KeyId": key.arn, "KeyMaterialId": material.material_id}


def _place(ctx: Context, tx: Tx, key: Key, material: ImportedMaterial, p: Params, model: str,
           valid_to: datetime | None) -> int:
    """Store the material as the version it belongs to, inside the caller's transaction: version 1
    on the first import, the version that had it (EXISTING_KEY_MATERIAL), or a new version waiting
    for RotateKeyOnDemand (NEW_KEY_MATERIAL)."""
    store = ctx.keystores.importer(key)
    versions = tx.versions.for_key(key.key_id)
    same = next((v for v in versions if v.material_id == material.material_id), None)
    description = p.get("KeyMaterialDescription")
    if not versions:
        version = 1
    elif (p.get("ImportType") or "EXISTING_KEY_MATERIAL") == "EXISTING_KEY_MATERIAL":
        if same is None:
            raise IncorrectKeyMaterialException(
                "The key material is not the material that was imported into this key before.")
        stored = store.import_version(key, same.version, material)
        tx.versions.set_material(key.key_id, same.version, stored.locator, "IMPORTED", valid_to, model)
        return same.version
    else:
        if not key.spec.rotatable:
            raise UnsupportedOperationException("Only symmetric keys can take new key material.")
        if same is not None:
            raise IncorrectKeyMaterialException("That key material was already imported into this key.")
        if any(v.version > key.current_version for v in versions):
            raise KMSInvalidStateException(f"{key.arn} already has new key material waiting for RotateKeyOnDemand.")
        version = max(v.version for v in versions) + 1
    stored = store.import_version(key, version, material)
    tx.versions.insert(KeyVersion(key.key_id, version, ctx.now(), stored.material_id, True, import_state="IMPORTED",
                                  valid_to=valid_to, expiration_model=model, description=description), stored.locator)
    return version


def delete_imported_key_material(ctx: Context, caller: Caller, p: Params) -> Result:
    key = _importable(ctx, caller, p["KeyId"], "DeleteImportedKeyMaterial")
    target = p.get("KeyMaterialId")
    with ctx.store.begin() as tx:
        versions = tx.versions.for_key(key.key_id)
        chosen = [v for v in versions if target is None or v.material_id == target]
        if target is not None and not chosen:
            raise NotFoundException(f"{key.arn} has no key material {target}.")
        for v in chosen:
            tx.versions.drop_material(key.key_id, v.version)
        if any(v.version == key.current_version for v in chosen):
            key = dataclasses.replace(key, state=KeyState.PENDING_IMPORT, valid_to=None)
            tx.keys.update(key)
    store = ctx.keystores.for_key(key)
    for v in chosen:
        store.destroy(key, v.version)
    result: Result = {"KeyId": key.arn}
    if target is not None:
        result["KeyMaterialId"] = target
    return result


def expire_imported_material(ctx: Context, now: datetime) -> list[str]:
    """Delete imported material whose ValidTo has passed; its key goes to PendingImport."""
    with ctx.store.begin() as tx:
        due = tx.keys.material_expired(now)
    for key_id in due:
        with ctx.store.begin() as tx:
            key = tx.keys.get(key_id, for_update=True)
            if key is None or key.valid_to is None or key.valid_to > now:
                continue
            tx.versions.drop_material(key_id, key.current_version)
            tx.keys.update(dataclasses.replace(key, state=KeyState.PENDING_IMPORT, valid_to=None))
        ctx.keystores.for_key(key).destroy(key, key.current_version)
    return due
