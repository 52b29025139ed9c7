"""Backups and restore, as an operator runs them: `openkms backup` and `openkms restore` as
subprocesses against real servers, and pg_dump / pg_restore for a PostgreSQL store.

A server on SQLite gets keys (symmetric, ECC signing, RSA encryption), aliases, a key policy, grants,
a secret and ciphertexts; the backup is taken from the command line while another thread keeps
calling the server (online); then a fresh data dir is restored from it and, with the root key file
put back, serves the same keys, aliases, policies, grants, secret and audit records, decrypts the
old ciphertexts and passes `openkms audit verify` with the audit public key kept apart. Damaged,
truncated and foreign files, used data dirs, a data dir a server holds and bad data dirs for
`backup` are each refused with one line and exit code 2, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from openkms.backup import check_backup
from openkms.errors import ConfigurationError
from openkms.node import DataDirLock
from tests.conftest import ACCOUNT_ID, bootstrap_env, drop_pg_database, new_pg_database
from tests.server import ServerProcess
from tests.test_audit import admin_client, all_events, leaks, openkms_cli, request_id, verify_log

NOT_IN_A_BACKUP = ("root.key", "credentials", "node-id", "serve.lock", "openkms.db-wal", "openkms.db-shm")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = openkms_cli(*args)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def refused(*args: str) -> str:
    """The command's one line on stderr, after checking it failed with exit code 2 and no traceback."""
    proc = run(*args)
    assert proc.returncode == 2, f"{args} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def state(server: ServerProcess) -> dict[str, Any]:
    """What a restore must bring back, as the API shows it."""
    kms = server.client()
    keys = sorted(k["KeyId"] for k in kms.list_keys(Limit=1000)["Keys"])
    described = {}
    for key_id in keys:
        meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
        described[key_id] = {k: v for k, v in meta.items() if k != "CreationDate"} | {
            "CreationDate": meta["CreationDate"].timestamp()}
    return {
        "keys": described,
        "aliases": sorted((a["AliasName"], a.get("TargetKeyId")) for a in kms.list_aliases(Limit=100)["Aliases"]),
        "policies": {k: kms.get_key_policy(KeyId=k, PolicyName="default")["Policy"] for k in keys},
        "grants": {k: sorted(json.dumps(g, sort_keys=True, default=str) for g in kms.list_grants(KeyId=k)["Grants"])
                   for k in keys},
        "public_keys": {k: kms.get_public_key(KeyId=k)["PublicKey"] for k in keys
                        if described[k]["KeySpec"] != "SYMMETRIC_DEFAULT"},
    }


@dataclass
class Original:
    server: ServerProcess
    env: dict[str, str]
    backup: Path
    public_key: Path  # the audit public key, kept apart from the server
    state: dict[str, Any]
    sym: str
    signer: str
    rsa: str
    ciphertexts: list[tuple[bytes, bytes, dict[str, str]]]  # (plaintext, blob, context)
    signature: bytes
    rsa_blob: bytes
    secret_id: str
    secret_value: str
    request_ids: list[str]  # of calls answered before the backup began
    intent_event_id: str  # a call that committed without its record: in the backup as an intent
    after_backup_key: str  # made on the original after the backup: not in it
    calls_during_backup: int
    load_errors: list[str] = field(default_factory=list)


def load(server: ServerProcess, key_id: str, churn_key: str, stop: threading.Event, counter: list[int],
         errors: list[str]) -> None:
    """Calls that go on while the backup runs: crypto, and a change (a tag) with its audit intent."""
    kms = server.client()
    n = 0
    while not stop.is_set():
        try:
            kms.encrypt(KeyId=key_id, Plaintext=b"during the backup")
            kms.tag_resource(KeyId=churn_key, Tags=[{"TagKey": "n", "TagValue": str(n)}])
            n += 1
            counter[0] = n
        except Exception as exc:
            errors.append(repr(exc))
            return


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Original]:
    base = tmp_path_factory.mktemp("backup-original")
    env = {**bootstrap_env(), "OPENKMS_AUDIT_DIGEST_INTERVAL": "1"}
    server = ServerProcess(base / "data", env=env)
    server.start()
    try:
        kms, sm = server.client(), server.client(service="secretsmanager")
        ids: list[str] = []
        sym = kms.create_key(Description="symmetric")
        ids.append(request_id(sym))
        sym_id = sym["KeyMetadata"]["KeyId"]
        signer = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
        rsa = kms.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
        churn = kms.create_key(Description="tagged during the backup")["KeyMetadata"]["KeyId"]
        ids.append(request_id(kms.create_alias(AliasName="alias/backup-sym", TargetKeyId=sym_id)))
        kms.create_alias(AliasName="alias/backup-signer", TargetKeyId=signer)
        policy = json.dumps({"Version": "2012-10-17", "Statement": [
            {"Sid": "root", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT_ID}:root"},
             "Action": "kms:*", "Resource": "*"},
            {"Sid": "app", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT_ID}:user/app"},
             "Action": ["kms:Decrypt"], "Resource": "*"}]})
        ids.append(request_id(kms.put_key_policy(KeyId=sym_id, PolicyName="default", Policy=policy)))
        grant = kms.create_grant(KeyId=sym_id, GranteePrincipal=f"arn:aws:iam::{ACCOUNT_ID}:user/app",
                                 Operations=["Decrypt", "Encrypt"], Name="app-grant")
        ids.append(request_id(grant))
        kms.create_grant(KeyId=rsa, GranteePrincipal=f"arn:aws:iam::{ACCOUNT_ID}:user/worker",
                         Operations=["Decrypt"], Constraints={"EncryptionContextSubset": {"tenant": "t1"}})
        ciphertexts = []
        for i in range(3):
            context = {"tenant": f"t{i}"}
            plaintext = f"old data {i}".encode()
            reply = kms.encrypt(KeyId="alias/backup-sym", Plaintext=plaintext, EncryptionContext=context)
            ids.append(request_id(reply))
            ciphertexts.append((plaintext, reply["CiphertextBlob"], context))
        data_key = kms.generate_data_key(KeyId=sym_id, KeySpec="AES_256")
        ciphertexts.append((data_key["Plaintext"], data_key["CiphertextBlob"], {}))
        signature = kms.sign(KeyId=signer, Message=b"signed before the backup", SigningAlgorithm="ECDSA_SHA_256",
                             MessageType="RAW")["Signature"]
        rsa_blob = kms.encrypt(KeyId=rsa, Plaintext=b"rsa before", EncryptionAlgorithm="RSAES_OAEP_SHA_256",
                               )["CiphertextBlob"]
        secret_value = json.dumps({"username": "app", "password": uuid.uuid4().hex})
        secret = sm.create_secret(Name="backup/db", SecretString=secret_value, KmsKeyId=sym_id)
        ids.append(request_id(secret))
        public_key = base / "audit-public.pem"
        proc = run("audit", "public-key", "--endpoint-url", server.endpoint,
                   "--credentials-file", str(server.data_dir / "credentials"))
        assert proc.returncode == 0, proc.stderr
        public_key.write_text(proc.stdout)
        deadline = time.monotonic() + 20  # a signed digest (every second) and its exported copy
        while not list((server.data_dir / "audit-digests").glob("*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.2)
        before = state(server)

        # A call that committed its change but not yet its record: its intent is in the store.
        event = next(e for e in all_events(admin_client(server)) if e["eventName"] == "CreateAlias")
        event_id = str(uuid.uuid4())
        with sqlite3.connect(server.data_dir / "openkms.db") as conn:
            node = conn.execute("SELECT node_id FROM audit_events LIMIT 1").fetchone()[0]
            conn.execute("INSERT INTO audit_pending (node_id, event_id, created, event) VALUES (?, ?, ?, ?)",
                         (node, event_id, time.time(), json.dumps({**event, "eventID": event_id})))

        stop, counter, errors = threading.Event(), [0], []
        worker = threading.Thread(target=load, args=(server, sym_id, churn, stop, counter, errors))
        worker.start()
        try:
            while counter[0] < 5 and worker.is_alive():
                time.sleep(0.05)
            at_start = counter[0]
            out = base / "backups" / "openkms.tar"
            out.parent.mkdir()
            proc = run("backup", "--data-dir", str(server.data_dir), "--out", str(out))
            during = counter[0] - at_start
        finally:
            stop.set()
            worker.join()
        assert proc.returncode == 0, proc.stderr
        assert "root key is NOT in it" in proc.stdout and str(server.data_dir / "root.key") in proc.stdout
        assert not errors, errors
        after = kms.create_key(Description="made after the backup")["KeyMetadata"]["KeyId"]
        yield Original(server, env, out, public_key, before, sym_id, signer, rsa, ciphertexts, signature,
                       rsa_blob, secret["ARN"], secret_value, ids, event_id, after, during, errors)
    finally:
        server.stop()


def test_backup_is_one_private_file_without_the_root_key_or_plaintext_secrets(original: Original) -> None:
    assert original.backup.stat().st_mode & 0o777 == 0o600
    assert not [p for p in original.backup.parent.iterdir() if p != original.backup], "temporary files left"
    with tarfile.open(original.backup) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and "openkms.db" in names
    assert any(n.startswith("audit-digests/") for n in names), names
    assert not [n for n in names if Path(n).name in NOT_IN_A_BACKUP], names
    root_key = (original.server.data_dir / "root.key").read_bytes()
    secrets = {"root key": root_key, "secret access key": original.env["OPENKMS_BOOTSTRAP_SECRET_ACCESS_KEY"].encode(),
               "secret value": original.secret_value.encode(), "data key": original.ciphertexts[-1][0]}
    assert leaks(original.backup.read_bytes(), secrets) == []
    manifest = check_backup(original.backup)
    assert (manifest.store, manifest.root_source, manifest.region) == ("sqlite", "file", "us-east-1")
    assert manifest.counts["keys"] == len(original.state["keys"]) and manifest.counts["secrets"] == 1


def test_the_backup_was_taken_while_calls_went_on(original: Original) -> None:
    assert original.calls_during_backup > 0, "no call was answered while the backup ran: it was not online"


@pytest.fixture(scope="module")
def restored(original: Original, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("backup-restored") / "data"
    proc = run("restore", str(original.backup), "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    carried = re.search(r"(\d+) call\(s\) had committed", proc.stdout)  # ours, and any in flight
    assert "copy the root.key" in proc.stdout and carried and int(carried.group(1)) >= 1, proc.stdout
    assert not (data / "root.key").exists() and not (data / "credentials").exists()
    server = ServerProcess(data, env=original.env)  # the old access keys: they are in the store
    server.start(expect_failure=True)  # without the root key, nothing opens the store
    assert server.proc is None or server.proc.returncode == 2
    assert "root key file" in server.output() and "is missing" in server.output()
    server.stop()
    shutil.copy2(original.server.data_dir / "root.key", data / "root.key")
    server.start()
    yield server
    server.stop()


def test_restored_node_serves_the_same_keys_aliases_policies_and_grants(original: Original,
                                                                       restored: ServerProcess) -> None:
    got = state(restored)
    assert got == original.state
    assert original.after_backup_key not in got["keys"], "the backup is not the store as it was when it was taken"


def test_old_ciphertexts_decrypt_and_old_signatures_verify(original: Original, restored: ServerProcess) -> None:
    kms = restored.client()
    for plaintext, blob, context in original.ciphertexts:
        reply = kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)
        assert reply["Plaintext"] == plaintext and reply["KeyId"].endswith(original.sym)
    assert kms.verify(KeyId=original.signer, Message=b"signed before the backup", Signature=original.signature,
                      SigningAlgorithm="ECDSA_SHA_256", MessageType="RAW")["SignatureValid"]
    assert kms.decrypt(KeyId=original.rsa, CiphertextBlob=original.rsa_blob,
                       EncryptionAlgorithm="RSAES_OAEP_SHA_256")["Plaintext"] == b"rsa before"
    # and the keys still work for new data
    blob = kms.encrypt(KeyId="alias/backup-sym", Plaintext=b"new")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"new"


def test_the_secret_reads(original: Original, restored: ServerProcess) -> None:
    sm = restored.client(service="secretsmanager")
    assert sm.get_secret_value(SecretId="backup/db")["SecretString"] == original.secret_value
    assert sm.describe_secret(SecretId=original.secret_id)["Name"] == "backup/db"


def test_audit_records_are_there_and_the_restored_node_starts_a_chain_of_its_own(
        original: Original, restored: ServerProcess) -> None:
    events = all_events(admin_client(restored))
    have = {e["requestID"] for e in events}
    assert set(original.request_ids) <= have
    recovered = [e for e in events if e["eventID"] == original.intent_event_id]
    assert len(recovered) == 1 and recovered[0]["additionalEventData"]["recoveredFromIntent"] is True
    with sqlite3.connect(restored.data_dir / "openkms.db") as conn:
        nodes = {r[0] for r in conn.execute("SELECT DISTINCT node_id FROM audit_events")}
        assert conn.execute("SELECT count(*) FROM audit_pending").fetchone()[0] == 0
    old_node = (original.server.data_dir / "node-id").read_text().strip()
    new_node = (restored.data_dir / "node-id").read_text().strip()
    assert new_node != old_node and nodes == {old_node, new_node}
    assert (restored.data_dir / "audit-digests" / f"{old_node}.jsonl").is_file()


def test_audit_verify_passes_on_the_restored_store(original: Original, restored: ServerProcess) -> None:
    restored.client().list_keys()  # a record of the new node's, signed at its stop
    restored.stop()
    try:
        for extra in ([], ["--public-key", str(original.public_key)]):
            proc = verify_log(restored.data_dir, None, *extra)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert proc.stdout.startswith("2 chain(s), ") and proc.stdout.splitlines()[0].endswith(": OK"), proc.stdout
            assert " 0 digest(s)" not in proc.stdout
        # The restored digests are checked: a tampered record of the old chain is found.
        with sqlite3.connect(restored.data_dir / "openkms.db") as conn:
            conn.execute("UPDATE audit_events SET record = replace(record, 'CreateAlias', 'CreateAliaz') "
                         "WHERE event_name = 'CreateAlias'")
        try:
            assert verify_log(restored.data_dir, None).returncode == 1
        finally:
            with sqlite3.connect(restored.data_dir / "openkms.db") as conn:
                conn.execute("UPDATE audit_events SET record = replace(record, 'CreateAliaz', 'CreateAlias') "
                             "WHERE event_name = 'CreateAlias'")
        assert verify_log(restored.data_dir, None).returncode == 0
    finally:
        restored.start()


# -- refusals --------------------------------------------------------------------------------------


def member_offset(backup: Path, name: str) -> int:
    with tarfile.open(backup) as tar:
        return int(tar.getmember(name).offset_data)


def flipped(backup: Path, offset: int, out: Path) -> Path:
    data = bytearray(backup.read_bytes())
    data[offset] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def test_restore_refuses_a_corrupted_backup_before_writing_anything(original: Original, tmp_path: Path) -> None:
    size = original.backup.stat().st_size
    db = member_offset(original.backup, "openkms.db")
    cases = {"the store": db + 4096 + 17, "the manifest": member_offset(original.backup, "manifest.json") + 40,
             "the store's first page": db + 3}
    for what, offset in cases.items():
        bad = flipped(original.backup, offset, tmp_path / "bad.tar")
        target = tmp_path / "target"
        line = refused("restore", str(bad), "--data-dir", str(target))
        assert "damaged" in line, (what, line)
        assert not target.exists(), f"a corrupted backup ({what}) wrote {list(target.iterdir())}"
    assert size > db + 4096 + 17


def test_no_flipped_byte_restores_anything_but_the_backup(original: Original, tmp_path: Path) -> None:
    """Anywhere a byte flips, the backup is refused, or (in tar padding) reads back exactly as made."""
    good = original.backup.read_bytes()
    reference = check_backup(original.backup, extract_to=(tmp_path / "ref"))
    want = {p.relative_to(tmp_path / "ref"): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (tmp_path / "ref").rglob("*") if p.is_file()}
    refused_count = 0
    for i, offset in enumerate(range(0, len(good), max(1, len(good) // 200))):
        bad = flipped(original.backup, offset, tmp_path / "bad.tar")
        out = tmp_path / f"x{i}"
        out.mkdir()
        try:
            manifest = check_backup(bad, extract_to=out)
        except ConfigurationError as exc:
            refused_count += 1
            assert "\n" not in str(exc)
            continue
        got = {p.relative_to(out): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
        assert manifest == reference and got == want, f"byte {offset} flipped went unnoticed"
    assert refused_count > 150


def test_restore_refuses_a_truncated_backup(original: Original, tmp_path: Path) -> None:
    good = original.backup.read_bytes()
    db = member_offset(original.backup, "openkms.db")
    for length in (0, 100, db - 512, db + 10, len(good) // 2, db + check_backup(original.backup).members[0].size - 1):
        short = tmp_path / "short.tar"
        short.write_bytes(good[:length])
        target = tmp_path / "target"
        line = refused("restore", str(short), "--data-dir", str(target))
        assert "openkms restore: " in line and ("truncated" in line or "not an openkms backup" in line), line
        assert not target.exists()


def test_restore_refuses_a_foreign_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    foreign = tmp_path / "foreign.tar"
    with tarfile.open(foreign, "w") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    assert "not an openkms backup" in refused("restore", str(foreign), "--data-dir", str(tmp_path / "d"))
    fake = tmp_path / "fake.tar"
    with tarfile.open(fake, "w") as tar:
        tar.add(tmp_path / "notes.txt", arcname="manifest.json")
    assert "manifest is damaged" in refused("restore", str(fake), "--data-dir", str(tmp_path / "d"))
    (tmp_path / "random.bin").write_bytes(os.urandom(5000))
    assert "not an openkms backup" in refused("restore", str(tmp_path / "random.bin"),
                                                      "--data-dir", str(tmp_path / "d"))
    assert "no such file" in refused("restore", str(tmp_path / "missing.tar"), "--data-dir", str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()


def test_restore_refuses_a_used_data_dir(original: Original, tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "openkms.db").write_bytes(b"")
    assert "already has a store" in refused("restore", str(original.backup), "--data-dir", str(used))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes").write_text("x")
    assert "is not empty" in refused("restore", str(original.backup), "--data-dir", str(other))
    assert sorted(os.listdir(other)) == ["notes"] and os.listdir(used) == ["openkms.db"]
    # a data dir that holds only the root key file is fresh: the root key may be put back first
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    shutil.copy2(original.server.data_dir / "root.key", fresh / "root.key")
    proc = run("restore", str(original.backup), "--data-dir", str(fresh))
    assert proc.returncode == 0 and "root.key is in place" in proc.stdout, proc.stdout + proc.stderr


def test_restore_refuses_a_data_dir_a_server_holds(original: Original, tmp_path: Path) -> None:
    held = tmp_path / "held"
    lock = DataDirLock(held)  # as a running server holds it
    try:
        line = refused("restore", str(original.backup), "--data-dir", str(held))
        assert "in use by another openkms server" in line, line
        assert sorted(os.listdir(held)) == ["serve.lock"]
    finally:
        lock.release()


def test_backup_refuses_bad_data_dirs_and_outputs(original: Original, tmp_path: Path) -> None:
    out = str(tmp_path / "b.tar")
    assert "no store at" in refused("backup", "--data-dir", str(tmp_path / "missing"), "--out", out)
    assert not (tmp_path / "missing").exists()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "openkms.db").write_bytes(os.urandom(8192))
    assert "openkms backup: " in refused("backup", "--data-dir", str(garbage), "--out", out)
    assert "inside the data dir" in refused("backup", "--data-dir", str(original.server.data_dir),
                                            "--out", str(original.server.data_dir / "b.tar"))
    assert "no directory" in refused("backup", "--data-dir", str(original.server.data_dir),
                                     "--out", str(tmp_path / "nope" / "b.tar"))
    assert not (tmp_path / "b.tar").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["garbage"]


def test_backup_of_a_postgresql_store_says_to_use_pg_dump(tmp_path: Path) -> None:
    line = refused("backup", "--storage-url", "postgresql://openkms:s3cret-pw@db.example:5432/kms?sslmode=require",
                   "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "kms.dump"))
    assert "pg_dump --format=custom" in line and "postgresql://openkms@db.example:5432/kms?sslmode=require" in line
    assert "s3cret-pw" not in line


# -- audit archives --------------------------------------------------------------------------------


def test_archived_audit_records_are_in_the_backup(tmp_path: Path) -> None:
    env = {**bootstrap_env(), "OPENKMS_AUDIT_DIGEST_INTERVAL": "1", "OPENKMS_SCHEDULER_INTERVAL": "0.5",
           "OPENKMS_AUDIT_RETENTION_DAYS": "0.00001"}  # records move to archives after ~1 s
    server = ServerProcess(tmp_path / "data", env=env)
    server.start()
    try:
        kms = server.client()
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key, Plaintext=b"archived")["CiphertextBlob"]
        archive = server.data_dir / "audit-archive"
        deadline = time.monotonic() + 30
        while not list(archive.glob("*.jsonl")) and time.monotonic() < deadline:
            kms.list_keys()
            time.sleep(0.3)
        assert list(archive.glob("*.jsonl")), "no audit records were archived"
        out = tmp_path / "b.tar"
        assert run("backup", "--data-dir", str(server.data_dir), "--out", str(out)).returncode == 0
    finally:
        server.stop()
    data = tmp_path / "restored"
    assert run("restore", str(out), "--data-dir", str(data)).returncode == 0
    restored_archives = sorted((data / "audit-archive").glob("*.jsonl"))
    assert restored_archives
    for path in restored_archives:
        assert path.read_bytes() == (archive / path.name).read_bytes()
    shutil.copy2(server.data_dir / "root.key", data / "root.key")
    proc = verify_log(data, None)
    assert proc.returncode == 0, proc.stdout
    # The archives hold records the store no longer has: without them, verify finds them missing.
    moved = tmp_path / "moved"
    shutil.move(data / "audit-archive", moved)
    assert verify_log(data, None).returncode == 1
    shutil.move(moved, data / "audit-archive")
    again = ServerProcess(data, env=env)
    again.start()
    try:
        assert again.client().decrypt(CiphertextBlob=blob)["Plaintext"] == b"archived"
    finally:
        again.stop()
    assert verify_log(data, None).returncode == 0


# -- PostgreSQL: pg_dump and pg_restore --------------------------------------------------------------


def test_postgresql_store_restores_from_pg_dump(tmp_path: Path, pg_dsn: str, pg_admin: object) -> None:
    assert shutil.which("pg_dump") and shutil.which("pg_restore"), "pg_dump and pg_restore must be installed"
    source = new_pg_database(pg_admin, pg_dsn)
    target = new_pg_database(pg_admin, pg_dsn)
    try:
        env = {**bootstrap_env(), "OPENKMS_AUDIT_DIGEST_INTERVAL": "1"}
        server = ServerProcess(tmp_path / "node1", storage_url=source, env=env)
        server.start()
        try:
            kms = server.client()
            key = kms.create_key()["KeyMetadata"]["KeyId"]
            kms.create_alias(AliasName="alias/pg", TargetKeyId=key)
            blobs = [kms.encrypt(KeyId="alias/pg", Plaintext=f"pg {i}".encode())["CiphertextBlob"] for i in range(3)]
            server.client(service="secretsmanager").create_secret(Name="pg/secret", SecretString="v1",
                                                                  KmsKeyId=key)
            time.sleep(1.5)
            before = state(server)
            dump = tmp_path / "openkms.dump"
            done = subprocess.run(["pg_dump", "--format=custom", f"--file={dump}", source],
                                  capture_output=True, text=True, timeout=120, check=False)  # online
            assert done.returncode == 0, done.stderr
        finally:
            server.stop()
        done = subprocess.run(["pg_restore", "--no-owner", "--exit-on-error", f"--dbname={target}", str(dump)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        node2 = tmp_path / "node2"  # a fresh node: its own data dir, the root key put back
        node2.mkdir(mode=0o700)
        shutil.copy2(server.data_dir / "root.key", node2 / "root.key")
        again = ServerProcess(node2, storage_url=target, env=env)
        again.start()
        try:
            assert state(again) == before
            kms = again.client()
            assert [kms.decrypt(CiphertextBlob=b)["Plaintext"] for b in blobs] == [b"pg 0", b"pg 1", b"pg 2"]
            sm = again.client(service="secretsmanager")
            assert sm.get_secret_value(SecretId="pg/secret")["SecretString"] == "v1"
        finally:
            again.stop()
        proc = verify_log(node2, target)
        assert proc.returncode == 0 and proc.stdout.startswith("2 chain(s)"), proc.stdout
    finally:
        drop_pg_database(pg_admin, source)
        drop_pg_database(pg_admin, target)


# -- the other root key sources: a passphrase, an HSM token ------------------------------------------


@pytest.mark.parametrize("source", ["passphrase", "pkcs11"])
def test_restore_with_a_passphrase_or_hsm_root(source: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Neither a passphrase nor a PIN is ever written to a backup or printed; the restored store
    opens only once the same source is given again."""
    from tests.test_root_hsm import PIN, pkcs11_flags

    secret = f"passphrase-{uuid.uuid4().hex}" if source == "passphrase" else PIN
    if source == "passphrase":
        root_env, args = {"OPENKMS_ROOT_PASSPHRASE": secret}, []
    else:
        hsm = request.getfixturevalue("softhsm")
        root_env, args = {"OPENKMS_ROOT_PKCS11_PIN": PIN}, pkcs11_flags(hsm, hsm.init_token(pin=PIN))
    env = {**bootstrap_env(), **root_env}
    server = ServerProcess(tmp_path / "data", env=env, extra_args=args)
    server.start()
    try:
        kms = server.client()
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key, Plaintext=b"sealed under the " + source.encode())["CiphertextBlob"]
        out = tmp_path / "b.tar"
        made = run("backup", "--data-dir", str(server.data_dir), "--out", str(out))
    finally:
        server.stop()
    assert made.returncode == 0 and "root key is NOT in it" in made.stdout, made.stdout + made.stderr
    assert not (server.data_dir / "root.key").exists()
    assert check_backup(out).root_source == source
    data = tmp_path / "restored"
    done = run("restore", str(out), "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert ("OPENKMS_ROOT_PASSPHRASE" if source == "passphrase" else "OPENKMS_ROOT_PKCS11_PIN") in done.stdout
    for text in (made.stdout + made.stderr, done.stdout + done.stderr):
        assert secret not in text
    assert secret.encode() not in out.read_bytes()
    without = ServerProcess(data, env=bootstrap_env(), extra_args=args)
    without.start(expect_failure=True)  # no passphrase, no PIN: the store stays shut
    assert without.proc is not None and without.proc.returncode == 2, without.output()
    without.stop()
    again = ServerProcess(data, env=env, extra_args=args)
    again.start()
    try:
        assert again.client().decrypt(CiphertextBlob=blob)["Plaintext"] == b"sealed under the " + source.encode()
    finally:
        again.stop()
    proc = verify_log(data, None)
    assert proc.returncode == 0 and proc.stdout.startswith("2 chain(s)"), proc.stdout
