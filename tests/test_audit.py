"""The audit log through the user's eyes: every call has exactly one record with the right fields,
no record holds a secret, and the log can be queried, paged, exported and followed.

A mixed workload (successes, an admin call refused to a non-admin user, a bad signature, an
unknown access key, validation and not-found errors, a failed Decrypt) runs through boto3 against
a real server on SQLite and on PostgreSQL. Records are matched to calls by the request id boto3
reads from the `x-amzn-RequestId` header. The raw store (SQLite file bytes, `pg_dump --data-only`)
and `openkms audit export` are searched for plaintexts, data keys, ciphertext blobs and secret
access keys in raw, hex and base64 forms. The query commands run as real subprocesses.

The helpers at the top are shared with test_audit_tamper.py and test_audit_durability.py.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from openkms.client.admin import AdminClient, AdminError
from tests.conftest import ACCOUNT_ID, REGION
from tests.server import ServerProcess

# -- helpers shared by the audit tests ---------------------------------------------------------------


def cli_env() -> dict[str, str]:
    """A clean environment: the commands take endpoint, credentials and store from their flags."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPENKMS_"))}


def openkms_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "openkms.cli.main", *args], env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def client_args(server: ServerProcess, credentials: Path | None = None) -> list[str]:
    return ["--endpoint-url", server.endpoint, "--credentials-file",
            str(credentials or server.data_dir / "credentials")]


def audit_cli(server: ServerProcess, command: str, *args: str,
              credentials: Path | None = None) -> subprocess.CompletedProcess[str]:
    return openkms_cli("audit", command, *client_args(server, credentials), *args)


def export_events(server: ServerProcess, *filters: str, credentials: Path | None = None) -> list[dict[str, Any]]:
    """`openkms audit export --out FILE [filters]`, read back: one event per line."""
    with tempfile.TemporaryDirectory(prefix="openkms-export-") as tmp:
        out = Path(tmp) / "events.jsonl"
        proc = audit_cli(server, "export", "--out", str(out), *filters, credentials=credentials)
        assert proc.returncode == 0, f"audit export {filters} exited {proc.returncode}:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
        return [json.loads(line) for line in out.read_text().splitlines()]


def verify_log(data_dir: Path, storage_url: str | None, *extra: str) -> subprocess.CompletedProcess[str]:
    """`openkms audit verify` on a stopped (or running) server's store, as an operator would run it."""
    args = ["audit", "verify", "--data-dir", str(data_dir)]
    if storage_url:
        args += ["--storage-url", storage_url]
    proc = openkms_cli(*args, *extra)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr + proc.stdout
    return proc


def request_id(reply: dict[str, Any] | ClientError) -> str:
    meta = reply.response["ResponseMetadata"] if isinstance(reply, ClientError) else reply["ResponseMetadata"]
    rid = meta["RequestId"]
    assert rid and meta["HTTPHeaders"]["x-amzn-requestid"] == rid
    return str(rid)


def failed_call(fn: Any, **params: Any) -> ClientError:
    with pytest.raises(ClientError) as caught:
        fn(**params)
    return caught.value


def admin_client(server: ServerProcess, access_key_id: str | None = None, secret: str | None = None) -> AdminClient:
    return AdminClient(server.endpoint, access_key_id or server.access_key_id,
                       secret or server.secret_access_key, REGION)


def all_events(admin: AdminClient, **filters: Any) -> list[dict[str, Any]]:
    """Every matching record, through QueryAuditEvents pages (in-process, for speed)."""
    events: list[dict[str, Any]] = []
    token = None
    while True:
        page = admin.call("QueryAuditEvents", Limit=1000, NextToken=token, **filters)
        events += page["Events"]
        token = page.get("NextToken")
        if not token:
            return events


def by_request_id(events: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        found.setdefault(event["requestID"], []).append(event)
    return found


def key_arn(account: str, key_id: str) -> str:
    return f"arn:aws:kms:{REGION}:{account}:key/{key_id}"


def encodings(secret: bytes) -> list[bytes]:
    """The forms a leaked secret could take in a file: raw, hex, base64 (standard, URL-safe, unpadded)."""
    b64 = base64.b64encode(secret)
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), b64,
            base64.urlsafe_b64encode(secret), b64.rstrip(b"=")]


def leaks(haystack: bytes, secrets: dict[str, bytes]) -> list[str]:
    return [f"{name} ({form[:24]!r}...)" for name, secret in secrets.items()
            for form in encodings(secret) if form in haystack]


def raw_store(server: ServerProcess) -> bytes:
    """Every byte the store holds: the SQLite files (database and WAL), or `pg_dump --data-only`."""
    if server.storage_url is None:
        return b"".join(p.read_bytes() for p in sorted(server.data_dir.iterdir())
                        if p.name.startswith("openkms.db"))
    dump = subprocess.run(["pg_dump", "--data-only", "--dbname", server.storage_url],
                          capture_output=True, timeout=60, check=True)
    return dump.stdout


def write_credentials(path: Path, access_key_id: str, secret: str) -> Path:
    path.write_text(f"[default]\naws_access_key_id = {access_key_id}\n"
                    f"aws_secret_access_key = {secret}\nregion = {REGION}\n")
    path.chmod(0o600)
    return path


# -- the workload --------------------------------------------------------------------------------------


@dataclass
class Call:
    """One call of the workload and what its record must say."""

    name: str
    request_id: str
    error: str | None = None
    identity: dict[str, str] = field(default_factory=dict)  # expected userIdentity members
    params: dict[str, Any] | None = None  # expected requestParameters members
    key: str | None = None  # ARN expected in resources
    recipient: str | None = None
    loose: bool = False  # resources and recipient not checked (a refused use of another account's key)


@dataclass
class Workload:
    server: ServerProcess
    admin_arn: str
    admin_key: str
    user_account: str
    user_arn: str
    user_key: str
    user_credentials: Path
    key_id: str
    user_key_id: str
    calls: list[Call]
    secrets: dict[str, bytes]
    window: tuple[float, float]
    window_ids: set[str]


def _random_account() -> str:
    return str(10**11 + int.from_bytes(os.urandom(5), "big") % (9 * 10**11))


@pytest.fixture(scope="module")
def workload(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Workload:
    kms = server.client()
    admin = admin_client(server)
    admin_arn = f"arn:aws:iam::{ACCOUNT_ID}:user/admin"
    admin_id = {"arn": admin_arn, "accountId": ACCOUNT_ID, "accessKeyId": server.access_key_id, "type": "IAMUser"}
    calls: list[Call] = []
    secrets: dict[str, bytes] = {"admin secret access key": server.secret_access_key.encode()}

    def ok(name: str, reply: dict[str, Any], **expect: Any) -> dict[str, Any]:
        calls.append(Call(name, request_id(reply), identity=expect.pop("identity", admin_id),
                          recipient=expect.pop("recipient", ACCOUNT_ID), **expect))
        return reply

    def err(name: str, code: str, exc: ClientError, **expect: Any) -> None:
        assert exc.response["Error"]["Code"] == code, exc.response["Error"]
        calls.append(Call(name, request_id(exc), error=code, identity=expect.pop("identity", admin_id),
                          recipient=expect.pop("recipient", ACCOUNT_ID), **expect))

    # Successes on the admin's own key, through its id and through an alias.
    created = kms.create_key(Description="audited key")
    key_id = created["KeyMetadata"]["KeyId"]
    arn = key_arn(ACCOUNT_ID, key_id)
    ok("CreateKey", created, params={"Description": "audited key"}, key=arn)
    ok("CreateAlias", kms.create_alias(AliasName="alias/audited", TargetKeyId=key_id),
       params={"AliasName": "alias/audited", "TargetKeyId": key_id}, key=arn)

    context = {"purpose": "audit-test", "tenant": "t-42"}
    plaintext = os.urandom(32)
    marker = f"plaintext-marker-{uuid.uuid4().hex}".encode()
    encrypted = ok("Encrypt", kms.encrypt(KeyId=key_id, Plaintext=plaintext, EncryptionContext=context),
                   params={"KeyId": key_id, "EncryptionContext": context}, key=arn)
    by_alias = ok("Encrypt", kms.encrypt(KeyId="alias/audited", Plaintext=marker),
                  params={"KeyId": "alias/audited"}, key=arn)
    decrypted = ok("Decrypt", kms.decrypt(CiphertextBlob=encrypted["CiphertextBlob"], EncryptionContext=context),
                   params={"EncryptionContext": context}, key=arn)
    assert decrypted["Plaintext"] == plaintext
    data_key = ok("GenerateDataKey", kms.generate_data_key(KeyId=key_id, KeySpec="AES_256",
                                                           EncryptionContext=context),
                  params={"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context}, key=arn)
    ok("DescribeKey", kms.describe_key(KeyId=arn), params={"KeyId": arn}, key=arn)
    secrets |= {"Encrypt plaintext": plaintext, "Encrypt plaintext (text)": marker,
                "Encrypt ciphertext": encrypted["CiphertextBlob"], "Encrypt ciphertext (alias)": by_alias[
                    "CiphertextBlob"], "data key plaintext": data_key["Plaintext"],
                "data key ciphertext": data_key["CiphertextBlob"]}

    # Errors of an authenticated caller: key not found, wrong encryption context, validation.
    missing = str(uuid.uuid4())
    err("Encrypt", "NotFoundException", failed_call(kms.encrypt, KeyId=missing, Plaintext=b"x"),
        params={"KeyId": missing})
    err("Decrypt", "InvalidCiphertextException",
        failed_call(kms.decrypt, CiphertextBlob=encrypted["CiphertextBlob"], EncryptionContext={"wrong": "1"}),
        params={"EncryptionContext": {"wrong": "1"}}, key=arn)
    raw = server.client(validate=False)
    err("Encrypt", "ValidationException", failed_call(raw.encrypt, KeyId=key_id, Plaintext=b""))

    # Callers the server cannot authenticate: a bad signature and an unknown access key.
    bad_sig = server.client(server.access_key_id, "not-the-secret-" + "x" * 25)
    err("Encrypt", "InvalidSignatureException", failed_call(bad_sig.encrypt, KeyId=key_id, Plaintext=b"x"),
        identity={"type": "Unknown", "accessKeyId": server.access_key_id}, recipient=None)
    unknown_akid = "AKIA" + uuid.uuid4().hex[:16].upper()
    stranger = server.client(unknown_akid, "s" * 40)
    err("DescribeKey", "UnrecognizedClientException", failed_call(stranger.describe_key, KeyId=key_id),
        identity={"type": "Unknown", "accessKeyId": unknown_akid}, recipient=None)

    # A non-admin user in a second account: its own key, and an admin call it may not make.
    user_account = _random_account()
    admin.call("CreateAccount", Name="audited tenant", AccountId=user_account)
    admin.call("CreateUser", AccountId=user_account, UserName="app")
    try:  # users hold no KMS permissions until an identity policy grants them, as in AWS IAM
        admin.call("PutUserPolicy", AccountId=user_account, UserName="app", PolicyName="kms-all",
                   PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                       {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}))
    except AdminError as exc:  # a server without identity policies: every user may use KMS
        assert exc.code == "UnknownOperationException", exc
    issued = admin.call("CreateAccessKey", AccountId=user_account, UserName="app")["AccessKey"]
    user_arn = f"arn:aws:iam::{user_account}:user/app"
    secrets["user secret access key"] = issued["SecretAccessKey"].encode()
    user_id = {"arn": user_arn, "accountId": user_account, "accessKeyId": issued["AccessKeyId"], "type": "IAMUser"}
    user_kms = server.client(issued["AccessKeyId"], issued["SecretAccessKey"])
    user_created = user_kms.create_key()
    user_key_id = user_created["KeyMetadata"]["KeyId"]
    user_key_arn = key_arn(user_account, user_key_id)
    ok("CreateKey", user_created, identity=user_id, key=user_key_arn, recipient=user_account)
    user_ct = ok("Encrypt", user_kms.encrypt(KeyId=user_key_id, Plaintext=b"tenant data"),
                 identity=user_id, params={"KeyId": user_key_id}, key=user_key_arn, recipient=user_account)
    secrets["tenant ciphertext"] = user_ct["CiphertextBlob"]
    # The tenant may not use the admin's key: refused (AccessDenied by the key policy, or NotFound).
    refused = failed_call(user_kms.encrypt, KeyId=arn, Plaintext=b"x")
    code = refused.response["Error"]["Code"]
    assert code in ("AccessDeniedException", "NotFoundException"), refused.response["Error"]
    err("Encrypt", code, refused, identity=user_id, params={"KeyId": arn}, loose=True)
    with pytest.raises(AdminError) as denied:
        admin_client(server, issued["AccessKeyId"], issued["SecretAccessKey"]).call(
            "CreateAccount", Name="not allowed")
    assert denied.value.code == "AccessDeniedException"
    user_credentials = write_credentials(tmp_path_factory.mktemp("user") / "credentials",
                                         issued["AccessKeyId"], issued["SecretAccessKey"])

    # A burst alone in a time window, for the time-range query.
    time.sleep(0.05)
    start = time.time()
    window_ids = {request_id(ok("Encrypt", kms.encrypt(KeyId=key_id, Plaintext=b"in the window"),
                                params={"KeyId": key_id}, key=arn)) for _ in range(3)}
    end = time.time()
    time.sleep(0.05)

    return Workload(server, admin_arn, server.access_key_id, user_account, user_arn, issued["AccessKeyId"],
                    user_credentials, key_id, user_key_id, calls, secrets, (start, end), window_ids)


# -- every call, exactly one record, the right fields -------------------------------------------------


def test_every_call_has_exactly_one_record_with_the_right_fields(workload: Workload) -> None:
    events = all_events(admin_client(workload.server))
    found = by_request_id(events)
    assert len(found) == len(events), "two records share a requestID"
    assert len({e["eventID"] for e in events}) == len(events), "two records share an eventID"
    for call in workload.calls:
        records = found.get(call.request_id, [])
        assert len(records) == 1, f"{call.name} {call.error or 'OK'} {call.request_id}: {len(records)} records"
        event = records[0]
        where = f"{call.name} {call.request_id}"
        assert event["eventName"] == call.name, where
        assert event["eventSource"] == "kms.amazonaws.com", where
        assert event.get("errorCode") == call.error, where
        if call.error:
            assert event["errorMessage"], where
        else:
            assert "errorMessage" not in event, where
        for member, value in call.identity.items():
            assert event["userIdentity"].get(member) == value, (where, member, event["userIdentity"])
        if call.identity.get("type") == "Unknown":
            assert "arn" not in event["userIdentity"] and "accountId" not in event["userIdentity"], where
        for member, value in (call.params or {}).items():
            assert (event["requestParameters"] or {}).get(member) == value, (where, member, event)
        resources = [r["ARN"] for r in event["resources"]]
        for r in event["resources"]:
            assert r["type"] == "AWS::KMS::Key" and r["accountId"] == r["ARN"].split(":")[4], where
        if not call.loose:
            assert resources == ([call.key] if call.key else []), (where, event["resources"])
            assert event["recipientAccountId"] == call.recipient, where
        assert event["sourceIPAddress"] == "127.0.0.1", where
        assert "Boto3/" in event["userAgent"] and "Botocore/" in event["userAgent"], where
        assert event["awsRegion"] == REGION, where
        assert event["eventTime"].endswith("Z") and event["eventType"] == "AwsApiCall", where
        assert event["readOnly"] == call.name.startswith(("Describe", "List", "Get")), where
        uuid.UUID(event["eventID"])


def test_admin_api_calls_are_recorded_including_refusals(workload: Workload) -> None:
    events = all_events(admin_client(workload.server), EventName="CreateAccount")
    denied = [e for e in events if e.get("errorCode") == "AccessDeniedException"]
    assert len(denied) == 1
    event = denied[0]
    assert event["eventSource"] == "openkms.admin"
    assert event["userIdentity"]["arn"] == workload.user_arn
    assert event["userIdentity"]["accountId"] == workload.user_account
    assert event["userIdentity"]["accessKeyId"] == workload.user_key
    assert event["requestParameters"] == {"Name": "not allowed"}
    assert "not authorized" in event["errorMessage"]
    allowed = [e for e in events if "errorCode" not in e]
    assert [e["requestParameters"]["AccountId"] for e in allowed] == [workload.user_account]
    assert allowed[0]["userIdentity"]["arn"] == workload.admin_arn
    # CreateAccessKey is recorded without the secret it returned.
    issued = [e for e in all_events(admin_client(workload.server), EventName="CreateAccessKey")
              if e["requestParameters"].get("AccountId") == workload.user_account]
    assert len(issued) == 1
    assert issued[0]["responseElements"]["AccessKey"]["AccessKeyId"] == workload.user_key
    assert "SecretAccessKey" not in issued[0]["responseElements"]["AccessKey"]


def test_records_hold_no_plaintext_key_or_secret(workload: Workload) -> None:
    server = workload.server
    exported = export_events(server)
    assert len(exported) >= len(workload.calls)
    text = "\n".join(json.dumps(e, sort_keys=True) for e in exported).encode()
    assert leaks(text, workload.secrets) == []
    for event in exported:
        for part in ("requestParameters", "responseElements"):
            members = set(event.get(part) or {})
            assert not members & {"Plaintext", "CiphertextBlob", "SecretAccessKey", "PrivateKeyPlaintext"}, event
    store = raw_store(server)
    assert b"audit-test" in store, "the store search reads the wrong bytes"  # an encryption context value
    assert leaks(store, workload.secrets) == []


# -- querying -----------------------------------------------------------------------------------------


def ids(events: Iterable[dict[str, Any]]) -> list[str]:
    return [e["requestID"] for e in events]


def test_query_by_key_event_name_and_error_code(workload: Workload) -> None:
    server, arn = workload.server, key_arn(ACCOUNT_ID, workload.key_id)
    encrypts_on_key = {c.request_id for c in workload.calls if c.name == "Encrypt" and c.key == arn}
    maybe = {c.request_id for c in workload.calls if c.loose}  # the tenant's refused use of this key
    by_key_id = export_events(server, "--key-id", workload.key_id, "--event-name", "Encrypt")
    assert encrypts_on_key <= set(ids(by_key_id)) <= encrypts_on_key | maybe
    assert len(by_key_id) == len(set(ids(by_key_id)))
    by_arn = export_events(server, "--key-id", arn, "--event-name", "Encrypt")
    assert ids(by_arn) == ids(by_key_id)

    whole_key = export_events(server, "--key-id", workload.key_id)
    assert {c.request_id for c in workload.calls if c.key == arn} <= set(ids(whole_key))
    assert all(arn in [r["ARN"] for r in e["resources"]] for e in whole_key)

    not_found = export_events(server, "--error-code", "NotFoundException")
    assert sorted(ids(not_found)) == sorted(c.request_id for c in workload.calls if c.error == "NotFoundException")
    bad_sig = export_events(server, "--error-code", "InvalidSignatureException", "--event-name", "Encrypt")
    assert [e["userIdentity"] for e in bad_sig] == [{"type": "Unknown", "accessKeyId": workload.admin_key}]


def test_query_by_account_and_principal(workload: Workload) -> None:
    server = workload.server
    tenant_calls = {c.request_id for c in workload.calls if c.recipient == workload.user_account}
    by_account = export_events(server, "--account-id", workload.user_account)
    assert tenant_calls <= set(ids(by_account))
    for event in by_account:
        accounts = {event["userIdentity"].get("accountId")} | {r["accountId"] for r in event["resources"]}
        assert workload.user_account in accounts, event
    assert [e["eventName"] for e in by_account if e["eventSource"] == "openkms.admin"] == ["CreateAccount"]

    by_principal = export_events(server, "--principal-arn", workload.user_arn)
    assert tenant_calls <= set(ids(by_principal))
    assert {e["userIdentity"]["arn"] for e in by_principal} == {workload.user_arn}
    assert ids(export_events(server, "--principal-arn", workload.user_arn, "--event-name", "CreateKey")) == [
        c.request_id for c in workload.calls if c.name == "CreateKey" and c.recipient == workload.user_account]

    # A non-admin sees its own account's records, and may not ask for another account's.
    own = export_events(server, credentials=workload.user_credentials)
    assert set(ids(by_account)) <= set(ids(own))
    for event in own:
        accounts = {event["userIdentity"].get("accountId")} | {r["accountId"] for r in event["resources"]}
        assert workload.user_account in accounts, event
    refused = audit_cli(server, "query", "--account-id", ACCOUNT_ID, credentials=workload.user_credentials)
    assert refused.returncode != 0 and "AccessDeniedException" in refused.stderr
    assert refused.stdout == "" and "Traceback" not in refused.stderr


def test_query_by_time_range(workload: Workload) -> None:
    start, end = workload.window
    events = export_events(workload.server, "--since", repr(start), "--until", repr(end))
    assert set(ids(events)) == workload.window_ids and len(events) == 3
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start - 1)) + "Z"  # ISO 8601 is taken too
    later = export_events(workload.server, "--since", iso, "--event-name", "Encrypt")
    assert workload.window_ids <= set(ids(later))
    assert export_events(workload.server, "--since", repr(end), "--until", repr(end)) == []


def test_query_pages_with_limit_and_next_token(workload: Workload) -> None:
    server = workload.server
    everything = export_events(server, "--event-name", "Encrypt")
    assert len(everything) >= 7
    assert export_events(server, "--event-name", "Encrypt", "--limit", "2") == everything  # export follows pages

    pages: list[list[dict[str, Any]]] = []
    args = ["--event-name", "Encrypt", "--limit", "3"]
    token: str | None = None
    for _ in range(len(everything)):
        proc = audit_cli(server, "query", *args, *(["--next-token", token] if token else []))
        assert proc.returncode == 0, proc.stderr
        pages.append([json.loads(line) for line in proc.stdout.splitlines()])
        more = [line for line in proc.stderr.splitlines() if line.startswith("# more: --next-token ")]
        if not more:
            break
        token = more[0].rsplit(" ", 1)[1]
    assert [len(p) for p in pages[:-1]] == [3] * (len(pages) - 1) and 1 <= len(pages[-1]) <= 3
    assert [e for page in pages for e in page] == everything

    bad = audit_cli(server, "query", "--next-token", "not-a-token!")
    assert bad.returncode != 0 and "ValidationException" in bad.stderr
    too_big = audit_cli(server, "query", "--limit", "1001")
    assert too_big.returncode != 0 and "ValidationException" in too_big.stderr


def test_tail_starts_at_recent_records(workload: Workload) -> None:
    """Without --since, tail prints the last --window seconds, not the whole log."""
    kms = workload.server.client()
    old = request_id(kms.describe_key(KeyId=workload.key_id))
    time.sleep(5.0)
    new = request_id(kms.describe_key(KeyId=workload.key_id))
    tail = audit_cli(workload.server, "tail", "--window", "2.5", "--key-id", workload.key_id)
    assert tail.returncode == 0, tail.stderr
    printed = ids([json.loads(line) for line in tail.stdout.splitlines()])
    assert new in printed and old not in printed, printed


def test_tail_follows_new_records(workload: Workload) -> None:
    server = workload.server
    kms = server.client()
    proc = subprocess.Popen(
        [sys.executable, "-m", "openkms.cli.main", "audit", "tail", "-f", "--interval", "0.2", "--since", "0",
         "--key-id", workload.key_id, "--event-name", "Encrypt", *client_args(server)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    lines: queue.Queue[str] = queue.Queue()

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()

    def read_until(wanted: set[str], timeout: float = 20.0) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not wanted <= set(ids(seen)):
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, (
                f"tail -f printed {ids(seen)}, still waiting for {wanted - set(ids(seen))}; "
                f"exit {proc.poll()}")
            try:
                seen.append(json.loads(lines.get(timeout=min(left, 1.0))))
            except queue.Empty:
                continue
        return seen

    try:
        arn = key_arn(ACCOUNT_ID, workload.key_id)
        history = read_until({c.request_id for c in workload.calls if c.name == "Encrypt" and c.key == arn})
        new = {request_id(kms.encrypt(KeyId=workload.key_id, Plaintext=b"followed")) for _ in range(3)}
        kms.describe_key(KeyId=workload.key_id)  # filtered out by --event-name
        followed = read_until(new)
        assert set(ids(followed)) == new, "tail -f printed a record twice or one that does not match"
        assert all(e["eventName"] == "Encrypt" for e in history + followed)
        again = {request_id(kms.encrypt(KeyId=workload.key_id, Plaintext=b"followed")) for _ in range(2)}
        assert set(ids(read_until(again))) == again
    finally:
        proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=5)
    assert proc.stderr is not None and proc.stdout is not None
    errors = proc.stderr.read()
    proc.stderr.close()
    proc.stdout.close()
    assert "Traceback" not in errors, errors


# -- GetKeyLastUsage ----------------------------------------------------------------------------------


def test_get_key_last_usage_names_the_audit_record(workload: Workload) -> None:
    server = workload.server
    kms = server.client()
    key_id = kms.create_key(Description="usage")["KeyMetadata"]["KeyId"]
    fresh = kms.get_key_last_usage(KeyId=key_id)
    assert fresh["KeyId"] == key_id and not fresh.get("KeyLastUsage")

    ct = kms.encrypt(KeyId=key_id, Plaintext=b"use it", EncryptionContext={"c": "1"})["CiphertextBlob"]
    last_ok = kms.generate_data_key(KeyId=key_id, KeySpec="AES_128")
    # Neither a failed Decrypt nor a non-cryptographic call moves "last used".
    failed_call(kms.decrypt, CiphertextBlob=ct, EncryptionContext={"c": "2"})
    kms.describe_key(KeyId=key_id)
    kms.tag_resource(KeyId=key_id, Tags=[{"TagKey": "k", "TagValue": "v"}])

    usage = kms.get_key_last_usage(KeyId=key_id)["KeyLastUsage"]
    assert usage["Operation"] == "GenerateDataKey"
    assert usage["KmsRequestId"] == request_id(last_ok)
    record = by_request_id(all_events(admin_client(server), KeyId=key_id))[request_id(last_ok)]
    assert len(record) == 1
    assert usage["CloudTrailEventId"] == record[0]["eventID"]
    assert abs(usage["Timestamp"].timestamp() - time.time()) < 60

    # Once flushed by the writer thread, the store answers the same.
    time.sleep(1.5)
    assert kms.get_key_last_usage(KeyId=key_id)["KeyLastUsage"] == usage

    # The tenant's key: its own last use, seen by the tenant.
    tenant_kms = server.client(workload.user_key, workload.secrets["user secret access key"].decode())
    tenant_usage = tenant_kms.get_key_last_usage(KeyId=workload.user_key_id)["KeyLastUsage"]
    tenant_encrypt = [c for c in workload.calls if c.name == "Encrypt" and not c.error
                      and c.key == key_arn(workload.user_account, workload.user_key_id)]
    assert tenant_usage["Operation"] == "Encrypt"
    assert tenant_usage["KmsRequestId"] == tenant_encrypt[0].request_id
