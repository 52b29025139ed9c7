"""BYOK: wrapping keys for import, unwrapping imported material, and checking that it fits a key spec.

Wrapping algorithms, as AWS KMS defines them (the customer wraps, we unwrap):

    RSAES_OAEP_SHA_1 / _SHA_256       RSA-OAEP (MGF1 with the same hash) of the material itself
    RSA_AES_KEY_WRAP_SHA_1 / _SHA_256 RSA-OAEP of a fresh AES-256 key  ||  AES key wrap with padding
                                      (RFC 5649) of the material under that AES key

The second form carries material of any size (RSA private keys); the first only what fits in one
OAEP block. Any failure to unwrap is InvalidCiphertextException, whatever went wrong.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..errors import IncorrectKeyMaterialException, InvalidCiphertextException, UnsupportedOperationException
from ..model import KeyFamily, KeySpecInfo
from ..wrapping import WRAPPING_ALGORITHMS
from . import asymmetric

WRAPPING_KEY_BITS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
_OAEP_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"SHA_1": hashes.SHA1, "SHA_256": hashes.SHA256}


def check_supported(wrapping_key_spec: str, algorithm: str) -> None:
    if wrapping_key_spec not in WRAPPING_KEY_BITS:
        raise UnsupportedOperationException(f"WrappingKeySpec {wrapping_key_spec} is not supported.")
    if algorithm not in WRAPPING_ALGORITHMS:
        raise UnsupportedOperationException(f"WrappingAlgorithm {algorithm} is not supported.")


def new_wrapping_key(wrapping_key_spec: str) -> tuple[bytes, bytes]:
    """(PKCS#8 DER private key, SubjectPublicKeyInfo DER public key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=WRAPPING_KEY_BITS[wrapping_key_spec])
    private = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def _oaep(h: type[hashes.HashAlgorithm]) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)


def unwrap(wrapping_private_der: bytes, algorithm: str, wrapped: bytes) -> bytes:
    hash_name, with_aes = WRAPPING_ALGORITHMS[algorithm]
    h = _OAEP_HASHES[hash_name]
    key = serialization.load_der_private_key(wrapping_private_der, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    block = key.key_size // 8
    try:
        if not with_aes:
            return key.decrypt(wrapped, _oaep(h))
        if len(wrapped) <= block:
            raise InvalidCiphertextException()
        aes_key = key.decrypt(wrapped[:block], _oaep(h))
        if len(aes_key) not in (16, 24, 32):
            raise InvalidCiphertextException()
        return keywrap.aes_key_unwrap_with_padding(aes_key, wrapped[block:])
    except (ValueError, keywrap.InvalidUnwrap):
        raise InvalidCiphertextException() from None


def check_material(spec: KeySpecInfo, material: bytes) -> None:
    """Imported material must be what the key spec needs, else IncorrectKeyMaterialException."""
    if spec.family is KeyFamily.SYMMETRIC:
        if len(material) != spec.material_bytes:
            raise IncorrectKeyMaterialException("Symmetric key material must be 32 bytes (256 bits).")
        return
    if spec.family is KeyFamily.HMAC:
        # As in AWS: at least the MAC's output length, at most the hash's block size.
        lo, hi = spec.material_bytes, 64 if spec.material_bytes <= 32 else 128
        if not lo <= len(material) <= hi:
            raise IncorrectKeyMaterialException(f"{spec.name} key material must be {lo} to {hi} bytes.")
        return
    try:
        handle = asymmetric.load(spec.name, material)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IncorrectKeyMaterialException("Key material must be a PKCS#8 DER private key.") from None
    if not asymmetric.check_private_key_matches(spec.name, handle):
        raise IncorrectKeyMaterialException(f"The private key does not match the key spec {spec.name}.")


def material_id(key_id: str, material: bytes) -> str:
    """A stable 64-hex-digit id of a key's material: the same material always gets the same id,
    which is how re-import recognizes it. A hash commits to high-entropy material without revealing it."""
    return hashlib.sha256(b"openkms key material id\x00" + key_id.encode() + b"\x00" + material).hexdigest()
