"""Asymmetric and HMAC key material: generation, signing, RSA-OAEP, ECDH and MACs.

Material is stored as bytes: PKCS#8 DER for private keys, the raw key for HMAC. `load` turns it
into a handle (a pyca key object, or the HMAC key) that the key store caches. Every algorithm is
one row of a table below, so a new key spec or algorithm is a new row, not a new branch.
Failures to verify or decrypt collapse into False or InvalidCiphertextException: nothing tells
which check failed.
"""

from __future__ import annotations

import hmac as std_hmac
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from ..errors import InvalidCiphertextException, ValidationException

try:  # ML-DSA (FIPS 204) needs cryptography >= 47 built with an OpenSSL that has it
    from cryptography.hazmat.primitives.asymmetric import mldsa

    _MLDSA: dict[str, Any] = {"ML_DSA_44": mldsa.MLDSA44PrivateKey, "ML_DSA_65": mldsa.MLDSA65PrivateKey,
                              "ML_DSA_87": mldsa.MLDSA87PrivateKey}
    mldsa.MLDSA44PrivateKey.generate()
except (ImportError, UnsupportedAlgorithm, AttributeError):  # pragma: no cover - depends on the wheel
    _MLDSA = {}

ML_DSA_SUPPORTED = bool(_MLDSA)

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ECC_NIST_P256": ec.SECP256R1, "ECC_NIST_P384": ec.SECP384R1, "ECC_NIST_P521": ec.SECP521R1,
    "ECC_SECG_P256K1": ec.SECP256K1,
}
_RSA_BITS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"SHA_1": hashes.SHA1, "SHA_224": hashes.SHA224,
                                                  "SHA_256": hashes.SHA256, "SHA_384": hashes.SHA384,
                                                  "SHA_512": hashes.SHA512}


@dataclass(frozen=True)
class SigningScheme:
    kind: str  # "pss" | "pkcs1" | "ecdsa" | "ed25519" | "mldsa"
    hash: type[hashes.HashAlgorithm] | None


SIGNING: dict[str, SigningScheme] = {
    **{f"RSASSA_PSS_SHA_{n}": SigningScheme("pss", _HASHES[f"SHA_{n}"]) for n in (256, 384, 512)},
    **{f"RSASSA_PKCS1_V1_5_SHA_{n}": SigningScheme("pkcs1", _HASHES[f"SHA_{n}"]) for n in (256, 384, 512)},
    **{f"ECDSA_SHA_{n}": SigningScheme("ecdsa", _HASHES[f"SHA_{n}"]) for n in (256, 384, 512)},
    "ED25519_SHA_512": SigningScheme("ed25519", None),
    "ML_DSA_SHAKE_256": SigningScheme("mldsa", None),
}
OAEP_HASH: dict[str, type[hashes.HashAlgorithm]] = {"RSAES_OAEP_SHA_1": hashes.SHA1,
                                                    "RSAES_OAEP_SHA_256": hashes.SHA256}
MAC_HASH: dict[str, type[hashes.HashAlgorithm]] = {f"HMAC_SHA_{n}": _HASHES[f"SHA_{n}"]
                                                   for n in (224, 256, 384, 512)}

_PKCS8 = (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate(spec: str) -> bytes:
    """A new private key of a key-pair spec, as PKCS#8 DER (raw specs take random bytes instead)."""
    key: Any
    if spec in _RSA_BITS:
        key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[spec])
    elif spec in _CURVES:
        key = ec.generate_private_key(_CURVES[spec]())
    elif spec == "ECC_NIST_EDWARDS25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif spec in _MLDSA:
        key = _MLDSA[spec].generate()
    else:
        raise ValidationException(f"KeySpec {spec} is not supported.")
    return key.private_bytes(*_PKCS8)  # type: ignore[no-any-return]


def data_key_pair(spec: str) -> tuple[bytes, bytes]:
    """A data key pair that is handed out, never stored: (PKCS#8 DER private, SPKI DER public)."""
    private_der = generate(spec)
    return private_der, public_key_der(load(spec, private_der))


def load(spec: str, material: bytes) -> Any:
    """A handle (a pyca private key object) for cryptography with a key pair's stored material."""
    return serialization.load_der_private_key(material, password=None)


def public_key_der(handle: Any) -> bytes:
    return handle.public_key().public_bytes(*_SPKI)  # type: ignore[no-any-return]


def check_private_key_matches(spec: str, handle: Any) -> bool:
    """Whether loaded material is of the spec's kind (used when material comes from outside)."""
    if spec in _RSA_BITS:
        return isinstance(handle, rsa.RSAPrivateKey) and handle.key_size == _RSA_BITS[spec]
    if spec in _CURVES:
        return isinstance(handle, ec.EllipticCurvePrivateKey) and isinstance(handle.curve, _CURVES[spec])
    if spec == "ECC_NIST_EDWARDS25519":
        return isinstance(handle, ed25519.Ed25519PrivateKey)
    if spec in _MLDSA:
        return isinstance(handle, _MLDSA[spec])
    return False


def _digest_or_raw(scheme: SigningScheme, algorithm: str, message: bytes, message_type: str) -> Any:
    """The hash argument pyca wants: the hash for RAW, Prehashed(hash) for a checked DIGEST."""
    assert scheme.hash is not None
    # An instance: pyca types digest_size and name as properties of HashAlgorithm, not of its class.
    h = scheme.hash()
    if message_type == "DIGEST":
        if len(message) != h.digest_size:
            raise ValidationException(f"Digest is invalid length for algorithm {algorithm}.")
        return utils.Prehashed(h)
    return h


def _check_message_type(scheme: SigningScheme, algorithm: str, message_type: str) -> None:
    if message_type == "EXTERNAL_MU":
        raise ValidationException(f"MessageType EXTERNAL_MU is not supported with {algorithm}.")
    if message_type == "DIGEST" and scheme.kind in ("ed25519", "mldsa"):
        raise ValidationException(f"MessageType DIGEST is not supported with {algorithm}; use RAW.")


def sign(handle: Any, algorithm: str, message: bytes, message_type: str) -> bytes:
    scheme = SIGNING[algorithm]
    _check_message_type(scheme, algorithm, message_type)
    if scheme.kind in ("ed25519", "mldsa"):
        return handle.sign(message)  # type: ignore[no-any-return]
    chosen = _digest_or_raw(scheme, algorithm, message, message_type)
    if scheme.kind == "ecdsa":
        return handle.sign(message, ec.ECDSA(chosen))  # type: ignore[no-any-return]
    return handle.sign(message, _rsa_padding(scheme), chosen)  # type: ignore[no-any-return]


def verify(handle: Any, algorithm: str, message: bytes, message_type: str, signature: bytes) -> bool:
    scheme = SIGNING[algorithm]
    _check_message_type(scheme, algorithm, message_type)
    public = handle.public_key()
    try:
        if scheme.kind in ("ed25519", "mldsa"):
            public.verify(signature, message)
        else:
            chosen = _digest_or_raw(scheme, algorithm, message, message_type)
            if scheme.kind == "ecdsa":
                public.verify(signature, message, ec.ECDSA(chosen))
            else:
                public.verify(signature, message, _rsa_padding(scheme), chosen)
    except (InvalidSignature, ValueError):
        return False
    return True


def _rsa_padding(scheme: SigningScheme) -> padding.AsymmetricPadding:
    assert scheme.hash is not None
    if scheme.kind == "pss":
        # KMS uses a salt as long as the hash output.
        h = scheme.hash()
        return padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
    return padding.PKCS1v15()


def _oaep(algorithm: str) -> padding.OAEP:
    h = OAEP_HASH[algorithm]
    return padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)


def rsa_max_plaintext(handle: Any, algorithm: str) -> int:
    return int(handle.key_size // 8 - 2 * OAEP_HASH[algorithm]().digest_size - 2)


def rsa_encrypt(handle: Any, algorithm: str, plaintext: bytes) -> bytes:
    limit = rsa_max_plaintext(handle, algorithm)
    if len(plaintext) > limit:
        raise ValidationException(
            f"Plaintext of {len(plaintext)} bytes is too long for this key and {algorithm} (at most {limit}).")
    return handle.public_key().encrypt(plaintext, _oaep(algorithm))  # type: ignore[no-any-return]


def rsa_decrypt(handle: Any, algorithm: str, ciphertext: bytes) -> bytes:
    try:
        return handle.decrypt(ciphertext, _oaep(algorithm))  # type: ignore[no-any-return]
    except ValueError:
        raise InvalidCiphertextException() from None


def mac(key: bytes, algorithm: str, message: bytes) -> bytes:
    return std_hmac.digest(key, message, MAC_HASH[algorithm]().name)


def mac_matches(key: bytes, algorithm: str, message: bytes, tag: bytes) -> bool:
    return std_hmac.compare_digest(mac(key, algorithm, message), tag)


def ecdh(handle: Any, peer_public_der: bytes) -> bytes:
    try:
        peer = serialization.load_der_public_key(peer_public_der)
    except (ValueError, UnsupportedAlgorithm):
        raise ValidationException("PublicKey is not a DER-encoded SubjectPublicKeyInfo.") from None
    if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != handle.curve.name:
        raise ValidationException("PublicKey must be an elliptic-curve key on the same curve as the KMS key.")
    return handle.exchange(ec.ECDH(), peer)  # type: ignore[no-any-return]
