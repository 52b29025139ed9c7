"""The Secrets Manager API's operations, as AWS defines them, and the table the API dispatches from.

Each operation is a plain function `(ctx, caller, params) -> result` over the KMS service's Context
(the store, the key lookup, access control, the clock), like the KMS operations: authorize
(`secretsmanager:<Operation>`: identity policies and the secret's resource policy, by IAM's rules)
-> find the secret -> check its state -> seal or open values through KMS (sealing.py) -> result.

Versions and staging labels follow AWS: a label is on at most one version; AWSCURRENT moving to a
version moves AWSPREVIOUS to the version that lost it; a version with no label is deprecated.
ClientRequestToken makes a new version idempotent: the same token with the same value is no new
version, with another value ResourceExistsException. A secret marked for deletion refuses all but
DescribeSecret, ListSecrets, RestoreSecret and DeleteSecret (with ForceDeleteWithoutRecovery).
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import secrets as random
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from ..errors import (
    AccessDeniedException,
    AlreadyExistsException,
    InvalidNextTokenException,
    InvalidParameterException,
    InvalidRequestException,
    KMSError,
    LimitExceededException,
    MalformedPolicyDocumentException,
    PublicPolicyException,
    ResourceExistsException,
    ResourceNotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from ..model import Caller, Secret, SecretVersion
from ..policy import parse_key_policy
from ..service import Context, Op, Params, Result
from ..storage import Tx
from . import names, rotation, schedule, sealing
from .cache import Snapshot

CURRENT, PREVIOUS, PENDING = "AWSCURRENT", "AWSPREVIOUS", "AWSPENDING"
MAX_VALUE_BYTES = 65536
MAX_VERSIONS = 100  # kept past this: labelled versions, and those younger than a day
MAX_TAGS = 50
MAX_STAGES_PER_VERSION = 20
MAX_POLICY_CHARS = 20480
MAX_BATCH = 20
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
MARKED = "You can't perform this operation on the secret because it was marked for deletion."


# -- finding and authorizing --------------------------------------------------------------------------
def _authorize(ctx: Context, caller: Caller, action: str, secret: Secret | None, resource_arn: str | None = None,
               extra: dict[str, Any] | None = None, tags: tuple[tuple[str, str], ...] | None = None,
               resource_account: str | None = None) -> None:
    context: dict[str, Any] = dict(extra or {})
    if secret is not None:
        context["secretsmanager:SecretId"] = secret.arn
        if tags is None:
            with ctx.store.begin() as tx:
                tags = tuple(tx.secrets.tags(secret.secret_id))
        for k, v in tags:
            context[f"aws:ResourceTag/{k}"] = v
            context[f"secretsmanager:ResourceTag/{k}"] = v
    arn = secret.arn if secret is not None else resource_arn or "*"
    account = secret.account_id if secret is not None else resource_account or caller.account_id
    try:
        ctx.access.authorize_resource(caller, f"secretsmanager:{action}", arn, account,
                                      secret.policy if secret is not None else None, context)
    except AccessDeniedException as exc:
        if secret is not None and account != caller.account_id:
            # Another account's caller learns nothing it did not send: not the ARN's random suffix.
            raise AccessDeniedException(exc.message.replace(secret.arn, arn.rsplit("-", 1)[0])) from None
        raise


def _load(ctx: Context, account_id: str, secret_id: str, cached: bool = False) -> Snapshot | None:
    """The secret `secret_id` names for a caller of `account_id`, with its tags, labels and
    versions, read in one transaction; with `cached` (reads only) maybe from this node's cache
    (secrets/cache.py), which another node's write reaches at once on PostgreSQL (storage/notify.py)."""
    cache = ctx.secrets_cache if cached else None
    if cache is not None:
        hit = cache.get(account_id, secret_id)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
    read_at = time.monotonic()
    with ctx.store.begin() as tx:
        secret = names.find(tx, account_id, secret_id)
        if secret is None:
            return None
        snapshot = Snapshot(secret, tuple(tx.secrets.tags(secret.secret_id)), tx.secrets.stages(secret.secret_id),
                            {v.version_id: v for v in tx.secrets.versions(secret.secret_id)})
    if ctx.secrets_cache is not None:
        ctx.secrets_cache.put(account_id, secret_id, snapshot, read_at)
    return snapshot


def _secret(ctx: Context, caller: Caller, p: Params, action: str, *, marked_ok: bool = False,
            extra: dict[str, Any] | None = None) -> Secret:
    """The secret SecretId names, if the caller may `action` it. One the caller may not see is
    AccessDeniedException, never ResourceNotFoundException (no probing for names)."""
    return _snapshot(ctx, caller, p, action, marked_ok=marked_ok, extra=extra).secret


def _snapshot(ctx: Context, caller: Caller, p: Params, action: str, *, marked_ok: bool = False,
              extra: dict[str, Any] | None = None, cached: bool = False) -> Snapshot:
    """`_secret`, with what was read of it (for the reads of values; `cached`: see _load)."""
    secret_id = p["SecretId"]
    snapshot = _load(ctx, caller.account_id, secret_id, cached)
    if snapshot is None:
        account = names.account_of(secret_id, caller.account_id)
        found = names.ARN_RE.match(secret_id)
        name = found.group(3) if found is not None else secret_id
        # Authorized as on a secret of the account the SecretId names: another account's caller
        # cannot tell a name that does not exist there from one it may not see.
        _authorize(ctx, caller, action, None, names.partial_arn(ctx.region, account, name), extra,
                   resource_account=account)
        raise ResourceNotFoundException("Secrets Manager can't find the specified secret.")
    secret = snapshot.secret
    _authorize(ctx, caller, action, secret, extra=extra, tags=snapshot.tags)
    if secret.deletion_date is not None and not marked_ok:
        raise InvalidRequestException(MARKED)
    return snapshot


def _touch(ctx: Context, secret: Secret, **values: Any) -> None:
    with ctx.store.begin() as tx:
        tx.secrets.update(secret.secret_id, last_changed=ctx.now(), **values)


def _optional(key: str, value: Any) -> dict[str, Any]:
    """A condition key of the request, when the request gives it."""
    return {key: value} if value is not None else {}


def _day(moment: datetime) -> datetime:
    """LastAccessedDate: the day only, as AWS reports it."""
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


# -- values -----------------------------------------------------------------------------------------
def _value_of(p: Params, required: bool) -> tuple[str, bytes] | None:
    string, binary = p.get("SecretString"), p.get("SecretBinary")
    if string is not None and binary is not None:
        raise InvalidParameterException("You can't specify both a binary secret value and a string secret value "
                                        "in the same secret.")
    if string is None and binary is None:
        if required:
            raise InvalidRequestException("You must provide either SecretString or SecretBinary.")
        return None
    value = ("string", string.encode("utf-8", "surrogatepass")) if string is not None else \
        ("binary", bytes(binary or b""))
    if len(value[1]) > MAX_VALUE_BYTES:
        raise InvalidParameterException(f"The secret value is larger than {MAX_VALUE_BYTES} bytes.")
    return value


def _token(p: Params) -> str:
    token = p.get("ClientRequestToken")
    if not token:  # the SDKs and the CLI fill it in; a raw request must give it
        raise InvalidRequestException("You must provide a ClientRequestToken value. We recommend a UUID-type value.")
    return str(token)


def _new_version(ctx: Context, caller: Caller, secret: Secret, token: str, value: tuple[str, bytes],
                 stages: list[str], key_id: str | None = None,
                 changes: dict[str, Any] | None = None) -> tuple[str, bool]:
    """Add a version (or find the same one again: idempotency); (version id, whether it is new).
    `changes` (columns of the secret) are written with the version, or not at all."""
    with ctx.store.begin() as tx:
        existing = tx.secrets.version(secret.secret_id, token)
    if existing is not None and existing.kind is None:
        # The version a rotation made for its new value (AWSPENDING, no value yet): filled in once.
        filled = sealing.seal(ctx, caller, secret, token, value[0], value[1], key_id)
        with ctx.store.begin() as tx:
            _lock(tx, secret.secret_id)
            again = tx.secrets.version(secret.secret_id, token)
            if again is None or again.kind is not None or tx.secrets.stages(secret.secret_id).get(PENDING) != token:
                # Filled meanwhile, or abandoned (its AWSPENDING removed): versions are never modified.
                raise ResourceExistsException("You can't modify an existing version, you can only create a new "
                                              "version.")
            tx.secrets.update_version(secret.secret_id, token, kind=filled.kind, key_arn=filled.key_arn,
                                      encrypted_data_key=filled.encrypted_data_key, sealed_value=filled.sealed_value)
            for stage in stages:
                _move_stage(tx, secret.secret_id, stage, token)
            tx.secrets.update(secret.secret_id, last_changed=ctx.now(), **(changes or {}))
        return token, True
    if existing is not None:
        if existing.kind != value[0] or existing.sealed_value is None or \
                sealing.open_value(ctx, caller, secret, existing) != value[1]:
            raise ResourceExistsException("You can't modify an existing version, you can only create a new version.")
        if changes:
            _touch(ctx, secret, **changes)
        return token, False
    version = sealing.seal(ctx, caller, secret, token, value[0], value[1], key_id)
    try:
        with ctx.store.begin() as tx:
            _lock(tx, secret.secret_id)
            tx.secrets.add_version(version)
            for stage in stages:
                _move_stage(tx, secret.secret_id, stage, token)
            tx.secrets.update(secret.secret_id, last_changed=ctx.now(), **(changes or {}))
            _prune(tx, secret.secret_id, ctx.now())
    except AlreadyExistsException:
        raise ResourceExistsException("A version with this ClientRequestToken already exists.") from None
    return token, True


def _lock(tx: Tx, secret_id: str) -> None:
    """Writers of one secret's versions and labels take turns (the row's lock, on PostgreSQL)."""
    if tx.secrets.get(secret_id, for_update=True) is None:
        raise ResourceNotFoundException("Secrets Manager can't find the specified secret.")


def _prune(tx: Tx, secret_id: str, now: datetime) -> None:
    """AWS's rule: past MAX_VERSIONS versions, deprecated ones (no label) older than a day go,
    oldest first."""
    versions = tx.secrets.versions(secret_id)
    if len(versions) <= MAX_VERSIONS:
        return
    labelled = set(tx.secrets.stages(secret_id).values())
    extra = len(versions) - MAX_VERSIONS
    for version in versions:  # oldest first
        if extra <= 0:
            break
        if version.version_id not in labelled and version.created < now - timedelta(days=1):
            tx.secrets.delete_version(secret_id, version.version_id)
            extra -= 1


def _move_stage(tx: Tx, secret_id: str, stage: str, version_id: str) -> None:
    """Put `stage` on `version_id`; AWSCURRENT takes AWSPREVIOUS with it to the version it leaves."""
    stages = tx.secrets.stages(secret_id)
    before = stages.get(stage)
    if before == version_id:
        return
    if stage == CURRENT and before is not None:
        tx.secrets.set_stage(secret_id, PREVIOUS, before)
    tx.secrets.set_stage(secret_id, stage, version_id)


def _versions_to_stages(tx: Tx, secret_id: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for stage, version_id in sorted(tx.secrets.stages(secret_id).items()):
        out.setdefault(version_id, []).append(stage)
    return out


def _check_stages(stages: list[str] | None) -> list[str]:
    stages = list(stages) if stages else [CURRENT]
    if len(stages) > MAX_STAGES_PER_VERSION:
        raise LimitExceededException(f"A version can have at most {MAX_STAGES_PER_VERSION} staging labels.")
    return stages


# -- tags -------------------------------------------------------------------------------------------
def _checked_tags(tags: list[dict[str, str]] | None) -> list[tuple[str, str]]:
    out = []
    for tag in tags or []:
        key, value = tag.get("Key"), tag.get("Value", "")
        if not key:
            raise InvalidParameterException("A tag key can't be empty.")
        if key.lower().startswith("aws:"):
            raise InvalidParameterException("Tag keys that begin with aws: are reserved.")
        out.append((key, value or ""))
    return out


def _request_tag_context(tags: list[tuple[str, str]]) -> dict[str, Any]:
    context: dict[str, Any] = {f"aws:RequestTag/{k}": v for k, v in tags}
    if tags:
        context["aws:TagKeys"] = [k for k, _ in tags]
    return context


# -- the operations ---------------------------------------------------------------------------------
def create_secret(ctx: Context, caller: Caller, p: Params) -> Result:
    name = p["Name"]
    if not names.NAME_RE.match(name):
        raise InvalidParameterException("Invalid name. Must be a valid name containing alphanumeric characters, or "
                                        "any of the following: -/_+=.@!")
    if p.get("AddReplicaRegions"):
        raise UnsupportedOperationException("Replicating secrets to other Regions is not supported by this server.")
    value = _value_of(p, required=False)
    token = _token(p) if value is not None else (p.get("ClientRequestToken") or str(uuid.uuid4()))
    tags = _checked_tags(p.get("Tags"))
    if len(tags) > MAX_TAGS:
        raise LimitExceededException(f"A secret can have at most {MAX_TAGS} tags.")
    arn = names.partial_arn(ctx.region, caller.account_id, name)
    context = {**_request_tag_context(tags), "secretsmanager:Name": name,
               **_optional("secretsmanager:Description", p.get("Description")),
               **_optional("secretsmanager:KmsKeyId", p.get("KmsKeyId"))}
    _authorize(ctx, caller, "CreateSecret", None, arn, context)
    if tags:  # tags given at creation need the right to tag, as in AWS
        _authorize(ctx, caller, "TagResource", None, arn, _request_tag_context(tags))
    now = ctx.now()
    with ctx.store.begin() as tx:
        existing = tx.secrets.by_name(caller.account_id, name)
    if existing is not None:
        if existing.deletion_date is not None:
            raise InvalidRequestException("You can't create this secret because a secret with this name is already "
                                          "scheduled for deletion.")
        # A retry of the same CreateSecret (same token, same value) succeeds again, as in AWS.
        if value is not None:
            with ctx.store.begin() as tx:
                same = tx.secrets.version(existing.secret_id, token)
            if same is not None and same.kind == value[0] and \
                    sealing.open_value(ctx, caller, existing, same) == value[1]:
                return {"ARN": existing.arn, "Name": existing.name, "VersionId": token}
        raise ResourceExistsException(f"The operation failed because the secret {name} already exists.")
    secret = Secret(str(uuid.uuid4()), caller.account_id, ctx.region, name,
                    names.new_arn(ctx.region, caller.account_id, name), p.get("Description"), p.get("KmsKeyId"),
                    now, now)
    version = sealing.seal(ctx, caller, secret, token, value[0], value[1]) if value is not None else None
    try:
        with ctx.store.begin() as tx:
            tx.secrets.insert(secret)
            for k, v in tags:
                tx.secrets.put_tag(secret.secret_id, k, v)
            if version is not None:
                tx.secrets.add_version(version)
                tx.secrets.set_stage(secret.secret_id, CURRENT, token)
    except AlreadyExistsException:
        raise ResourceExistsException(f"The operation failed because the secret {name} already exists.") from None
    result: Result = {"ARN": secret.arn, "Name": secret.name}
    if version is not None:
        result["VersionId"] = token
    return result


def get_secret_value(ctx: Context, caller: Caller, p: Params) -> Result:
    stage = p.get("VersionStage")
    snapshot = _snapshot(ctx, caller, p, "GetSecretValue",
                         extra={"secretsmanager:VersionStage": stage or CURRENT} if stage or not p.get("VersionId")
                         else None, cached=True)
    return _value_answer(ctx, caller, snapshot, p.get("VersionId"), stage)


def _value_answer(ctx: Context, caller: Caller, snapshot: Snapshot, version_id: str | None,
                  stage: str | None) -> Result:
    secret, stages = snapshot.secret, snapshot.stages
    if version_id is None:
        version_id = stages.get(stage or CURRENT)
        if version_id is None:
            raise ResourceNotFoundException("Secrets Manager can't find the specified secret value for staging "
                                            f"label: {stage or CURRENT}")
    elif stage is not None and stages.get(stage) != version_id:
        raise InvalidRequestException(f"The staging label {stage} is not attached to version {version_id}.")
    version = snapshot.versions.get(version_id)
    if version is None:
        raise ResourceNotFoundException("Secrets Manager can't find the specified secret value for VersionId: "
                                        f"{version_id}")
    if version.sealed_value is None:
        raise ResourceNotFoundException("Secrets Manager can't find the specified secret value for VersionId: "
                                        f"{version_id}")
    value = sealing.open_value(ctx, caller, secret, version)
    today = _day(ctx.now())
    if secret.last_accessed != today or version.last_accessed != today:  # one write a day, at most
        with ctx.store.begin() as tx:
            tx.secrets.update(secret.secret_id, last_accessed=today)
            tx.secrets.update_version(secret.secret_id, version.version_id, last_accessed=today)
    result: Result = {"ARN": secret.arn, "Name": secret.name, "VersionId": version.version_id,
                      "VersionStages": sorted(s for s, v in stages.items() if v == version.version_id),
                      "CreatedDate": version.created}
    if version.kind == "binary":
        result["SecretBinary"] = value
    else:
        result["SecretString"] = value.decode("utf-8", "surrogatepass")
    return result


def put_secret_value(ctx: Context, caller: Caller, p: Params) -> Result:
    secret = _secret(ctx, caller, p, "PutSecretValue")
    if p.get("RotationToken"):
        with ctx.store.begin() as tx:
            expected = tx.secrets.rotation_token(secret.secret_id)
        if expected is None or not hmac.compare_digest(expected, rotation.token_digest(str(p["RotationToken"]))):
            raise InvalidRequestException("The RotationToken doesn't belong to a rotation of this secret in progress.")
    value = _value_of(p, required=True)
    assert value is not None
    stages = _check_stages(p.get("VersionStages"))
    version_id, _ = _new_version(ctx, caller, secret, _token(p), value, stages)
    with ctx.store.begin() as tx:
        on_it = sorted(s for s, v in tx.secrets.stages(secret.secret_id).items() if v == version_id)
    return {"ARN": secret.arn, "Name": secret.name, "VersionId": version_id, "VersionStages": on_it}


def update_secret(ctx: Context, caller: Caller, p: Params) -> Result:
    secret = _secret(ctx, caller, p, "UpdateSecret", extra={
        **_optional("secretsmanager:Description", p.get("Description")),
        **_optional("secretsmanager:KmsKeyId", p.get("KmsKeyId"))})
    value = _value_of(p, required=False)
    changes: dict[str, Any] = {}
    if p.get("Description") is not None:
        changes["description"] = p["Description"]
    new_key = p.get("KmsKeyId")
    if new_key is not None and new_key != secret.kms_key_id:
        changes["kms_key_id"] = new_key
    # All or nothing, as in AWS: a new key or value that KMS refuses leaves the secret as it was.
    updated = dataclasses.replace(secret, **changes)
    result: Result = {"ARN": secret.arn, "Name": secret.name}
    if value is not None:
        version_id, _ = _new_version(ctx, caller, updated, _token(p), value, [CURRENT], changes=changes)
        result["VersionId"] = version_id
        if "kms_key_id" in changes:  # AWSPREVIOUS and AWSPENDING follow the new key too
            _reencrypt(ctx, caller, updated, {})
    elif "kms_key_id" in changes:
        _reencrypt(ctx, caller, updated, changes)
    elif changes:
        _touch(ctx, secret, **changes)
    return result


def _reencrypt(ctx: Context, caller: Caller, secret: Secret, changes: dict[str, Any]) -> None:
    """A new KmsKeyId: AWSCURRENT, AWSPENDING and AWSPREVIOUS are sealed again under it (AWS).
    Every version is sealed before any is written; `changes` are written with them."""
    with ctx.store.begin() as tx:
        stages = tx.secrets.stages(secret.secret_id)
        versions = {v.version_id: v for v in tx.secrets.versions(secret.secret_id)}
    resealed: dict[str, SecretVersion] = {}
    for stage in (CURRENT, PENDING, PREVIOUS):
        version = versions.get(stages.get(stage, ""))
        if version is None or version.sealed_value is None or version.kind is None or \
                version.version_id in resealed:
            continue
        value = sealing.open_value(ctx, caller, secret, version)
        resealed[version.version_id] = sealing.seal(ctx, caller, secret, version.version_id, version.kind,
                                                    value)
    with ctx.store.begin() as tx:
        for fresh in resealed.values():
            tx.secrets.update_version(secret.secret_id, fresh.version_id, key_arn=fresh.key_arn,
                                      encrypted_data_key=fresh.encrypted_data_key, sealed_value=fresh.sealed_value)
        tx.secrets.update(secret.secret_id, last_changed=ctx.now(), **changes)


def describe_secret(ctx: Context, caller: Caller, p: Params) -> Result:
    snapshot = _snapshot(ctx, caller, p, "DescribeSecret", marked_ok=True, cached=True)
    result = _description(snapshot.secret, list(snapshot.tags))
    stages: dict[str, list[str]] = {}
    for stage, version_id in sorted(snapshot.stages.items()):
        stages.setdefault(version_id, []).append(stage)
    result["VersionIdsToStages"] = stages
    return result


def _description(secret: Secret, tags: list[tuple[str, str]]) -> Result:
    result: Result = {"ARN": secret.arn, "Name": secret.name, "Description": secret.description,
                      "KmsKeyId": secret.kms_key_id, "LastChangedDate": secret.last_changed,
                      "LastAccessedDate": secret.last_accessed, "DeletedDate": secret.deletion_date,
                      "CreatedDate": secret.created, "Tags": [{"Key": k, "Value": v} for k, v in tags] or None}
    if secret.rotation_lambda_arn or secret.rotation_enabled:
        result["RotationEnabled"] = secret.rotation_enabled
        result["RotationLambdaARN"] = secret.rotation_lambda_arn
        result["RotationRules"] = json.loads(secret.rotation_rules) if secret.rotation_rules else None
        result["LastRotatedDate"] = secret.last_rotated
        result["NextRotationDate"] = secret.next_rotation if secret.rotation_enabled else None
    return result


def list_secret_version_ids(ctx: Context, caller: Caller, p: Params) -> Result:
    secret = _secret(ctx, caller, p, "ListSecretVersionIds")
    with ctx.store.begin() as tx:
        labelled = _versions_to_stages(tx, secret.secret_id)
        versions = tx.secrets.versions(secret.secret_id)
    shown = [v for v in versions if v.version_id in labelled or p.get("IncludeDeprecated")]
    page, token = _page(shown, p, lambda v: v.version_id)
    result: Result = {"ARN": secret.arn, "Name": secret.name, "Versions": [
        {"VersionId": v.version_id, "VersionStages": labelled.get(v.version_id), "LastAccessedDate": v.last_accessed,
         "CreatedDate": v.created, "KmsKeyIds": [v.key_arn] if v.key_arn else None} for v in page]}
    if token:
        result["NextToken"] = token
    return result


def update_secret_version_stage(ctx: Context, caller: Caller, p: Params) -> Result:
    stage = p["VersionStage"]
    secret = _secret(ctx, caller, p, "UpdateSecretVersionStage", extra={"secretsmanager:VersionStage": stage})
    move_to, remove_from = p.get("MoveToVersionId"), p.get("RemoveFromVersionId")
    with ctx.store.begin() as tx:
        stages = tx.secrets.stages(secret.secret_id)
        current = stages.get(stage)
        tx.secrets.get(secret.secret_id, for_update=True)  # writers of one secret's labels take turns
        target = tx.secrets.version(secret.secret_id, move_to) if move_to is not None else None
        if move_to is not None and target is None:
            raise ResourceNotFoundException(f"Secrets Manager can't find the specified secret version: {move_to}")
        if stage == CURRENT and target is not None and target.kind is None:
            raise InvalidRequestException(f"The version {move_to} has no value yet, so it can't be AWSCURRENT.")
        if current is not None and current != move_to and remove_from != current:
            raise InvalidParameterException(
                f"The staging label {stage} is currently attached to version {current}, so you must explicitly "
                "reference that version in RemoveFromVersionId.")
        if remove_from is not None and current != remove_from:
            raise InvalidParameterException(f"The staging label {stage} is not attached to version {remove_from}.")
        if move_to is None:
            if stage == CURRENT:
                raise InvalidParameterException("You can't remove the staging label AWSCURRENT from the version it "
                                                "is on without moving it to another version.")
            if remove_from is not None:
                tx.secrets.remove_stage(secret.secret_id, stage)
        else:
            on_target = sum(1 for v in stages.values() if v == move_to)
            if current != move_to and on_target >= MAX_STAGES_PER_VERSION:
                raise LimitExceededException(f"A version can have at most {MAX_STAGES_PER_VERSION} staging labels.")
            _move_stage(tx, secret.secret_id, stage, move_to)
        tx.secrets.update(secret.secret_id, last_changed=ctx.now())
    return {"ARN": secret.arn, "Name": secret.name}


def delete_secret(ctx: Context, caller: Caller, p: Params) -> Result:
    force, window = bool(p.get("ForceDeleteWithoutRecovery")), p.get("RecoveryWindowInDays")
    if force and window is not None:
        raise InvalidParameterException("You can't use ForceDeleteWithoutRecovery in conjunction with "
                                        "RecoveryWindowInDays.")
    days = 30 if window is None else int(window)
    if not 7 <= days <= 30:
        raise InvalidParameterException("The RecoveryWindowInDays value must be between 7 and 30 days (inclusive).")
    secret = _secret(ctx, caller, p, "DeleteSecret", marked_ok=True, extra={
        "secretsmanager:ForceDeleteWithoutRecovery": "true" if force else "false",
        **_optional("secretsmanager:RecoveryWindowInDays", str(window) if window is not None else None)})
    now = ctx.now()
    if force:
        with ctx.store.begin() as tx:
            tx.secrets.delete(secret.secret_id)
        return {"ARN": secret.arn, "Name": secret.name, "DeletionDate": now}
    if secret.deletion_date is not None:
        raise InvalidRequestException(MARKED)
    when = now + timedelta(days=days)
    with ctx.store.begin() as tx:
        tx.secrets.update(secret.secret_id, deletion_date=when, last_changed=now)
    return {"ARN": secret.arn, "Name": secret.name, "DeletionDate": when}


def restore_secret(ctx: Context, caller: Caller, p: Params) -> Result:
    secret = _secret(ctx, caller, p, "RestoreSecret", marked_ok=True)
    if secret.deletion_date is not None:
        _touch(ctx, secret, deletion_date=None)
    return {"ARN": secret.arn, "Name": secret.name}


def purge_deleted_secrets(ctx: Context) -> list[str]:
    """The scheduler's work: secrets whose recovery window has ended are deleted for good."""
    with ctx.store.begin() as tx:
        due = tx.secrets.due_for_deletion(ctx.now())
    for secret_id in due:
        with ctx.store.begin() as tx:
            secret = tx.secrets.get(secret_id, for_update=True)
            if secret is not None and secret.deletion_date is not None and secret.deletion_date <= ctx.now():
                tx.secrets.delete(secret_id)
    return due


# -- listing ----------------------------------------------------------------------------------------
def _page(items: list[Any], p: Params, key: Callable[[Any], str], limit_default: int = 100) -> tuple[list[Any], str]:
    limit = int(p.get("MaxResults") or limit_default)
    start = 0
    if p.get("NextToken"):
        try:
            after = base64.urlsafe_b64decode(p["NextToken"].encode()).decode()
        except (ValueError, UnicodeDecodeError):
            raise InvalidNextTokenException("The NextToken value is not valid.") from None
        ids = [key(i) for i in items]
        if after not in ids:
            raise InvalidNextTokenException("The NextToken value is not valid.")
        start = ids.index(after) + 1
    page = items[start:start + limit]
    more = start + limit < len(items)
    return page, base64.urlsafe_b64encode(key(page[-1]).encode()).decode() if more and page else ""


_FILTER_KEYS = ("description", "name", "tag-key", "tag-value", "primary-region", "owning-service", "all")


def _matches(secret: Secret, tags: list[tuple[str, str]], filters: list[dict[str, Any]]) -> bool:
    for f in filters:
        key, values = f.get("Key"), f.get("Values") or []
        if key not in _FILTER_KEYS:
            raise InvalidParameterException(f"Invalid filter key: {key}")
        wanted = [v for v in values if not v.startswith("!")]
        unwanted = [v[1:] for v in values if v.startswith("!")]

        def hit(value: str, fields: list[str], fold: bool) -> bool:
            return any((fld.lower() if fold else fld).startswith(value.lower() if fold else value) for fld in fields)

        if key == "name":
            fields, fold = [secret.name], False
        elif key == "description":
            fields, fold = [secret.description or ""], True
        elif key == "tag-key":
            fields, fold = [k for k, _ in tags], False
        elif key == "tag-value":
            fields, fold = [v for _, v in tags], False
        elif key == "primary-region":
            fields, fold = [], False  # no replicated secrets
        elif key == "owning-service":
            fields, fold = [], False
        else:  # all: any word of the value in any attribute, not case-sensitive
            fields = [secret.name, secret.description or "", *[k for k, _ in tags], *[v for _, v in tags]]
            words = [w for v in wanted for w in v.split()]
            if wanted and not any(hit(w, fields, True) for w in words):
                return False
            if any(hit(w, fields, True) for v in unwanted for w in v.split()):
                return False
            continue
        if wanted and not any(hit(v, fields, fold) for v in wanted):
            return False
        if any(hit(v, fields, fold) for v in unwanted):
            return False
    return True


def list_secrets(ctx: Context, caller: Caller, p: Params) -> Result:
    _authorize(ctx, caller, "ListSecrets", None)
    filters = p.get("Filters") or []
    with ctx.store.begin() as tx:
        candidates = [(s, tx.secrets.tags(s.secret_id), _versions_to_stages(tx, s.secret_id))
                      for s in tx.secrets.for_account(caller.account_id)
                      if s.deletion_date is None or p.get("IncludePlannedDeletion")]
    shown = [c for c in candidates if _matches(c[0], c[1], filters)]
    if p.get("SortOrder") == "desc":
        shown.reverse()
    page, token = _page(shown, p, lambda c: c[0].secret_id)
    entries = []
    for secret, tags, stages in page:
        entry = _description(secret, tags)
        entry["SecretVersionsToStages"] = stages
        entries.append(entry)
    result: Result = {"SecretList": entries}
    if token:
        result["NextToken"] = token
    return result


def batch_get_secret_value(ctx: Context, caller: Caller, p: Params) -> Result:
    ids, filters = p.get("SecretIdList"), p.get("Filters")
    if (ids is None) == (filters is None):
        raise InvalidParameterException("Specify either SecretIdList or Filters, not both.")
    _authorize(ctx, caller, "BatchGetSecretValue", None)
    values: list[Result] = []
    errors: list[Result] = []
    token = ""
    if ids is not None:
        if len(ids) > MAX_BATCH:
            raise InvalidParameterException(f"SecretIdList can hold at most {MAX_BATCH} secrets.")
        targets = list(ids)
    else:
        listed = list_secrets(ctx, caller, {"Filters": filters, "MaxResults": p.get("MaxResults") or MAX_BATCH,
                                            "NextToken": p.get("NextToken")})
        targets = [entry["ARN"] for entry in listed["SecretList"]]
        token = listed.get("NextToken", "")
    for secret_id in targets:
        try:
            snapshot = _snapshot(ctx, caller, {"SecretId": secret_id}, "GetSecretValue",
                                 extra={"secretsmanager:VersionStage": CURRENT}, cached=True)
            values.append(_value_answer(ctx, caller, snapshot, None, None))
        except KMSError as exc:
            errors.append({"SecretId": secret_id, "ErrorCode": exc.code, "Message": exc.message})
    result: Result = {"SecretValues": values, "Errors": errors or None}
    if token:
        result["NextToken"] = token
    return result


# -- tags -------------------------------------------------------------------------------------------
def tag_resource(ctx: Context, caller: Caller, p: Params) -> Result:
    tags = _checked_tags(p["Tags"])
    secret = _secret(ctx, caller, p, "TagResource", extra=_request_tag_context(tags))
    with ctx.store.begin() as tx:
        keys = {k for k, _ in tx.secrets.tags(secret.secret_id)} | {k for k, _ in tags}
        if len(keys) > MAX_TAGS:
            raise LimitExceededException(f"A secret can have at most {MAX_TAGS} tags.")
        for k, v in tags:
            tx.secrets.put_tag(secret.secret_id, k, v)
        tx.secrets.update(secret.secret_id, last_changed=ctx.now())
    return {}


def untag_resource(ctx: Context, caller: Caller, p: Params) -> Result:
    keys = list(p["TagKeys"])
    secret = _secret(ctx, caller, p, "UntagResource", extra={"aws:TagKeys": keys} if keys else None)
    with ctx.store.begin() as tx:
        for k in keys:
            tx.secrets.remove_tag(secret.secret_id, k)
        tx.secrets.update(secret.secret_id, last_changed=ctx.now())
    return {}


# -- resource policies ------------------------------------------------------------------------------
def _parsed_policy(text: str) -> Any:
    if len(text) > MAX_POLICY_CHARS:
        raise LimitExceededException(f"A resource policy can be at most {MAX_POLICY_CHARS} characters.")
    try:
        return parse_key_policy(text)
    except (MalformedPolicyDocumentException, ValidationException, LimitExceededException) as exc:
        raise MalformedPolicyDocumentException(exc.message) from None


# Condition keys that narrow an Allow for everyone to known callers (BlockPublicPolicy), when
# compared without wildcards; other conditions (aws:SecureTransport, a time) leave it public.
NARROWING_KEYS = frozenset({"aws:principalaccount", "aws:principalarn", "aws:principalorgid", "aws:principalorgpaths",
                            "aws:sourceaccount", "aws:sourcearn", "aws:sourceip", "aws:sourcevpc", "aws:sourcevpce",
                            "aws:userid", "kms:calleraccount"})


def _is_public(policy: Any) -> bool:
    """An Allow for everyone that no condition narrows to known callers (BlockPublicPolicy)."""
    def narrowed(statement: Any) -> bool:
        return any(c.key.lower() in NARROWING_KEYS and not c.operator.startswith(("StringNotLike", "StringNotEquals",
                                                                                  "ArnNotLike", "ArnNotEquals",
                                                                                  "NotIpAddress"))
                   and not any("*" in str(v) or "?" in str(v) for v in c.values)
                   for c in statement.conditions)
    return any(s.principals is not None and s.principals.everyone and not s.not_principal and not narrowed(s)
               for s in policy.allows)


def put_resource_policy(ctx: Context, caller: Caller, p: Params) -> Result:
    secret = _secret(ctx, caller, p, "PutResourcePolicy", extra={
        "secretsmanager:BlockPublicPolicy": "true" if p.get("BlockPublicPolicy") else "false"})
    policy = _parsed_policy(p["ResourcePolicy"])
    if p.get("BlockPublicPolicy") and _is_public(policy):
        raise PublicPolicyException("You can't attach a resource-based policy that allows broad access to the "
                                    "secret.")
    _touch(ctx, secret, policy=p["ResourcePolicy"])
    return {"ARN": secret.arn, "Name": secret.name}


def get_resource_policy(ctx: Context, caller: Caller, p: Params) -> Result:
    secret = _secret(ctx, caller, p, "GetResourcePolicy", marked_ok=True)
    return {"ARN": secret.arn, "Name": secret.name, "ResourcePolicy": secret.policy}


def delete_resource_policy(ctx: Context, caller: Caller, p: Params) -> Result:
    secret = _secret(ctx, caller, p, "DeleteResourcePolicy")
    _touch(ctx, secret, policy=None)
    return {"ARN": secret.arn, "Name": secret.name}


def validate_resource_policy(ctx: Context, caller: Caller, p: Params) -> Result:
    if p.get("SecretId"):
        _secret(ctx, caller, p, "ValidateResourcePolicy")
    else:
        _authorize(ctx, caller, "ValidateResourcePolicy", None)
    try:
        _parsed_policy(p["ResourcePolicy"])
    except (MalformedPolicyDocumentException, LimitExceededException) as exc:
        return {"PolicyValidationPassed": False,
                "ValidationErrors": [{"CheckName": "BasicPolicyValidation", "ErrorMessage": exc.message}]}
    return {"PolicyValidationPassed": True, "ValidationErrors": []}


def list_resource_policies(ctx: Context, caller: Caller, p: Params) -> Result:
    """The names of the secret's resource policies: `default` (the one Put/GetResourcePolicy
    manage) when it has one; this server keeps no others."""
    secret = _secret(ctx, caller, p, "ListResourcePolicies", marked_ok=True)
    return {"ResourcePolicies": [{"PolicyName": "default"}] if secret.policy is not None else []}


# -- passwords --------------------------------------------------------------------------------------
def get_random_password(ctx: Context, caller: Caller, p: Params) -> Result:
    _authorize(ctx, caller, "GetRandomPassword", None)
    length = int(p.get("PasswordLength") or 32)
    exclude = set(p.get("ExcludeCharacters") or "")
    classes = []
    if not p.get("ExcludeLowercase"):
        classes.append("abcdefghijklmnopqrstuvwxyz")
    if not p.get("ExcludeUppercase"):
        classes.append("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if not p.get("ExcludeNumbers"):
        classes.append("0123456789")
    if not p.get("ExcludePunctuation"):
        classes.append(PUNCTUATION)
    if p.get("IncludeSpace"):
        classes.append(" ")
    classes = ["".join(c for c in chars if c not in exclude) for chars in classes]
    classes = [c for c in classes if c]
    if not classes:
        raise InvalidParameterException("The password can't be made of no characters.")
    require = p.get("RequireEachIncludedType", True)
    if require and length < len(classes):
        raise InvalidParameterException("The password is too short to include a character of each type.")
    alphabet = "".join(classes)
    while True:
        password = "".join(random.choice(alphabet) for _ in range(length))
        if not require or all(any(ch in chars for ch in password) for chars in classes):
            return {"RandomPassword": password}


# -- rotation and replication (later) ---------------------------------------------------------------
def _fresh(ctx: Context, secret: Secret) -> Secret:
    with ctx.store.begin() as tx:
        again = tx.secrets.get(secret.secret_id)
    return again if again is not None else secret


def rotate_secret(ctx: Context, caller: Caller, p: Params) -> Result:
    """Configure rotation (function, rules) and, unless RotateImmediately is false, start one
    (rotation.py): the answer comes once it has started; its steps run after."""
    secret = _secret(ctx, caller, p, "RotateSecret",
                     extra=_optional("secretsmanager:RotationLambdaARN", p.get("RotationLambdaARN")))
    function_arn = p.get("RotationLambdaARN") or secret.rotation_lambda_arn
    if not function_arn:
        raise InvalidRequestException("No Lambda rotation function ARN is associated with this secret.")
    runner = ctx.secrets_rotation
    if runner is None:
        raise UnsupportedOperationException("Rotation is not available on this server.")
    fn = runner.function_for(secret, function_arn)
    if fn is None:
        raise AccessDeniedException("Secrets Manager cannot invoke the specified Lambda function. Ensure that the "
                                    "function policy grants access to the principal secretsmanager.amazonaws.com.")
    # As in AWS, who configures rotation may invoke the function (an identity policy allowing
    # lambda:InvokeFunction on its ARN; an account's administrator may).
    ctx.access.authorize_resource(caller, "lambda:InvokeFunction", function_arn, secret.account_id, None, {})
    given_rules = p.get("RotationRules")
    rules = schedule.check_rules(dict(given_rules)) if given_rules is not None else \
        (json.loads(secret.rotation_rules) if secret.rotation_rules else None)
    token = _token(p)
    immediately = p.get("RotateImmediately", True)
    unfinished = rotation.check_can_start(ctx, secret)
    now = ctx.now()
    changes: dict[str, Any] = {"rotation_lambda_arn": function_arn, "rotation_enabled": True,
                               "rotation_rules": json.dumps(rules) if rules else None,
                               "next_rotation": schedule.next_time(rules, now) if rules else None}
    if immediately and unfinished is not None and unfinished != token:
        _touch(ctx, secret, **changes)
        runner.start(_fresh(ctx, secret), unfinished, fn)  # AWS tries the unfinished rotation again
        raise rotation.previous_rotation_error()
    _touch(ctx, secret, **changes)
    if immediately:
        with ctx.store.begin() as tx:
            done = tx.secrets.version(secret.secret_id, token)
            current = tx.secrets.stages(secret.secret_id).get(CURRENT)
        if done is not None and done.kind is not None and unfinished != token:
            if current == token:  # the same RotateSecret again, after its rotation finished
                return {"ARN": secret.arn, "Name": secret.name, "VersionId": token}
            raise ResourceExistsException("A version with this ClientRequestToken already exists.")
        if not runner.start(_fresh(ctx, secret), token, fn):
            raise rotation.previous_rotation_error()  # one is still finishing, here or on another node
    return {"ARN": secret.arn, "Name": secret.name, "VersionId": token}


def cancel_rotate_secret(ctx: Context, caller: Caller, p: Params) -> Result:
    secret = _secret(ctx, caller, p, "CancelRotateSecret")
    if not secret.rotation_enabled:
        raise InvalidRequestException("Secrets Manager can't cancel rotation because rotation isn't enabled for the "
                                      "secret.")
    _touch(ctx, secret, rotation_enabled=False, next_rotation=None)
    with ctx.store.begin() as tx:
        tx.secrets.end_rotation(secret.secret_id)  # a function's later PutSecretValue is refused
        pending = tx.secrets.stages(secret.secret_id).get(PENDING)
    result: Result = {"ARN": secret.arn, "Name": secret.name}
    if pending is not None:
        result["VersionId"] = pending
    return result


def _no_replication(operation: str) -> Callable[[Context, Caller, Params], Result]:
    """A replication operation: authorized on its secret like any other (a caller who may not
    call it is refused first), then UnsupportedOperationException."""
    def refuse(ctx: Context, caller: Caller, p: Params) -> Result:
        _secret(ctx, caller, p, operation, marked_ok=True)
        raise UnsupportedOperationException("Replicating secrets to other Regions is not supported by this server.")
    return refuse


OPERATIONS: dict[str, Op] = {
    "CreateSecret": Op(create_secret),
    "GetSecretValue": Op(get_secret_value, read_only=True),
    "BatchGetSecretValue": Op(batch_get_secret_value, read_only=True),
    "PutSecretValue": Op(put_secret_value),
    "UpdateSecret": Op(update_secret),
    "DescribeSecret": Op(describe_secret, read_only=True),
    "ListSecrets": Op(list_secrets, read_only=True),
    "ListSecretVersionIds": Op(list_secret_version_ids, read_only=True),
    "UpdateSecretVersionStage": Op(update_secret_version_stage),
    "DeleteSecret": Op(delete_secret),
    "RestoreSecret": Op(restore_secret),
    "RotateSecret": Op(rotate_secret),
    "CancelRotateSecret": Op(cancel_rotate_secret),
    "GetRandomPassword": Op(get_random_password, read_only=True),
    "TagResource": Op(tag_resource),
    "UntagResource": Op(untag_resource),
    "PutResourcePolicy": Op(put_resource_policy),
    "GetResourcePolicy": Op(get_resource_policy, read_only=True),
    "DeleteResourcePolicy": Op(delete_resource_policy),
    "ValidateResourcePolicy": Op(validate_resource_policy, read_only=True),
    "ListResourcePolicies": Op(list_resource_policies, read_only=True),
    "ReplicateSecretToRegions": Op(_no_replication("ReplicateSecretToRegions")),
    "RemoveRegionsFromReplication": Op(_no_replication("RemoveRegionsFromReplication")),
    "StopReplicationToReplica": Op(_no_replication("StopReplicationToReplica")),
    "AssociateCrossAccountReplica": Op(_no_replication("AssociateCrossAccountReplica")),
    "DisassociateCrossAccountReplica": Op(_no_replication("DisassociateCrossAccountReplica")),
}
