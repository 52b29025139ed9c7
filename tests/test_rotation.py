"""Key rotation: on demand, automatic (the scheduler), across restarts, and exactly once on two nodes."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import bootstrap_env, run_sql
from tests.server import ServerProcess
from tests.test_lifecycle import wait_for


def code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def version_of(ciphertext: bytes) -> int:
    return int.from_bytes(ciphertext[17:21], "big")  # the blob header names the key version


def test_rotation_status_and_bounds(server: Any, kms: Any, key_id: str) -> None:
    status = kms.get_key_rotation_status(KeyId=key_id)
    assert status["KeyRotationEnabled"] is False and "NextRotationDate" not in status
    kms.enable_key_rotation(KeyId=key_id, RotationPeriodInDays=180)
    status = kms.get_key_rotation_status(KeyId=key_id)
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 180
    due = status["NextRotationDate"] - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=179, hours=23) < due <= dt.timedelta(days=180)
    kms.enable_key_rotation(KeyId=key_id)
    assert kms.get_key_rotation_status(KeyId=key_id)["RotationPeriodInDays"] == 365
    kms.disable_key_rotation(KeyId=key_id)
    assert kms.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is False
    loose = server.client(validate=False)
    for days in (89, 2561):
        with pytest.raises(ClientError) as e:
            loose.enable_key_rotation(KeyId=key_id, RotationPeriodInDays=days)
        assert code(e) == "ValidationException"


@pytest.mark.parametrize("spec,usage", [("RSA_2048", "SIGN_VERIFY"), ("HMAC_256", "GENERATE_VERIFY_MAC"),
                                        ("ECC_NIST_P256", "SIGN_VERIFY")])
def test_rotation_refused_for_asymmetric_and_hmac(kms: Any, spec: str, usage: str) -> None:
    key_id = kms.create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]["KeyId"]
    for call in (kms.enable_key_rotation, kms.rotate_key_on_demand, kms.get_key_rotation_status,
                 kms.list_key_rotations):
        with pytest.raises(ClientError) as e:
            call(KeyId=key_id)
        assert code(e) == "UnsupportedOperationException"


def test_rotation_refused_in_wrong_states(kms: Any, key_id: str) -> None:
    kms.disable_key(KeyId=key_id)
    for call in (kms.enable_key_rotation, kms.rotate_key_on_demand):
        with pytest.raises(ClientError) as e:
            call(KeyId=key_id)
        assert code(e) == "DisabledException"
    kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(ClientError) as e:
        kms.rotate_key_on_demand(KeyId=key_id)
    assert code(e) == "KMSInvalidStateException"


def test_on_demand_rotations_keep_old_ciphertexts(kms: Any, key_id: str) -> None:
    kms.create_alias(AliasName="alias/rotating", TargetKeyId=key_id)
    arn = kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
    cts = [kms.encrypt(KeyId="alias/rotating", Plaintext=b"v1", EncryptionContext={"n": "1"})["CiphertextBlob"]]
    for n in range(2, 5):
        assert kms.rotate_key_on_demand(KeyId=key_id)["KeyId"] == key_id
        cts.append(kms.encrypt(KeyId="alias/rotating", Plaintext=f"v{n}".encode(),
                               EncryptionContext={"n": str(n)})["CiphertextBlob"])
    assert [version_of(c) for c in cts] == [1, 2, 3, 4]
    for n, ct in enumerate(cts, start=1):
        out = kms.decrypt(CiphertextBlob=ct, EncryptionContext={"n": str(n)})
        assert out["Plaintext"] == f"v{n}".encode() and out["KeyId"] == arn
    moved = kms.re_encrypt(CiphertextBlob=cts[0], SourceEncryptionContext={"n": "1"}, DestinationKeyId=key_id,
                           DestinationEncryptionContext={"n": "1"})["CiphertextBlob"]
    assert version_of(moved) == 4
    md = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert md["KeyId"] == key_id and md["Arn"] == arn
    rotations = kms.list_key_rotations(KeyId=key_id)["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["ON_DEMAND"] * 3
    assert [r["KeyMaterialState"] for r in rotations] == ["NON_CURRENT", "NON_CURRENT", "CURRENT"]
    assert len({r["KeyMaterialId"] for r in rotations}) == 3
    everything = kms.list_key_rotations(KeyId=key_id, IncludeKeyMaterial="ALL_KEY_MATERIAL")["Rotations"]
    assert len(everything) == 4 and "RotationType" not in everything[0]
    pages = list(kms.get_paginator("list_key_rotations").paginate(KeyId=key_id, PaginationConfig={"PageSize": 2}))
    assert [len(p["Rotations"]) for p in pages] == [2, 1]


def test_on_demand_rotation_limit(kms: Any, key_id: str) -> None:
    for _ in range(10):
        kms.rotate_key_on_demand(KeyId=key_id)
    with pytest.raises(ClientError) as e:
        kms.rotate_key_on_demand(KeyId=key_id)
    assert code(e) == "LimitExceededException"


def test_rotations_survive_restart(tmp_path: Path, store_url: str | None) -> None:
    env = bootstrap_env()
    server = ServerProcess(tmp_path / "data", storage_url=store_url, env=env)
    server.start()
    kms = server.client()
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    cts = []
    for n in range(4):
        cts.append(kms.encrypt(KeyId=key_id, Plaintext=bytes([n]) * 8)["CiphertextBlob"])
        kms.rotate_key_on_demand(KeyId=key_id)
    server.stop()
    server = ServerProcess(tmp_path / "data", storage_url=store_url, env=env, port=server.port)
    server.start()
    try:
        kms = server.client()
        for n, ct in enumerate(cts):
            assert kms.decrypt(CiphertextBlob=ct)["Plaintext"] == bytes([n]) * 8
        assert version_of(kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]) == 5
    finally:
        server.stop()


def test_scheduler_rotates_due_keys(tmp_path: Path, store_url: str | None) -> None:
    env = bootstrap_env() | {"OPENKMS_SCHEDULER_INTERVAL": "0.3"}
    server = ServerProcess(tmp_path / "data", storage_url=store_url, env=env)
    server.start()
    try:
        kms = server.client()
        due, later, disabled = (kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(3))
        for k in (due, later, disabled):
            kms.enable_key_rotation(KeyId=k, RotationPeriodInDays=90)
        old = kms.encrypt(KeyId=due, Plaintext=b"before")["CiphertextBlob"]
        kms.disable_key(KeyId=disabled)
        for k in (due, disabled):
            run_sql(server.data_dir, store_url, ("UPDATE kms_keys SET next_rotation = ? WHERE key_id = ?",
                                                 (time.time() - 1, k)))
        assert wait_for(lambda: len(kms.list_key_rotations(KeyId=due)["Rotations"]) == 1)
        rotation = kms.list_key_rotations(KeyId=due)["Rotations"][0]
        assert rotation["RotationType"] == "AUTOMATIC" and rotation["KeyMaterialState"] == "CURRENT"
        next_date = kms.get_key_rotation_status(KeyId=due)["NextRotationDate"]
        assert next_date - dt.datetime.now(dt.UTC) > dt.timedelta(days=89)
        assert wait_for(lambda: version_of(kms.encrypt(KeyId=due, Plaintext=b"x")["CiphertextBlob"]) == 2,
                        timeout=10)  # the node's cache is refreshed within OPENKMS_CACHE_TTL
        assert kms.decrypt(CiphertextBlob=old)["Plaintext"] == b"before"
        time.sleep(1)
        assert kms.list_key_rotations(KeyId=later)["Rotations"] == []
        assert kms.list_key_rotations(KeyId=disabled)["Rotations"] == []  # disabled keys do not rotate
        assert kms.get_key_rotation_status(KeyId=disabled)["NextRotationDate"] > dt.datetime.now(dt.UTC)
        assert len(kms.list_key_rotations(KeyId=due)["Rotations"]) == 1  # and only once
    finally:
        server.stop()


def test_two_nodes_rotate_each_due_key_exactly_once(tmp_path: Path, pg_url: str) -> None:
    """Two server processes share one PostgreSQL store; both run the scheduler every 0.1 s."""
    env = bootstrap_env() | {"OPENKMS_SCHEDULER_INTERVAL": "0.1"}
    first = ServerProcess(tmp_path / "a", storage_url=pg_url, env=env)
    first.start()
    (tmp_path / "b").mkdir(mode=0o700)
    shutil.copy2(tmp_path / "a" / "root.key", tmp_path / "b" / "root.key")  # nodes share the root key
    second = ServerProcess(tmp_path / "b", storage_url=pg_url, env=env)
    second.start()
    try:
        kms_a, kms_b = first.client(), second.client()
        keys = [kms_a.create_key()["KeyMetadata"]["KeyId"] for _ in range(30)]
        for k in keys:
            kms_a.enable_key_rotation(KeyId=k, RotationPeriodInDays=90)
        ct = kms_a.encrypt(KeyId=keys[0], Plaintext=b"node a")["CiphertextBlob"]
        run_sql(tmp_path, pg_url, ("UPDATE kms_keys SET next_rotation = ? WHERE next_rotation IS NOT NULL",
                                   (time.time() - 1,)))
        assert wait_for(lambda: all(len(kms_b.list_key_rotations(KeyId=k)["Rotations"]) >= 1 for k in keys),
                        timeout=30)
        time.sleep(1.5)  # many more scheduler runs on both nodes
        counts = [len(kms_b.list_key_rotations(KeyId=k)["Rotations"]) for k in keys]
        assert counts == [1] * len(keys)
        # Each node decrypts what the other encrypted, before and after the rotation.
        assert kms_b.decrypt(CiphertextBlob=ct)["Plaintext"] == b"node a"
        ct_b = kms_b.encrypt(KeyId=keys[0], Plaintext=b"node b")["CiphertextBlob"]
        assert kms_a.decrypt(CiphertextBlob=ct_b)["Plaintext"] == b"node b"
        logs = first.output() + second.output()
        assert "rotated" in logs and "scheduler run failed" not in logs
    finally:
        second.stop()
        first.stop()
