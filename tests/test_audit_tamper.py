"""Tampering with the audit log behind the server's back, and `openkms audit verify` naming it.

One server per store (SQLite, PostgreSQL) writes a log with several signed digests (forced with the
admin API CreateAuditDigest, plus the one written at shutdown) and stops. Each test then works on
a fresh copy of that store (a copied data directory; a PostgreSQL database created from the
original as its template), changes it with plain SQL as an attacker with write access to the
database would (edit a record, delete one, swap two, insert a forged one with a correct hash,
truncate the tail, forge or drop a digest) and runs `openkms audit verify` as a subprocess: it
must exit non-zero and name the record and the kind of damage.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import bootstrap_env, drop_pg_database, new_pg_database
from tests.server import ServerProcess
from tests.test_audit import admin_client, audit_cli, verify_log

GENESIS = "0" * 64


@dataclass
class LogStore:
    """A stopped server's store (a data dir, and a PostgreSQL URL unless embedded), opened for tampering."""

    data_dir: Path
    url: str | None

    @property
    def node(self) -> str:
        return (self.data_dir / "node-id").read_text().strip()

    def _connect(self) -> Any:
        if self.url is None:
            return closing(sqlite3.connect(self.data_dir / "openkms.db"))
        import psycopg

        return psycopg.connect(self.url, connect_timeout=5)

    def execute(self, *statements: tuple[str, tuple[Any, ...]] | str) -> None:
        """Run the statements in one transaction."""
        with self._connect() as conn:
            for statement in statements:
                sql, params = (statement, ()) if isinstance(statement, str) else statement
                if self.url is not None:
                    sql = sql.replace("?", "%s")
                conn.execute(sql, params)
            conn.commit()

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._connect() as conn:
            return list(conn.execute(sql if self.url is None else sql.replace("?", "%s"), params).fetchall())

    def records(self) -> dict[int, tuple[str, str]]:
        """seq -> (record text, hash)."""
        return {int(seq): (record, digest) for seq, record, digest in
                self.rows("SELECT seq, record, hash FROM audit_events ORDER BY seq")}

    def digests(self) -> list[tuple[int, int]]:
        """(digest_seq, record_seq) in order."""
        return [(int(d), int(r)) for d, r in
                self.rows("SELECT digest_seq, record_seq FROM audit_digests ORDER BY digest_seq")]

    def verify(self, *extra: str) -> tuple[int, str]:
        proc = verify_log(self.data_dir, self.url, *extra)
        return proc.returncode, proc.stdout + proc.stderr


@dataclass
class Pristine:
    store: LogStore
    public_key_pem: str
    records: int
    digests: list[tuple[int, int]]


def wait_for_digests(store: LogStore, count: int, timeout: float = 15.0) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        digests = store.digests()
        if len(digests) >= count:
            return digests
        time.sleep(0.1)
    raise AssertionError(f"no digest {count} within {timeout} s: {store.digests()}")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def pristine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pristine]:
    """A stopped server's store holding a log of ~30 records under three signed digests."""
    url = None
    if request.param == "postgres":
        url = new_pg_database(request.getfixturevalue("pg_admin"), request.getfixturevalue("pg_dsn"))
    data_dir = tmp_path_factory.mktemp("tamper") / "data"
    server = ServerProcess(data_dir, storage_url=url, env=bootstrap_env())
    server.start()
    store = LogStore(data_dir, url)
    try:
        kms = server.client()
        admin = admin_client(server)
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        for i in range(10):
            ct = kms.encrypt(KeyId=key, Plaintext=b"record %d" % i)["CiphertextBlob"]
        admin.call("CreateAuditDigest")
        wait_for_digests(store, 1)
        for _ in range(6):
            kms.decrypt(CiphertextBlob=ct)
            kms.describe_key(KeyId=key)
        admin.call("CreateAuditDigest")
        wait_for_digests(store, 2)
        for _ in range(5):
            kms.generate_data_key(KeyId=key, KeySpec="AES_256")
        pem = audit_cli(server, "public-key")
        assert pem.returncode == 0 and pem.stdout.startswith("-----BEGIN PUBLIC KEY-----"), pem.stderr
    finally:
        server.stop()  # a clean stop signs a last digest over the newest records
    records = store.records()
    digests = store.digests()
    assert len(digests) >= 3, digests
    assert digests[-1][1] == max(records), "the shutdown digest must cover the newest record"
    assert list(records) == list(range(1, len(records) + 1))
    yield Pristine(store, pem.stdout, len(records), digests)
    if url:
        drop_pg_database(request.getfixturevalue("pg_admin"), url)


@pytest.fixture
def log(pristine: Pristine, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogStore]:
    """A copy of the pristine store, for one test to damage."""
    data_dir = tmp_path / "data"
    shutil.copytree(pristine.store.data_dir, data_dir)
    url = None
    if pristine.store.url:
        admin = request.getfixturevalue("pg_admin")
        base, _, original = pristine.store.url.rpartition("/")
        url = f"{base}/openkms_t_{uuid.uuid4().hex[:12]}"
        admin.execute(f'CREATE DATABASE "{url.rpartition("/")[2]}" TEMPLATE "{original}"')
    yield LogStore(data_dir, url)
    if url:
        drop_pg_database(request.getfixturevalue("pg_admin"), url)


def problems(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("node ")]


def assert_detected(log: LogStore, *patterns: str) -> str:
    code, output = log.verify()
    assert code != 0, f"verify passed a damaged log:\n{output}"
    assert "OK" not in output.splitlines()[0], output
    for pattern in patterns:
        assert re.search(pattern, output), f"{pattern!r} not in:\n{output}"
    return output


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def canonical(obj: Any) -> str:
    """What an attacker would write: sorted keys, no spaces (the verifier hashes the stored text as is)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# -- a clean log, and what the verifier needs --------------------------------------------------------


def test_clean_log_verifies(log: LogStore, pristine: Pristine, tmp_path: Path) -> None:
    code, output = log.verify()
    assert code == 0, output
    head = output.splitlines()[0]
    assert head == f"1 chain(s), {pristine.records} record(s), {len(pristine.digests)} digest(s): OK"
    pem = tmp_path / "audit.pem"
    pem.write_text(pristine.public_key_pem)
    code, output = log.verify("--public-key", str(pem))  # the key published by `openkms audit public-key`
    assert code == 0 and output.splitlines()[0].endswith(": OK"), output


def test_wrong_public_key_fails(log: LogStore, pristine: Pristine, tmp_path: Path) -> None:
    other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = tmp_path / "other.pem"
    pem.write_bytes(other)
    code, output = log.verify("--public-key", str(pem))
    assert code != 0, output
    for digest_seq, _ in pristine.digests:
        assert f"digest {digest_seq}: signature does not verify" in output, output


def test_missing_store_is_an_error(tmp_path: Path) -> None:
    proc = verify_log(tmp_path / "nothing-here", None)
    assert proc.returncode == 2 and "no store" in proc.stderr


# -- records ------------------------------------------------------------------------------------------


def test_edited_record_is_altered(log: LogStore) -> None:
    record, _ = log.records()[5]
    forged = record.replace('"sourceIPAddress":"127.0.0.1"', '"sourceIPAddress":"203.0.113.9"')
    assert forged != record
    log.execute(("UPDATE audit_events SET record = ? WHERE seq = 5", (forged,)))
    output = assert_detected(log, r"record 5 altered")
    assert len(problems(output)) == 1, output


def test_edited_record_with_recomputed_hash_breaks_the_chain(log: LogStore) -> None:
    record, _ = log.records()[7]
    event = json.loads(record)
    event["event"]["eventName"] = "DescribeKey"
    forged = canonical(event)
    log.execute(("UPDATE audit_events SET record = ?, hash = ? WHERE seq = 7", (forged, sha256(forged))))
    assert_detected(log, r"record 8 does not follow record 7 \(a record was inserted, removed or rewritten")


def test_rewritten_chain_is_caught_by_the_signed_digest(log: LogStore, pristine: Pristine) -> None:
    """An attacker who rewrites every record from 4 on, with consistent hashes, cannot re-sign digests."""
    records = log.records()
    prev = records[3][1]
    statements: list[tuple[str, tuple[Any, ...]]] = []
    for seq in range(4, pristine.records + 1):
        content = json.loads(records[seq][0])
        content["prev"] = prev
        if seq == 4:
            content["event"]["userAgent"] = "innocent"
        text = canonical(content)
        prev = sha256(text)
        statements.append(("UPDATE audit_events SET record = ?, hash = ? WHERE seq = ?", (text, prev, seq)))
    log.execute(*statements)
    first_covering = next(d for d, seq in pristine.digests if seq >= 4)
    assert_detected(log, rf"digest {first_covering}: records up to \d+ do not match the signed digest \(rewritten\)")


def test_deleted_record_is_removed(log: LogStore) -> None:
    log.execute("DELETE FROM audit_events WHERE seq = 6")
    output = assert_detected(log, r"record 6 removed \(sequence jumps from 5 to 7\)")
    assert "record 7 does not follow" not in output  # one removal, reported once


def test_deleted_records_are_removed(log: LogStore) -> None:
    log.execute("DELETE FROM audit_events WHERE seq BETWEEN 9 AND 12")
    assert_detected(log, r"records 9-12 removed")


def test_swapped_records_are_reordered(log: LogStore) -> None:
    node = log.node
    log.execute(("UPDATE audit_events SET seq = -1 WHERE node_id = ? AND seq = 4", (node,)),
                ("UPDATE audit_events SET seq = 4 WHERE node_id = ? AND seq = 9", (node,)),
                ("UPDATE audit_events SET seq = 9 WHERE node_id = ? AND seq = -1", (node,)))
    assert_detected(log, r"record at position 4 is record 9: records reordered",
                    r"record at position 9 is record 4")


def test_forged_record_with_a_correct_hash_is_inserted(log: LogStore) -> None:
    """Shift records 8.. up by one and put a forged record 8 in the gap: it chains to record 7 and
    hashes correctly, but the record after it no longer follows."""
    records = log.records()
    node = log.node
    content = json.loads(records[7][0])
    event = content["event"] | {"eventID": str(uuid.uuid4()), "requestID": str(uuid.uuid4()),
                                "eventName": "Decrypt"}
    forged = canonical({"event": event, "node": node, "prev": records[7][1], "seq": 8})
    log.execute(
        ("UPDATE audit_events SET seq = -(seq + 1) WHERE node_id = ? AND seq >= 8", (node,)),
        ("UPDATE audit_events SET seq = -seq WHERE node_id = ? AND seq < 0", (node,)),
        ("INSERT INTO audit_events (node_id, seq, event_time, event_id, event_name, caller_account, "
         "owner_account, principal_arn, key_id, error_code, record, hash) "
         "SELECT node_id, 8, event_time, ?, 'Decrypt', caller_account, owner_account, principal_arn, key_id, "
         "error_code, ?, ? FROM audit_events WHERE node_id = ? AND seq = 7",
         (event["eventID"], forged, sha256(forged), node)))
    assert len(log.records()) == len(records) + 1
    output = assert_detected(log, r"record at position 9 is record 8: records inserted before it")
    assert "record 8 altered" not in output  # the forgery itself hashes correctly


def test_truncated_tail_is_reported(log: LogStore, pristine: Pristine) -> None:
    last = pristine.records
    log.execute(("DELETE FROM audit_events WHERE seq > ?", (last - 3,)))
    assert_detected(log, rf"log truncated: digest {pristine.digests[-1][0]} covers records up to {last}, "
                         rf"but the chain ends at record {last - 3}")


def test_everything_after_a_digest_removed_is_truncated(log: LogStore, pristine: Pristine) -> None:
    _, first_covered = pristine.digests[0]
    log.execute(("DELETE FROM audit_events WHERE seq > ?", (first_covered,)))
    assert_detected(log, rf"log truncated: digest {pristine.digests[1][0]} covers records up to "
                         rf"{pristine.digests[1][1]}, but the chain ends at record {first_covered}")


# -- digests ------------------------------------------------------------------------------------------


def test_tampered_digest_signature_is_reported(log: LogStore) -> None:
    (signature,), = log.rows("SELECT signature FROM audit_digests WHERE digest_seq = 2")
    flipped = bytes([signature[0] ^ 0x01]) + bytes(signature[1:])
    log.execute(("UPDATE audit_digests SET signature = ? WHERE digest_seq = 2", (flipped,)))
    output = assert_detected(log, r"digest 2: signature does not verify with the audit public key")
    assert "digest 1:" not in output


def test_tampered_digest_body_is_reported(log: LogStore, pristine: Pristine) -> None:
    """Moving a digest back (to hide a truncation) breaks its signature."""
    (body,), = log.rows("SELECT body FROM audit_digests WHERE digest_seq = 3")
    content = json.loads(body)
    content["record_seq"] -= 2
    log.execute(("UPDATE audit_digests SET body = ?, record_seq = record_seq - 2 WHERE digest_seq = 3",
                 (canonical(content),)))
    assert_detected(log, r"digest 3: signature does not verify")


def exported_digest_file(log: LogStore) -> Path:
    return log.data_dir / "audit-digests" / f"{log.node}.jsonl"


def test_digests_are_exported_outside_the_store(log: LogStore, pristine: Pristine) -> None:
    lines = [json.loads(line) for line in exported_digest_file(log).read_text().splitlines()]
    assert [(d["digest_seq"], json.loads(d["body"])["record_seq"]) for d in lines] == pristine.digests
    stored = log.rows("SELECT digest_seq, body FROM audit_digests ORDER BY digest_seq")
    assert [(d["digest_seq"], d["body"]) for d in lines] == [(int(s), b) for s, b in stored]


def test_removed_digest_is_reported(log: LogStore) -> None:
    log.execute("DELETE FROM audit_digests WHERE digest_seq = 2")
    assert_detected(log, r"digest 2 missing from the store \(checked against its exported copy\)")
    exported_digest_file(log).unlink()  # an attacker who can also delete the node's files
    assert_detected(log, r"digest 3: does not follow the digest before it \(a digest was removed\)")


def test_emptied_store_is_caught_by_the_exported_digests(log: LogStore, pristine: Pristine) -> None:
    """Deleting every record and every digest leaves nothing in the store to contradict; the
    digests the node exported to its data directory still say how far the log went."""
    log.execute("DELETE FROM audit_events", "DELETE FROM audit_digests")
    last_digest, last_seq = pristine.digests[-1]
    assert_detected(log, rf"digest {last_digest} missing from the store",
                    rf"log truncated: digest {last_digest} covers records up to {last_seq}, "
                    rf"but the chain ends at record 0")


def test_exported_digest_that_differs_from_the_store_is_reported(log: LogStore) -> None:
    path = exported_digest_file(log)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    body = json.loads(lines[0]["body"])
    body["record_seq"] += 1
    lines[0]["body"] = canonical(body)
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    assert_detected(log, r"digest 1 in the store differs from its exported copy")


def test_swapped_public_key_in_the_store_is_caught_with_the_published_key(log: LogStore, pristine: Pristine,
                                                                            tmp_path: Path) -> None:
    """An attacker who re-signs digests with a key of their own and puts its public half in the store
    is caught by the digests the node exported; one who also deletes those fools a verify that
    trusts the store, not one given the published key."""
    from openkms.audit.log import PUBLIC_KEY_META

    forger = ed25519.Ed25519PrivateKey.generate()
    der = forger.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    statements: list[tuple[str, tuple[Any, ...]]] = [("DELETE FROM audit_events WHERE seq > ?",
                                                      (pristine.digests[0][1],))]
    for digest_seq, body in log.rows("SELECT digest_seq, body FROM audit_digests ORDER BY digest_seq"):
        if digest_seq > 1:
            statements.append(("DELETE FROM audit_digests WHERE digest_seq = ?", (digest_seq,)))
        else:
            statements.append(("UPDATE audit_digests SET signature = ? WHERE digest_seq = ?",
                               (forger.sign(body.encode()), digest_seq)))
    statements.append(("UPDATE openkms_meta SET value = ? WHERE name = ?", (der, PUBLIC_KEY_META)))
    log.execute(*statements)
    assert_detected(log, r"digest 1 in the store differs from its exported copy",
                    r"digest 2: signature does not verify")  # the exported copy, under the forged key
    exported_digest_file(log).unlink()
    code, output = log.verify()
    assert code == 0, output  # the store now vouches for itself: this is why --public-key exists
    pem = tmp_path / "published.pem"
    pem.write_text(pristine.public_key_pem)
    code, output = log.verify("--public-key", str(pem))
    assert code != 0 and "digest 1: signature does not verify" in output, output


@pytest.mark.parametrize("first, last", [(5, 5), (5, 7)])
def test_removed_and_renumbered_records_are_reported(log: LogStore, pristine: Pristine, first: int, last: int) -> None:
    """Delete records and renumber the rest down to close the gap: reported once, as the removal it
    is, and not as every later record being out of place or the tail being truncated."""
    node, gone = log.node, last - first + 1
    log.execute(("DELETE FROM audit_events WHERE node_id = ? AND seq BETWEEN ? AND ?", (node, first, last)),
                ("UPDATE audit_events SET seq = -(seq - ?) WHERE node_id = ? AND seq > ?", (gone, node, last)),
                ("UPDATE audit_events SET seq = -seq WHERE node_id = ? AND seq < 0", (node,)))
    span = f"record {first}" if gone == 1 else f"records {first}-{last}"
    output = assert_detected(log, rf"{span} removed, and the records after renumbered to close the gap "
                                  rf"\(record {last + 1} is at position {first}\)")
    assert "truncated" not in output and "position 6 is" not in output and "does not match" not in output, output
    assert len([line for line in output.splitlines() if "node " in line and "removed" in line]) == 1, output


# The columns that queries filter on (event_name, key_id, error_code, event_time, ...) are copies of
# fields of the hashed record, kept for indexes. Changing one would hide a record from
# `openkms audit query --event-name ...`; verify recomputes them from the hashed record.
UNHASHED_COLUMNS = {  # record 3 is an Encrypt
    "event_name": "UPDATE audit_events SET event_name = 'DescribeKey' WHERE seq = 3",
    "key_id": "UPDATE audit_events SET key_id = '00000000-0000-0000-0000-000000000000' WHERE seq = 3",
    "event_time": "UPDATE audit_events SET event_time = event_time - 30 * 86400 WHERE seq = 3",
}


@pytest.mark.parametrize("column", sorted(UNHASHED_COLUMNS))
def test_edited_query_column_is_reported(log: LogStore, column: str) -> None:
    def row() -> list[tuple[Any, ...]]:
        return log.rows(f"SELECT {column} FROM audit_events WHERE seq = 3")

    before = row()
    log.execute(UNHASHED_COLUMNS[column])
    if row() == before:  # not an AssertionError: a broken set-up must fail, not pass as the known gap
        raise RuntimeError(f"the {column} column did not change")
    assert_detected(log, r"record 3")
