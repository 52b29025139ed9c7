"""Writes the known-answer files of this folder from fixed inputs (run once per new format, never to
"fix" a failing vector: a vector that no longer opens means stored data would no longer open).

    python tests/vectors/make_vectors.py

Each vector fixes every input, the random ones included (salt, nonce), and records the exact
bytes the format produced when it was introduced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

from openkms.accounts import secret_aad
from openkms.audit.log import SIGNING_KEY_AAD
from openkms.crypto import blob, root
from openkms.crypto.wrap import material_id
from openkms.keystore.software import import_token_aad, material_aad, wrapping_key_aad

HERE = Path(__file__).parent
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"


def fixed_random(data: bytes) -> mock._patch[object]:
    """os.urandom that returns `data` (the one random draw the format makes)."""
    return mock.patch.object(os, "urandom", lambda n: data[:n])


def blob_vectors() -> list[dict[str, object]]:
    cases = [
        (bytes(range(32)), KEY_ID, 1, b"", None),
        (bytes(range(32)), KEY_ID, 1, b"hello", {}),
        (bytes(range(1, 33)), KEY_ID, 7, b"hello", {"tenant": "t1", "app": "orders"}),
        (b"\xff" * 32, "00000000-0000-0000-0000-000000000001", 4294967295, bytes(range(256)),
         {"k\u00e9y": "v\u00e2lue", "": ""}),
    ]
    out = []
    for i, (material, key_id, version, plaintext, context) in enumerate(cases):
        salt = bytes([0x10 + i]) * blob.SALT_BYTES
        with fixed_random(salt):
            sealed = blob.seal(material, key_id, version, plaintext, context)
        out.append({"material": material.hex(), "key_id": key_id, "version": version, "salt": salt.hex(),
                    "plaintext": plaintext.hex(), "context": context, "blob": sealed.hex()})
    return out


def blob_v2_vectors() -> list[dict[str, object]]:
    """Format 2, as an HSM seals it (CKM_AES_GCM over header and context): made here with pyca's
    AES-GCM, which computes the same bytes for the same key, IV and AAD."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    out = []
    for i, (key_id, version, plaintext, context) in enumerate([
            (KEY_ID, 1, b"hsm data", {"tenant": "t1"}),
            ("00000000-0000-0000-0000-000000000002", 1, b"", None)]):
        material, iv = bytes([0x40 + i]) * 32, bytes([0x50 + i]) * blob.IV_BYTES
        header = blob.header_v2(key_id, version, iv)
        sealed = header + AESGCM(material).encrypt(iv, plaintext, blob.aad(header, context))
        out.append({"material": material.hex(), "key_id": key_id, "version": version, "iv": iv.hex(),
                    "plaintext": plaintext.hex(), "context": context, "blob": sealed.hex()})
    return out


def proxy_aad(aad: bytes, metadata: bytes) -> bytes:
    """The AAD an XKS proxy gives its HSM (spec): len16(aad) || aad || len8(metadata) || metadata."""
    return len(aad).to_bytes(2, "big") + aad + len(metadata).to_bytes(1, "big") + metadata


def blob_v3_vectors() -> list[dict[str, object]]:
    """Format 3 (external key stores): a format-1 blob under the key's own material, sealed again by
    the external key as an XKS proxy does it (AES-256-GCM, the spec's AAD binding), here with pyca."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    out = []
    for i, (key_id, version, plaintext, context, iv_len, metadata) in enumerate([
            (KEY_ID, 1, b"hyok data", {"tenant": "t1"}, 12, b""),
            ("00000000-0000-0000-0000-000000000003", 2, b"", None, 16, b"ekm-metadata-20bytes")]):
        material, salt = bytes([0x60 + i]) * 32, bytes([0x70 + i]) * blob.SALT_BYTES
        external, iv = bytes([0x80 + i]) * 32, bytes([0x90 + i]) * iv_len
        with fixed_random(salt):
            inner = blob.seal(material, key_id, version, plaintext, context)
        header = blob.header_v3(key_id, version)
        aad = blob.xks_aad(header, context)
        sealed = AESGCM(external).encrypt(iv, inner, proxy_aad(aad, metadata))
        parts = blob.XksParts(iv, metadata, sealed[-16:], sealed[:-16])
        out.append({"material": material.hex(), "external_key": external.hex(), "key_id": key_id,
                    "version": version, "plaintext": plaintext.hex(), "context": context, "aad": aad.hex(),
                    "inner": inner.hex(), "blob": blob.pack_v3(header, parts).hex()})
    return out


def sealed_vectors() -> list[dict[str, object]]:
    key = bytes(range(100, 132))
    cases = [
        ("key material", material_aad(KEY_ID, 1), bytes(range(32))),
        ("key material, later version", material_aad(KEY_ID, 12), b"\x00" * 64),
        ("secret access key", secret_aad("AKIAIOSFODNN7EXAMPLE"), b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        ("audit signing key", SIGNING_KEY_AAD, bytes(range(32, 64))),
        ("root key check", root.CHECK_AAD, root.CHECK_PLAINTEXT),
        ("import wrapping key", wrapping_key_aad("ab" * 32), b"0\x82\x04\xbd private key DER"),
        ("import token", import_token_aad(KEY_ID), bytes.fromhex("41d9000000000000") + bytes(16)),
        ("empty", b"", b""),
    ]
    out = []
    for i, (what, aad, plaintext) in enumerate(cases):
        nonce = bytes([0x20 + i]) * 12
        with fixed_random(nonce):
            sealed = root.RootKey(key, "test").seal(plaintext, aad)
        out.append({"what": what, "root_key": key.hex(), "aad": aad.decode(), "nonce": nonce.hex(),
                    "plaintext": plaintext.hex(), "sealed": sealed.hex()})
    return out


def passphrase_vectors() -> list[dict[str, object]]:
    salt = bytes(range(16))
    derived = root.from_passphrase("correct horse battery staple", salt)
    with fixed_random(b"\x30" * 12):
        check = derived.make_check()
    return [{"passphrase": "correct horse battery staple", "salt": salt.hex(), "check": check.hex()}]


def material_id_vectors() -> list[dict[str, object]]:
    return [{"key_id": KEY_ID, "material": m.hex(), "material_id": material_id(KEY_ID, m)}
            for m in (bytes(range(32)), b"\x00" * 16)]


def main() -> None:
    files = {"blob_v1.json": blob_vectors(), "blob_v2.json": blob_v2_vectors(), "blob_v3.json": blob_v3_vectors(),
             "sealed_v1.json": sealed_vectors(),
             "passphrase_v1.json": passphrase_vectors(), "material_id_v1.json": material_id_vectors()}
    for name, vectors in files.items():
        (HERE / name).write_text(json.dumps(vectors, indent=1, ensure_ascii=True) + "\n")


if __name__ == "__main__":
    main()
