"""The customer's side of BYOK: wrap key material with the wrapping public key from
GetParametersForImport, as `openkms byok wrap` does. Needs only `cryptography`.

The same can be done with nothing but the openssl command line; the README shows how.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..wrapping import WRAPPING_ALGORITHMS

_OAEP_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"SHA_1": hashes.SHA1, "SHA_256": hashes.SHA256}


def wrap_key_material(wrapping_public_key: bytes, algorithm: str, material: bytes) -> bytes:
    """`wrapping_public_key` is the DER (or PEM) SubjectPublicKeyInfo from GetParametersForImport."""
    if algorithm not in WRAPPING_ALGORITHMS:
        raise ValueError(f"unknown wrapping algorithm {algorithm}; one of {', '.join(WRAPPING_ALGORITHMS)}")
    hash_name, with_aes = WRAPPING_ALGORITHMS[algorithm]
    h = _OAEP_HASHES[hash_name]
    if wrapping_public_key.lstrip().startswith(b"-----BEGIN"):
        public = serialization.load_pem_public_key(wrapping_public_key)
    else:
        public = serialization.load_der_public_key(wrapping_public_key)
    if not isinstance(public, rsa.RSAPublicKey):
        raise ValueError("the wrapping key must be an RSA public key")
    oaep = padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)
    if not with_aes:
        return public.encrypt(material, oaep)
    aes_key = os.urandom(32)
    return public.encrypt(aes_key, oaep) + keywrap.aes_key_wrap_with_padding(aes_key, material)
