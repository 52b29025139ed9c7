"""Known answers for every format openkms stores or returns (tests/vectors/*.json).

These pin the bytes: a change to a KDF label, an AAD label, the header layout or the context
encoding passes every round-trip test and breaks every stored ciphertext; it fails here. The
files were written once by tests/vectors/make_vectors.py; never regenerate them to make a test pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from openkms.accounts import secret_aad
from openkms.audit.log import SIGNING_KEY_AAD
from openkms.crypto import blob, root
from openkms.crypto.wrap import material_id
from openkms.errors import InvalidCiphertextException
from openkms.keystore.software import import_token_aad, material_aad, wrapping_key_aad

VECTORS = Path(__file__).parent.parent / "vectors"


def load(name: str) -> list[dict[str, Any]]:
    return list(json.loads((VECTORS / name).read_text()))


def fixed_random(data: bytes) -> Any:
    return mock.patch.object(os, "urandom", lambda n: data[:n])


@pytest.mark.parametrize("v", load("blob_v1.json"), ids=lambda v: f"v{v['version']}-{len(v['plaintext']) // 2}B")
def test_blob_v1(v: dict[str, Any]) -> None:
    material, data = bytes.fromhex(v["material"]), bytes.fromhex(v["blob"])
    header = blob.parse_header(data)
    assert (header.key_id, header.version, header.salt.hex()) == (v["key_id"], v["version"], v["salt"])
    assert blob.open_blob(material, header, data, v["context"]) == bytes.fromhex(v["plaintext"])
    with fixed_random(bytes.fromhex(v["salt"])):
        assert blob.seal(material, v["key_id"], v["version"], bytes.fromhex(v["plaintext"]), v["context"]) == data


def test_blob_v1_every_flipped_byte_fails() -> None:
    v = load("blob_v1.json")[2]
    material, data = bytes.fromhex(v["material"]), bytes.fromhex(v["blob"])
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(InvalidCiphertextException):
            blob.open_blob(material, blob.parse_header(bytes(tampered)), bytes(tampered), v["context"])
    with pytest.raises(InvalidCiphertextException):  # the context is bound too
        blob.open_blob(material, blob.parse_header(data), data, {**v["context"], "extra": "pair"})


LABELS = {
    "key material": material_aad("1234abcd-12ab-34cd-56ef-1234567890ab", 1),
    "key material, later version": material_aad("1234abcd-12ab-34cd-56ef-1234567890ab", 12),
    "secret access key": secret_aad("AKIAIOSFODNN7EXAMPLE"),
    "audit signing key": SIGNING_KEY_AAD,
    "root key check": root.CHECK_AAD,
    "import wrapping key": wrapping_key_aad("ab" * 32),
    "import token": import_token_aad("1234abcd-12ab-34cd-56ef-1234567890ab"),
    "empty": b"",
}


@pytest.mark.parametrize("v", load("sealed_v1.json"), ids=lambda v: v["what"])
def test_sealed_v1(v: dict[str, Any]) -> None:
    aad = v["aad"].encode()
    assert LABELS[v["what"]] == aad, "the AAD label of a stored value changed"
    key = root.RootKey(bytes.fromhex(v["root_key"]), "test")
    sealed = bytes.fromhex(v["sealed"])
    assert sealed[:1] == root.SEAL_FORMAT_V1
    assert key.unseal(sealed, aad) == bytes.fromhex(v["plaintext"])
    with fixed_random(bytes.fromhex(v["nonce"])):
        assert key.seal(bytes.fromhex(v["plaintext"]), aad) == sealed
    with pytest.raises(InvalidCiphertextException):
        key.unseal(sealed, aad + b"x")


def test_root_check_value() -> None:
    (v,) = [v for v in load("sealed_v1.json") if v["what"] == "root key check"]
    assert root.RootKey(bytes.fromhex(v["root_key"]), "test").verify_check(bytes.fromhex(v["sealed"]))


@pytest.mark.parametrize("v", load("passphrase_v1.json"))
def test_passphrase_root_key(v: dict[str, Any]) -> None:
    derived = root.from_passphrase(v["passphrase"], bytes.fromhex(v["salt"]))
    assert derived.verify_check(bytes.fromhex(v["check"]))
    assert not root.from_passphrase(v["passphrase"] + " ", bytes.fromhex(v["salt"])).verify_check(
        bytes.fromhex(v["check"]))


@pytest.mark.parametrize("v", load("material_id_v1.json"))
def test_key_material_id(v: dict[str, Any]) -> None:
    assert material_id(v["key_id"], bytes.fromhex(v["material"])) == v["material_id"]


@pytest.mark.parametrize("v", load("blob_v3.json"), ids=lambda v: f"v3-{len(v['plaintext']) // 2}B")
def test_blob_v3(v: dict[str, Any]) -> None:
    """Double encryption: the proxy's layer opens with the external key and the spec's AAD binding
    of openkms's AAD (header, SHA-256 of the context); inside is the format-1 blob of the key's own
    material."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = bytes.fromhex(v["blob"])
    header = blob.parse_header(data)
    assert (header.format, header.key_id, header.version) == (3, v["key_id"], v["version"])
    assert header.raw == blob.header_v3(v["key_id"], v["version"])
    aad = blob.xks_aad(header.raw, v["context"])
    assert aad.hex() == v["aad"]
    parts = blob.unpack_v3(data)
    binding = len(aad).to_bytes(2, "big") + aad + len(parts.metadata).to_bytes(1, "big") + parts.metadata
    inner = AESGCM(bytes.fromhex(v["external_key"])).decrypt(parts.iv, parts.ciphertext + parts.tag, binding)
    assert inner.hex() == v["inner"]
    inner_header = blob.parse_header(inner)
    assert blob.open_blob(bytes.fromhex(v["material"]), inner_header, inner, v["context"]) == \
        bytes.fromhex(v["plaintext"])
    assert blob.pack_v3(header.raw, parts) == data


@pytest.mark.parametrize("v", load("blob_v2.json"), ids=lambda v: f"v2-{len(v['plaintext']) // 2}B")
def test_blob_v2(v: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = bytes.fromhex(v["blob"])
    header = blob.parse_header(data)
    assert (header.format, header.key_id, header.version, header.salt.hex()) == (2, v["key_id"], v["version"], v["iv"])
    assert header.raw == blob.header_v2(v["key_id"], v["version"], bytes.fromhex(v["iv"]))
    opened = AESGCM(bytes.fromhex(v["material"])).decrypt(header.salt, data[len(header.raw):],
                                                          blob.aad(header.raw, v["context"]))
    assert opened == bytes.fromhex(v["plaintext"])
    with pytest.raises(InvalidCiphertextException):  # never opened as format 1
        blob.open_blob(bytes.fromhex(v["material"]), header, data, v["context"])
