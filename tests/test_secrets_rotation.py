"""Secrets Manager rotation end to end: real `openkms serve` processes, boto3, no mocks.

- built-in random-password rotation on SQLite and PostgreSQL, RotationRules checks, CancelRotateSecret;
- a webhook function: an HTTPS receiver in this process (a CA and server certificate made with the
  `openssl` binary; the server trusts the CA through OPENKMS_ROTATION_CA_BUNDLE) that checks
  X-OpenKMS-Signature and does the four steps with boto3 under credentials of its own; a receiver
  that fails at setSecret, and what is left behind;
- a command function: a Python script run by the server with the payload on stdin;
- the PostgreSQL rotators against a private PostgreSQL cluster with password authentication (the
  machine's PostgreSQL trusts every login, so it cannot tell a new password from an old one);
- scheduled rotation on two nodes sharing one PostgreSQL store: exactly one node rotates;
- secret values (old and new) never reach the server's log or the audit log.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import pwd
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from openkms.client.admin import AdminClient, AdminError
from tests.conftest import ACCOUNT_ID, REGION, bootstrap_env, run_sql
from tests.hsm_helpers import query
from tests.server import ServerProcess, free_port

STEPS = ["createSecret", "setSecret", "testSecret", "finishSecret"]
LOOPBACK = "127.0.0.0/8"
CURRENT, PREVIOUS, PENDING = "AWSCURRENT", "AWSPREVIOUS", "AWSPENDING"
PREVIOUS_NOT_COMPLETE = "A previous rotation isn't complete"
WAIT_S = 15.0
SCHEDULED = 6  # secrets due at once in the two-node test


# -- helpers ----------------------------------------------------------------------------------------
def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(check: Callable[[], Any], timeout: float = WAIT_S, interval: float = 0.05, what: str = "") -> Any:
    """Polls `check` until it answers something true; returns that (AssertionError at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {what}")
        time.sleep(interval)


def expect_error(code: str, fn: Callable[..., Any], **params: Any) -> str:
    with pytest.raises(ClientError) as caught:
        fn(**params)
    error = caught.value.response["Error"]
    assert error["Code"] == code, error
    return str(error.get("Message", ""))


def admin_error(code: str, admin: AdminClient, op: str, **params: Any) -> str:
    with pytest.raises(AdminError) as caught:
        admin.call(op, **params)
    assert caught.value.code == code, caught.value
    return caught.value.message


def operator(server: ServerProcess) -> AdminClient:
    return AdminClient(server.endpoint, server.access_key_id, server.secret_access_key, REGION)


def policy(*actions: str) -> str:
    return json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": "*"}]})


def new_user(admin: AdminClient, account_id: str, name: str, *, is_admin: bool = False,
             actions: tuple[str, ...] = ()) -> tuple[str, str]:
    """A user of the account with an access key: (access key id, secret access key)."""
    user = unique(name)
    admin.call("CreateUser", AccountId=account_id, UserName=user, Admin=is_admin or None)
    if actions:
        admin.call("PutUserPolicy", AccountId=account_id, UserName=user, PolicyName="p",
                   PolicyDocument=policy(*actions))
    key = admin.call("CreateAccessKey", AccountId=account_id, UserName=user)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


ROTATOR_ACTIONS = ("secretsmanager:*", "kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey")


def stage_map(sm: Any, secret_id: str) -> dict[str, str]:
    """staging label -> version id."""
    out = {}
    for version, labels in sm.describe_secret(SecretId=secret_id)["VersionIdsToStages"].items():
        for label in labels:
            out[label] = version
    return out


def value_of(sm: Any, secret_id: str, stage: str = CURRENT) -> dict[str, Any]:
    return json.loads(sm.get_secret_value(SecretId=secret_id, VersionStage=stage)["SecretString"])  # type: ignore[no-any-return]


def all_versions(sm: Any, secret_id: str) -> dict[str, list[str]]:
    versions = sm.list_secret_version_ids(SecretId=secret_id, IncludeDeprecated=True)["Versions"]
    return {v["VersionId"]: sorted(v.get("VersionStages") or []) for v in versions}


def audit_events(admin: AdminClient, event_name: str | None = None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    token = None
    while True:
        page = admin.call("QueryAuditEvents", EventName=event_name, Limit=1000, NextToken=token)
        events += page["Events"]
        token = page.get("NextToken")
        if not token:
            return events


def rotation_events(admin: AdminClient, name: str, secret_arn: str) -> list[dict[str, Any]]:
    """The rotation's service events (RotationStarted/Succeeded/Failed) of one secret."""
    return [e for e in audit_events(admin, name)
            if (e.get("serviceEventDetails") or {}).get("SecretId") == secret_arn]


def wait_events(admin: AdminClient, name: str, secret_arn: str, count: int = 1) -> list[dict[str, Any]]:
    """Waits for at least `count` of the secret's `name` events; returns them."""
    def enough() -> list[dict[str, Any]] | None:
        found = rotation_events(admin, name, secret_arn)
        return found if len(found) >= count else None
    return wait_until(enough, what=f"{count} {name} event(s) for {secret_arn}")  # type: ignore[no-any-return]


def wait_rotated(admin: AdminClient, sm: Any, secret_arn: str, token: str, hook: Hook | None = None) -> dict[str, Any]:
    """Waits until the rotation `token` of the secret has succeeded (its audit record written, so
    the runner is done with it); returns that record."""
    def done() -> dict[str, Any] | None:
        failed = [e for e in rotation_events(admin, "RotationFailed", secret_arn)
                  if e["serviceEventDetails"].get("ClientRequestToken") == token]
        assert not failed, ([(e["serviceEventDetails"], e.get("errorMessage")) for e in failed],
                            hook.errors if hook is not None else None)
        return next((e for e in rotation_events(admin, "RotationSucceeded", secret_arn)
                     if e["serviceEventDetails"].get("ClientRequestToken") == token), None)
    event = wait_until(done, what=f"rotation {token} of {secret_arn}")
    assert stage_map(sm, secret_arn)[CURRENT] == token
    return event  # type: ignore[no-any-return]


def forms(value: str) -> set[str]:
    """A value as it would appear in text: as it is, JSON-escaped, as a Python repr."""
    return {value, json.dumps(value)[1:-1], repr(value)[1:-1]}


def assert_no_leaks(server: ServerProcess, admin: AdminClient, values: list[str]) -> None:
    """None of `values` is in the server's log or in any audit record."""
    assert values and all(len(v) >= 8 for v in values), values  # short strings would match by chance
    log_text = server.output()
    records = json.dumps(audit_events(admin))
    assert len(records) > 1000, "no audit records to look at"
    found = [(v, where) for v in values for f in forms(v)
             for where, text in (("server log", log_text), ("audit log", records)) if f in text]
    assert not found, found


# -- certificates and the HTTPS receiver ------------------------------------------------------------
@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path


def make_pki(directory: Path) -> Pki:
    """A CA and a server certificate for 127.0.0.1 / localhost, made with the openssl binary."""
    assert shutil.which("openssl"), "the openssl binary is needed to make the receiver's certificate"
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ext = directory / "srv.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(ca_key),
            "-out", str(ca), "-days", "2", "-subj", "/CN=openkms rotation test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return Pki(ca, cert, key)


def signed(secret: str, header: str, body: bytes) -> bool:
    """X-OpenKMS-Signature as documented, checked here from scratch: `t=<unix time>,v1=<hex
    HMAC-SHA256(signing secret, "<t>." + body)>`, made within the last five minutes."""
    try:
        items = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(items["t"])
    except (KeyError, ValueError):
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return set(items) == {"t", "v1"} and abs(time.time() - timestamp) < 300 and \
        hmac.compare_digest(expected, items["v1"])


@dataclass
class Hook:
    """One webhook function's behaviour at the receiver, and what it saw."""

    path: str
    url: str
    sm: Any  # the receiver's own Secrets Manager client
    signing_secret: str = ""
    fail_at: str | None = None
    redirect_to: str | None = None  # answer every step with a 302 to this URL
    steps: list[str] = field(default_factory=list)  # steps with a valid signature, in order of arrival
    payloads: list[dict[str, Any]] = field(default_factory=list)
    function_arns: list[str] = field(default_factory=list)
    rejected: int = 0  # requests with a bad signature
    wrong_token_errors: list[str] = field(default_factory=list)
    new_passwords: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # what went wrong in the receiver's own steps


def webhook_step(hook: Hook, payload: dict[str, Any]) -> None:
    """AWS's rotation template, as a customer's function would do it, through the public API."""
    sm, arn, token, step = hook.sm, payload["SecretId"], payload["ClientRequestToken"], payload["Step"]
    if step == "createSecret":
        current = json.loads(sm.get_secret_value(SecretId=arn, VersionStage=CURRENT)["SecretString"])
        try:
            sm.get_secret_value(SecretId=arn, VersionId=token, VersionStage=PENDING)
            return  # made already (a step run again)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
        new = dict(current, password="new-" + secrets.token_urlsafe(18))
        try:  # a RotationToken that is not this rotation's is refused
            sm.put_secret_value(SecretId=arn, ClientRequestToken=token, SecretString=json.dumps(new),
                                VersionStages=[PENDING], RotationToken="not-" + payload["RotationToken"])
            hook.wrong_token_errors.append("accepted")
        except ClientError as exc:
            hook.wrong_token_errors.append(exc.response["Error"]["Code"])
        hook.new_passwords.append(new["password"])
        sm.put_secret_value(SecretId=arn, ClientRequestToken=token, SecretString=json.dumps(new),
                            VersionStages=[PENDING], RotationToken=payload["RotationToken"])
    elif step == "finishSecret":
        stages = sm.describe_secret(SecretId=arn)["VersionIdsToStages"]
        current_version = next(v for v, labels in stages.items() if CURRENT in labels)
        if current_version != token:
            sm.update_secret_version_stage(SecretId=arn, VersionStage=CURRENT, MoveToVersionId=token,
                                           RemoveFromVersionId=current_version)


class Receiver:
    """An HTTPS server in a thread; each webhook function has a path of its own."""

    def __init__(self, pki: Pki) -> None:
        self.hooks: dict[str, Hook] = {}
        self.gets: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook = receiver.hooks.get(self.path)
                if hook is not None and hook.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", hook.redirect_to)
                else:
                    self.send_response(receiver.handle(self.path, self.headers.get("X-OpenKMS-Signature") or "",
                                                       self.headers.get("X-OpenKMS-Function-Arn") or "", body))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # what a redirect leads to: anything that answers 200
                receiver.gets.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki.cert), str(pki.key))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def hook(self, sm: Any, host: str = "localhost") -> Hook:
        path = "/" + unique("fn")
        made = Hook(path, f"https://{host}:{self.port}{path}", sm)
        self.hooks[path] = made
        return made

    def handle(self, path: str, header: str, function_arn: str, body: bytes) -> int:
        hook = self.hooks.get(path)
        if hook is None:
            return 404
        if not hook.signing_secret or not signed(hook.signing_secret, header, body):
            hook.rejected += 1
            return 401
        payload = json.loads(body)
        step = payload["Step"]
        with self.lock:
            hook.steps.append(step)
            hook.payloads.append(payload)
            hook.function_arns.append(function_arn)
        if step == hook.fail_at:
            return 500
        try:
            webhook_step(hook, payload)
        except Exception as exc:
            hook.errors.append(f"{step}: {exc!r}")
            return 500
        return 200

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def register_webhook(admin: AdminClient, hook: Hook, account_id: str = ACCOUNT_ID) -> str:
    made = admin.call("CreateRotationFunction", AccountId=account_id, FunctionName=hook.path[1:], Kind="webhook",
                      Url=hook.url, TimeoutSeconds=15)
    hook.signing_secret = made["SigningSecret"]
    return str(made["RotationFunction"]["FunctionArn"])


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("rotation-pki"))


@pytest.fixture(scope="module")
def receiver(pki: Pki) -> Iterator[Receiver]:
    made = Receiver(pki)
    yield made
    made.close()


@pytest.fixture(scope="module")
def rserver(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server (SQLite) that trusts the receiver's CA."""
    # The receivers listen on loopback, which webhooks may reach only where the operator allows it.
    env = dict(bootstrap_env(), OPENKMS_ROTATION_CA_BUNDLE=str(pki.ca), OPENKMS_ROTATION_ALLOWED_NETWORKS=LOOPBACK)
    proc = ServerProcess(tmp_path_factory.mktemp("rotation") / "data", env=env)
    proc.start()
    yield proc
    proc.stop()


@dataclass
class World:
    server: ServerProcess
    operator: AdminClient
    account_admin: AdminClient  # an administrator of ACCOUNT_ID who is no operator
    sm: Any  # the bootstrap operator's Secrets Manager client
    rotator: tuple[str, str]  # a user's access key for the functions' own calls
    rotator_sm: Any


@pytest.fixture(scope="module")
def world(rserver: ServerProcess) -> World:
    op = operator(rserver)
    admin_key = new_user(op, ACCOUNT_ID, "acct-admin", is_admin=True)
    rotator = new_user(op, ACCOUNT_ID, "rotator", actions=ROTATOR_ACTIONS)
    return World(rserver, op, AdminClient(rserver.endpoint, *admin_key, REGION),
                 rserver.client(service="secretsmanager", retry=False), rotator,
                 rserver.client(*rotator, service="secretsmanager", retry=False))


# -- 1. built-in random-password rotation, rules, cancel --------------------------------------------
def test_random_password_rotation(server: ServerProcess) -> None:
    admin = operator(server)
    sm = server.client(service="secretsmanager", retry=False)
    exclude = "abcdefghijkABCDEFGHIJK0123456789"
    made = admin.call("CreateRotationFunction", AccountId=ACCOUNT_ID, FunctionName=unique("rand"),
                      Kind="random-password", PasswordLength=24, ExcludeCharacters=exclude)
    assert "SigningSecret" not in made
    arn = made["RotationFunction"]["FunctionArn"]
    assert arn == f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{made['RotationFunction']['FunctionName']}"
    old = {"engine": "none", "username": "svc", "password": "old-" + secrets.token_hex(8), "host": "db.example"}
    secret = sm.create_secret(Name=unique("rot/rand"), SecretString=json.dumps(old))
    first = secret["VersionId"]

    answer = sm.rotate_secret(SecretId=secret["ARN"], RotationLambdaARN=arn,
                              RotationRules={"AutomaticallyAfterDays": 10})
    token = answer["VersionId"]
    assert token != first and answer["ARN"] == secret["ARN"]
    event = wait_rotated(admin, sm, secret["ARN"], token)
    assert event["eventType"] == "AwsServiceEvent" and event["serviceEventDetails"]["RotationLambdaARN"] == arn
    assert rotation_events(admin, "RotationStarted", secret["ARN"])

    new = value_of(sm, secret["ARN"])
    assert new["password"] != old["password"] and len(new["password"]) == 24
    assert not set(new["password"]) & set(exclude), new["password"]
    assert {k: v for k, v in new.items() if k != "password"} == {k: v for k, v in old.items() if k != "password"}
    assert value_of(sm, secret["ARN"], PREVIOUS) == old
    assert stage_map(sm, secret["ARN"])[PREVIOUS] == first

    # What the built-in function did through the API is in the audit log as Secrets Manager's own
    # calls, naming the secret and the rotation's version, never a value.
    def calls_of_the_function() -> list[dict[str, Any]] | None:
        found = [e for e in audit_events(admin) if e.get("userIdentity", {}).get("type") == "AWSService"
                 and e.get("eventType") == "AwsApiCall"
                 and (e.get("requestParameters") or {}).get("SecretId") == secret["ARN"]]
        names = {e["eventName"] for e in found}
        return found if {"PutSecretValue", "UpdateSecretVersionStage"} <= names else None
    calls = wait_until(calls_of_the_function, what="the built-in function's calls in the audit log")
    assert all(e["eventSource"] == "secretsmanager.amazonaws.com" for e in calls)
    # (a GetSecretValue of AWSPENDING answered ResourceNotFoundException: the template's own check)
    assert not [e for e in calls if e["eventName"] in ("PutSecretValue", "UpdateSecretVersionStage")
                and e.get("errorCode")], calls
    put = next(e for e in calls if e["eventName"] == "PutSecretValue")
    assert put["requestParameters"]["ClientRequestToken"] == token and put["readOnly"] is False
    assert set(put["requestParameters"]) <= {"SecretId", "ClientRequestToken", "VersionStages"}, put
    recorded = json.dumps(calls)
    assert not any(form in recorded for form in forms(new["password"]) | forms(old["password"]))
    # Each write's intent went with it and went away with its record (none left to replay).
    wait_until(lambda: query(server.data_dir, server.storage_url, "SELECT count(*) FROM audit_pending")[0][0] == 0,
               what="no audit intent left")

    described = sm.describe_secret(SecretId=secret["ARN"])
    assert described["RotationEnabled"] is True and described["RotationLambdaARN"] == arn
    assert described["RotationRules"] == {"AutomaticallyAfterDays": 10}
    last, following = described["LastRotatedDate"], described["NextRotationDate"]
    assert abs((datetime.now(UTC) - last).total_seconds()) < 120, last
    assert abs((following - last - timedelta(days=10)).total_seconds()) < 120, (last, following)

    # Functions this account may not use: none of that name, another account's.
    expect_error("AccessDeniedException", sm.rotate_secret, SecretId=secret["ARN"],
                 RotationLambdaARN=arn.rsplit(":", 1)[0] + ":" + unique("nope"))
    other = str(secrets.randbelow(9 * 10**11) + 10**11)
    admin.call("CreateAccount", Name=unique("other"), AccountId=other)
    theirs = admin.call("CreateRotationFunction", AccountId=other, FunctionName=unique("rand"),
                        Kind="random-password")["RotationFunction"]["FunctionArn"]
    assert f":{other}:" in theirs
    expect_error("AccessDeniedException", sm.rotate_secret, SecretId=secret["ARN"], RotationLambdaARN=theirs)

    # RotationRules that AWS refuses; the secret keeps its rules.
    for rules in ({"AutomaticallyAfterDays": 5, "ScheduleExpression": "rate(5 days)"},
                  {"ScheduleExpression": "rate(1 hours)"},
                  {"ScheduleExpression": "cron(0 0 * * * *)"},
                  {"ScheduleExpression": "cron(61 0 * * ? *)"},
                  {"ScheduleExpression": "every day"},
                  {"ScheduleExpression": "rate(4 hours)", "Duration": "4h"},
                  {"AutomaticallyAfterDays": 1, "Duration": "24h"}):
        expect_error("InvalidParameterException", sm.rotate_secret, SecretId=secret["ARN"], RotationLambdaARN=arn,
                     RotationRules=rules)
    assert sm.describe_secret(SecretId=secret["ARN"])["RotationRules"] == {"AutomaticallyAfterDays": 10}
    assert all_versions(sm, secret["ARN"]).keys() == {first, token}

    cancelled = sm.cancel_rotate_secret(SecretId=secret["ARN"])
    assert cancelled["ARN"] == secret["ARN"]
    described = sm.describe_secret(SecretId=secret["ARN"])
    assert described["RotationEnabled"] is False and "NextRotationDate" not in described
    expect_error("InvalidRequestException", sm.cancel_rotate_secret, SecretId=secret["ARN"])

    assert_no_leaks(server, admin, [old["password"], new["password"]])


# -- 2. webhooks ------------------------------------------------------------------------------------
def test_webhook_rotation(world: World, receiver: Receiver) -> None:
    hook = receiver.hook(world.rotator_sm)
    # http:// is refused (the operator has not allowed it); an account administrator registers https.
    message = admin_error("ValidationException", world.account_admin, "CreateRotationFunction", AccountId=ACCOUNT_ID,
                          FunctionName=unique("plain"), Kind="webhook", Url=f"http://127.0.0.1:{receiver.port}/x")
    assert "https" in message
    arn = register_webhook(world.account_admin, hook)
    assert len(hook.signing_secret) >= 32
    listed = world.account_admin.call("ListRotationFunctions", AccountId=ACCOUNT_ID)["RotationFunctions"]
    assert [f["Url"] for f in listed if f["FunctionArn"] == arn] == [hook.url]
    assert hook.signing_secret not in json.dumps(listed)

    sm = world.sm
    old = {"username": "svc", "password": "old-" + secrets.token_hex(8)}
    secret = sm.create_secret(Name=unique("rot/hook"), SecretString=json.dumps(old))
    token = sm.rotate_secret(SecretId=secret["ARN"], RotationLambdaARN=arn,
                             RotationRules={"ScheduleExpression": "rate(10 days)"})["VersionId"]
    wait_rotated(world.operator, sm, secret["ARN"], token, hook)
    assert hook.steps == STEPS and hook.rejected == 0
    assert {p["ClientRequestToken"] for p in hook.payloads} == {token}
    assert {p["SecretId"] for p in hook.payloads} == {secret["ARN"]}
    assert set(hook.function_arns) == {arn}
    assert len({p["RotationToken"] for p in hook.payloads}) == 1
    assert hook.wrong_token_errors == ["InvalidRequestException"]
    new = value_of(sm, secret["ARN"])
    assert new == dict(old, password=hook.new_passwords[0])
    assert value_of(sm, secret["ARN"], PREVIOUS) == old
    assert stage_map(sm, secret["ARN"])[PREVIOUS] == secret["VersionId"]

    # After the rotation, its RotationToken is worth nothing.
    expect_error("InvalidRequestException", world.rotator_sm.put_secret_value, SecretId=secret["ARN"],
                 SecretString="late", VersionStages=[PENDING], RotationToken=hook.payloads[0]["RotationToken"])
    assert len(all_versions(sm, secret["ARN"])) == 2

    # The receiver does refuse a bad signature: a request signed with another secret is not a step.
    body = json.dumps({"Step": "createSecret", "SecretId": secret["ARN"], "ClientRequestToken": token,
                       "RotationToken": "x"}).encode()
    forged = urllib.request.Request(hook.url, data=body, method="POST",
                                    headers={"X-OpenKMS-Signature": f"t={int(time.time())},v1={'0' * 64}"})
    context = ssl.create_default_context(cafile=world.server.env["OPENKMS_ROTATION_CA_BUNDLE"])
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10, context=context)
    assert refused.value.code == 401 and hook.rejected == 1 and len(hook.steps) == 4

    assert_no_leaks(world.server, world.operator, [old["password"], new["password"], hook.signing_secret])


def test_webhook_failure_leaves_the_rotation_pending(world: World, receiver: Receiver) -> None:
    hook = receiver.hook(world.rotator_sm, host="127.0.0.1")  # the certificate's IP address name
    hook.fail_at = "setSecret"
    arn = register_webhook(world.operator, hook)
    sm = world.sm
    old = {"username": "svc", "password": "old-" + secrets.token_hex(8)}
    secret = sm.create_secret(Name=unique("rot/fail"), SecretString=json.dumps(old))
    first = secret["VersionId"]
    token = sm.rotate_secret(SecretId=secret["ARN"], RotationLambdaARN=arn)["VersionId"]

    failed = wait_events(world.operator, "RotationFailed", secret["ARN"])
    details = failed[0]["serviceEventDetails"]
    assert details["Step"] == "setSecret" and details["ClientRequestToken"] == token, failed[0]
    assert failed[0]["errorCode"] == "RotationFailed" and "500" in failed[0]["errorMessage"], failed[0]
    assert hook.steps == ["createSecret", "setSecret"]
    assert stage_map(sm, secret["ARN"]) == {CURRENT: first, PENDING: token}
    assert value_of(sm, secret["ARN"]) == old
    pending = json.loads(sm.get_secret_value(SecretId=secret["ARN"], VersionId=token,
                                             VersionStage=PENDING)["SecretString"])
    assert pending["password"] == hook.new_passwords[0]
    assert not rotation_events(world.operator, "RotationSucceeded", secret["ARN"])

    # Another RotateSecret: the unfinished rotation is in the way (and is tried again).
    second = str(uuid.uuid4())
    message = expect_error("InvalidRequestException", sm.rotate_secret, SecretId=secret["ARN"],
                           ClientRequestToken=second)
    assert PREVIOUS_NOT_COMPLETE in message
    again = wait_events(world.operator, "RotationFailed", secret["ARN"], 2)
    assert {e["serviceEventDetails"]["ClientRequestToken"] for e in again} == {token}
    assert hook.steps == ["createSecret", "setSecret"] * 2
    assert second not in all_versions(sm, secret["ARN"])
    assert stage_map(sm, secret["ARN"]) == {CURRENT: first, PENDING: token}

    # Taking AWSPENDING off the version abandons that rotation: a new one runs (and now succeeds).
    sm.update_secret_version_stage(SecretId=secret["ARN"], VersionStage=PENDING, RemoveFromVersionId=token)
    hook.fail_at = None
    third = sm.rotate_secret(SecretId=secret["ARN"])["VersionId"]
    assert third not in (first, token)
    wait_rotated(world.operator, sm, secret["ARN"], third, hook)
    assert hook.steps[4:] == STEPS
    assert value_of(sm, secret["ARN"])["password"] == hook.new_passwords[-1]
    assert value_of(sm, secret["ARN"], PREVIOUS) == old

    assert_no_leaks(world.server, world.operator, [old["password"], *hook.new_passwords])


def test_webhook_redirect_is_no_success(world: World, receiver: Receiver) -> None:
    """Only a 2xx answer is success: a redirect (to a page that answers 200) fails the step, and is
    not followed (it could lead anywhere, http:// too)."""
    hook = receiver.hook(world.rotator_sm)
    landing = "/" + unique("landing")
    hook.redirect_to = f"https://localhost:{receiver.port}{landing}"
    arn = register_webhook(world.operator, hook)
    sm = world.sm
    secret = sm.create_secret(Name=unique("rot/redirect"), SecretString=json.dumps({"password": "p" * 12}))
    token = sm.rotate_secret(SecretId=secret["ARN"], RotationLambdaARN=arn)["VersionId"]
    failed = wait_events(world.operator, "RotationFailed", secret["ARN"])[0]
    assert failed["serviceEventDetails"]["Step"] == "createSecret" and "302" in failed["errorMessage"], failed
    assert landing not in receiver.gets
    assert not rotation_events(world.operator, "RotationSucceeded", secret["ARN"])
    assert stage_map(sm, secret["ARN"]) == {CURRENT: secret["VersionId"], PENDING: token}


# -- 3. commands ------------------------------------------------------------------------------------
COMMAND = '''#!{python}
import json, os, secrets, sys

payload = json.load(sys.stdin)
with open(os.environ["STEPS_FILE"], "a") as steps:
    steps.write(payload["Step"] + " " + os.environ.get("MARKER", "-") + "\\n")
if payload["Step"] in ("createSecret", "finishSecret"):
    import boto3

    sm = boto3.client("secretsmanager")  # AWS_ENDPOINT_URL, AWS_REGION and the key: from the environment
    arn, token = payload["SecretId"], payload["ClientRequestToken"]
    if payload["Step"] == "createSecret":
        current = json.loads(sm.get_secret_value(SecretId=arn)["SecretString"])
        current["password"] = "cmd-" + secrets.token_urlsafe(18)
        sm.put_secret_value(SecretId=arn, ClientRequestToken=token, SecretString=json.dumps(current),
                            VersionStages=["AWSPENDING"], RotationToken=payload["RotationToken"])
    else:
        stages = sm.describe_secret(SecretId=arn)["VersionIdsToStages"]
        current = next(v for v, labels in stages.items() if "AWSCURRENT" in labels)
        sm.update_secret_version_stage(SecretId=arn, VersionStage="AWSCURRENT", MoveToVersionId=token,
                                       RemoveFromVersionId=current)
'''


def test_command_rotation(world: World, tmp_path: Path) -> None:
    script = tmp_path / "rotate.py"
    script.write_text(COMMAND.format(python=sys.executable))
    script.chmod(0o755)
    steps_file = tmp_path / "steps.txt"
    marker = "marker-" + secrets.token_hex(12)
    key_id, secret_key = world.rotator
    environment = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret_key, "STEPS_FILE": str(steps_file),
                   "MARKER": marker}
    name = unique("cmd")

    # A command runs on the server's machine: an account administrator may not register one.
    admin_error("AccessDeniedException", world.account_admin, "CreateRotationFunction", AccountId=ACCOUNT_ID,
                FunctionName=name, Kind="command", Command=[str(script)], Environment=environment)
    made = world.operator.call("CreateRotationFunction", AccountId=ACCOUNT_ID, FunctionName=name, Kind="command",
                               Command=[str(script)], Environment=environment, TimeoutSeconds=60)
    arn = made["RotationFunction"]["FunctionArn"]
    listed = world.operator.call("ListRotationFunctions", AccountId=ACCOUNT_ID)["RotationFunctions"]
    mine = [f for f in listed if f["FunctionArn"] == arn]
    assert mine and mine[0]["Command"] == [str(script)]
    assert sorted(mine[0]["EnvironmentVariables"]) == sorted(environment)
    hidden = [secret_key, marker, str(steps_file)]
    assert not [v for v in hidden if v in json.dumps(listed) or v in json.dumps(made)]
    records = audit_events(world.operator, "CreateRotationFunction")
    assert [r for r in records if name in json.dumps(r)], "no audit record of the registration"
    assert not [v for v in [*hidden, key_id] if v in json.dumps(records)]

    sm = world.sm
    old = {"username": "svc", "password": "old-" + secrets.token_hex(8)}
    secret = sm.create_secret(Name=unique("rot/cmd"), SecretString=json.dumps(old))
    token = sm.rotate_secret(SecretId=secret["ARN"], RotationLambdaARN=arn)["VersionId"]
    wait_rotated(world.operator, sm, secret["ARN"], token)
    assert steps_file.read_text().split("\n") == [f"{s} {marker}" for s in STEPS] + [""]
    new = value_of(sm, secret["ARN"])
    assert new["password"].startswith("cmd-") and dict(new, password=old["password"]) == old
    assert value_of(sm, secret["ARN"], PREVIOUS) == old

    # A command that exits 1 fails its step.
    failing = world.operator.call("CreateRotationFunction", AccountId=ACCOUNT_ID, FunctionName=unique("false"),
                                  Kind="command", Command=[shutil.which("false") or "/bin/false"])
    doomed = sm.create_secret(Name=unique("rot/cmdfail"), SecretString=json.dumps(old))
    doomed_token = sm.rotate_secret(SecretId=doomed["ARN"],
                                    RotationLambdaARN=failing["RotationFunction"]["FunctionArn"])["VersionId"]
    failed = wait_events(world.operator, "RotationFailed", doomed["ARN"])[0]
    assert failed["serviceEventDetails"]["Step"] == "createSecret", failed
    assert failed["serviceEventDetails"]["ClientRequestToken"] == doomed_token
    assert "status 1" in failed["errorMessage"], failed
    assert stage_map(sm, doomed["ARN"])[CURRENT] == doomed["VersionId"]

    assert_no_leaks(world.server, world.operator, [old["password"], new["password"], secret_key, marker])


def test_one_accounts_hung_rotations_hold_up_only_its_own(tmp_path: Path) -> None:
    """A node's rotation threads (4) are shared by its accounts; one account's rotations take at most
    half of them at once, the rest waiting their turn. An account whose function hangs until its
    timeout holds up its own rotations, not another account's; and what waited runs in the end."""
    server = ServerProcess(tmp_path / "data", env=bootstrap_env())
    server.start()
    try:
        op = operator(server)
        sm = server.client(service="secretsmanager", retry=False)
        false = shutil.which("false") or "/bin/false"
        # What waits does run: five rotations at once, each failing at once at createSecret.
        quick = op.call("CreateRotationFunction", AccountId=ACCOUNT_ID, FunctionName=unique("false"),
                        Kind="command", Command=[false])["RotationFunction"]["FunctionArn"]
        five = [sm.create_secret(Name=unique("rot/q"), SecretString="v")["ARN"] for _ in range(5)]
        for arn in five:
            sm.rotate_secret(SecretId=arn, RotationLambdaARN=quick)
        for arn in five:
            assert wait_events(op, "RotationFailed", arn)[0]["serviceEventDetails"]["Step"] == "createSecret"

        # The account's function hangs: four rotations of it, as many as the node has threads.
        hung = op.call("CreateRotationFunction", AccountId=ACCOUNT_ID, FunctionName=unique("hang"),
                       Kind="command", Command=[shutil.which("sleep") or "/bin/sleep", "8"],
                       TimeoutSeconds=20)["RotationFunction"]["FunctionArn"]
        for _ in range(4):
            sm.rotate_secret(SecretId=sm.create_secret(Name=unique("rot/h"), SecretString="v")["ARN"],
                             RotationLambdaARN=hung)
        other = str(secrets.randbelow(9 * 10**11) + 10**11)
        op.call("CreateAccount", Name=unique("other"), AccountId=other)
        theirs = server.client(*new_user(op, other, "admin", is_admin=True), service="secretsmanager", retry=False)
        fails = op.call("CreateRotationFunction", AccountId=other, FunctionName=unique("false"), Kind="command",
                        Command=[false])["RotationFunction"]["FunctionArn"]
        started = time.monotonic()
        secret = theirs.create_secret(Name=unique("rot/other"), SecretString="v")["ARN"]
        theirs.rotate_secret(SecretId=secret, RotationLambdaARN=fails)
        # Its rotation runs (and fails at createSecret) while the first account's still hang: not
        # after them (the hung ones sleep 8 s; one thread each of the four would make it wait).
        found = wait_until(lambda: rotation_events(op, "RotationFailed", secret), timeout=6.0,
                           what="the other account's rotation")
        assert found[0]["serviceEventDetails"]["Step"] == "createSecret"
        assert time.monotonic() - started < 6.0
    finally:
        server.stop()


# -- 4. PostgreSQL rotators against a PostgreSQL that checks passwords ------------------------------
@dataclass
class PrivatePg:
    port: int
    superuser_password: str

    def login(self, user: str, password: str) -> Any:
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, dbname="postgres", user=user, password=password,
                               connect_timeout=5, autocommit=True)

    def can_login(self, user: str, password: str) -> bool:
        import psycopg

        try:
            with self.login(user, password) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def superuser(self) -> Any:
        return self.login("postgres", self.superuser_password)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def value(self, user: str, password: str, **extra: Any) -> dict[str, Any]:
        return {"engine": "postgres", "host": "127.0.0.1", "port": self.port, "username": user,
                "password": password, "dbname": "postgres", **extra}


def pg_bindir() -> Path:
    candidates = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True,
                                         timeout=10).stdout.strip())
    candidates.append("/usr/lib/postgresql/15/bin")
    for candidate in candidates:
        if candidate and all((Path(candidate) / b).is_file() for b in ("initdb", "pg_ctl")):
            return Path(candidate)
    pytest.fail(f"the PostgreSQL rotation tests need PostgreSQL's initdb and pg_ctl (looked in {candidates}); "
                "install the PostgreSQL server (Debian: postgresql-15)")


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePg]:
    """A PostgreSQL cluster of this module: scram-sha-256 over TCP, so that passwords count."""
    bindir = pg_bindir()
    base = Path(tempfile.mkdtemp(prefix="openkms-rotation-pg-"))
    data, sockets, log, pwfile = base / "data", base / "sock", base / "postgres.log", base / "pwfile"
    sockets.mkdir()
    password = "su-" + secrets.token_hex(12)
    pwfile.write_text(password + "\n")
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.fail("running as root, the PostgreSQL rotation tests need the `postgres` user to run initdb")
        for path in (base, sockets, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]

    def run(*args: str) -> None:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}\n" + \
            (log.read_text() if log.exists() else "")

    port = free_port()
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
        "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1",
        "-w", "-l", str(log), "start")
    try:
        pg = PrivatePg(port, password)
        assert pg.can_login("postgres", password) and not pg.can_login("postgres", "wrong-password"), \
            "the private PostgreSQL does not check passwords"
        yield pg
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "stop", "-m", "fast")
        shutil.rmtree(base, ignore_errors=True)


def test_postgresql_single_user(world: World, private_pg: PrivatePg) -> None:
    pg, sm = private_pg, world.sm
    old = "old-" + secrets.token_hex(8)
    with pg.superuser() as conn:
        conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{old}'")
    assert pg.can_login("app", old)
    admin_error("AccessDeniedException", world.account_admin, "CreateRotationFunction", AccountId=ACCOUNT_ID,
                FunctionName=unique("pg-single"), Kind="postgresql-single-user", AllowedHosts=[pg.address])
    admin_error("ValidationException", world.operator, "CreateRotationFunction", AccountId=ACCOUNT_ID,
                FunctionName=unique("pg-single"), Kind="postgresql-single-user")  # no AllowedHosts
    arn = world.operator.call("CreateRotationFunction", AccountId=ACCOUNT_ID, FunctionName=unique("pg-single"),
                              Kind="postgresql-single-user",
                              AllowedHosts=[pg.address])["RotationFunction"]["FunctionArn"]
    secret = sm.create_secret(Name=unique("rot/pg"), SecretString=json.dumps(pg.value("app", old)))
    token = sm.rotate_secret(SecretId=secret["ARN"], RotationLambdaARN=arn)["VersionId"]
    wait_rotated(world.operator, sm, secret["ARN"], token)

    new = value_of(sm, secret["ARN"])
    assert new == dict(pg.value("app", old), password=new["password"]) and new["password"] != old
    assert len(new["password"]) == 32 and not set(new["password"]) & set("/@\"'\\")
    assert pg.can_login("app", new["password"])
    assert not pg.can_login("app", old)
    assert value_of(sm, secret["ARN"], PREVIOUS)["password"] == old

    # A value naming a database the function may not reach (here the machine's own PostgreSQL, which
    # trusts every login on loopback) fails the step, and nothing is done there.
    stray = sm.create_secret(Name=unique("rot/pg-stray"),
                             SecretString=json.dumps(dict(pg.value("postgres", "anything"), port=5432)))
    stray_token = sm.rotate_secret(SecretId=stray["ARN"], RotationLambdaARN=arn)["VersionId"]
    failed = wait_events(world.operator, "RotationFailed", stray["ARN"])[0]
    assert "AllowedHosts" in failed["errorMessage"], failed
    assert stage_map(sm, stray["ARN"])[CURRENT] != stray_token

    assert_no_leaks(world.server, world.operator, [old, new["password"], pg.superuser_password])


def test_postgresql_alternating_users(world: World, private_pg: PrivatePg) -> None:
    pg, sm = private_pg, world.sm
    old = "old-" + secrets.token_hex(8)
    with pg.superuser() as conn:
        conn.execute(f"CREATE ROLE app2 LOGIN PASSWORD '{old}'")
        conn.execute("CREATE TABLE app2_data (n int)")
        conn.execute("GRANT SELECT ON app2_data TO app2")
    master = sm.create_secret(Name=unique("rot/pg-master"),
                              SecretString=json.dumps(pg.value("postgres", pg.superuser_password)))
    arn = world.operator.call("CreateRotationFunction", AccountId=ACCOUNT_ID, FunctionName=unique("pg-alt"),
                              Kind="postgresql-alternating-users", AllowedHosts=[pg.address],
                              MasterSecretArn=master["ARN"])["RotationFunction"]["FunctionArn"]
    secret = sm.create_secret(Name=unique("rot/pg-alt"),
                              SecretString=json.dumps(pg.value("app2", old, masterarn=master["ARN"])))

    token = sm.rotate_secret(SecretId=secret["ARN"], RotationLambdaARN=arn)["VersionId"]
    wait_rotated(world.operator, sm, secret["ARN"], token)
    clone = value_of(sm, secret["ARN"])
    assert clone["username"] == "app2_clone" and clone["masterarn"] == master["ARN"]
    assert pg.can_login("app2_clone", clone["password"])
    assert pg.can_login("app2", old)  # the other user is untouched: its sessions go on
    with pg.superuser() as conn:
        member = conn.execute("SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
                              "JOIN pg_roles u ON u.oid = m.member WHERE r.rolname = 'app2' "
                              "AND u.rolname = 'app2_clone'").fetchone()
        assert member is not None, "app2_clone is not a member of app2"
        assert conn.execute("SELECT has_table_privilege('app2_clone', 'app2_data', 'SELECT')").fetchone() == (True,)
    with pg.login("app2_clone", clone["password"]) as conn:
        assert conn.execute("SELECT count(*) FROM app2_data").fetchone() == (0,)

    token2 = sm.rotate_secret(SecretId=secret["ARN"])["VersionId"]
    wait_rotated(world.operator, sm, secret["ARN"], token2)
    back = value_of(sm, secret["ARN"])
    assert back["username"] == "app2" and back["password"] not in (old, clone["password"])
    assert pg.can_login("app2", back["password"])
    assert not pg.can_login("app2", old)
    assert pg.can_login("app2_clone", clone["password"])  # AWSPREVIOUS still works
    assert value_of(sm, secret["ARN"], PREVIOUS)["username"] == "app2_clone"

    # A value whose masterarn is another secret than the function's is refused (a confused deputy).
    other = sm.create_secret(Name=unique("rot/pg-other-master"),
                             SecretString=json.dumps(pg.value("postgres", pg.superuser_password)))
    sneaky = sm.create_secret(Name=unique("rot/pg-sneaky"),
                              SecretString=json.dumps(pg.value("app2", "x", masterarn=other["ARN"])))
    sm.rotate_secret(SecretId=sneaky["ARN"], RotationLambdaARN=arn)
    failed = wait_events(world.operator, "RotationFailed", sneaky["ARN"])[0]
    assert "MasterSecretArn" in failed["errorMessage"], failed

    assert_no_leaks(world.server, world.operator,
                    [old, clone["password"], back["password"], pg.superuser_password])


# -- 5. scheduled rotation on two nodes: exactly once -----------------------------------------------
@pytest.fixture
def two_nodes(pki: Pki, pg_url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    env = {"OPENKMS_ROTATION_CA_BUNDLE": str(pki.ca), "OPENKMS_SCHEDULER_INTERVAL": "0.3",
           "OPENKMS_CACHE_TTL": "0.5", "OPENKMS_ROTATION_ALLOWED_NETWORKS": LOOPBACK}
    a = ServerProcess(tmp_path / "a", storage_url=pg_url, env=dict(bootstrap_env(), **env))
    a.start()
    try:
        (tmp_path / "b").mkdir()
        shutil.copy2(tmp_path / "a" / "root.key", tmp_path / "b" / "root.key")
        b = ServerProcess(tmp_path / "b", storage_url=pg_url, env=env)
        b.start()
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def test_scheduled_rotation_runs_once_on_two_nodes(two_nodes: tuple[ServerProcess, ServerProcess],
                                                   receiver: Receiver, pg_url: str) -> None:
    """Several secrets fall due at once, so that both nodes' scheduler runs see them due together."""
    a, b = two_nodes
    admin = operator(a)
    rotator = new_user(admin, ACCOUNT_ID, "rotator", actions=ROTATOR_ACTIONS)
    hook = receiver.hook(a.client(*rotator, service="secretsmanager", retry=False))
    arn = register_webhook(admin, hook)
    sm = a.client(service="secretsmanager", retry=False)
    sm_b = b.client(a.access_key_id, a.secret_access_key, service="secretsmanager", retry=False)
    olds = [{"username": f"svc{i}", "password": "old-" + secrets.token_hex(8)} for i in range(SCHEDULED)]
    made = [sm.create_secret(Name=unique("rot/sched"), SecretString=json.dumps(old)) for old in olds]
    for secret in made:
        sm.rotate_secret(SecretId=secret["ARN"], RotationLambdaARN=arn, RotateImmediately=False,
                         RotationRules={"AutomaticallyAfterDays": 1})
    described = sm_b.describe_secret(SecretId=made[0]["ARN"])
    assert described["RotationEnabled"] is True and "LastRotatedDate" not in described
    assert abs((described["NextRotationDate"] - datetime.now(UTC) - timedelta(days=1)).total_seconds()) < 120
    time.sleep(1.0)  # several scheduler runs on each node: not due, not rotated
    assert hook.steps == [] and list(all_versions(sm, made[0]["ARN"])) == [made[0]["VersionId"]]

    arns = [secret["ARN"] for secret in made]
    run_sql(a.data_dir, pg_url, (f"UPDATE secrets SET next_rotation = ? WHERE arn IN ({', '.join('?' * len(arns))})",
                                 (time.time() - 60, *arns)))
    for secret_arn in arns:
        wait_events(admin, "RotationSucceeded", secret_arn)
    time.sleep(1.5)  # a second rotation, by either node, would have started by now
    assert hook.rejected == 0 and not hook.errors, hook.errors
    for secret, old in zip(made, olds, strict=True):
        secret_arn = secret["ARN"]
        steps = [p["Step"] for p in hook.payloads if p["SecretId"] == secret_arn]
        assert steps == STEPS, (secret_arn, steps)  # createSecret exactly once
        succeeded = rotation_events(admin, "RotationSucceeded", secret_arn)
        assert len(succeeded) == 1 and len(rotation_events(admin, "RotationStarted", secret_arn)) == 1, succeeded
        assert not rotation_events(admin, "RotationFailed", secret_arn)
        token = succeeded[0]["serviceEventDetails"]["ClientRequestToken"]
        versions = all_versions(sm, secret_arn)
        assert versions in ({secret["VersionId"]: [PREVIOUS], token: [CURRENT, PENDING]},
                            {secret["VersionId"]: [PREVIOUS], token: [CURRENT]}), versions
        new = value_of(sm_b, secret_arn)
        assert new["password"] in hook.new_passwords and dict(new, password=old["password"]) == old
        described = sm_b.describe_secret(SecretId=secret_arn)
        now = datetime.now(UTC)
        assert abs((now - described["LastRotatedDate"]).total_seconds()) < 60
        assert abs((described["NextRotationDate"] - now - timedelta(days=1)).total_seconds()) < 60
        rotated_by = [s for s in (a, b) if f"rotated secret {secret_arn} " in s.output()]
        assert len(rotated_by) == 1, f"{len(rotated_by)} nodes rotated {secret_arn}"
    assert len(hook.new_passwords) == SCHEDULED

    for node in (a, b):
        assert_no_leaks(node, admin, [old["password"] for old in olds] + hook.new_passwords)
