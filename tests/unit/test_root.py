"""The root of trust (openkms.crypto.root) and in-memory key material (openkms.crypto.material)."""

from __future__ import annotations

import base64
import os
import pickle
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openkms.crypto.material import KeyMaterial
from openkms.crypto.root import ROOT_KEY_BYTES, RootKey, from_passphrase, load_key_file, new_salt
from openkms.errors import ConfigurationError, InvalidCiphertextException

KEY = bytes(range(100, 132))
ROOT = RootKey(KEY, source="test")


def secret_renderings(secret: bytes) -> list[str]:
    """Ways key bytes could leak into a string."""
    return [secret.hex(), secret.hex().upper(), repr(secret)[2:-1], base64.b64encode(secret).decode(),
            str(list(secret))[1:-1]]


# -- seal / unseal ----------------------------------------------------------------------------------
@given(plaintext=st.binary(max_size=512), aad=st.binary(max_size=64))
def test_seal_unseal_round_trip(plaintext: bytes, aad: bytes) -> None:
    sealed = ROOT.seal(plaintext, aad)
    assert len(plaintext) < 8 or plaintext not in sealed, "the plaintext must not show through"
    assert ROOT.unseal(sealed, aad) == plaintext


@given(aad=st.binary(max_size=32), other=st.binary(max_size=32))
def test_wrong_aad_is_invalid_ciphertext(aad: bytes, other: bytes) -> None:
    if aad == other:
        other += b"!"
    sealed = ROOT.seal(b"key material", aad)
    with pytest.raises(InvalidCiphertextException):
        ROOT.unseal(sealed, other)


@given(data=st.data())
def test_any_flipped_bit_is_invalid_ciphertext(data: st.DataObject) -> None:
    sealed = bytearray(ROOT.seal(b"key material", b"aad"))
    bit = data.draw(st.integers(min_value=0, max_value=len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InvalidCiphertextException):
        ROOT.unseal(bytes(sealed), b"aad")


@pytest.mark.parametrize("damage", [
    lambda s: b"",
    lambda s: s[:1],
    lambda s: s[:-1],
    lambda s: s[:20],
    lambda s: s + b"\x00",
    lambda s: b"\x02" + s[1:],
    lambda s: s[1:],
])
def test_damaged_sealed_values_are_invalid_ciphertext(damage: object) -> None:
    sealed = ROOT.seal(b"key material", b"aad")
    with pytest.raises(InvalidCiphertextException):
        ROOT.unseal(damage(sealed), b"aad")  # type: ignore[operator]


def test_another_root_key_cannot_unseal() -> None:
    sealed = ROOT.seal(b"key material", b"aad")
    with pytest.raises(InvalidCiphertextException):
        RootKey(os.urandom(ROOT_KEY_BYTES), source="other").unseal(sealed, b"aad")


def test_check_value() -> None:
    check = ROOT.make_check()
    assert ROOT.verify_check(check)
    assert not RootKey(os.urandom(ROOT_KEY_BYTES), source="other").verify_check(check)
    assert not ROOT.verify_check(b"")
    assert not ROOT.verify_check(check[:-1])


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_root_key_must_be_32_bytes(length: int) -> None:
    with pytest.raises(ConfigurationError):
        RootKey(b"k" * length, source="test")


# -- passphrase -------------------------------------------------------------------------------------
def test_from_passphrase_is_deterministic_per_salt() -> None:
    salt, other_salt = new_salt(), new_salt()
    assert salt != other_salt and len(salt) == 16
    a = from_passphrase("correct horse battery staple", salt)
    b = from_passphrase("correct horse battery staple", salt)
    c = from_passphrase("correct horse battery staple", other_salt)
    d = from_passphrase("correct horse battery stapler", salt)
    assert a.source == "passphrase"

    sealed = a.seal(b"secret", b"aad")
    assert b.unseal(sealed, b"aad") == b"secret"
    for other in (c, d):
        with pytest.raises(InvalidCiphertextException):
            other.unseal(sealed, b"aad")


# -- key file ---------------------------------------------------------------------------------------
def test_load_key_file_creates_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    created = load_key_file(path, create=True)
    assert created.source == "file"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == ROOT_KEY_BYTES
    assert [p.name for p in tmp_path.iterdir()] == ["root.key"], "no temporary file is left behind"

    loaded = load_key_file(path, create=False)
    assert loaded.unseal(created.seal(b"x", b"aad"), b"aad") == b"x"
    again = load_key_file(path, create=True)  # an existing file is read, never replaced
    assert again.unseal(created.seal(b"y", b"aad"), b"aad") == b"y"


def test_load_key_file_creates_a_private_file_under_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_key_file(tmp_path / "root.key", create=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "root.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o666, 0o610, 0o601])
def test_load_key_file_refuses_group_or_other_permissions(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "root.key"
    load_key_file(path, create=True)
    path.chmod(mode)
    for create in (False, True):
        with pytest.raises(ConfigurationError, match="chmod 600"):
            load_key_file(path, create=create)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_key_file_accepts_owner_only_permissions(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "root.key"
    load_key_file(path, create=True)
    path.chmod(mode)
    assert load_key_file(path, create=False).source == "file"


def test_load_key_file_refuses_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    with pytest.raises(ConfigurationError, match="missing"):
        load_key_file(path, create=False)
    assert not path.exists()


@pytest.mark.parametrize("length", [0, 31, 33])
def test_load_key_file_refuses_a_wrong_length(tmp_path: Path, length: int) -> None:
    path = tmp_path / "root.key"
    path.write_bytes(b"k" * length)
    path.chmod(0o600)
    with pytest.raises(ConfigurationError):
        load_key_file(path, create=False)


# -- nothing secret in reprs ------------------------------------------------------------------------
def test_root_key_repr_reveals_no_key_bytes() -> None:
    for text in (repr(ROOT), str(ROOT), f"{ROOT!r}", format(ROOT)):
        assert "test" in text or "RootKey" in text
        for rendering in secret_renderings(KEY):
            assert rendering not in text


def test_key_material_reveals_nothing() -> None:
    raw = os.urandom(32)
    material = KeyMaterial(raw)
    for text in (repr(material), str(material), f"{material}"):
        for rendering in secret_renderings(raw):
            assert rendering not in text
    assert material.reveal() == raw
    assert len(material) == 32
    with pytest.raises(TypeError):
        pickle.dumps(material)
    assert material != KeyMaterial(raw), "key material must not be comparable (timing, accidents)"
    with pytest.raises(TypeError):
        hash(material)


def test_root_key_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(ROOT)
