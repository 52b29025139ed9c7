"""Asymmetric and HMAC keys: GetPublicKey, Sign, Verify, GenerateMac, VerifyMac, DeriveSharedSecret."""

from __future__ import annotations

from ..errors import KMSInvalidMacException, KMSInvalidSignatureException, UnsupportedOperationException
from ..model import Caller, KeyUsage
from .context import Context, Params, Result
from .encryption import key_for_use
from .keys import ALGORITHM_FIELDS
from .states import check_usable, dry_run, no_recipient


def get_public_key(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "GetPublicKey")
    if not key.spec.has_public_key:
        raise UnsupportedOperationException(f"{key.arn} is not an asymmetric key; it has no public key.")
    check_usable(key, ctx.now())
    return {"KeyId": key.arn, "PublicKey": ctx.keystores.asymmetric(key).public_key(key),
            "CustomerMasterKeySpec": key.key_spec, "KeySpec": key.key_spec, "KeyUsage": key.key_usage.value,
            ALGORITHM_FIELDS[key.key_usage]: list(key.spec.allowed(key.key_usage))}


def sign(ctx: Context, caller: Caller, p: Params) -> Result:
    algorithm = p["SigningAlgorithm"]
    key = key_for_use(ctx, caller, p["KeyId"], "Sign", KeyUsage.SIGN_VERIFY, algorithm)
    dry_run(p)
    signature = ctx.keystores.asymmetric(key).sign(key, algorithm, p["Message"], p.get("MessageType") or "RAW")
    return {"KeyId": key.arn, "Signature": signature, "SigningAlgorithm": algorithm}


def verify(ctx: Context, caller: Caller, p: Params) -> Result:
    algorithm = p["SigningAlgorithm"]
    key = key_for_use(ctx, caller, p["KeyId"], "Verify", KeyUsage.SIGN_VERIFY, algorithm)
    valid = ctx.keystores.asymmetric(key).verify(key, algorithm, p["Message"], p.get("MessageType") or "RAW",
                                                 p["Signature"])
    if not valid:
        raise KMSInvalidSignatureException("The signature is not valid for this message, key and algorithm.")
    dry_run(p)
    return {"KeyId": key.arn, "SignatureValid": True, "SigningAlgorithm": algorithm}


def generate_mac(ctx: Context, caller: Caller, p: Params) -> Result:
    algorithm = p["MacAlgorithm"]
    key = key_for_use(ctx, caller, p["KeyId"], "GenerateMac", KeyUsage.GENERATE_VERIFY_MAC, algorithm)
    dry_run(p)
    return {"Mac": ctx.keystores.asymmetric(key).mac(key, algorithm, p["Message"]), "MacAlgorithm": algorithm,
            "KeyId": key.arn}


def verify_mac(ctx: Context, caller: Caller, p: Params) -> Result:
    algorithm = p["MacAlgorithm"]
    key = key_for_use(ctx, caller, p["KeyId"], "VerifyMac", KeyUsage.GENERATE_VERIFY_MAC, algorithm)
    if not ctx.keystores.asymmetric(key).mac_matches(key, algorithm, p["Message"], p["Mac"]):
        raise KMSInvalidMacException("The MAC is not valid for this message, key and algorithm.")
    dry_run(p)
    return {"KeyId": key.arn, "MacValid": True, "MacAlgorithm": algorithm}


def derive_shared_secret(ctx: Context, caller: Caller, p: Params) -> Result:
    no_recipient(p)
    algorithm = p["KeyAgreementAlgorithm"]
    key = key_for_use(ctx, caller, p["KeyId"], "DeriveSharedSecret", KeyUsage.KEY_AGREEMENT, algorithm)
    secret = ctx.keystores.asymmetric(key).derive_shared_secret(key, p["PublicKey"])
    dry_run(p)
    return {"KeyId": key.arn, "SharedSecret": secret, "KeyAgreementAlgorithm": algorithm,
            "KeyOrigin": key.origin.value}
