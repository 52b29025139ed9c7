"""Envelope encryption of secret values through openkms's own KMS, as Secrets Manager uses AWS KMS.

Each version has a data key of its own: GenerateDataKey (AES_256) under the secret's KMS key, asked
for on the caller's behalf (`kms:ViaService` secretsmanager.<region>.amazonaws.com, so that key
policies and the caller's own rights decide), with the encryption context AWS uses,
`{"SecretARN": <arn>, "SecretVersionId": <version id>}`. The value is sealed with AES-256-GCM under
the data key (the same context as additional data); only the KMS ciphertext of the data key is
kept. Reading a value is a KMS Decrypt of that ciphertext, again on the caller's behalf.

A secret without a KmsKeyId uses its account's AWS managed key `alias/aws/secretsmanager`, made on
first use; its key policy lets the account's principals use it through Secrets Manager only.
KMS's refusals become what Secrets Manager answers: AccessDeniedException ("Access to KMS is not
allowed") when the caller may not use the key, EncryptionFailure or DecryptionFailure otherwise.
"""

from __future__ import annotations

import dataclasses
import json

from ..crypto import aead
from ..errors import (
    AccessDeniedException,
    DecryptionFailure,
    EncryptionFailure,
    KMSError,
    KMSInternalException,
    ThrottlingException,
)
from ..model import Caller, Secret, SecretVersion, alias_arn, key_arn
from ..service import Context
from ..service import encryption as kms
from ..service.keys import aws_managed_key

DEFAULT_KEY_ALIAS = "alias/aws/secretsmanager"
DEFAULT_KEY_DESCRIPTION = "Default key that protects my Secrets Manager data when no other key is defined"


def via_service(region: str) -> str:
    return f"secretsmanager.{region}.amazonaws.com"


def managed_key_policy(account_id: str, region: str) -> str:
    """The key policy AWS gives an account's aws/secretsmanager key."""
    via = via_service(region)
    return json.dumps({
        "Version": "2012-10-17", "Id": "auto-secretsmanager-2",
        "Statement": [
            {"Sid": "Allow access through AWS Secrets Manager for all principals in the account that are "
                    "authorized to use AWS Secrets Manager",
             "Effect": "Allow", "Principal": {"AWS": "*"},
             "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:CreateGrant", "kms:DescribeKey"],
             "Resource": "*",
             "Condition": {"StringEquals": {"kms:ViaService": via, "kms:CallerAccount": account_id}}},
            {"Sid": "Allow access through AWS Secrets Manager for all principals in the account that are "
                    "authorized to use AWS Secrets Manager",
             "Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:GenerateDataKey*", "Resource": "*",
             "Condition": {"StringEquals": {"kms:CallerAccount": account_id}, "StringLike": {"kms:ViaService": via}}},
            {"Sid": "Allow direct access to key metadata to the account", "Effect": "Allow",
             "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
             "Action": ["kms:Describe*", "kms:Get*", "kms:List*", "kms:RevokeGrant"], "Resource": "*"},
        ]})


def context_of(secret: Secret, version_id: str) -> dict[str, str]:
    return {"SecretARN": secret.arn, "SecretVersionId": version_id}


def _aad(secret: Secret, version_id: str) -> bytes:
    return json.dumps(context_of(secret, version_id), sort_keys=True, separators=(",", ":")).encode()


def key_ref(ctx: Context, secret: Secret) -> str:
    """The KMS key a new version of the secret is sealed under, as an ARN in the secret's account:
    a key id or alias name given to CreateSecret or UpdateSecret names a key of the secret's own
    account, whoever writes the next value (a caller from another account must not seal it under a
    key of its own)."""
    given = secret.kms_key_id
    if given:
        if given.startswith("arn:"):
            return given
        if given.startswith("alias/"):  # the alias of the secret's account, as its key's ARN
            target = ctx.keys.alias_target(secret.account_id, given)
            return key_arn(ctx.region, secret.account_id, target) if target else \
                alias_arn(ctx.region, secret.account_id, given)
        return key_arn(ctx.region, secret.account_id, given)
    policy = managed_key_policy(secret.account_id, ctx.region)
    return aws_managed_key(ctx, secret.account_id, DEFAULT_KEY_ALIAS, DEFAULT_KEY_DESCRIPTION, policy).arn


def _kms_refusal(exc: KMSError, failure: type[KMSError], doing: str) -> KMSError:
    if isinstance(exc, AccessDeniedException):
        return AccessDeniedException("Access to KMS is not allowed")
    if isinstance(exc, ThrottlingException):  # a key store's quota: the SDKs retry this one, with backoff
        return ThrottlingException("Rate exceeded")
    return failure(f"Secrets Manager can't {doing} the protected secret text using the provided KMS key: "
                   f"{exc.code}: {exc.message}")


def seal(ctx: Context, caller: Caller, secret: Secret, version_id: str, kind: str, value: bytes,
         key_id: str | None = None) -> SecretVersion:
    """A new version holding `value` (kind "string" or "binary"), sealed as the module says."""
    ref = key_ref(ctx, dataclasses.replace(secret, kms_key_id=key_id)) if key_id else key_ref(ctx, secret)
    context = context_of(secret, version_id)
    try:
        answer = kms.generate_data_key(ctx, caller.via(via_service(ctx.region), "GenerateDataKey"),
                                       {"KeyId": ref, "KeySpec": "AES_256", "EncryptionContext": context})
    except KMSError as exc:
        raise _kms_refusal(exc, EncryptionFailure, "encrypt") from None
    sealed = aead.seal(answer["Plaintext"], value, _aad(secret, version_id))
    return SecretVersion(secret.secret_id, version_id, ctx.now(), None, kind, answer["KeyId"],
                         answer["CiphertextBlob"], sealed)


def open_value(ctx: Context, caller: Caller, secret: Secret, version: SecretVersion) -> bytes:
    """The value of a version, or DecryptionFailure / AccessDeniedException."""
    if version.encrypted_data_key is None or version.sealed_value is None:
        raise KMSInternalException("The secret version has no value.")
    try:
        answer = kms.decrypt(ctx, caller.via(via_service(ctx.region), "Decrypt"), {
            "CiphertextBlob": version.encrypted_data_key, "KeyId": version.key_arn,
            "EncryptionContext": context_of(secret, version.version_id)})
    except KMSError as exc:
        raise _kms_refusal(exc, DecryptionFailure, "decrypt") from None
    try:
        return aead.unseal(answer["Plaintext"], version.sealed_value, _aad(secret, version.version_id))
    except KMSError:
        raise DecryptionFailure("The secret version failed its integrity check.") from None
