"""Keys: create, describe, list, enable and disable, schedule and cancel deletion, describe anew."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from datetime import timedelta

from ..audit.context import note_key
from ..errors import (
    AlreadyExistsException,
    CustomKeyStoreInvalidStateException,
    KMSInvalidStateException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
    XksKeyAlreadyInUseException,
)
from ..keystore.base import KeyStore, StoredVersion
from ..model import KEY_SPECS, Alias, Caller, ConnectionState, Key, KeyState, KeyUsage, KeyVersion, Origin
from .context import Context, Params, Result
from .keystores import connected_store_of
from .paging import decode_marker, limit_of, page
from .policies import checked_policy
from .states import STATE_WORDS, check_not_pending_deletion
from .tags import MAX_TAGS_PER_KEY, checked_tags, tag_conditions
from .xks import check_external_key

ALGORITHM_FIELDS = {
    KeyUsage.ENCRYPT_DECRYPT: "EncryptionAlgorithms",
    KeyUsage.SIGN_VERIFY: "SigningAlgorithms",
    KeyUsage.GENERATE_VERIFY_MAC: "MacAlgorithms",
    KeyUsage.KEY_AGREEMENT: "KeyAgreementAlgorithms",
}
OFFERED_ORIGINS = (Origin.AWS_KMS.value, Origin.EXTERNAL.value, Origin.AWS_CLOUDHSM.value,
                   Origin.EXTERNAL_KEY_STORE.value)
STORE_TYPE_OF_ORIGIN = {Origin.AWS_CLOUDHSM: "AWS_CLOUDHSM", Origin.EXTERNAL_KEY_STORE: "EXTERNAL_KEY_STORE"}


def key_metadata(ctx: Context, key: Key) -> Result:
    md: Result = {
        "AWSAccountId": key.account_id,
        "KeyId": key.key_id,
        "Arn": key.arn,
        "CreationDate": key.created,
        "Enabled": key.effective_state is KeyState.ENABLED,
        "Description": key.description,
        "KeyUsage": key.key_usage.value,
        "KeyState": key.effective_state.value,
        "Origin": key.origin.value,
        "KeyManager": key.key_manager,
        "CustomerMasterKeySpec": key.key_spec,
        "KeySpec": key.key_spec,
        "MultiRegion": False,
    }
    md[ALGORITHM_FIELDS[key.key_usage]] = list(key.spec.allowed(key.key_usage))
    if key.origin.imports_material and key.expiration_model:
        md["ExpirationModel"] = key.expiration_model
        if key.valid_to is not None:
            md["ValidTo"] = key.valid_to
    if key.state is KeyState.PENDING_DELETION:
        md["DeletionDate"] = key.deletion_date
        md["PendingDeletionWindowInDays"] = key.pending_window_days
    if key.custom_key_store_id is not None:
        md["CustomKeyStoreId"] = key.custom_key_store_id
        row = ctx.keystores.custom_key_store(key.custom_key_store_id)
        if row is not None and row.cluster_id:
            md["CloudHsmClusterId"] = row.cluster_id
    if key.xks_key_id is not None:
        md["XksKeyConfiguration"] = {"Id": key.xks_key_id}
    return md


def create_key(ctx: Context, caller: Caller, p: Params) -> Result:
    spec_name = p.get("KeySpec")
    legacy_spec = p.get("CustomerMasterKeySpec")
    if spec_name and legacy_spec:
        raise ValidationException("You cannot specify KeySpec and CustomerMasterKeySpec in the same request.")
    spec_name = spec_name or legacy_spec or "SYMMETRIC_DEFAULT"
    spec = KEY_SPECS.get(spec_name)
    if spec is None or not ctx.keystores.supports(spec):
        raise UnsupportedOperationException(f"KeySpec {spec_name} is not supported by this server.")
    try:
        usage = KeyUsage(p.get("KeyUsage") or KeyUsage.ENCRYPT_DECRYPT.value)
    except ValueError:  # a usage a newer KMS model knows and this server does not
        raise UnsupportedOperationException(f"KeyUsage {p['KeyUsage']} is not supported by this server.") from None
    if usage not in spec.usages:
        raise ValidationException(f"KeyUsage {usage.value} is not compatible with KeySpec {spec_name}.")
    origin_name = p.get("Origin") or Origin.AWS_KMS.value
    if origin_name not in OFFERED_ORIGINS:
        raise UnsupportedOperationException(f"Origin {origin_name} is not supported by this server.")
    cks_id = p.get("CustomKeyStoreId")
    origin = Origin(origin_name)
    if (cks_id is None) == origin.in_custom_key_store:
        raise ValidationException("A key in a custom key store needs both Origin AWS_CLOUDHSM or "
                                  "EXTERNAL_KEY_STORE, and a CustomKeyStoreId.")
    xks_key_id = p.get("XksKeyId")
    if (xks_key_id is None) == (origin is Origin.EXTERNAL_KEY_STORE):
        raise ValidationException("XksKeyId is required with Origin EXTERNAL_KEY_STORE, and valid with it only.")
    if cks_id is not None and (spec_name != "SYMMETRIC_DEFAULT" or usage is not KeyUsage.ENCRYPT_DECRYPT):
        raise UnsupportedOperationException("Keys in a custom key store are SYMMETRIC_DEFAULT keys for "
                                            "ENCRYPT_DECRYPT only.")
    if p.get("MultiRegion"):
        raise UnsupportedOperationException("Multi-Region keys are not supported by this server.")
    tags = checked_tags(p.get("Tags") or [])
    if len(tags) > MAX_TAGS_PER_KEY:
        raise TagException(f"A key can have at most {MAX_TAGS_PER_KEY} tags.")
    bypass = bool(p.get("BypassPolicyLockoutSafetyCheck"))
    ctx.access.authorize_identity(caller, "CreateKey", tag_conditions(tags) | {
        "kms:KeySpec": spec_name, "kms:KeyUsage": usage.value, "kms:KeyOrigin": origin_name,
        "kms:BypassPolicyLockoutSafetyCheck": bypass})
    policy = checked_policy(caller, p.get("Policy"), bypass)
    if cks_id is not None:
        row = connected_store_of(ctx, caller, cks_id)  # CustomKeyStoreNotFound / InvalidState before the HSM
        if row.store_type != STORE_TYPE_OF_ORIGIN[origin]:
            raise UnsupportedOperationException(f"Origin {origin.value} needs a custom key store of type "
                                                f"{STORE_TYPE_OF_ORIGIN[origin]}; {cks_id} is {row.store_type}.")
        if xks_key_id is not None:
            check_external_key(ctx, row, xks_key_id)  # the proxy's metadata, as AWS asks for it
        keystore: KeyStore = ctx.keystores.for_custom_key_store(cks_id)
    else:
        keystore = ctx.keystores.for_new_key(spec, origin)
    imported = origin.imports_material
    key = Key(key_id=str(uuid.uuid4()), account_id=caller.account_id, region=ctx.region,
              description=p.get("Description") or "", key_spec=spec_name, key_usage=usage, origin=origin,
              state=KeyState.PENDING_IMPORT if imported else KeyState.ENABLED, created=ctx.now(),
              current_version=0 if imported else 1, policy=policy, custom_key_store_id=cks_id,
              xks_key_id=xks_key_id)
    # Made before the transaction: generating an RSA key takes up to a second of CPU.
    stored = None if imported else keystore.create_version(key, 1)
    try:
        _insert_key(ctx, key, stored, tags)
    except Exception:
        if cks_id is not None and stored is not None:
            with contextlib.suppress(Exception):  # the object would be an orphan in the token
                keystore.destroy(key)
        raise
    return {"KeyMetadata": key_metadata(ctx, key)}


def _insert_key(ctx: Context, key: Key, stored: StoredVersion | None, tags: dict[str, str]) -> None:
    with ctx.store.begin() as tx:
        if key.custom_key_store_id is not None:
            # Locked and read again: the store may have been disconnected (and a delete may be
            # waiting) since it was checked.
            row = tx.key_stores.get(key.custom_key_store_id, for_update=True)
            if row is None or row.connection_state is not ConnectionState.CONNECTED:
                raise CustomKeyStoreInvalidStateException(f"Custom key store {key.custom_key_store_id} "
                                                          "is not connected.")
            if key.xks_key_id is not None and \
                    tx.key_stores.key_with_xks_key_id(key.custom_key_store_id, key.xks_key_id) is not None:
                raise XksKeyAlreadyInUseException(f"External key {key.xks_key_id} is already used by a KMS key in "
                                                  f"custom key store {key.custom_key_store_id}.")
        tx.keys.insert(key)
        if stored is not None:
            tx.versions.insert(KeyVersion(key.key_id, 1, key.created, stored.material_id, True), stored.locator)
        for k, v in tags.items():
            tx.tags.put(key.key_id, k, v)
        note_key(key.arn, key.account_id)  # before the commit, so the call's intent names the new key


def describe_key(ctx: Context, caller: Caller, p: Params) -> Result:
    return {"KeyMetadata": key_metadata(ctx, ctx.keys.authorized(caller, p["KeyId"], "DescribeKey"))}


def list_keys(ctx: Context, caller: Caller, p: Params) -> Result:
    ctx.access.authorize_identity(caller, "ListKeys")
    limit = limit_of(p, 100)
    with ctx.store.begin() as tx:
        keys = tx.keys.list_ids(caller.account_id, decode_marker(p.get("Marker")), limit + 1)
    return page(keys, limit, lambda k: k.key_id, "Keys", lambda k: {"KeyId": k.key_id, "KeyArn": k.arn})


def _switch(ctx: Context, caller: Caller, p: Params, action: str, to: KeyState) -> Result:
    """Enable or disable: only between the two states, and doing it twice is no error."""
    key = ctx.keys.authorized(caller, p["KeyId"], action, allow_alias=False)
    if key.effective_state not in (KeyState.ENABLED, KeyState.DISABLED):
        raise KMSInvalidStateException(f"{key.arn} is {STATE_WORDS[key.effective_state]}.")
    if key.state is not to:
        ctx.save(dataclasses.replace(key, state=to))
    return {}


def enable_key(ctx: Context, caller: Caller, p: Params) -> Result:
    return _switch(ctx, caller, p, "EnableKey", KeyState.ENABLED)


def disable_key(ctx: Context, caller: Caller, p: Params) -> Result:
    return _switch(ctx, caller, p, "DisableKey", KeyState.DISABLED)


def schedule_key_deletion(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "ScheduleKeyDeletion", allow_alias=False)
    days = p.get("PendingWindowInDays")
    days = 30 if days is None else days
    if not 7 <= days <= 30:
        raise ValidationException.detected(
            [f"Value '{days}' at 'pendingWindowInDays' failed to satisfy constraint: Member must have value "
             "between 7 and 30"])
    check_not_pending_deletion(key)
    deletion = ctx.now() + timedelta(days=days)
    key = ctx.save(dataclasses.replace(key, state=KeyState.PENDING_DELETION, deletion_date=deletion,
                                        pending_window_days=days))
    return {"KeyId": key.arn, "DeletionDate": deletion, "KeyState": key.state.value, "PendingWindowInDays": days}


def cancel_key_deletion(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "CancelKeyDeletion", allow_alias=False)
    if key.state is not KeyState.PENDING_DELETION:
        raise KMSInvalidStateException(f"{key.arn} is not pending deletion.")
    key = ctx.save(dataclasses.replace(key, state=KeyState.DISABLED, deletion_date=None, pending_window_days=None))
    return {"KeyId": key.arn}


def update_key_description(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "UpdateKeyDescription", allow_alias=False)
    check_not_pending_deletion(key)
    ctx.save(dataclasses.replace(key, description=p["Description"]))
    return {}


def get_key_last_usage(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "GetKeyLastUsage", allow_alias=False)
    last = ctx.usage.last(key.key_id) if ctx.usage is not None else None
    return {"KeyId": key.key_id, "KeyLastUsage": last or {}, "TrackingStartDate": key.created,
            "KeyCreationDate": key.created}


def aws_managed_key(ctx: Context, account_id: str, alias: str, description: str, policy: str) -> Key:
    """The account's AWS managed key of a service (alias/aws/<service>), made on first use: a
    SYMMETRIC_DEFAULT key with KeyManager AWS, whose key policy (the service's, as AWS writes it)
    lets principals of the account use it only through that service, and nobody manage it."""
    with ctx.store.begin() as tx:
        existing = tx.aliases.get(account_id, alias)
        key = tx.keys.get(existing.target_key_id) if existing is not None else None
    if key is not None:
        return key
    now = ctx.now()
    key = Key(key_id=str(uuid.uuid4()), account_id=account_id, region=ctx.region, description=description,
              key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT, origin=Origin.AWS_KMS,
              state=KeyState.ENABLED, created=now, current_version=1, policy=policy, key_manager="AWS")
    keystore = ctx.keystores.for_new_key(key.spec, key.origin)
    stored = keystore.create_version(key, 1)
    try:
        with ctx.store.begin() as tx:
            tx.keys.insert(key)
            tx.versions.insert(KeyVersion(key.key_id, 1, now, stored.material_id, True), stored.locator)
            tx.aliases.insert(Alias(account_id, alias, key.key_id, now, now))
            note_key(key.arn, key.account_id)
    except AlreadyExistsException:  # another call made it first: use that one
        with ctx.store.begin() as tx:
            existing = tx.aliases.get(account_id, alias)
            made = tx.keys.get(existing.target_key_id) if existing is not None else None
        if made is None:
            raise
        return made
    return key
