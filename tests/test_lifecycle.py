"""Restarts, the root of trust, bootstrap and the deletion scheduler, with real server processes."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import ACCOUNT_ID, bootstrap_env, run_sql
from tests.server import ServerProcess


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def tree_digest(path: Path) -> dict[str, str]:
    """What the store holds; not SQLite's scratch files, nor the lock file naming the last server."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.endswith(("-shm", "-wal")) and p.name != "serve.lock"}


def test_first_start_bootstrap(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data)  # no bootstrap variables: everything is generated
    server.start()
    try:
        out = server.output()
        assert server.endpoint in out and "us-east-1" in out and str(data / "credentials") in out
        creds = data / "credentials"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert stat.S_IMODE((data / "root.key").stat().st_mode) == 0o600
        assert (data / "root.key").stat().st_size == 32
        text = creds.read_text()
        assert "[default]" in text and "aws_access_key_id" in text and "aws_secret_access_key" in text
        kms = server.client()  # reads the credentials file
        md = kms.create_key()["KeyMetadata"]
        assert md["AWSAccountId"].isdigit() and len(md["AWSAccountId"]) == 12
        assert md["AWSAccountId"] in out
        assert server.secret_access_key not in out  # the secret is written to the file, never printed
    finally:
        server.stop()


def test_restart_keeps_keys_aliases_tags_and_ciphertexts(tmp_path: Path, store_url: str | None) -> None:
    env = bootstrap_env()
    server = ServerProcess(tmp_path / "data", storage_url=store_url, env=env)
    server.start()
    kms = server.client()
    key = kms.create_key(Description="keep me", Tags=[{"TagKey": "t", "TagValue": "v"}])["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/keep", TargetKeyId=key)
    disabled = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.disable_key(KeyId=disabled)
    ct = kms.encrypt(KeyId="alias/keep", Plaintext=b"durable", EncryptionContext={"c": "1"})["CiphertextBlob"]
    server.stop()

    server = ServerProcess(tmp_path / "data", storage_url=store_url, env=env, port=server.port)
    server.start()
    try:
        kms = server.client()
        md = kms.describe_key(KeyId="alias/keep")["KeyMetadata"]
        assert md["KeyId"] == key and md["Description"] == "keep me"
        assert kms.list_resource_tags(KeyId=key)["Tags"] == [{"TagKey": "t", "TagValue": "v"}]
        assert kms.describe_key(KeyId=disabled)["KeyMetadata"]["KeyState"] == "Disabled"
        assert kms.decrypt(CiphertextBlob=ct, EncryptionContext={"c": "1"})["Plaintext"] == b"durable"
        assert "account id:  " not in server.output().split("openkms serving")[-1]  # no second bootstrap
    finally:
        server.stop()


def test_acknowledged_writes_survive_kill_9(tmp_path: Path, store_url: str | None) -> None:
    env = bootstrap_env()
    server = ServerProcess(tmp_path / "data", storage_url=store_url, env=env)
    server.start()
    kms = server.client()
    keys = [kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(5)]
    kms.create_alias(AliasName="alias/crash", TargetKeyId=keys[-1])
    import signal

    server.stop(sig=signal.SIGKILL)
    server = ServerProcess(tmp_path / "data", storage_url=store_url, env=env, port=server.port)
    server.start()
    try:
        kms = server.client()
        for k in keys:
            assert kms.describe_key(KeyId=k)["KeyMetadata"]["KeyState"] == "Enabled"
        assert kms.describe_key(KeyId="alias/crash")["KeyMetadata"]["KeyId"] == keys[-1]
    finally:
        server.stop()


def test_wrong_root_key_file_refuses_to_start_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, env=bootstrap_env())
    server.start()
    server.client().create_key()
    server.stop()
    (data / "root.key").write_bytes(os.urandom(32))
    before = tree_digest(data)
    bad = ServerProcess(data, env=bootstrap_env())
    bad.start(expect_failure=True)
    assert bad.proc is None or bad.proc.returncode != 0
    assert "wrong root key" in bad.output()
    assert tree_digest(data) == before


def test_missing_root_key_file_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, env=bootstrap_env())
    server.start()
    server.stop()
    (data / "root.key").unlink()
    bad = ServerProcess(data, env=bootstrap_env())
    bad.start(expect_failure=True)
    assert "root key file" in bad.output() and "missing" in bad.output()
    assert not (data / "root.key").exists()


def test_passphrase_root(tmp_path: Path, store_url: str | None) -> None:
    env = bootstrap_env() | {"OPENKMS_ROOT_PASSPHRASE": "correct horse battery staple"}
    data = tmp_path / "data"
    server = ServerProcess(data, storage_url=store_url, env=env)
    server.start()
    kms = server.client()
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    ct = kms.encrypt(KeyId=key, Plaintext=b"sealed by passphrase")["CiphertextBlob"]
    server.stop()
    assert not (data / "root.key").exists()

    wrong = ServerProcess(data, storage_url=store_url, env=env | {"OPENKMS_ROOT_PASSPHRASE": "wrong"})
    wrong.start(expect_failure=True)
    assert "wrong root passphrase" in wrong.output()
    missing = ServerProcess(data, storage_url=store_url, env={k: v for k, v in env.items()
                                                              if k != "OPENKMS_ROOT_PASSPHRASE"})
    missing.start(expect_failure=True)
    assert "OPENKMS_ROOT_PASSPHRASE" in missing.output()

    server = ServerProcess(data, storage_url=store_url, env=env)
    server.start()
    try:
        assert server.client().decrypt(CiphertextBlob=ct)["Plaintext"] == b"sealed by passphrase"
        assert "correct horse" not in server.output()
    finally:
        server.stop()


def test_store_reveals_no_key_material(tmp_path: Path) -> None:
    """Data keys returned to a client never appear in the store; nor does the secret access key."""
    data = tmp_path / "data"
    env = bootstrap_env()
    server = ServerProcess(data, env=env)
    server.start()
    kms = server.client()
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    data_keys = [kms.generate_data_key(KeyId=key, KeySpec="AES_256")["Plaintext"] for _ in range(3)]
    server.stop()
    blob = b"".join(p.read_bytes() for p in data.iterdir() if p.name.startswith("openkms.db"))
    for dk in data_keys:
        assert dk not in blob and dk.hex().encode() not in blob
    assert env["OPENKMS_BOOTSTRAP_SECRET_ACCESS_KEY"].encode() not in blob
    # Sealed material is the only form in the database: 1 format byte + 12 nonce + 32 key + 16 tag.
    with sqlite3.connect(data / "openkms.db") as conn:
        rows = conn.execute("select sealed_material from key_versions where key_id = ?", (key,)).fetchall()
    assert len(rows) == 1 and len(rows[0][0]) == 61


def key_gone(kms: Any, key_id: str) -> bool:
    try:
        kms.describe_key(KeyId=key_id)
    except ClientError as exc:
        return exc.response["Error"]["Code"] == "NotFoundException"
    return False


def test_scheduled_deletion_really_deletes(tmp_path: Path, store_url: str | None) -> None:
    env = bootstrap_env() | {"OPENKMS_SCHEDULER_INTERVAL": "0.5"}
    data = tmp_path / "data"
    server = ServerProcess(data, storage_url=store_url, env=env)
    server.start()
    try:
        kms = server.client()
        doomed = kms.create_key()["KeyMetadata"]["KeyId"]
        kept = kms.create_key()["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName="alias/doomed", TargetKeyId=doomed)
        ct = kms.encrypt(KeyId=doomed, Plaintext=b"bye")["CiphertextBlob"]
        kms.schedule_key_deletion(KeyId=doomed, PendingWindowInDays=7)
        kms.schedule_key_deletion(KeyId=kept, PendingWindowInDays=7)
        time.sleep(1.5)  # several scheduler runs: nothing is due yet
        assert kms.describe_key(KeyId=doomed)["KeyMetadata"]["KeyState"] == "PendingDeletion"
        # Move the window's end into the past, as if seven days had gone by.
        run_sql(data, store_url, ("UPDATE kms_keys SET deletion_date = ? WHERE key_id = ?",
                                  (time.time() - 1, doomed)))
        assert wait_for(lambda: key_gone(kms, doomed))
        assert kms.describe_key(KeyId=kept)["KeyMetadata"]["KeyState"] == "PendingDeletion"
        assert "alias/doomed" not in [a["AliasName"] for a in kms.list_aliases()["Aliases"]]
        with pytest.raises(ClientError) as e:
            kms.decrypt(CiphertextBlob=ct)
        assert e.value.response["Error"]["Code"] == "InvalidCiphertextException"
        assert doomed not in [k["KeyId"] for k in kms.list_keys()["Keys"]]
    finally:
        server.stop()


def test_deletion_due_while_stopped_happens_after_restart(tmp_path: Path, store_url: str | None) -> None:
    env = bootstrap_env() | {"OPENKMS_SCHEDULER_INTERVAL": "0.5"}
    data = tmp_path / "data"
    server = ServerProcess(data, storage_url=store_url, env=env)
    server.start()
    kms = server.client()
    doomed = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.schedule_key_deletion(KeyId=doomed, PendingWindowInDays=7)
    server.stop()
    run_sql(data, store_url, ("UPDATE kms_keys SET deletion_date = ? WHERE key_id = ?", (time.time() - 1, doomed)))
    server = ServerProcess(data, storage_url=store_url, env=env, port=server.port)
    server.start()
    try:
        assert wait_for(lambda: key_gone(server.client(), doomed))
    finally:
        server.stop()


def test_bootstrap_account_id_from_environment(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", env=bootstrap_env())
    server.start()
    try:
        assert server.client().create_key()["KeyMetadata"]["AWSAccountId"] == ACCOUNT_ID
    finally:
        server.stop()
