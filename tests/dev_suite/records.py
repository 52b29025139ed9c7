"""The code under test: a tiny application that seals records with a KMS key (envelope encryption)
and reads its database password from Secrets Manager."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ALIAS = "alias/app"


def seal(kms: Any, record: dict[str, Any]) -> dict[str, str]:
    data_key = kms.generate_data_key(KeyId=KEY_ALIAS, KeySpec="AES_256",
                                     EncryptionContext={"purpose": "records"})
    nonce = os.urandom(12)
    body = AESGCM(data_key["Plaintext"]).encrypt(nonce, json.dumps(record).encode(), None)
    return {"key": base64.b64encode(data_key["CiphertextBlob"]).decode(),
            "body": base64.b64encode(nonce + body).decode()}


def unseal(kms: Any, sealed: dict[str, str]) -> dict[str, Any]:
    plaintext_key = kms.decrypt(CiphertextBlob=base64.b64decode(sealed["key"]),
                                EncryptionContext={"purpose": "records"})["Plaintext"]
    raw = base64.b64decode(sealed["body"])
    record: dict[str, Any] = json.loads(AESGCM(plaintext_key).decrypt(raw[:12], raw[12:], None))
    return record


def database_password(secretsmanager: Any) -> str:
    value: str = json.loads(secretsmanager.get_secret_value(SecretId="app/db")["SecretString"])["password"]
    return value
