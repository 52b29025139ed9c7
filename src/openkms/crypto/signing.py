"""Ed25519 for the audit log's signed digests."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def new_signing_key() -> tuple[bytes, bytes]:
    """(raw 32-byte private key, SubjectPublicKeyInfo DER public key)."""
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return raw, public_der(raw)


def public_der(private_raw: bytes) -> bytes:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(private_raw)
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(public_key_der: bytes) -> bytes:
    return serialization.load_der_public_key(public_key_der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(private_raw: bytes, data: bytes) -> bytes:
    return ed25519.Ed25519PrivateKey.from_private_bytes(private_raw).sign(data)


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """`public_key` is DER or PEM SubjectPublicKeyInfo."""
    try:
        if public_key.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(public_key)
        else:
            key = serialization.load_der_public_key(public_key)
        if not isinstance(key, ed25519.Ed25519PublicKey):
            return False
        key.verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def fingerprint(public_key: bytes) -> str:
    """SHA-256 (hex) of a DER or PEM public key's SubjectPublicKeyInfo DER: one value for both
    encodings of one key. ValueError if it is not a public key."""
    import hashlib

    if public_key.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(public_key)
    else:
        key = serialization.load_der_public_key(public_key)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()
