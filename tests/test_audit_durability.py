"""The audit log is never lost: kill -9 under load, an unwritable audit store, and retention.

- Crash: several threads make Encrypt calls with boto3 while the server is killed with SIGKILL.
  After a restart, every call that was answered 200 has exactly one record, and the chain verifies.
- Fail closed: a trigger makes INSERTs into audit_events fail while the server runs. Calls must
  then fail with HTTP 500 KMSInternalException, never succeed; without the trigger they succeed
  again and the chain still verifies.
- Intents: a call that changes state while its record cannot be written is refused, but its
  change stands with the intent written in the same transaction; the next writer records the
  call from that intent, marked as recovered. Calls that change nothing leave no intent.
- Retention: with a tiny OPENKMS_AUDIT_RETENTION_DAYS, records move to <data-dir>/audit-archive,
  leave the store, and verification still covers archive + store, also across a restart; a line
  deleted from an archive file is reported.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from tests.conftest import bootstrap_env, run_sql
from tests.server import ServerProcess
from tests.test_audit import admin_client, all_events, by_request_id, export_events, request_id, verify_log


def store_rows(data_dir: Path, store_url: str | None, sql: str) -> list[tuple[Any, ...]]:
    if store_url is None:
        with sqlite3.connect(data_dir / "openkms.db") as conn:
            return [tuple(r) for r in conn.execute(sql)]
    import psycopg

    with psycopg.connect(store_url) as conn:
        return [tuple(r) for r in conn.execute(sql)]  # type: ignore[arg-type]


def store_seqs(data_dir: Path, store_url: str | None) -> list[int]:
    return [r[0] for r in store_rows(data_dir, store_url, "SELECT seq FROM audit_events ORDER BY seq")]


def assert_verifies(data_dir: Path, store_url: str | None, records: int | None = None) -> str:
    proc = verify_log(data_dir, store_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head = proc.stdout.splitlines()[0]
    assert head.endswith(": OK"), proc.stdout
    if records is not None:
        assert f" {records} record(s)" in head, head
    return head


# -- kill -9 under load -------------------------------------------------------------------------------


def test_every_answered_call_survives_kill_9(tmp_path: Path, store_url: str | None) -> None:
    env = bootstrap_env()
    data = tmp_path / "data"
    server = ServerProcess(data, storage_url=store_url, env=env)
    server.start()
    key = server.client().create_key()["KeyMetadata"]["KeyId"]
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load() -> None:
        kms = server.client()  # one client per thread
        while not stop.is_set():
            try:
                reply = kms.encrypt(KeyId=key, Plaintext=b"must be on record")
            except Exception:  # the server is gone: connection refused or reset
                if stop.is_set():
                    return
                time.sleep(0.01)
                continue
            if reply["ResponseMetadata"]["HTTPStatusCode"] == 200:
                with lock:
                    answered.append(request_id(reply))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(answered) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop(sig=signal.SIGKILL)  # mid-load: batches in flight, no shutdown digest
    stop.set()
    for t in threads:
        t.join(timeout=30)
    acked = list(answered)
    assert len(acked) >= 100, f"only {len(acked)} calls answered before the kill"

    # The chain verifies as the crash left it (the newest records are after the last digest).
    assert_verifies(data, store_url)

    server = ServerProcess(data, storage_url=store_url, env=env, port=server.port)
    server.start()
    try:
        recorded = by_request_id(export_events(server, "--event-name", "Encrypt", "--key-id", key))
        lost = [rid for rid in acked if rid not in recorded]
        assert not lost, f"{len(lost)} of {len(acked)} answered calls have no record, e.g. {lost[:3]}"
        assert all(len(recorded[rid]) == 1 for rid in acked)
        server.client().encrypt(KeyId=key, Plaintext=b"after the crash")  # the chain continues
    finally:
        server.stop()
    assert_verifies(data, store_url)


# -- fail closed --------------------------------------------------------------------------------------

SQLITE_BLOCK = ("CREATE TRIGGER audit_block BEFORE INSERT ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'audit store unwritable'); END;")
PG_BLOCK = (
    "CREATE FUNCTION audit_block() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'audit store unwritable'; END $$",
    "CREATE TRIGGER audit_block BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION audit_block()",
)


def refused(fn: Any, **params: Any) -> ClientError:
    try:
        reply = fn(**params)
    except ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 500, exc.response
        assert exc.response["Error"]["Code"] == "KMSInternalException", exc.response
        return exc
    raise AssertionError(f"answered without an audit record: {reply}")


def test_calls_fail_while_the_audit_store_is_unwritable(tmp_path: Path, store_url: str | None) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, storage_url=store_url, env=bootstrap_env())
    server.start()
    try:
        kms = server.client()
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        ct = kms.encrypt(KeyId=key, Plaintext=b"before", EncryptionContext={"a": "1"})["CiphertextBlob"]
        last_ok = kms.encrypt(KeyId=key, Plaintext=b"before")

        run_sql(data, store_url, *([SQLITE_BLOCK] if store_url is None else PG_BLOCK))
        failures = [
            refused(kms.encrypt, KeyId=key, Plaintext=b"unaudited"),
            refused(kms.decrypt, CiphertextBlob=ct, EncryptionContext={"a": "1"}),
            refused(kms.generate_data_key, KeyId=key, KeySpec="AES_256"),
            refused(kms.create_key, Description="unaudited"),
            refused(kms.describe_key, KeyId=key),
        ]
        for exc in failures:
            assert "Plaintext" not in exc.response and "CiphertextBlob" not in exc.response
            assert "audit" in exc.response["Error"]["Message"]
        assert server.proc is not None and server.proc.poll() is None, "the server must keep running"

        run_sql(data, store_url, "DROP TRIGGER audit_block" if store_url is None
                else "DROP TRIGGER audit_block ON audit_events")
        after = kms.encrypt(KeyId=key, Plaintext=b"after")
        assert kms.decrypt(CiphertextBlob=ct, EncryptionContext={"a": "1"})["Plaintext"] == b"before"

        events = by_request_id(all_events(admin_client(server)))
        assert request_id(after) in events and request_id(last_ok) in events
        for exc in failures:  # a refused call left no record (its batch was rolled back)
            assert request_id(exc) not in events
        # GetKeyLastUsage never names a refused call.
        usage = kms.get_key_last_usage(KeyId=key)["KeyLastUsage"]
        assert usage["KmsRequestId"] in events, "KeyLastUsage names a call that has no audit record"
    finally:
        server.stop()
    assert_verifies(data, store_url)


def test_a_change_whose_record_failed_is_recorded_from_its_intent(tmp_path: Path, store_url: str | None) -> None:
    """A call that changes state writes its intent in the change's own transaction. When its record
    then fails, the call is refused but the change stands, and so does the intent: the next writer
    records the call from it, marked as recovered. Calls that change nothing leave no intent."""
    data = tmp_path / "data"
    server = ServerProcess(data, storage_url=store_url, env=bootstrap_env())
    server.start()
    intents = "SELECT event_id, event FROM audit_pending"
    try:
        kms = server.client(retry=False)  # one request per call: a retried DisableKey changes nothing
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        kms.tag_resource(KeyId=key, Tags=[{"TagKey": "team", "TagValue": "a"}])
        kms.encrypt(KeyId=key, Plaintext=b"recorded")
        assert store_rows(data, store_url, intents) == [], "a recorded call must not leave its intent behind"

        run_sql(data, store_url, *([SQLITE_BLOCK] if store_url is None else PG_BLOCK))
        disabled = refused(kms.disable_key, KeyId=key)
        aliased = refused(kms.create_alias, AliasName="alias/unrecorded", TargetKeyId=key)
        created = refused(kms.create_key, Description="unrecorded")
        encrypted = refused(kms.encrypt, KeyId=key, Plaintext=b"refused")
        left = {event_id: json.loads(event) for event_id, event in store_rows(data, store_url, intents)}
        assert sorted(e["requestID"] for e in left.values()) == sorted(
            [request_id(disabled), request_id(aliased), request_id(created)]), left  # the Encrypt changed nothing
        run_sql(data, store_url, "DROP TRIGGER audit_block" if store_url is None
                else "DROP TRIGGER audit_block ON audit_events")
        # The refused calls' changes stand...
        assert kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Disabled"
        assert "alias/unrecorded" in [a["AliasName"] for a in kms.list_aliases()["Aliases"]]
        new_keys = {k["KeyArn"] for k in kms.list_keys()["Keys"]} - {kms.describe_key(KeyId=key)["KeyMetadata"]["Arn"]}
        assert len(new_keys) == 1, "the refused CreateKey's key exists"
        events = by_request_id(all_events(admin_client(server)))
        assert request_id(disabled) not in events and request_id(aliased) not in events
    finally:
        server.stop()

    server.start()  # ...and the next writer records them from their intents, once each.
    try:
        kms = server.client()
        kms.list_keys()  # answered once the writer is ready, which it is after recording the intents
        events = by_request_id(all_events(admin_client(server)))
        assert request_id(encrypted) not in events
        for exc, name, arn in ((disabled, "DisableKey", None), (aliased, "CreateAlias", None),
                               (created, "CreateKey", new_keys.pop())):
            (event,) = events[request_id(exc)]
            assert event["eventName"] == name and event["eventID"] in left
            assert event["additionalEventData"] == {"recoveredFromIntent": True}
            assert "errorCode" not in event and event.get("responseElements") is None
            assert event["userIdentity"]["accessKeyId"] == server.access_key_id
            resource = event["resources"][0]["ARN"]  # the key the change was made to
            assert resource == arn if arn else resource.endswith(key), (name, event["resources"])
        assert events[request_id(disabled)][0]["requestParameters"] == {"KeyId": key}
        assert events[request_id(created)][0]["requestParameters"]["Description"] == "unrecorded"
        assert store_rows(data, store_url, intents) == []
        normal = [e for evs in events.values() for e in evs if "additionalEventData" in e]
        assert len(normal) == 3, "only the three recovered records carry the mark"
    finally:
        server.stop()
    assert_verifies(data, store_url)


# -- the writer process dies --------------------------------------------------------------------------


def writer_pids(server: ServerProcess) -> list[int]:
    """The audit writer processes under the server (there is one per server process)."""
    assert server.proc is not None
    out = subprocess.run(["pgrep", "-f", "-g", str(server.proc.pid), "openkms.audit.writer"],
                         capture_output=True, text=True, check=False).stdout
    return [int(pid) for pid in out.split()]


def test_calls_fail_closed_when_the_writer_dies_and_recover(tmp_path: Path, store_url: str | None) -> None:
    """SIGKILL the audit writer while calls run: no call is answered 200 without its record, the
    server starts a new writer, the chain goes on from the durable head and verifies."""
    data = tmp_path / "data"
    server = ServerProcess(data, storage_url=store_url, env=bootstrap_env())
    server.start()
    answered: list[str] = []
    refusals: list[str] = []
    try:
        kms = server.client()
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        (first,) = writer_pids(server)
        stop = threading.Event()

        def load() -> None:
            client = server.client()
            while not stop.is_set():
                try:
                    answered.append(request_id(client.encrypt(KeyId=key, Plaintext=b"x")))
                except ClientError as exc:
                    assert exc.response["Error"]["Code"] == "KMSInternalException", exc.response
                    refusals.append(request_id(exc))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        os.kill(first, signal.SIGKILL)
        time.sleep(2.5)  # a new writer is started about a second after the old one is found dead
        stop.set()
        for thread in threads:
            thread.join()
        after = request_id(kms.encrypt(KeyId=key, Plaintext=b"after"))
        (second,) = writer_pids(server)
        assert second != first, "the server must have started a new writer"
        events = by_request_id(all_events(admin_client(server)))
    finally:
        server.stop()
    assert answered, "no call succeeded"
    missing = [rid for rid in [*answered, after] if rid not in events]
    assert not missing, f"{len(missing)} call(s) answered 200 have no audit record"
    assert_verifies(data, store_url)


# -- retention ----------------------------------------------------------------------------------------


def archive_lines(data_dir: Path) -> dict[Path, list[dict[str, Any]]]:
    return {p: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((data_dir / "audit-archive").glob("*.jsonl"))}


def archived_request_ids(data_dir: Path) -> set[str]:
    return {json.loads(item["record"])["event"]["requestID"]
            for items in archive_lines(data_dir).values() for item in items if item["type"] == "record"}


def wait_until(predicate: Any, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def test_retention_archives_and_verification_spans_archive_and_store(tmp_path: Path,
                                                                      store_url: str | None) -> None:
    env = bootstrap_env() | {"OPENKMS_AUDIT_RETENTION_DAYS": "0.00001",  # 0.864 s
                             "OPENKMS_SCHEDULER_INTERVAL": "0.5", "OPENKMS_AUDIT_DIGEST_INTERVAL": "0.5"}
    data = tmp_path / "data"
    server = ServerProcess(data, storage_url=store_url, env=env)
    server.start()
    calls: list[str] = []
    try:
        kms = server.client()
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        for i in range(12):
            calls.append(request_id(kms.encrypt(KeyId=key, Plaintext=b"%d" % i)))
        # They leave the store, all but the newest record: the chain continues from it after a restart.
        # Archived first (the file), then deleted from the store (its own commit a moment later).
        wait_until(lambda: set(calls[:-1]) <= archived_request_ids(data) and len(store_seqs(data, store_url)) <= 1,
                   what="the records to be archived and to leave the store")
        assert len(store_seqs(data, store_url)) == 1
        assert_verifies(data, store_url, records=13)  # CreateKey + 12 Encrypts, while the server runs
        in_store = set(by_request_id(all_events(admin_client(server))))
        assert calls[-1] in in_store and not set(calls[:-1]) & in_store
    finally:
        server.stop()

    # After a restart, when everything old is in archives, the chain goes on from where it was.
    time.sleep(1)
    server = ServerProcess(data, storage_url=store_url, env=env, port=server.port)
    server.start()
    try:
        kms = server.client()
        later = [request_id(kms.encrypt(KeyId=key, Plaintext=b"later")) for _ in range(4)]
        wait_until(lambda: set(later[:-1]) <= archived_request_ids(data), what="the later records to be archived")
    finally:
        server.stop()
    head = assert_verifies(data, store_url)
    seqs = [item["seq"] for items in archive_lines(data).values() for item in items if item["type"] == "record"]
    seqs += store_seqs(data, store_url)
    assert sorted(seqs) == list(range(1, len(seqs) + 1)), "one chain, no gap, no restart at 1"
    assert f" {len(seqs)} record(s)" in head

    # A record line deleted from an archive file is reported.
    path, items = next((p, items) for p, items in archive_lines(data).items()
                       if sum(item["type"] == "record" for item in items) >= 3)
    records = [item for item in items if item["type"] == "record"]
    victim = records[1]
    path.write_text("".join(json.dumps(item) + "\n" for item in items if item is not victim))
    proc = verify_log(data, store_url)
    assert proc.returncode != 0, proc.stdout
    assert f"record {victim['seq']} removed" in proc.stdout, proc.stdout


def test_archiving_after_a_crash_between_file_and_delete(tmp_path: Path, store_url: str | None) -> None:
    """A crash after an archive file is in place but before its rows left the store leaves them in
    both. The next archive run, which also takes records written meanwhile, must not archive them a
    second time (verify would find them twice)."""
    from openkms.audit.chain import index_columns

    env = bootstrap_env() | {"OPENKMS_AUDIT_RETENTION_DAYS": "0.00001",  # 0.864 s
                             "OPENKMS_SCHEDULER_INTERVAL": "0.5", "OPENKMS_AUDIT_DIGEST_INTERVAL": "0.5"}
    data = tmp_path / "data"
    server = ServerProcess(data, storage_url=store_url, env=env)
    server.start()
    try:
        kms = server.client()
        key = kms.create_key()["KeyMetadata"]["KeyId"]
        calls = [request_id(kms.encrypt(KeyId=key, Plaintext=b"x")) for _ in range(5)]
        wait_until(lambda: set(calls[:-1]) <= archived_request_ids(data), what="the records to be archived")
    finally:
        server.stop()
    # The scheduler may have taken those records in one run or in several (one file each).
    first_files = archive_lines(data)
    archived = [item for items in first_files.values() for item in items]
    # Records written after that archive run: a server whose scheduler will not run again soon.
    server = ServerProcess(data, storage_url=store_url, env=env | {"OPENKMS_SCHEDULER_INTERVAL": "300"},
                           port=server.port)
    server.start()
    try:
        kms = server.client()
        for _ in range(3):
            kms.encrypt(KeyId=key, Plaintext=b"y")
    finally:
        server.stop()
    node = (data / "node-id").read_text().strip()
    restored = []
    for item in archived:
        if item["type"] == "record":
            event = json.loads(item["record"])["event"]
            values = (node, item["seq"], time.time() - 3600, *index_columns(event), item["record"], item["hash"])
            restored.append("INSERT INTO audit_events (node_id, seq, event_time, event_id, event_name, "
                            "caller_account, owner_account, principal_arn, key_id, error_code, record, hash) "
                            "VALUES (" + ", ".join("NULL" if v is None else repr(v) if not isinstance(v, str)
                                                   else "'" + v.replace("'", "''") + "'" for v in values) + ")")
    run_sql(data, store_url, *restored)  # as if the delete after writing that file had not happened
    time.sleep(1.0)  # the records written since are past the retention too
    server = ServerProcess(data, storage_url=store_url, env=env, port=server.port)
    server.start()  # its scheduler archives at once
    try:
        wait_until(lambda: len(archive_lines(data)) > len(first_files), what="another archive file")
    finally:
        server.stop()
    seqs = [item["seq"] for items in archive_lines(data).values() for item in items if item["type"] == "record"]
    assert len(seqs) == len(set(seqs)), f"records archived twice: {sorted(seqs)}"
    assert_verifies(data, store_url)
