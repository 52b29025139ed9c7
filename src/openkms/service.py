"""One method per KMS operation: resolve the key -> check access, state and spec -> key store -> result.

Methods take the caller and the request's members (already validated against botocore's model:
blobs are bytes, required members are present) and return the response's members with Python
values (bytes, datetime); the API layer renders them. Errors are types from errors.py.

Key metadata is cached in-process for `cache_ttl` seconds. Every change made through this node
updates the cache at once; a change made by another node on the same store is seen within the TTL.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from .access import AccessControl, grant_from_row, principal_arn
from .audit.context import note_key
from .audit.usage import UsageTracker
from .cache import TTLCache
from .crypto import blob, wrap
from .errors import (
    AccessDeniedException,
    AlreadyExistsException,
    DisabledException,
    DryRunOperationException,
    ExpiredImportTokenException,
    IncorrectKeyException,
    IncorrectKeyMaterialException,
    InvalidAliasNameException,
    InvalidCiphertextException,
    InvalidGrantTokenException,
    InvalidImportTokenException,
    InvalidKeyUsageException,
    InvalidMarkerException,
    KMSInternalException,
    KMSInvalidMacException,
    KMSInvalidSignatureException,
    KMSInvalidStateException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
)
from .keystore.software import SoftwareKeyStore
from .model import (
    ALIAS_ARN_RE,
    ALIAS_NAME_RE,
    DATA_KEY_PAIR_SPECS,
    KEY_ARN_RE,
    KEY_ID_RE,
    KEY_SPECS,
    Alias,
    Caller,
    Key,
    KeyState,
    KeyUsage,
    KeyVersion,
    Origin,
    alias_arn,
)
from .policy import Grant, default_key_policy, parse_key_policy, root_arn, would_lock_out
from .storage import Store

Params = Mapping[str, Any]
Result = dict[str, Any]

DATA_KEY_SPECS = {"AES_256": 32, "AES_128": 16}
ALGORITHM_CONDITION = {
    KeyUsage.ENCRYPT_DECRYPT: "kms:EncryptionAlgorithm",
    KeyUsage.SIGN_VERIFY: "kms:SigningAlgorithm",
    KeyUsage.GENERATE_VERIFY_MAC: "kms:MacAlgorithm",
    KeyUsage.KEY_AGREEMENT: "kms:KeyAgreementAlgorithm",
    KeyUsage.ENCAPSULATE_DECAPSULATE: "kms:EncapsulationAlgorithm",
}
ALGORITHM_FIELDS = {
    KeyUsage.ENCRYPT_DECRYPT: "EncryptionAlgorithms",
    KeyUsage.SIGN_VERIFY: "SigningAlgorithms",
    KeyUsage.GENERATE_VERIFY_MAC: "MacAlgorithms",
    KeyUsage.KEY_AGREEMENT: "KeyAgreementAlgorithms",
}
MAX_TAGS_PER_KEY = 50
PRINCIPAL_ARN_RE = re.compile(r"^(arn:aws[a-z-]*:(iam|sts)::\d{12}:\S+|\d{12})$")
MAX_ON_DEMAND_ROTATIONS = 10  # per key, as in AWS
IMPORT_PARAMETERS_VALID = timedelta(hours=24)
MAX_IMPORT_VALIDITY = timedelta(days=365)


def _encode_marker(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode()


def _decode_marker(marker: str | None) -> str | None:
    if marker is None:
        return None
    try:
        return base64.urlsafe_b64decode(marker.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidMarkerException("The marker is not valid.") from None


class KMS:
    def __init__(self, store: Store, keystore: SoftwareKeyStore, region: str, cache_ttl: float = 5.0,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.keystore = keystore
        self.region = region
        self._clock = clock or (lambda: datetime.now(UTC))
        self._keys: TTLCache[str, Key | None] = TTLCache(cache_ttl)
        self._aliases: TTLCache[tuple[str, str], str | None] = TTLCache(cache_ttl)
        self.usage: UsageTracker | None = None  # set by the API layer, which records uses
        self.access = AccessControl(store, cache_ttl)

    def now(self) -> datetime:
        return self._clock()

    # -- lookups (cached) --------------------------------------------------------------------
    def _load_key(self, key_id: str) -> Key | None:
        def load() -> Key | None:
            with self.store.begin() as tx:
                return tx.keys.get(key_id)
        return self._keys.get(key_id, load)

    def _remember(self, key: Key) -> None:
        self._keys.put(key.key_id, key)

    def _alias_target(self, account_id: str, name: str) -> str | None:
        def load() -> str | None:
            with self.store.begin() as tx:
                alias = tx.aliases.get(account_id, name)
            return alias.target_key_id if alias else None
        return self._aliases.get((account_id, name), load)

    def _forget_alias(self, account_id: str, name: str) -> None:
        self._aliases.pop((account_id, name))

    def _find(self, caller: Caller, key_ref: str, allow_alias: bool = True) -> tuple[Key, str | None]:
        """A key id, key ARN, alias name or alias ARN -> (the key, the alias name it was named by).

        No authorization: only for paths where an explicit decision follows (Decrypt routes by the
        blob's key; ListAliases filters by a key the caller names). Everything else goes through
        `_authorized`. A key of another account can only be named by its key ARN; aliases never
        resolve across accounts.
        """
        account = caller.account_id
        key_id: str | None
        request_alias = None
        if key_ref.startswith("alias/") or ALIAS_ARN_RE.match(key_ref):
            if not allow_alias:
                raise NotFoundException(f"Invalid keyId '{key_ref}'. An alias is not accepted here.")
            m = ALIAS_ARN_RE.match(key_ref)
            if m:
                region, alias_account, name = m.groups()
                if alias_account != account or region != self.region:
                    # Aliases never resolve across accounts or regions.
                    raise NotFoundException(f"Alias {key_ref} is not found.")
            else:
                name = key_ref
            key_id = self._alias_target(account, name)
            if key_id is None:
                raise NotFoundException(f"Alias {alias_arn(self.region, account, name)} is not found.")
            request_alias = name
            owner = account
        else:
            m = KEY_ARN_RE.match(key_ref)
            if m:
                region, owner, key_id = m.groups()
                if region != self.region:
                    raise NotFoundException(f"Key '{key_ref}' does not exist")
            elif KEY_ID_RE.match(key_ref):
                key_id, owner = key_ref, account
            else:
                raise NotFoundException(f"Invalid keyId '{key_ref}'")
        key = self._load_key(key_id)
        if key is None or key.account_id != owner:
            raise NotFoundException(f"Key 'arn:aws:kms:{self.region}:{owner}:key/{key_id}' does not exist")
        note_key(key.arn, key.account_id)
        return key, request_alias

    def _authorized(self, caller: Caller, key_ref: str, action: str, *, allow_alias: bool = True,
                    encryption_context: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None,
                    new_grant: Grant | None = None) -> Key:
        """The key `key_ref` names, if the caller may `kms:<action>` it; AccessDeniedException if not.

        Every path from a request to a key passes here, or through `_find` followed by `_decide`.
        """
        key, request_alias = self._find(caller, key_ref, allow_alias)
        self._decide(caller, key, action, request_alias=request_alias, encryption_context=encryption_context,
                     extra=extra, new_grant=new_grant)
        return key

    def _decide(self, caller: Caller, key: Key, action: str, *, request_alias: str | None = None,
                encryption_context: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None,
                new_grant: Grant | None = None) -> None:
        """The one authorization decision for a request on `key` (key policy, identity policies, grants)."""
        if not action:
            # Fail closed: there is no way to ask for a key without saying what it is wanted for.
            raise KMSInternalException("A key was looked up without an action to authorize.")
        if request_alias is not None:
            extra = {**(extra or {}), "kms:RequestAlias": request_alias}
        self.access.authorize(caller, key, action, encryption_context=encryption_context, extra=extra,
                              grant_tokens=caller.grant_tokens, new_grant=new_grant)

    def _check_usable(self, key: Key) -> None:
        if key.state is KeyState.ENABLED:
            if key.valid_to is not None and self.now() >= key.valid_to:
                # Imported material past its ValidTo is unusable at once, before the scheduler
                # gets round to deleting it.
                raise KMSInvalidStateException(f"{key.arn} is pending import.")
            return
        if key.state is KeyState.DISABLED:
            raise DisabledException(f"{key.arn} is disabled.")
        raise KMSInvalidStateException(f"{key.arn} is {_state_words(key.state)}.")

    @staticmethod
    def _check_not_pending_deletion(key: Key) -> None:
        if key.state is KeyState.PENDING_DELETION:
            raise KMSInvalidStateException(f"{key.arn} is pending deletion.")

    def _crypto_key(self, caller: Caller, key_ref: str, action: str, usage: KeyUsage, algorithm: str | None, *,
                    encryption_context: Mapping[str, str] | None = None) -> Key:
        extra = {ALGORITHM_CONDITION[usage]: algorithm} if algorithm else None
        key = self._authorized(caller, key_ref, action, extra=extra,
                            encryption_context=encryption_context if encryption_context is not None else
                            ({} if usage is KeyUsage.ENCRYPT_DECRYPT else None))
        self._check_for_use(key, usage, algorithm)
        return key

    def _check_for_use(self, key: Key, usage: KeyUsage, algorithm: str | None) -> None:
        """The key is for this purpose, in a state to be used, and allows the algorithm."""
        if key.key_usage is not usage:
            raise InvalidKeyUsageException(
                f"{key.arn} key usage is {key.key_usage.value} which is not valid for this operation.")
        self._check_usable(key)
        if algorithm is not None:
            self._check_algorithm(key, algorithm)

    @staticmethod
    def _check_algorithm(key: Key, algorithm: str) -> None:
        if algorithm not in key.spec.allowed(key.key_usage):
            raise InvalidKeyUsageException(
                f"The operation failed because {key.arn} does not support the {algorithm} algorithm.")

    def key_metadata(self, key: Key) -> Result:
        spec = key.spec
        md: Result = {
            "AWSAccountId": key.account_id,
            "KeyId": key.key_id,
            "Arn": key.arn,
            "CreationDate": key.created,
            "Enabled": key.state is KeyState.ENABLED,
            "Description": key.description,
            "KeyUsage": key.key_usage.value,
            "KeyState": key.state.value,
            "Origin": key.origin.value,
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": key.key_spec,
            "KeySpec": key.key_spec,
            "MultiRegion": False,
        }
        md[ALGORITHM_FIELDS[key.key_usage]] = list(spec.allowed(key.key_usage))
        if key.origin is Origin.EXTERNAL and key.expiration_model:
            md["ExpirationModel"] = key.expiration_model
            if key.valid_to is not None:
                md["ValidTo"] = key.valid_to
        if key.state is KeyState.PENDING_DELETION:
            md["DeletionDate"] = key.deletion_date
            md["PendingDeletionWindowInDays"] = key.pending_window_days
        return md

    def _save(self, key: Key) -> Key:
        with self.store.begin() as tx:
            tx.keys.update(key)
        self._remember(key)
        return key

    # -- key lifecycle ----------------------------------------------------------------------
    def create_key(self, caller: Caller, p: Params) -> Result:
        spec_name = p.get("KeySpec")
        legacy_spec = p.get("CustomerMasterKeySpec")
        if spec_name and legacy_spec:
            raise ValidationException("You cannot specify KeySpec and CustomerMasterKeySpec in the same request.")
        spec_name = spec_name or legacy_spec or "SYMMETRIC_DEFAULT"
        spec = KEY_SPECS.get(spec_name)
        if spec is None or not self.keystore.supports(spec_name):
            raise UnsupportedOperationException(f"KeySpec {spec_name} is not supported by this server.")
        try:
            usage = KeyUsage(p.get("KeyUsage") or KeyUsage.ENCRYPT_DECRYPT.value)
        except ValueError:  # a usage a newer KMS model knows and this server does not
            raise UnsupportedOperationException(f"KeyUsage {p['KeyUsage']} is not supported by this server.") from None
        if usage not in spec.usages:
            raise ValidationException(f"KeyUsage {usage.value} is not compatible with KeySpec {spec_name}.")
        origin = p.get("Origin") or "AWS_KMS"
        if origin not in (Origin.AWS_KMS.value, Origin.EXTERNAL.value):
            raise UnsupportedOperationException(f"Origin {origin} is not supported by this server.")
        if p.get("CustomKeyStoreId") or p.get("XksKeyId"):
            raise UnsupportedOperationException("Custom key stores are not supported by this server.")
        if p.get("MultiRegion"):
            raise UnsupportedOperationException("Multi-Region keys are not supported by this server.")
        tags = self._checked_tags(p.get("Tags") or [])
        if len(tags) > MAX_TAGS_PER_KEY:
            raise TagException(f"A key can have at most {MAX_TAGS_PER_KEY} tags.")
        self.access.authorize_identity(caller, "CreateKey", _tag_conditions(tags) | {
            "kms:KeySpec": spec_name, "kms:KeyUsage": usage.value, "kms:KeyOrigin": origin,
            "kms:BypassPolicyLockoutSafetyCheck": bool(p.get("BypassPolicyLockoutSafetyCheck"))})
        policy = self._checked_policy(caller, p.get("Policy"), bool(p.get("BypassPolicyLockoutSafetyCheck")))
        external = origin == Origin.EXTERNAL.value
        key = Key(key_id=str(uuid.uuid4()), account_id=caller.account_id, region=self.region,
                  description=p.get("Description") or "", key_spec=spec_name, key_usage=usage,
                  origin=Origin(origin), state=KeyState.PENDING_IMPORT if external else KeyState.ENABLED,
                  created=self.now(), current_version=0 if external else 1, policy=policy)
        with self.store.begin() as tx:
            tx.keys.insert(key)
            if not external:
                sealed, material_id = self.keystore.new_material(key.key_id, 1, spec_name)
                tx.versions.insert(KeyVersion(key.key_id, 1, key.created, material_id, True), sealed)
            for k, v in tags.items():
                tx.tags.put(key.key_id, k, v)
            note_key(key.arn, key.account_id)  # before the commit, so the call's intent names the new key
        self._remember(key)
        return {"KeyMetadata": self.key_metadata(key)}

    def describe_key(self, caller: Caller, p: Params) -> Result:
        return {"KeyMetadata": self.key_metadata(self._authorized(caller, p["KeyId"], "DescribeKey"))}

    def list_keys(self, caller: Caller, p: Params) -> Result:
        self.access.authorize_identity(caller, "ListKeys")
        limit = p.get("Limit") or 100
        after = _decode_marker(p.get("Marker"))
        with self.store.begin() as tx:
            keys = tx.keys.list_ids(caller.account_id, after, limit + 1)
        result: Result = {"Keys": [{"KeyId": k.key_id, "KeyArn": k.arn} for k in keys[:limit]],
                          "Truncated": len(keys) > limit}
        if len(keys) > limit:
            result["NextMarker"] = _encode_marker(keys[limit - 1].key_id)
        return result

    def enable_key(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "EnableKey", allow_alias=False)
        if key.state is KeyState.DISABLED:
            self._save(dataclasses.replace(key, state=KeyState.ENABLED))
        elif key.state is not KeyState.ENABLED:
            raise KMSInvalidStateException(f"{key.arn} is {_state_words(key.state)}.")
        return {}

    def disable_key(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "DisableKey", allow_alias=False)
        if key.state is KeyState.ENABLED:
            self._save(dataclasses.replace(key, state=KeyState.DISABLED))
        elif key.state is not KeyState.DISABLED:
            raise KMSInvalidStateException(f"{key.arn} is {_state_words(key.state)}.")
        return {}

    def schedule_key_deletion(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "ScheduleKeyDeletion", allow_alias=False)
        days = p.get("PendingWindowInDays")
        days = 30 if days is None else days
        if not 7 <= days <= 30:
            raise ValidationException(
                f"1 validation error detected: Value '{days}' at 'pendingWindowInDays' failed to satisfy "
                "constraint: Member must have value between 7 and 30")
        self._check_not_pending_deletion(key)
        deletion = self.now() + timedelta(days=days)
        key = self._save(dataclasses.replace(key, state=KeyState.PENDING_DELETION,
                                             deletion_date=deletion, pending_window_days=days))
        return {"KeyId": key.arn, "DeletionDate": deletion, "KeyState": key.state.value,
                "PendingWindowInDays": days}

    def cancel_key_deletion(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "CancelKeyDeletion", allow_alias=False)
        if key.state is not KeyState.PENDING_DELETION:
            raise KMSInvalidStateException(f"{key.arn} is not pending deletion.")
        key = self._save(dataclasses.replace(key, state=KeyState.DISABLED, deletion_date=None,
                                             pending_window_days=None))
        return {"KeyId": key.arn}

    def update_key_description(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "UpdateKeyDescription", allow_alias=False)
        self._check_not_pending_deletion(key)
        self._save(dataclasses.replace(key, description=p["Description"]))
        return {}

    def purge_due_keys(self) -> list[str]:
        """Really delete every key whose deletion window has ended. Safe to run on many nodes."""
        with self.store.begin() as tx:
            due = tx.keys.due_for_deletion(self.now())
        for key_id in due:
            with self.store.begin() as tx:
                key = tx.keys.get(key_id, for_update=True)
                if key is None or key.state is not KeyState.PENDING_DELETION:
                    continue
                if key.deletion_date is None or key.deletion_date > self.now():
                    continue
                names = tx.aliases.names_for_key(key_id)
                tx.keys.delete(key_id)
            self._keys.pop(key_id)
            for name in names:
                self._forget_alias(key.account_id, name)
            self.keystore.forget(key_id)
        return due

    # -- tags -------------------------------------------------------------------------------
    @staticmethod
    def _checked_tags(tags: list[Mapping[str, str]]) -> dict[str, str]:
        out: dict[str, str] = {}
        for tag in tags:
            k, v = tag["TagKey"], tag["TagValue"]
            if k.lower().startswith("aws:"):
                raise TagException("Tag keys beginning with 'aws:' are reserved.")
            if k in out:
                raise TagException(f"Duplicate tag key {k}.")
            out[k] = v
        return out

    def tag_resource(self, caller: Caller, p: Params) -> Result:
        tags = self._checked_tags(p["Tags"])
        key = self._authorized(caller, p["KeyId"], "TagResource", allow_alias=False, extra=_tag_conditions(tags))
        self._check_not_pending_deletion(key)
        with self.store.begin() as tx:
            existing = dict(tx.tags.list(key.key_id))
            if len(set(existing) | set(tags)) > MAX_TAGS_PER_KEY:
                raise LimitExceededException(f"A key can have at most {MAX_TAGS_PER_KEY} tags.")
            for k, v in tags.items():
                tx.tags.put(key.key_id, k, v)
        self.access.forget_lookups(key.key_id)
        return {}

    def untag_resource(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "UntagResource", allow_alias=False,
                               extra={"aws:TagKeys": list(p["TagKeys"])})
        self._check_not_pending_deletion(key)
        with self.store.begin() as tx:
            for k in p["TagKeys"]:
                tx.tags.remove(key.key_id, k)
        self.access.forget_lookups(key.key_id)
        return {}

    def list_resource_tags(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "ListResourceTags", allow_alias=False)
        limit = p.get("Limit") or 50
        if limit > 50:
            raise ValidationException("Limit must be between 1 and 50.")
        after = _decode_marker(p.get("Marker"))
        with self.store.begin() as tx:
            tags = [(k, v) for k, v in tx.tags.list(key.key_id) if after is None or k > after]
        page = tags[:limit]
        result: Result = {"Tags": [{"TagKey": k, "TagValue": v} for k, v in page],
                          "Truncated": len(tags) > limit}
        if len(tags) > limit:
            result["NextMarker"] = _encode_marker(page[-1][0])
        return result

    # -- aliases ----------------------------------------------------------------------------
    def _check_alias_name(self, name: str) -> None:
        if not ALIAS_NAME_RE.match(name):
            raise InvalidAliasNameException(
                f"Alias name {name} must begin with 'alias/' and contain only letters, digits, /, _ and -.")
        if name == "alias/aws" or name.startswith("alias/aws/"):
            raise InvalidAliasNameException("Alias names beginning with 'alias/aws/' are reserved.")

    def create_alias(self, caller: Caller, p: Params) -> Result:
        name = p["AliasName"]
        self._check_alias_name(name)
        key = self._own_key(caller, self._authorized(caller, p["TargetKeyId"], "CreateAlias", allow_alias=False))
        self._check_not_pending_deletion(key)
        now = self.now()
        with self.store.begin() as tx:
            if tx.aliases.get(caller.account_id, name) is not None:
                raise AlreadyExistsException(
                    f"An alias with the name {alias_arn(self.region, caller.account_id, name)} already exists")
            tx.aliases.insert(Alias(caller.account_id, name, key.key_id, now, now))
        self._forget_alias(caller.account_id, name)
        self.access.forget_lookups(key.key_id)
        return {}

    @staticmethod
    def _own_key(caller: Caller, key: Key) -> Key:
        """Aliases live in one account and point at keys of that account only."""
        if key.account_id != caller.account_id:
            raise NotFoundException(f"Key '{key.arn}' does not exist")
        return key

    def update_alias(self, caller: Caller, p: Params) -> Result:
        name = p["AliasName"]
        self._check_alias_name(name)
        key = self._own_key(caller, self._authorized(caller, p["TargetKeyId"], "UpdateAlias", allow_alias=False))
        self._check_not_pending_deletion(key)
        with self.store.begin() as tx:
            alias = tx.aliases.get(caller.account_id, name)
            if alias is None:
                raise NotFoundException(f"Alias {alias_arn(self.region, caller.account_id, name)} is not found.")
            current = tx.keys.get(alias.target_key_id)
            if current is not None and (current.key_usage is not key.key_usage
                                        or current.key_spec != key.key_spec):
                raise ValidationException(
                    "The new target key must have the same key spec and key usage as the current one.")
            if current is not None:
                self._decide(caller, current, "UpdateAlias")
            tx.aliases.retarget(caller.account_id, name, key.key_id, self.now())
        self._forget_alias(caller.account_id, name)
        self.access.forget_lookups(key.key_id)
        if current is not None:
            self.access.forget_lookups(current.key_id)
        return {}

    def delete_alias(self, caller: Caller, p: Params) -> Result:
        name = p["AliasName"]
        with self.store.begin() as tx:
            alias = tx.aliases.get(caller.account_id, name)
            if alias is None:
                raise NotFoundException(f"Alias {alias_arn(self.region, caller.account_id, name)} is not found.")
            target = tx.keys.get(alias.target_key_id)
        if target is not None:
            self._decide(caller, target, "DeleteAlias")
            self.access.forget_lookups(target.key_id)
        with self.store.begin() as tx:
            tx.aliases.delete(caller.account_id, name)
        self._forget_alias(caller.account_id, name)
        return {}

    def list_aliases(self, caller: Caller, p: Params) -> Result:
        limit = p.get("Limit") or 50
        if limit > 100:
            raise ValidationException("Limit must be between 1 and 100.")
        self.access.authorize_identity(caller, "ListAliases")
        # ListAliases is authorized by identity policies alone (above); the key only filters.
        key_id = (self._own_key(caller, self._find(caller, p["KeyId"], allow_alias=False)[0]).key_id
                  if p.get("KeyId") else None)
        after = _decode_marker(p.get("Marker"))
        with self.store.begin() as tx:
            aliases = tx.aliases.list(caller.account_id, key_id, after, limit + 1)
        result: Result = {
            "Aliases": [{"AliasName": a.name, "AliasArn": alias_arn(self.region, a.account_id, a.name),
                         "TargetKeyId": a.target_key_id, "CreationDate": a.created,
                         "LastUpdatedDate": a.updated} for a in aliases[:limit]],
            "Truncated": len(aliases) > limit}
        if len(aliases) > limit:
            result["NextMarker"] = _encode_marker(aliases[limit - 1].name)
        return result

    # -- cryptographic operations -----------------------------------------------------------
    @staticmethod
    def _dry_run(p: Params) -> None:
        if p.get("DryRun"):
            raise DryRunOperationException()

    @staticmethod
    def _no_recipient(p: Params) -> None:
        if p.get("Recipient"):
            raise UnsupportedOperationException("Recipient (Nitro Enclaves attestation) is not supported.")

    def _encrypt(self, key: Key, plaintext: bytes, context: Mapping[str, str] | None, algorithm: str) -> bytes:
        if key.spec.symmetric:
            return self.keystore.encrypt(key, plaintext, context)
        if context:
            raise ValidationException("EncryptionContext is not supported with asymmetric keys.")
        return self.keystore.rsa_encrypt(key, algorithm, plaintext)

    def _decrypt(self, caller: Caller, ciphertext: bytes, context: Mapping[str, str] | None,
                 key_ref: str | None, algorithm: str | None, action: str) -> tuple[Key, bytes, str]:
        """Decrypt a symmetric blob (it names its key) or an RSA ciphertext (KeyId required)."""
        algorithm = algorithm or "SYMMETRIC_DEFAULT"
        # The KeyId only routes (an RSA ciphertext) or is compared with the blob's key: the decision
        # is made below, on the key that will do the decrypting.
        requested, request_alias = self._find(caller, key_ref) if key_ref is not None else (None, None)
        if requested is not None and not requested.spec.symmetric:
            key = requested
            self._decide(caller, key, action, request_alias=request_alias,
                         extra={"kms:EncryptionAlgorithm": algorithm})
            self._check_for_use(key, KeyUsage.ENCRYPT_DECRYPT, algorithm)
            if context:
                raise ValidationException("EncryptionContext is not supported with asymmetric keys.")
            return key, self.keystore.rsa_decrypt(key, algorithm, ciphertext), algorithm
        header = blob.parse_header(ciphertext)
        if requested is not None and requested.key_id != header.key_id:
            raise IncorrectKeyException(
                "The key ID in the request does not identify a CMK that can perform this operation.")
        key = self._load_key(header.key_id)
        if key is None or not key.spec.symmetric:
            raise InvalidCiphertextException()
        note_key(key.arn, key.account_id)
        self._decide(caller, key, action, request_alias=request_alias if requested is not None else None,
                     encryption_context=context or {}, extra={"kms:EncryptionAlgorithm": algorithm})
        self._check_for_use(key, KeyUsage.ENCRYPT_DECRYPT, algorithm)
        if header.version > key.current_version:
            # Another node may have rotated the key since this node cached it.
            self._keys.pop(key.key_id)
            fresh = self._load_key(key.key_id)
            if fresh is None or header.version > fresh.current_version:
                raise InvalidCiphertextException()
        return key, self.keystore.decrypt(key, header, ciphertext, context), algorithm

    def encrypt(self, caller: Caller, p: Params) -> Result:
        algorithm = p.get("EncryptionAlgorithm") or "SYMMETRIC_DEFAULT"
        key = self._crypto_key(caller, p["KeyId"], "Encrypt", KeyUsage.ENCRYPT_DECRYPT, algorithm,
                               encryption_context=p.get("EncryptionContext") or {})
        self._dry_run(p)
        ciphertext = self._encrypt(key, p["Plaintext"], p.get("EncryptionContext"), algorithm)
        return {"CiphertextBlob": ciphertext, "KeyId": key.arn, "EncryptionAlgorithm": algorithm}

    @staticmethod
    def _require(p: Params, member: str) -> None:
        """For members the model leaves optional but the operation cannot do without."""
        if p.get(member) is None:
            path = member[0].lower() + member[1:]
            raise ValidationException(f"1 validation error detected: Value null at '{path}' failed to satisfy "
                                      "constraint: Member must not be null")

    def decrypt(self, caller: Caller, p: Params) -> Result:
        self._require(p, "CiphertextBlob")
        self._no_recipient(p)
        key, plaintext, algorithm = self._decrypt(caller, p["CiphertextBlob"], p.get("EncryptionContext"),
                                                  p.get("KeyId"), p.get("EncryptionAlgorithm"), "Decrypt")
        self._dry_run(p)
        return {"KeyId": key.arn, "Plaintext": plaintext, "EncryptionAlgorithm": algorithm}

    def re_encrypt(self, caller: Caller, p: Params) -> Result:
        self._require(p, "CiphertextBlob")
        dest_alg = p.get("DestinationEncryptionAlgorithm") or "SYMMETRIC_DEFAULT"
        dest = self._crypto_key(caller, p["DestinationKeyId"], "ReEncryptTo", KeyUsage.ENCRYPT_DECRYPT, dest_alg,
                                encryption_context=p.get("DestinationEncryptionContext") or {})
        source, plaintext, source_alg = self._decrypt(
            caller, p["CiphertextBlob"], p.get("SourceEncryptionContext"), p.get("SourceKeyId"),
            p.get("SourceEncryptionAlgorithm"), "ReEncryptFrom")
        self._dry_run(p)
        ciphertext = self._encrypt(dest, plaintext, p.get("DestinationEncryptionContext"), dest_alg)
        return {"CiphertextBlob": ciphertext, "SourceKeyId": source.arn, "KeyId": dest.arn,
                "SourceEncryptionAlgorithm": source_alg, "DestinationEncryptionAlgorithm": dest_alg}

    @staticmethod
    def _data_key_length(p: Params) -> int:
        nbytes, spec = p.get("NumberOfBytes"), p.get("KeySpec")
        if (nbytes is None) == (spec is None):
            raise ValidationException("Please specify either number of bytes or key spec.")
        return nbytes if nbytes is not None else DATA_KEY_SPECS[spec]

    def generate_data_key(self, caller: Caller, p: Params) -> Result:
        self._no_recipient(p)
        length = self._data_key_length(p)
        key = self._crypto_key(caller, p["KeyId"], "GenerateDataKey", KeyUsage.ENCRYPT_DECRYPT, "SYMMETRIC_DEFAULT",
                               encryption_context=p.get("EncryptionContext") or {})
        self._dry_run(p)
        plaintext = os.urandom(length)
        ciphertext = self._encrypt(key, plaintext, p.get("EncryptionContext"), "SYMMETRIC_DEFAULT")
        return {"CiphertextBlob": ciphertext, "Plaintext": plaintext, "KeyId": key.arn}

    def generate_data_key_without_plaintext(self, caller: Caller, p: Params) -> Result:
        length = self._data_key_length(p)
        key = self._crypto_key(caller, p["KeyId"], "GenerateDataKeyWithoutPlaintext", KeyUsage.ENCRYPT_DECRYPT,
                               "SYMMETRIC_DEFAULT", encryption_context=p.get("EncryptionContext") or {})
        self._dry_run(p)
        ciphertext = self._encrypt(key, os.urandom(length), p.get("EncryptionContext"), "SYMMETRIC_DEFAULT")
        return {"CiphertextBlob": ciphertext, "KeyId": key.arn}

    def generate_random(self, caller: Caller, p: Params) -> Result:
        self._no_recipient(p)
        if p.get("CustomKeyStoreId"):
            raise UnsupportedOperationException("Custom key stores are not supported by this server.")
        self._require(p, "NumberOfBytes")
        self.access.authorize_identity(caller, "GenerateRandom")
        return {"Plaintext": os.urandom(p["NumberOfBytes"])}

    # -- asymmetric and HMAC operations -------------------------------------------------------
    def get_public_key(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "GetPublicKey")
        if key.spec.symmetric or key.key_usage is KeyUsage.GENERATE_VERIFY_MAC:
            raise UnsupportedOperationException(f"{key.arn} is not an asymmetric key; it has no public key.")
        self._check_usable(key)
        return {"KeyId": key.arn, "PublicKey": self.keystore.public_key(key),
                "CustomerMasterKeySpec": key.key_spec, "KeySpec": key.key_spec, "KeyUsage": key.key_usage.value,
                ALGORITHM_FIELDS[key.key_usage]: list(key.spec.allowed(key.key_usage))}

    def sign(self, caller: Caller, p: Params) -> Result:
        algorithm = p["SigningAlgorithm"]
        key = self._crypto_key(caller, p["KeyId"], "Sign", KeyUsage.SIGN_VERIFY, algorithm)
        self._dry_run(p)
        signature = self.keystore.sign(key, algorithm, p["Message"], p.get("MessageType") or "RAW")
        return {"KeyId": key.arn, "Signature": signature, "SigningAlgorithm": algorithm}

    def verify(self, caller: Caller, p: Params) -> Result:
        algorithm = p["SigningAlgorithm"]
        key = self._crypto_key(caller, p["KeyId"], "Verify", KeyUsage.SIGN_VERIFY, algorithm)
        valid = self.keystore.verify(key, algorithm, p["Message"], p.get("MessageType") or "RAW", p["Signature"])
        if not valid:
            raise KMSInvalidSignatureException("The signature is not valid for this message, key and algorithm.")
        self._dry_run(p)
        return {"KeyId": key.arn, "SignatureValid": True, "SigningAlgorithm": algorithm}

    def generate_mac(self, caller: Caller, p: Params) -> Result:
        algorithm = p["MacAlgorithm"]
        key = self._crypto_key(caller, p["KeyId"], "GenerateMac", KeyUsage.GENERATE_VERIFY_MAC, algorithm)
        self._dry_run(p)
        return {"Mac": self.keystore.mac(key, algorithm, p["Message"]), "MacAlgorithm": algorithm, "KeyId": key.arn}

    def verify_mac(self, caller: Caller, p: Params) -> Result:
        algorithm = p["MacAlgorithm"]
        key = self._crypto_key(caller, p["KeyId"], "VerifyMac", KeyUsage.GENERATE_VERIFY_MAC, algorithm)
        if not self.keystore.mac_matches(key, algorithm, p["Message"], p["Mac"]):
            raise KMSInvalidMacException("The MAC is not valid for this message, key and algorithm.")
        self._dry_run(p)
        return {"KeyId": key.arn, "MacValid": True, "MacAlgorithm": algorithm}

    def derive_shared_secret(self, caller: Caller, p: Params) -> Result:
        self._no_recipient(p)
        algorithm = p["KeyAgreementAlgorithm"]
        key = self._crypto_key(caller, p["KeyId"], "DeriveSharedSecret", KeyUsage.KEY_AGREEMENT, algorithm)
        secret = self.keystore.derive_shared_secret(key, p["PublicKey"])
        self._dry_run(p)
        return {"KeyId": key.arn, "SharedSecret": secret, "KeyAgreementAlgorithm": algorithm,
                "KeyOrigin": key.origin.value}

    def _data_key_pair(self, caller: Caller, p: Params, operation: str) -> tuple[Key, bytes, bytes, bytes]:
        pair_spec = p["KeyPairSpec"]
        if pair_spec not in DATA_KEY_PAIR_SPECS:
            raise UnsupportedOperationException(f"KeyPairSpec {pair_spec} is not supported by this server.")
        key = self._crypto_key(caller, p["KeyId"], operation, KeyUsage.ENCRYPT_DECRYPT, "SYMMETRIC_DEFAULT",
                               encryption_context=p.get("EncryptionContext") or {})
        self._dry_run(p)
        private_der, public_der = self.keystore.new_key_pair(pair_spec)
        wrapped = self._encrypt(key, private_der, p.get("EncryptionContext"), "SYMMETRIC_DEFAULT")
        return key, private_der, public_der, wrapped

    def generate_data_key_pair(self, caller: Caller, p: Params) -> Result:
        self._no_recipient(p)
        key, private_der, public_der, wrapped = self._data_key_pair(caller, p, "GenerateDataKeyPair")
        return {"PrivateKeyCiphertextBlob": wrapped, "PrivateKeyPlaintext": private_der, "PublicKey": public_der,
                "KeyId": key.arn, "KeyPairSpec": p["KeyPairSpec"]}

    def generate_data_key_pair_without_plaintext(self, caller: Caller, p: Params) -> Result:
        key, _, public_der, wrapped = self._data_key_pair(caller, p, "GenerateDataKeyPairWithoutPlaintext")
        return {"PrivateKeyCiphertextBlob": wrapped, "PublicKey": public_der, "KeyId": key.arn,
                "KeyPairSpec": p["KeyPairSpec"]}

    def get_key_last_usage(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "GetKeyLastUsage", allow_alias=False)
        last = self.usage.last(key.key_id) if self.usage is not None else None
        return {"KeyId": key.key_id, "KeyLastUsage": last or {}, "TrackingStartDate": key.created,
                "KeyCreationDate": key.created}

    # -- rotation -----------------------------------------------------------------------------
    def _rotatable(self, caller: Caller, key_ref: str, action: str) -> Key:
        key = self._authorized(caller, key_ref, action, allow_alias=False)
        if not key.spec.symmetric:
            raise UnsupportedOperationException(f"{key.arn} is not a symmetric encryption key; it cannot rotate.")
        self._check_not_pending_deletion(key)
        return key

    def enable_key_rotation(self, caller: Caller, p: Params) -> Result:
        key = self._rotatable(caller, p["KeyId"], "EnableKeyRotation")
        if key.origin is Origin.EXTERNAL:
            raise UnsupportedOperationException(
                f"{key.arn} has imported key material: automatic rotation is not available; "
                "import new material and use RotateKeyOnDemand.")
        self._check_usable(key)
        period = p.get("RotationPeriodInDays") or 365
        self._save(dataclasses.replace(key, rotation_period_days=period,
                                       next_rotation=self.now() + timedelta(days=period)))
        return {}

    def disable_key_rotation(self, caller: Caller, p: Params) -> Result:
        key = self._rotatable(caller, p["KeyId"], "DisableKeyRotation")
        if key.state is KeyState.DISABLED:
            raise DisabledException(f"{key.arn} is disabled.")
        self._save(dataclasses.replace(key, rotation_period_days=None, next_rotation=None))
        return {}

    def get_key_rotation_status(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "GetKeyRotationStatus")
        if not key.spec.symmetric:
            raise UnsupportedOperationException(f"{key.arn} is not a symmetric encryption key; it cannot rotate.")
        result: Result = {"KeyId": key.arn, "KeyRotationEnabled": key.rotation_period_days is not None}
        if key.rotation_period_days is not None:
            result["RotationPeriodInDays"] = key.rotation_period_days
            result["NextRotationDate"] = key.next_rotation
        return result

    def rotate_key_on_demand(self, caller: Caller, p: Params) -> Result:
        key = self._rotatable(caller, p["KeyId"], "RotateKeyOnDemand")
        self._check_usable(key)
        with self.store.begin() as tx:
            key = tx.keys.get(key.key_id, for_update=True) or key
            versions = tx.versions.list(key.key_id)
            if sum(v.rotation_type == "ON_DEMAND" for v in versions) >= MAX_ON_DEMAND_ROTATIONS:
                raise LimitExceededException(
                    f"{key.arn} has had {MAX_ON_DEMAND_ROTATIONS} on-demand rotations, the most allowed.")
            key = self._add_version(tx, key, versions, "ON_DEMAND")
        self._remember(key)
        return {"KeyId": key.key_id}

    def _add_version(self, tx: Any, key: Key, versions: list[KeyVersion], rotation_type: str) -> Key:
        """Make a new version current, inside the caller's transaction; returns the updated key."""
        now = self.now()
        if key.origin is Origin.EXTERNAL:
            pending = [v for v in versions if v.version > key.current_version and v.has_material]
            if not pending:
                raise KMSInvalidStateException(
                    f"{key.arn} has no new key material to rotate to: import it with ImportType NEW_KEY_MATERIAL.")
            new = pending[0]
            tx.versions.set_rotation(key.key_id, new.version, rotation_type, now)
            return self._write_key(tx, dataclasses.replace(
                key, current_version=new.version, valid_to=new.valid_to, expiration_model=new.expiration_model))
        version = max((v.version for v in versions), default=0) + 1
        sealed, material_id = self.keystore.new_material(key.key_id, version, key.key_spec)
        tx.versions.insert(KeyVersion(key.key_id, version, now, material_id, True, rotation_type=rotation_type),
                           sealed)
        return self._write_key(tx, dataclasses.replace(key, current_version=version))

    @staticmethod
    def _write_key(tx: Any, key: Key) -> Key:
        tx.keys.update(key)
        return key

    def list_key_rotations(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "ListKeyRotations", allow_alias=False)
        if not key.spec.symmetric:
            raise UnsupportedOperationException(f"{key.arn} is not a symmetric encryption key; it cannot rotate.")
        limit = p.get("Limit") or 100
        after = _decode_marker(p.get("Marker"))
        start = int(after) if after and after.isdigit() else 0
        with self.store.begin() as tx:
            versions = tx.versions.list(key.key_id)
        if p.get("IncludeKeyMaterial") != "ALL_KEY_MATERIAL":
            versions = [v for v in versions if v.rotation_type is not None]
        versions = [v for v in versions if v.version > start]
        page = versions[:limit]
        entries = []
        for v in page:
            entry: Result = {"KeyId": key.key_id, "KeyMaterialId": v.material_id,
                             "KeyMaterialState": ("CURRENT" if v.version == key.current_version else
                                                  "PENDING_ROTATION" if v.version > key.current_version else
                                                  "NON_CURRENT")}
            if v.rotation_type is not None:
                entry["RotationType"] = v.rotation_type
                entry["RotationDate"] = v.rotated or v.created
            if key.origin is Origin.EXTERNAL:
                entry["ImportState"] = v.import_state
                entry["ExpirationModel"] = v.expiration_model
                entry["ValidTo"] = v.valid_to
                entry["KeyMaterialDescription"] = v.description
            entries.append(entry)
        result: Result = {"Rotations": entries, "Truncated": len(versions) > limit}
        if len(versions) > limit:
            result["NextMarker"] = _encode_marker(str(page[-1].version))
        return result

    def rotate_due_keys(self) -> list[str]:
        """Rotate every key whose automatic rotation is due. Each due key is rotated once, by one
        node: the rows are locked for the transaction and other nodes skip locked rows."""
        now = self.now()
        rotated: list[Key] = []
        with self.store.begin() as tx:
            for key in tx.keys.due_for_rotation(now):
                period = timedelta(days=key.rotation_period_days or 365)
                next_rotation = (key.next_rotation or now) + period
                if next_rotation <= now:  # the node was down for a whole period: rotate once
                    next_rotation = now + period
                if key.state is KeyState.ENABLED and key.origin is Origin.AWS_KMS:
                    key = self._add_version(tx, key, tx.versions.list(key.key_id), "AUTOMATIC")
                    rotated.append(key)
                # Disabled keys and keys pending deletion do not rotate; their schedule moves on.
                tx.keys.update(dataclasses.replace(key, next_rotation=next_rotation))
        for key in rotated:
            self._keys.pop(key.key_id)
        return [k.key_id for k in rotated]

    # -- BYOK: import of key material ----------------------------------------------------------
    def _importable(self, caller: Caller, key_ref: str, action: str) -> Key:
        key = self._authorized(caller, key_ref, action, allow_alias=False)
        if key.origin is not Origin.EXTERNAL:
            raise UnsupportedOperationException(f"{key.arn} was not created with Origin EXTERNAL.")
        self._check_not_pending_deletion(key)
        return key

    def get_parameters_for_import(self, caller: Caller, p: Params) -> Result:
        key = self._importable(caller, p["KeyId"], "GetParametersForImport")
        wrap.check_supported(p["WrappingKeySpec"], p["WrappingAlgorithm"])
        valid_to = self.now() + IMPORT_PARAMETERS_VALID
        token = self.keystore.new_import_token(key.key_id, valid_to)
        token_id = hashlib.sha256(token).hexdigest()
        public_der, sealed_private = self.keystore.new_wrapping_key(token_id, p["WrappingKeySpec"])
        with self.store.begin() as tx:
            tx.import_tokens.insert(token_id, key.key_id, p["WrappingAlgorithm"], p["WrappingKeySpec"],
                                    sealed_private, valid_to)
        return {"KeyId": key.arn, "ImportToken": token, "PublicKey": public_der, "ParametersValidTo": valid_to}

    def import_key_material(self, caller: Caller, p: Params) -> Result:
        key = self._importable(caller, p["KeyId"], "ImportKeyMaterial")
        token_id = hashlib.sha256(p["ImportToken"]).hexdigest()
        with self.store.begin() as tx:
            token = tx.import_tokens.get(token_id)
        if token is None:
            # Purged once expired; the token itself still says when it expired, if it is ours.
            expiry = self.keystore.import_token_expiry(key.key_id, p["ImportToken"])
            if expiry is not None and expiry <= self.now():
                raise ExpiredImportTokenException("The import token has expired; call GetParametersForImport again.")
            raise InvalidImportTokenException("The import token is not valid for this key.")
        if token.key_id != key.key_id:
            raise InvalidImportTokenException("The import token is not valid for this key.")
        if token.valid_to <= self.now().timestamp():
            raise ExpiredImportTokenException("The import token has expired; call GetParametersForImport again.")
        material = self.keystore.unwrap_import(token_id, bytes(token.sealed_private_key), token.wrapping_algorithm,
                                               p["EncryptedKeyMaterial"])
        wrap.check_material(key.key_spec, material)
        model, valid_to = self._expiration(p)
        material_id = wrap.material_id(key.key_id, material)
        if p.get("KeyMaterialId") and p["KeyMaterialId"] != material_id:
            raise IncorrectKeyMaterialException("The key material is not the material KeyMaterialId names.")
        with self.store.begin() as tx:
            key = tx.keys.get(key.key_id, for_update=True) or key
            versions = tx.versions.list(key.key_id)
            same = next((v for v in versions if v.material_id == material_id), None)
            import_type = p.get("ImportType") or "EXISTING_KEY_MATERIAL"
            if not versions:  # first import: version 1 becomes current
                sealed = self.keystore.seal_material(key.key_id, 1, material)
                tx.versions.insert(KeyVersion(key.key_id, 1, self.now(), material_id, True, import_state="IMPORTED",
                                              valid_to=valid_to, expiration_model=model,
                                              description=p.get("KeyMaterialDescription")), sealed)
                key = dataclasses.replace(key, current_version=1)
                version = 1
            elif import_type == "EXISTING_KEY_MATERIAL":
                if same is None:
                    raise IncorrectKeyMaterialException(
                        "The key material is not the material that was imported into this key before.")
                version = same.version
                tx.versions.set_material(key.key_id, version, self.keystore.seal_material(key.key_id, version, material),
                                         "IMPORTED", valid_to, model)
            else:
                if not key.spec.symmetric:
                    raise UnsupportedOperationException("Only symmetric keys can take new key material.")
                if same is not None:
                    raise IncorrectKeyMaterialException("That key material was already imported into this key.")
                if any(v.version > key.current_version for v in versions):
                    raise KMSInvalidStateException(
                        f"{key.arn} already has new key material waiting for RotateKeyOnDemand.")
                version = max(v.version for v in versions) + 1
                tx.versions.insert(KeyVersion(key.key_id, version, self.now(), material_id, True,
                                              import_state="IMPORTED", valid_to=valid_to, expiration_model=model,
                                              description=p.get("KeyMaterialDescription")),
                                   self.keystore.seal_material(key.key_id, version, material))
            if version == key.current_version:
                state = KeyState.ENABLED if key.state is KeyState.PENDING_IMPORT else key.state
                key = dataclasses.replace(key, state=state, valid_to=valid_to, expiration_model=model)
            tx.keys.update(key)
        self.keystore.forget(key.key_id, version)
        self._remember(key)
        return {"KeyId": key.arn, "KeyMaterialId": material_id}

    def _expiration(self, p: Params) -> tuple[str, datetime | None]:
        model, valid_to = p.get("ExpirationModel"), p.get("ValidTo")
        if model is None:
            model = "KEY_MATERIAL_EXPIRES" if valid_to is not None else "KEY_MATERIAL_DOES_NOT_EXPIRE"
        if model == "KEY_MATERIAL_DOES_NOT_EXPIRE":
            if valid_to is not None:
                raise ValidationException("ValidTo is not allowed with ExpirationModel KEY_MATERIAL_DOES_NOT_EXPIRE.")
            return model, None
        if valid_to is None:
            raise ValidationException("ValidTo is required with ExpirationModel KEY_MATERIAL_EXPIRES.")
        now = self.now()
        if valid_to <= now or valid_to > now + MAX_IMPORT_VALIDITY:
            raise ValidationException("ValidTo must be in the future and at most 365 days away.")
        return model, valid_to

    def delete_imported_key_material(self, caller: Caller, p: Params) -> Result:
        key = self._importable(caller, p["KeyId"], "DeleteImportedKeyMaterial")
        with self.store.begin() as tx:
            versions = tx.versions.list(key.key_id)
            target = p.get("KeyMaterialId")
            chosen = [v for v in versions if target is None or v.material_id == target]
            if target is not None and not chosen:
                raise NotFoundException(f"{key.arn} has no key material {target}.")
            for v in chosen:
                tx.versions.drop_material(key.key_id, v.version)
            if any(v.version == key.current_version for v in chosen):
                key = dataclasses.replace(key, state=KeyState.PENDING_IMPORT, valid_to=None)
                tx.keys.update(key)
        self.keystore.forget(key.key_id)
        self._remember(key)
        result: Result = {"KeyId": key.arn}
        if target is not None:
            result["KeyMaterialId"] = target
        return result

    def expire_imported_material(self) -> list[str]:
        """Delete imported material whose ValidTo has passed; its key goes to PendingImport."""
        now = self.now()
        with self.store.begin() as tx:
            due = tx.keys.material_expired(now)
        for key_id in due:
            with self.store.begin() as tx:
                key = tx.keys.get(key_id, for_update=True)
                if key is None or key.valid_to is None or key.valid_to > now:
                    continue
                tx.versions.drop_material(key_id, key.current_version)
                key = dataclasses.replace(key, state=KeyState.PENDING_IMPORT, valid_to=None)
                tx.keys.update(key)
            self.keystore.forget(key_id)
            self._keys.pop(key_id)
        return due

    def run_scheduled_work(self) -> dict[str, list[str]]:
        """What the background scheduler does on each run, on every node."""
        done = {"deleted": self.purge_due_keys(), "rotated": self.rotate_due_keys(),
                "expired": self.expire_imported_material()}
        with self.store.begin() as tx:
            tx.import_tokens.delete_expired(self.now())
        return done

    # -- key policies -------------------------------------------------------------------------
    def _checked_policy(self, caller: Caller, text: str | None, bypass: bool, key_arn: str = "") -> str | None:
        """Parse a new key policy (MalformedPolicyDocumentException if it is not one) and refuse one
        that would lock the caller out of PutKeyPolicy, unless the caller bypasses that check."""
        if text is None:
            return None
        compiled = parse_key_policy(text)
        if not bypass and would_lock_out(compiled, principal_arn(caller), caller.account_id, key_arn=key_arn):
            raise MalformedPolicyDocumentException(
                "The new key policy will not allow you to update the key policy in the future.")
        return text

    def get_key_policy(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "GetKeyPolicy", allow_alias=False)
        name = p.get("PolicyName") or "default"
        if name != "default":
            raise NotFoundException(f"No such policy exists: {name}")
        return {"Policy": key.policy or default_key_policy(key.account_id), "PolicyName": "default"}

    def put_key_policy(self, caller: Caller, p: Params) -> Result:
        bypass = bool(p.get("BypassPolicyLockoutSafetyCheck"))
        key = self._authorized(caller, p["KeyId"], "PutKeyPolicy", allow_alias=False,
                            extra={"kms:BypassPolicyLockoutSafetyCheck": bypass})
        if (p.get("PolicyName") or "default") != "default":
            raise NotFoundException(f"No such policy exists: {p['PolicyName']}")
        self._check_not_pending_deletion(key)
        self._save(dataclasses.replace(key, policy=self._checked_policy(caller, p["Policy"], bypass, key.arn)))
        return {}

    def list_key_policies(self, caller: Caller, p: Params) -> Result:
        self._authorized(caller, p["KeyId"], "ListKeyPolicies", allow_alias=False)
        return {"PolicyNames": ["default"], "Truncated": False}

    # -- grants -------------------------------------------------------------------------------
    def create_grant(self, caller: Caller, p: Params) -> Result:
        self._require(p, "GranteePrincipal")  # newer models also allow a service principal instead
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
        # `new_grant`: a caller whose CreateGrant permission comes from a grant may only create
        # grants at least as narrow as that grant (AWS's rule); the decision checks it.
        key = self._authorized(caller, p["KeyId"], "CreateGrant", allow_alias=False, extra=extra, new_grant=grant)
        self._check_not_pending_deletion(key)
        self._dry_run(p)
        token = base64.urlsafe_b64encode(os.urandom(48)).decode()
        name = p.get("Name")
        with self.store.begin() as tx:
            if name:
                for row in tx.grants.by_name(key.key_id, name):
                    same = grant_from_row(row, key.arn)
                    if (same.grantee_principal, same.operations, same.retiring_principal,
                            same.encryption_context_subset, same.encryption_context_equals) == (
                            grant.grantee_principal, grant.operations, grant.retiring_principal,
                            grant.encryption_context_subset, grant.encryption_context_equals):
                        # Idempotent retry: the same grant, as AWS answers for a repeated Name.
                        return {"GrantToken": token, "GrantId": row.grant_id}
            grant_id = os.urandom(32).hex()
            tx.grants.insert({"grant_id": grant_id, "key_id": key.key_id, "name": name, "grantee_principal": grantee,
                              "retiring_principal": retiring, "issuing_account": root_arn(caller.account_id),
                              "operations": orjson.dumps(operations).decode(),
                              "constraints": orjson.dumps(constraints).decode() if constraints else None,
                              "token_hash": hashlib.sha256(token.encode()).hexdigest(),
                              "created": self.now().timestamp()})
        self.access.forget_grants(key.key_id)
        return {"GrantToken": token, "GrantId": grant_id}

    def _grant_entry(self, row: Any, key_arn: str) -> Result:
        entry: Result = {"KeyId": key_arn, "GrantId": row.grant_id, "CreationDate": datetime.fromtimestamp(row.created, UTC),
                         "GranteePrincipal": row.grantee_principal, "IssuingAccount": row.issuing_account,
                         "Operations": orjson.loads(row.operations)}
        if row.name:
            entry["Name"] = row.name
        if row.retiring_principal:
            entry["RetiringPrincipal"] = row.retiring_principal
        if row.constraints:
            entry["Constraints"] = orjson.loads(row.constraints)
        return entry

    def list_grants(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "ListGrants", allow_alias=False)
        limit = p.get("Limit") or 50
        after = _decode_marker(p.get("Marker"))
        with self.store.begin() as tx:
            rows = [r for r in tx.grants.for_key(key.key_id)
                    if (p.get("GrantId") is None or r.grant_id == p["GrantId"])
                    and (p.get("GranteePrincipal") is None or r.grantee_principal == p["GranteePrincipal"])]
        if after is not None:
            rows = [r for r in rows if r.grant_id > after]
        rows.sort(key=lambda r: r.grant_id)
        result: Result = {"Grants": [self._grant_entry(r, key.arn) for r in rows[:limit]], "Truncated": len(rows) > limit}
        if len(rows) > limit:
            result["NextMarker"] = _encode_marker(rows[limit - 1].grant_id)
        return result

    def list_retirable_grants(self, caller: Caller, p: Params) -> Result:
        self._require(p, "RetiringPrincipal")
        self.access.authorize_identity(caller, "ListRetirableGrants")
        limit = p.get("Limit") or 50
        with self.store.begin() as tx:
            rows = tx.grants.retirable_by(p["RetiringPrincipal"], _decode_marker(p.get("Marker")), limit + 1)
            arns = {}
            for r in rows:
                k = tx.keys.get(r.key_id)
                arns[r.key_id] = k.arn if k else r.key_id
        result: Result = {"Grants": [self._grant_entry(r, arns[r.key_id]) for r in rows[:limit]],
                          "Truncated": len(rows) > limit}
        if len(rows) > limit:
            result["NextMarker"] = _encode_marker(rows[limit - 1].grant_id)
        return result

    def retire_grant(self, caller: Caller, p: Params) -> Result:
        """By the grant's retiring principal, by its grantee if the grant allows RetireGrant, or by
        the key's account: by grant token, or by key ARN and grant id."""
        with self.store.begin() as tx:
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
        me = {caller.principal.arn, principal_arn(caller)}
        operations = orjson.loads(row.operations)
        allowed = (row.retiring_principal in me or (row.grantee_principal in me and "RetireGrant" in operations)
                   or (caller.principal.is_admin and caller.account_id == key.account_id))
        if not allowed:
            raise AccessDeniedException(
                f"User: {caller.principal.arn} is not authorized to perform: kms:RetireGrant on resource: {key.arn} "
                "because it is neither the grant's retiring principal nor its grantee")
        note_key(key.arn, key.account_id)
        self._dry_run(p)
        with self.store.begin() as tx:
            tx.grants.delete(row.grant_id)
        self.access.forget_grants(key.key_id)
        return {}

    def revoke_grant(self, caller: Caller, p: Params) -> Result:
        key = self._authorized(caller, p["KeyId"], "RevokeGrant", allow_alias=False)
        self._dry_run(p)
        with self.store.begin() as tx:
            row = tx.grants.get(p["GrantId"])
            if row is None or row.key_id != key.key_id:
                raise NotFoundException(f"Grant {p['GrantId']} does not exist for {key.arn}.")
            tx.grants.delete(row.grant_id)
        self.access.forget_grants(key.key_id)
        return {}


def _tag_conditions(tags: Mapping[str, str]) -> dict[str, Any]:
    conditions: dict[str, Any] = {f"aws:RequestTag/{k}": v for k, v in tags.items()}
    if tags:
        conditions["aws:TagKeys"] = list(tags)
    return conditions


def _state_words(state: KeyState) -> str:
    return {
        KeyState.PENDING_DELETION: "pending deletion",
        KeyState.PENDING_IMPORT: "pending import",
        KeyState.DISABLED: "disabled",
        KeyState.UNAVAILABLE: "unavailable",
        KeyState.ENABLED: "enabled",
    }[state]
