"""Secrets Manager's formats, pinned: the additional data a version is sealed with, the sealed value
(a known-answer vector made with pyca/cryptography directly, not with openkms's own code), secret
names and ARNs, and finding a secret by name, ARN or partial ARN in a real (SQLite) store."""

from __future__ import annotations

import string
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from openkms.crypto import aead
from openkms.errors import KMSError
from openkms.model import Account, Secret
from openkms.secrets import names
from openkms.secrets.sealing import _aad, context_of
from openkms.storage import Store

ACCOUNT = "111122223333"
ARN = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:prod/db-AbC123"
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def secret(name: str = "prod/db", arn: str = ARN, account: str = ACCOUNT, secret_id: str = "s-1") -> Secret:
    return Secret(secret_id, account, "us-east-1", name, arn, None, None, NOW, NOW)


def test_the_additional_data_is_the_encryption_context_as_canonical_json() -> None:
    assert context_of(secret(), "v-1") == {"SecretARN": ARN, "SecretVersionId": "v-1"}
    assert _aad(secret(), "v-1") == (
        b'{"SecretARN":"arn:aws:secretsmanager:us-east-1:111122223333:secret:prod/db-AbC123","SecretVersionId":"v-1"}')


# A stored value from outside openkms's code: AES-256-GCM(key, nonce, value, aad), nonce first.
KEY = bytes(range(32))
NONCE = bytes.fromhex("000102030405060708090a0b")
VALUE = b'{"username":"app","password":"hunter2"}'
SEALED = NONCE + bytes.fromhex("3c20a368a097ac7ae024b5b19388081da1faa54491082c0b571581a7274b68c7"
                               "6f64cb8e9de36f76605def6980b034bbe6ce1863665caf")


def test_a_sealed_value_opens_with_its_version_and_nothing_else() -> None:
    assert NONCE + AESGCM(KEY).encrypt(NONCE, VALUE, _aad(secret(), "v-1")) == SEALED
    assert aead.unseal(KEY, SEALED, _aad(secret(), "v-1")) == VALUE
    with pytest.raises(KMSError):  # another version's context
        aead.unseal(KEY, SEALED, _aad(secret(), "v-2"))
    with pytest.raises(KMSError):  # another secret (a new ARN for the same name)
        aead.unseal(KEY, SEALED, _aad(secret(arn=ARN[:-6] + "XyZ789"), "v-1"))


@given(st.integers(min_value=0, max_value=len(SEALED) - 1), st.integers(min_value=1, max_value=255))
@settings(max_examples=200, deadline=None)
def test_any_flipped_byte_is_refused(position: int, flip: int) -> None:
    broken = bytearray(SEALED)
    broken[position] ^= flip
    with pytest.raises(KMSError):
        aead.unseal(KEY, bytes(broken), _aad(secret(), "v-1"))


def test_a_truncated_value_is_refused() -> None:
    for n in (0, 1, 12, 27):
        with pytest.raises(KMSError):
            aead.unseal(KEY, SEALED[:n], _aad(secret(), "v-1"))


NAME_CHARS = string.ascii_letters + string.digits + "/_+=.@-"


@given(st.text(alphabet=NAME_CHARS, min_size=1, max_size=512))
@settings(max_examples=200, deadline=None)
def test_every_valid_name_makes_an_arn_that_parses_back(name: str) -> None:
    assert names.NAME_RE.match(name)
    arn = names.new_arn("eu-west-1", ACCOUNT, name)
    found = names.ARN_RE.match(arn)
    assert found is not None
    assert found.groups()[:2] == ("eu-west-1", ACCOUNT)
    assert found.group(3)[:-7] == name and found.group(3)[-7] == "-"
    assert all(c in string.ascii_letters + string.digits for c in found.group(3)[-6:])
    assert names.partial_arn("eu-west-1", ACCOUNT, name) == arn[:-7]
    assert names.account_of(arn, "999999999999") == ACCOUNT
    assert names.account_of(name, "999999999999") == "999999999999"


@pytest.mark.parametrize("bad", ["", "a" * 513, "has space", "semi;colon", "ünï", "star*"])
def test_invalid_names(bad: str) -> None:
    assert not names.NAME_RE.match(bad)


def test_suffixes_differ() -> None:
    assert len({names.new_arn("us-east-1", ACCOUNT, "x") for _ in range(50)}) == 50


def test_find_by_name_arn_and_partial_arn(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'openkms.db'}")
    other = "444455556666"
    try:
        with store.begin() as tx:
            for account in (ACCOUNT, other):
                tx.accounts.insert(Account(account, account, NOW))
            tx.secrets.insert(secret())
            # A name that looks like a partial ARN's suffix, and the same name in another account.
            tx.secrets.insert(secret("prod/db-AbC123", ARN + "-QwErTy", secret_id="s-2"))
            tx.secrets.insert(secret("prod/db", ARN.replace(ACCOUNT, other)[:-6] + "ZzZzZz", other, "s-3"))
        with store.begin() as tx:
            def found(secret_id: str, account: str = ACCOUNT) -> str | None:
                hit = names.find(tx, account, secret_id)
                return hit.secret_id if hit is not None else None

            assert found("prod/db") == "s-1"
            assert found(ARN) == "s-1"
            assert found(ARN[:-7]) == "s-1"  # the partial ARN
            assert found("prod/db-AbC123") == "s-2"  # a name is a name
            assert found(ARN + "-QwErTy") == "s-2"
            assert found("prod/db", other) == "s-3"  # by name: the caller's own account
            other_arn = ARN.replace(ACCOUNT, other)[:-6] + "ZzZzZz"
            assert found(other_arn) == "s-3"  # another account's secret: by ARN
            assert found(other_arn[:-7]) == "s-3"
            assert found(ARN[:-6] + "NoSuch") is None
            assert found("nope") is None
    finally:
        store.close()
