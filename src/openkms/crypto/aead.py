"""AES-256-GCM, the one AEAD of openkms. Every failure to open is InvalidCiphertextException."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import InvalidCiphertextException

NONCE_BYTES = 12
TAG_BYTES = 16


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce(12) || ciphertext || tag(16), with a fresh random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise InvalidCiphertextException()
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise InvalidCiphertextException() from None


def derive_message_key(key: bytes, salt: bytes, info: bytes) -> tuple[bytes, bytes]:
    """A per-message AES-256 key and nonce from a key version and a random salt (HKDF-SHA256).

    Deriving a fresh key per message lifts the 2^32-messages-per-key limit that random 96-bit
    nonces put on a single AES-GCM key; a busy KMS key would reach it in days.
    """
    okm = HKDF(algorithm=hashes.SHA256(), length=32 + NONCE_BYTES, salt=salt, info=info).derive(key)
    return okm[:32], okm[32:]


def encrypt_with(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt_with(key: bytes, nonce: bytes, ciphertext_and_tag: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext_and_tag, aad)
    except (InvalidTag, ValueError):
        raise InvalidCiphertextException() from None
