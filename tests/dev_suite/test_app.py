"""The application's tests: each creates what it needs, and relies on the reset for a clean start."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import records
from botocore.exceptions import ClientError


def test_store_starts_empty(kms: Any, secretsmanager: Any) -> None:
    assert kms.list_keys()["Keys"] == []
    assert secretsmanager.list_secrets()["SecretList"] == []


def test_seal_and_unseal_a_record(kms: Any, app_key: str) -> None:
    sealed = records.seal(kms, {"id": 7, "card": "4111 1111 1111 1111"})
    assert "4111" not in json.dumps(sealed)
    assert records.unseal(kms, sealed) == {"id": 7, "card": "4111 1111 1111 1111"}


def test_a_disabled_key_cannot_seal(kms: Any, app_key: str) -> None:
    kms.disable_key(KeyId=app_key)
    with pytest.raises(ClientError) as caught:
        records.seal(kms, {"id": 8})
    assert caught.value.response["Error"]["Code"] == "DisabledException"


def test_tampered_record_is_refused(kms: Any, app_key: str) -> None:
    sealed = records.seal(kms, {"id": 9})
    key = bytearray(base64.b64decode(sealed["key"]))
    key[-1] ^= 1
    sealed["key"] = base64.b64encode(bytes(key)).decode()
    with pytest.raises(ClientError) as caught:
        records.unseal(kms, sealed)
    assert caught.value.response["Error"]["Code"] == "InvalidCiphertextException"


def test_database_password(secretsmanager: Any) -> None:
    secretsmanager.create_secret(Name="app/db", SecretString=json.dumps({"password": "hunter2"}))
    assert records.database_password(secretsmanager) == "hunter2"


def test_caller_is_the_test_account(sts: Any) -> None:
    assert sts.get_caller_identity()["Account"] == "000000000000"
