"""Encryption: Encrypt, Decrypt, ReEncrypt, data keys and data key pairs, GenerateRandom.

A symmetric key's ciphertext is a blob that names its key and version (crypto/blob.py), so Decrypt
finds the key from the blob and needs no KeyId; an RSA key's ciphertext is bare RSA-OAEP, so
Decrypt needs the KeyId. `spec.ciphertext` says which.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..audit.context import note_key
from ..crypto import asymmetric, blob
from ..errors import (
    IncorrectKeyException,
    InvalidCiphertextException,
    UnsupportedOperationException,
    ValidationException,
)
from ..model import DATA_KEY_PAIR_SPECS, Caller, Key, KeyUsage
from .context import Context, Params, Result
from .keystores import connected_store_of
from .states import check_for_use, dry_run, no_recipient, require

DATA_KEY_SPECS = {"AES_256": 32, "AES_128": 16}
ALGORITHM_CONDITION = {
    KeyUsage.ENCRYPT_DECRYPT: "kms:EncryptionAlgorithm",
    KeyUsage.SIGN_VERIFY: "kms:SigningAlgorithm",
    KeyUsage.GENERATE_VERIFY_MAC: "kms:MacAlgorithm",
    KeyUsage.KEY_AGREEMENT: "kms:KeyAgreementAlgorithm",
    KeyUsage.ENCAPSULATE_DECAPSULATE: "kms:EncapsulationAlgorithm",
}


def key_for_use(ctx: Context, caller: Caller, key_ref: str, action: str, usage: KeyUsage, algorithm: str | None,
                *, encryption_context: Mapping[str, str] | None = None) -> Key:
    """The key, if the caller may `action` it, it is for `usage`, usable now, and allows `algorithm`."""
    extra = {ALGORITHM_CONDITION[usage]: algorithm} if algorithm else None
    if encryption_context is None and usage is KeyUsage.ENCRYPT_DECRYPT:
        encryption_context = {}
    key = ctx.keys.authorized(caller, key_ref, action, extra=extra, encryption_context=encryption_context)
    check_for_use(key, usage, algorithm, ctx.now())
    return key


def _encrypt(ctx: Context, key: Key, plaintext: bytes, context: Mapping[str, str] | None, algorithm: str) -> bytes:
    if key.spec.ciphertext == "blob":
        return ctx.keystores.for_key(key).encrypt(key, plaintext, context)
    if context:
        raise ValidationException("EncryptionContext is not supported with asymmetric keys.")
    return ctx.keystores.asymmetric(key).rsa_encrypt(key, algorithm, plaintext)


def _decrypt(ctx: Context, caller: Caller, ciphertext: bytes, context: Mapping[str, str] | None,
             key_ref: str | None, algorithm: str | None, action: str) -> tuple[Key, bytes, str]:
    """Decrypt a blob (it names its key) or an RSA ciphertext (KeyId required)."""
    algorithm = algorithm or "SYMMETRIC_DEFAULT"
    # The KeyId only routes (an RSA ciphertext) or is compared with the blob's key: the decision is
    # made below, on the key that will do the decrypting.
    requested, request_alias = ctx.keys.find(caller, key_ref) if key_ref is not None else (None, None)
    if requested is not None and requested.spec.ciphertext != "blob":
        key = requested
        ctx.keys.decide(caller, key, action, request_alias=request_alias, extra={"kms:EncryptionAlgorithm": algorithm})
        check_for_use(key, KeyUsage.ENCRYPT_DECRYPT, algorithm, ctx.now())
        if context:
            raise ValidationException("EncryptionContext is not supported with asymmetric keys.")
        return key, ctx.keystores.asymmetric(key).rsa_decrypt(key, algorithm, ciphertext), algorithm
    header = blob.parse_header(ciphertext)
    if requested is not None and requested.key_id != header.key_id:
        raise IncorrectKeyException(
            "The key ID in the request does not identify a CMK that can perform this operation.")
    found = ctx.keys.load(header.key_id)
    if found is None or found.spec.ciphertext != "blob":
        raise InvalidCiphertextException()
    key = found
    note_key(key.arn, key.account_id)
    ctx.keys.decide(caller, key, action, request_alias=request_alias if requested is not None else None,
                    encryption_context=context or {}, extra={"kms:EncryptionAlgorithm": algorithm})
    check_for_use(key, KeyUsage.ENCRYPT_DECRYPT, algorithm, ctx.now())
    if header.version > key.current_version:
        # Another node may have rotated the key since this node cached it.
        fresh = ctx.keys.refresh(key.key_id)
        if fresh is None or header.version > fresh.current_version:
            raise InvalidCiphertextException()
    return key, ctx.keystores.for_key(key).decrypt(key, header.version, ciphertext, context), algorithm


def encrypt(ctx: Context, caller: Caller, p: Params) -> Result:
    algorithm = p.get("EncryptionAlgorithm") or "SYMMETRIC_DEFAULT"
    key = key_for_use(ctx, caller, p["KeyId"], "Encrypt", KeyUsage.ENCRYPT_DECRYPT, algorithm,
                      encryption_context=p.get("EncryptionContext") or {})
    dry_run(p)
    ciphertext = _encrypt(ctx, key, p["Plaintext"], p.get("EncryptionContext"), algorithm)
    return {"CiphertextBlob": ciphertext, "KeyId": key.arn, "EncryptionAlgorithm": algorithm}


def decrypt(ctx: Context, caller: Caller, p: Params) -> Result:
    require(p, "CiphertextBlob")
    no_recipient(p)
    key, plaintext, algorithm = _decrypt(ctx, caller, p["CiphertextBlob"], p.get("EncryptionContext"),
                                         p.get("KeyId"), p.get("EncryptionAlgorithm"), "Decrypt")
    dry_run(p)
    return {"KeyId": key.arn, "Plaintext": plaintext, "EncryptionAlgorithm": algorithm}


def re_encrypt(ctx: Context, caller: Caller, p: Params) -> Result:
    require(p, "CiphertextBlob")
    dest_alg = p.get("DestinationEncryptionAlgorithm") or "SYMMETRIC_DEFAULT"
    dest = key_for_use(ctx, caller, p["DestinationKeyId"], "ReEncryptTo", KeyUsage.ENCRYPT_DECRYPT, dest_alg,
                       encryption_context=p.get("DestinationEncryptionContext") or {})
    source, plaintext, source_alg = _decrypt(ctx, caller, p["CiphertextBlob"], p.get("SourceEncryptionContext"),
                                             p.get("SourceKeyId"), p.get("SourceEncryptionAlgorithm"),
                                             "ReEncryptFrom")
    dry_run(p)
    ciphertext = _encrypt(ctx, dest, plaintext, p.get("DestinationEncryptionContext"), dest_alg)
    return {"CiphertextBlob": ciphertext, "SourceKeyId": source.arn, "KeyId": dest.arn,
            "SourceEncryptionAlgorithm": source_alg, "DestinationEncryptionAlgorithm": dest_alg}


def _data_key_length(p: Params) -> int:
    nbytes, spec = p.get("NumberOfBytes"), p.get("KeySpec")
    if (nbytes is None) == (spec is None):
        raise ValidationException("Please specify either number of bytes or key spec.")
    return int(nbytes) if nbytes is not None else DATA_KEY_SPECS[str(spec)]


def _data_key(ctx: Context, caller: Caller, p: Params, action: str) -> tuple[Key, bytes, bytes]:
    length = _data_key_length(p)
    key = key_for_use(ctx, caller, p["KeyId"], action, KeyUsage.ENCRYPT_DECRYPT, "SYMMETRIC_DEFAULT",
                      encryption_context=p.get("EncryptionContext") or {})
    dry_run(p)
    plaintext = os.urandom(length)
    return key, plaintext, _encrypt(ctx, key, plaintext, p.get("EncryptionContext"), "SYMMETRIC_DEFAULT")


def generate_data_key(ctx: Context, caller: Caller, p: Params) -> Result:
    no_recipient(p)
    key, plaintext, ciphertext = _data_key(ctx, caller, p, "GenerateDataKey")
    return {"CiphertextBlob": ciphertext, "Plaintext": plaintext, "KeyId": key.arn}


def generate_data_key_without_plaintext(ctx: Context, caller: Caller, p: Params) -> Result:
    key, _, ciphertext = _data_key(ctx, caller, p, "GenerateDataKeyWithoutPlaintext")
    return {"CiphertextBlob": ciphertext, "KeyId": key.arn}


def _data_key_pair(ctx: Context, caller: Caller, p: Params, action: str) -> tuple[Key, bytes, bytes, bytes]:
    pair_spec = p["KeyPairSpec"]
    if pair_spec not in DATA_KEY_PAIR_SPECS:
        raise UnsupportedOperationException(f"KeyPairSpec {pair_spec} is not supported by this server.")
    key = key_for_use(ctx, caller, p["KeyId"], action, KeyUsage.ENCRYPT_DECRYPT, "SYMMETRIC_DEFAULT",
                      encryption_context=p.get("EncryptionContext") or {})
    if key.origin.in_custom_key_store:  # as AWS: data key pairs are not made under custom key store keys
        raise UnsupportedOperationException(f"{key.arn} is in a custom key store: it cannot make data key pairs.")
    dry_run(p)
    private_der, public_der = asymmetric.data_key_pair(pair_spec)
    wrapped = _encrypt(ctx, key, private_der, p.get("EncryptionContext"), "SYMMETRIC_DEFAULT")
    return key, private_der, public_der, wrapped


def generate_data_key_pair(ctx: Context, caller: Caller, p: Params) -> Result:
    no_recipient(p)
    key, private_der, public_der, wrapped = _data_key_pair(ctx, caller, p, "GenerateDataKeyPair")
    return {"PrivateKeyCiphertextBlob": wrapped, "PrivateKeyPlaintext": private_der, "PublicKey": public_der,
            "KeyId": key.arn, "KeyPairSpec": p["KeyPairSpec"]}


def generate_data_key_pair_without_plaintext(ctx: Context, caller: Caller, p: Params) -> Result:
    key, _, public_der, wrapped = _data_key_pair(ctx, caller, p, "GenerateDataKeyPairWithoutPlaintext")
    return {"PrivateKeyCiphertextBlob": wrapped, "PublicKey": public_der, "KeyId": key.arn,
            "KeyPairSpec": p["KeyPairSpec"]}


def generate_random(ctx: Context, caller: Caller, p: Params) -> Result:
    no_recipient(p)
    require(p, "NumberOfBytes")
    ctx.access.authorize_identity(caller, "GenerateRandom")
    if p.get("CustomKeyStoreId"):  # drawn from the key store's HSM
        row = connected_store_of(ctx, caller, p["CustomKeyStoreId"])
        if row.store_type != "AWS_CLOUDHSM":  # as AWS: an external key store makes no random bytes
            raise UnsupportedOperationException("GenerateRandom is not supported for an external key store.")
        return {"Plaintext": ctx.keystores.hsm_store(p["CustomKeyStoreId"]).random(p["NumberOfBytes"])}
    return {"Plaintext": os.urandom(p["NumberOfBytes"])}
