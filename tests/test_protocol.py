"""The AWS JSON 1.1 protocol layer of a real server, fuzzed and probed.

Requests are signed with botocore's own SigV4 signer and sent with http.client, so the server sees
exactly what arrives on the wire. Whatever the target and body, the answer must be a JSON 1.1
response with a request id, and an error must be `{"__type": ..., "message": ...}` with a 4xx
status: a 5xx means the server failed to classify a bad request.

OPENKMS_FUZZ_EXAMPLES=5000 runs a longer hunt than the default 150 examples per property.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from unittest import mock

import boto3
import botocore.loaders
import pytest
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from tests.server import REGION, ServerProcess
from tests.unit.test_shapes import ShapeValues

JSON_11 = "application/x-amz-json-1.1"
MAX_BODY = 256 * 1024
KMS_MODEL: dict[str, Any] = botocore.loaders.Loader().load_service_model("kms", "service-2")
KMS_OPERATIONS = sorted(KMS_MODEL["operations"])
ADMIN_OPERATIONS = ["CreateAccount", "ListAccounts", "CreateUser", "ListUsers", "CreateAccessKey",
                    "ListAccessKeys", "UpdateAccessKey", "DeleteAccessKey"]
MEMBER_NAMES = sorted({name for spec in KMS_MODEL["operations"].values() if "input" in spec
                       for name in KMS_MODEL["shapes"][spec["input"]["shape"]]["members"]}
                      | {"AccountId", "Name", "UserName", "Admin", "AccessKeyId", "Status"})

FUZZ = settings(max_examples=int(os.environ.get("OPENKMS_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- sending requests -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str:
        return str(self.json().get("__type"))

    @property
    def message(self) -> str:
        return str(self.json().get("message"))


def signed_headers(server: ServerProcess, target: str | None, body: bytes, *,
                   access_key_id: str | None = None, secret: str | None = None, region: str = REGION,
                   service: str = "kms", when: datetime | None = None,
                   extra: dict[str, str] | None = None) -> dict[str, str]:
    """Headers of a request signed by botocore, as boto3 would send it (`when` fixes the clock)."""
    headers = {"Content-Type": JSON_11, **(extra or {})}
    if target is not None:
        headers["X-Amz-Target"] = target
    request = AWSRequest(method="POST", url=server.endpoint + "/", data=body, headers=headers)
    auth = SigV4Auth(Credentials(access_key_id or server.access_key_id, secret or server.secret_access_key),
                     service, region)
    if when is None:
        auth.add_auth(request)
    else:
        with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
            auth.add_auth(request)
    return dict(request.headers.items())


def send(server: ServerProcess, body: bytes = b"", headers: dict[str, str] | None = None,
         method: str = "POST", path: str = "/", timeout: float = 10.0) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        # The server may answer (413) and close before the body is all sent; read that answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def call(server: ServerProcess, target: str | None, body: bytes | str | dict[str, Any]) -> Reply:
    """A correctly signed request."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    return send(server, raw, signed_headers(server, target, raw))


def check_protocol(reply: Reply) -> None:
    """What every answer to POST / must look like (and, in a hypothesis test, a statistics event)."""
    if currently_in_test_context():
        event("status", f"{reply.status} {reply.json().get('__type', '') if reply.status != 200 else ''}")
    assert reply.status < 500, (reply.status, reply.body[:500])
    assert reply.headers.get("content-type") == JSON_11, reply.headers
    uuid.UUID(reply.headers["x-amzn-requestid"])
    body = reply.json()
    assert isinstance(body, dict)
    if reply.status == 200:
        assert "__type" not in body
    else:
        assert reply.status >= 400
        assert isinstance(body.get("__type"), str) and body["__type"], body
        assert isinstance(body.get("message"), str), body


def expect_error(reply: Reply, code: str, status: int = 400) -> str:
    check_protocol(reply)
    assert (reply.status, reply.error_code) == (status, code), (reply.status, reply.body[:500])
    return reply.message


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_key(kms: Any) -> dict[str, str]:
    """A real key and alias, so that fuzzed requests also reach the service, not only the parser."""
    metadata = kms.create_key(Description="fuzz target")["KeyMetadata"]
    alias = f"alias/fuzz-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=metadata["KeyId"])
    return {"KeyId": metadata["KeyId"], "Arn": metadata["Arn"], "Alias": alias,
            "AliasArn": metadata["Arn"].split(":key/")[0] + ":" + alias}


@pytest.fixture(scope="module")
def implemented(server: ServerProcess) -> list[str]:
    """The model's operations this server implements, so that fuzzing spends its examples there."""
    ops = [op for op in KMS_OPERATIONS
           if call(server, "TrentService." + op, b"{}").error_code != "UnsupportedOperationException"]
    assert ops
    return ops


@pytest.fixture(scope="module")
def raw_kms(server: ServerProcess) -> Any:
    """boto3 without client-side validation, to send values the model forbids."""
    return server.client(validate=False)


# -- strategies -------------------------------------------------------------------------------------
FUZZ_CHARS = st.characters(codec="utf-8")
fuzz_text = st.text(alphabet=FUZZ_CHARS, max_size=40)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
huge_text = st.builds(lambda c, n: c * n, FUZZ_CHARS, st.integers(min_value=10_000, max_value=70_000))

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | fuzz_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(fuzz_text, inner, max_size=4),
    max_leaves=15,
)
junk_objects = st.dictionaries(st.sampled_from(MEMBER_NAMES) | fuzz_text, json_values, max_size=6)
nested_junk = st.builds(lambda opener, depth, closer: opener * depth + closer * depth,
                        st.sampled_from(["[", '{"a":', '{"Tags":[']), st.integers(1, 2000),
                        st.sampled_from(["]", "}", "]}"]))

targets = st.one_of(
    st.sampled_from(KMS_OPERATIONS).map(lambda op: "TrentService." + op),
    st.sampled_from(ADMIN_OPERATIONS).map(lambda op: "OpenKMSAdmin." + op),
    header_text.map(lambda s: "TrentService." + s),
    header_text.map(lambda s: "OpenKMSAdmin." + s),
    header_text,
    st.none(),
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


bodies = st.one_of(
    st.binary(max_size=2048),
    json_values.map(_dumps),
    junk_objects.map(_dumps),
    st.tuples(st.sampled_from(["Description", "KeyId", "Plaintext", "Marker", "Policy"]), huge_text).map(
        lambda m: _dumps({m[0]: m[1]})),
    nested_junk.map(str.encode),
    st.just(b""),
)

_shape_values: dict[str, tuple[ShapeValues, ShapeValues]] = {}


def shape_values(key: dict[str, str]) -> tuple[ShapeValues, ShapeValues]:
    """(junky, well-typed) request strategies whose strings include the real key's names."""
    if key["KeyId"] not in _shape_values:
        strings = fuzz_text | st.sampled_from(sorted(key.values()))
        _shape_values[key["KeyId"]] = (
            ShapeValues(KMS_MODEL, strings=strings, chars=FUZZ_CHARS, junk=json_values, junk_one_in=4),
            ShapeValues(KMS_MODEL, strings=strings, chars=FUZZ_CHARS, junk=json_values, junk_one_in=None))
    return _shape_values[key["KeyId"]]


# -- properties -------------------------------------------------------------------------------------
@FUZZ
@given(target=targets, body=bodies)
def test_fuzzed_targets_and_bodies(server: ServerProcess, target: str | None, body: bytes) -> None:
    reply = call(server, target, body)
    check_protocol(reply)
    if len(body) > MAX_BODY:
        assert (reply.status, reply.error_code) == (413, "RequestEntityTooLargeException")


@FUZZ
@given(any_op=st.sampled_from(KMS_OPERATIONS), well_typed=st.booleans(), data=st.data())
def test_fuzzed_model_requests(server: ServerProcess, fuzz_key: dict[str, str], implemented: list[str],
                               any_op: str, well_typed: bool, data: st.DataObject) -> None:
    op = data.draw(st.sampled_from(implemented) | st.just(any_op), label="operation")
    junky, typed = shape_values(fuzz_key)
    body = data.draw((typed if well_typed else junky).request(op), label="body")
    reply = call(server, "TrentService." + op, _dumps(body))
    check_protocol(reply)
    if reply.status != 200 and isinstance(body, dict) and isinstance(body.get("Plaintext"), str):
        plaintext = body["Plaintext"]
        elsewhere = any(plaintext in json.dumps(v) for k, v in body.items() if k != "Plaintext")
        assert len(plaintext) < 8 or elsewhere or plaintext not in reply.message, "a plaintext was echoed"


@FUZZ
@given(target=targets, body=bodies)
def test_fuzzed_unsigned_requests(server: ServerProcess, target: str | None, body: bytes) -> None:
    headers = {"Content-Type": JSON_11}
    if target is not None:
        headers["X-Amz-Target"] = target
    reply = send(server, body, headers)
    check_protocol(reply)
    if len(body) > MAX_BODY:
        assert reply.status == 413
    else:
        assert (reply.status, reply.error_code) == (403, "MissingAuthenticationTokenException")


# -- explicit cases: JSON and operations -----------------------------------------------------------
@pytest.mark.parametrize("body", [b"{", b"{'KeyId': 'x'}", b"\xff\xfe", b'{"Limit": 1,}', b"NaN", b"{}x",
                                  b'{"KeyId": "\\ud800"}', b"1e999"])
def test_malformed_json(server: ServerProcess, body: bytes) -> None:
    expect_error(call(server, "TrentService.ListKeys", body), "SerializationException")


@pytest.mark.parametrize("body", [b"[]", b"1", b'"ListKeys"', b"null", b"true", b'[{"Limit": 1}]'])
def test_body_must_be_a_json_object(server: ServerProcess, body: bytes) -> None:
    expect_error(call(server, "TrentService.ListKeys", body), "SerializationException")


@pytest.mark.parametrize("body", [b"", b"  ", b"{}"])
def test_empty_body_is_an_empty_request(server: ServerProcess, body: bytes) -> None:
    reply = call(server, "TrentService.ListKeys", body)
    check_protocol(reply)
    assert reply.status == 200 and "Keys" in reply.json()


@pytest.mark.parametrize("target", [None, "", "TrentService.", "TrentService.NoSuchOperation",
                                    "TrentService.listkeys", "trentservice.ListKeys", "ListKeys",
                                    "OpenKMSAdmin.NoSuchOperation", "OpenKMSAdmin.", "KMS.ListKeys",
                                    "TrentService.ListKeys.Extra"])
def test_unknown_operation(server: ServerProcess, target: str | None) -> None:
    expect_error(call(server, target, b"{}"), "UnknownOperationException")


def test_every_model_operation_is_known(server: ServerProcess) -> None:
    """No model operation is unknown: it is implemented or UnsupportedOperationException."""
    for op in KMS_OPERATIONS:
        reply = call(server, "TrentService." + op, b"{}")
        check_protocol(reply)
        assert reply.error_code != "UnknownOperationException", op


# -- explicit cases: size, health and other paths ---------------------------------------------------
def test_body_over_the_limit_is_413(server: ServerProcess) -> None:
    body = _dumps({"Description": "d" * (300 * 1024)})
    started = time.monotonic()
    reply = call(server, "TrentService.CreateKey", body)
    assert time.monotonic() - started < 5
    message = expect_error(reply, "RequestEntityTooLargeException", 413)
    assert "262144" in message


def test_body_at_the_limit_is_parsed(server: ServerProcess) -> None:
    padding = MAX_BODY - len(_dumps({"Limit": 0, "Marker": ""}))
    body = _dumps({"Limit": 0, "Marker": "m" * padding})
    assert len(body) == MAX_BODY
    message = expect_error(call(server, "TrentService.ListKeys", body), "ValidationException")
    assert "at 'marker'" in message and "at 'limit'" in message


def test_chunked_body_over_the_limit_is_413(server: ServerProcess) -> None:
    """No Content-Length: the server must stop reading at the limit and answer, not hang."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Target: TrentService.ListKeys\r\n"
                     b"Content-Type: application/x-amz-json-1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(300):
                sock.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may answer and close before reading everything
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(payload)["__type"] == "RequestEntityTooLargeException"


def test_health(server: ServerProcess) -> None:
    reply = send(server, method="GET", path="/health")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json()["status"] == "ok"
    assert reply.json()["region"] == REGION


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("POST", "/other"), ("PUT", "/"),
                                              ("DELETE", "/"), ("GET", "/health/x"), ("POST", "/health"),
                                              ("GET", "/index.html"), ("POST", "//")])
def test_other_paths_are_json_errors(server: ServerProcess, method: str, path: str) -> None:
    reply = send(server, b"{}", signed_headers(server, "TrentService.ListKeys", b"{}"), method=method, path=path)
    message = expect_error(reply, "UnknownOperationException")
    assert b"<html" not in reply.body.lower() and message


# -- explicit cases: authentication -----------------------------------------------------------------
@pytest.mark.parametrize("target", ["TrentService.ListKeys", "TrentService.NoSuchOperation",
                                    "OpenKMSAdmin.ListAccounts"])
def test_unsigned_request(server: ServerProcess, target: str) -> None:
    reply = send(server, b"{}", {"Content-Type": JSON_11, "X-Amz-Target": target})
    expect_error(reply, "MissingAuthenticationTokenException", 403)


def test_unsigned_request_with_boto3(server: ServerProcess) -> None:
    client = boto3.client("kms", endpoint_url=server.endpoint, region_name=REGION,
                          config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as caught:
        client.list_keys()
    assert caught.value.response["Error"]["Code"] == "MissingAuthenticationTokenException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


# -- explicit cases: types and constraints, through boto3 without client-side validation -----------
def error_of(caught: pytest.ExceptionInfo[ClientError]) -> tuple[str, str]:
    error = caught.value.response["Error"]
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    return error["Code"], error["Message"]


@pytest.mark.parametrize(("operation", "params"), [
    ("list_keys", {"Limit": "5"}),
    ("list_keys", {"Limit": 5.5}),
    ("list_keys", {"Marker": 7}),
    ("create_key", {"Description": 5}),
    ("create_key", {"MultiRegion": "yes"}),
    ("generate_random", {"NumberOfBytes": "32"}),
    ("describe_key", {"KeyId": ["a"]}),
])
def test_wrong_types_are_serialization_errors(raw_kms: Any, operation: str, params: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as caught:
        getattr(raw_kms, operation)(**params)
    code, message = error_of(caught)
    assert code == "SerializationException", message


def test_wrong_types_inside_the_encryption_context(server: ServerProcess, fuzz_key: dict[str, str]) -> None:
    reply = call(server, "TrentService.Encrypt", {"KeyId": fuzz_key["KeyId"], "Plaintext": "YQ==",
                                                  "EncryptionContext": {"k": 1}})
    expect_error(reply, "SerializationException")
    reply = call(server, "TrentService.Encrypt", {"KeyId": fuzz_key["KeyId"], "Plaintext": "not base64!"})
    expect_error(reply, "SerializationException")


@pytest.mark.parametrize(("operation", "params", "expected"), [
    ("generate_random", {"NumberOfBytes": 0},
     ("1 validation error detected: Value '0' at 'numberOfBytes' failed to satisfy constraint: "
     "Member must have value greater than or equal to 1")),
    ("generate_random", {"NumberOfBytes": 1025},
     ("1 validation error detected: Value '1025' at 'numberOfBytes' failed to satisfy constraint: "
     "Member must have value less than or equal to 1024")),
    ("list_keys", {"Limit": 0},
     ("1 validation error detected: Value '0' at 'limit' failed to satisfy constraint: "
     "Member must have value greater than or equal to 1")),
    ("create_key", {"KeyUsage": "BOGUS"},
     ("1 validation error detected: Value 'BOGUS' at 'keyUsage' failed to satisfy constraint: "
     "Member must satisfy enum value set: [" + ", ".join(
         KMS_MODEL["shapes"]["KeyUsageType"]["enum"]) + "]")),
    ("create_key", {"Tags": [{"TagKey": "ok", "TagValue": "v"}, {"TagKey": "", "TagValue": "v"}]},
     ("1 validation error detected: Value '' at 'tags.2.member.tagKey' failed to satisfy constraint: "
     "Member must have length greater than or equal to 1")),
    ("create_alias", {"AliasName": "alias/no spaces", "TargetKeyId": "k"},
     ("1 validation error detected: Value 'alias/no spaces' at 'aliasName' failed to satisfy constraint: "
     "Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$")),
    ("describe_key", {},
     ("1 validation error detected: Value null at 'keyId' failed to satisfy constraint: "
     "Member must not be null")),
    ("encrypt", {"KeyId": "", "Plaintext": b""},
     ("2 validation errors detected: "
     "Value '' at 'keyId' failed to satisfy constraint: Member must have length greater than or equal to 1; "
     "Value at 'plaintext' failed to satisfy constraint: Member must have length greater than or equal to 1")),
])
def test_constraint_violations(raw_kms: Any, operation: str, params: dict[str, Any], expected: str) -> None:
    with pytest.raises(ClientError) as caught:
        getattr(raw_kms, operation)(**params)
    assert error_of(caught) == ("ValidationException", expected)


def test_validation_happens_before_the_key_is_looked_up(raw_kms: Any) -> None:
    with pytest.raises(ClientError) as caught:
        raw_kms.generate_data_key(KeyId="alias/does-not-exist", NumberOfBytes=2000)
    code, message = error_of(caught)
    assert code == "ValidationException"
    assert "Value '2000' at 'numberOfBytes'" in message


def test_plaintext_is_never_echoed(server: ServerProcess, raw_kms: Any, fuzz_key: dict[str, str]) -> None:
    marker = b"TOPSECRETPLAINTEXT"
    plaintext = (marker * 300)[:4097]
    with pytest.raises(ClientError) as caught:
        raw_kms.encrypt(KeyId=fuzz_key["KeyId"], Plaintext=plaintext)
    code, message = error_of(caught)
    assert code == "ValidationException"
    assert message == ("1 validation error detected: Value at 'plaintext' failed to satisfy constraint: "
                       "Member must have length less than or equal to 4096")

    encoded = base64.b64encode(plaintext).decode()
    for body in ({"KeyId": fuzz_key["KeyId"], "Plaintext": encoded},
                 {"KeyId": "", "Plaintext": encoded},
                 {"KeyId": fuzz_key["KeyId"], "Plaintext": encoded[:-4] + "@@@@"}):
        reply = call(server, "TrentService.Encrypt", body)
        check_protocol(reply)
        assert reply.status == 400
        assert marker not in reply.body and encoded[:24].encode() not in reply.body


# -- the admin API: same protocol ---------------------------------------------------------------------
@pytest.mark.parametrize("account_id", ["123456789012\n", "\u0661" * 12, "12345678901", "1234567890123",
                                        " 123456789012", "12345678901x"])
def test_admin_rejects_malformed_account_ids(server: ServerProcess, account_id: str) -> None:
    reply = call(server, "OpenKMSAdmin.CreateAccount", {"Name": "n", "AccountId": account_id})
    expect_error(reply, "ValidationException")


@pytest.mark.parametrize("user_name", ["bob\n", "", "b" * 65, "bob smith", "bob/x"])
def test_admin_rejects_malformed_user_names(server: ServerProcess, user_name: str) -> None:
    reply = call(server, "OpenKMSAdmin.CreateUser", {"AccountId": "111122223333", "UserName": user_name})
    expect_error(reply, "ValidationException")


@pytest.mark.parametrize(("op", "body", "code"), [
    ("CreateAccount", {}, "ValidationException"),
    ("CreateUser", {"AccountId": "111122223333"}, "ValidationException"),
    ("ListUsers", {"AccountId": 111122223333}, "SerializationException"),
    ("CreateUser", {"AccountId": "111122223333", "UserName": "u", "Admin": "yes"}, "SerializationException"),
    ("UpdateAccessKey", {"AccessKeyId": "AKIANOBODY", "Status": "Enabled"}, "ValidationException"),
])
def test_admin_validation_and_types(server: ServerProcess, op: str, body: dict[str, Any], code: str) -> None:
    expect_error(call(server, "OpenKMSAdmin." + op, body), code)


# -- known bugs ------------------------------------------------------------------------------------
def test_decrypt_without_ciphertext_blob(server: ServerProcess, fuzz_key: dict[str, str]) -> None:
    for body in ({}, {"KeyId": fuzz_key["KeyId"]}, {"CiphertextBlob": None}):
        message = expect_error(call(server, "TrentService.Decrypt", body), "ValidationException")
        assert "'ciphertextBlob'" in message


@pytest.mark.parametrize(("target", "body"), [
    ("TrentService.CreateKey", {"Description": "a\u0000b"}),
    ("TrentService.CreateKey", {"Tags": [{"TagKey": "k\u0000", "TagValue": "v"}]}),
    ("TrentService.DescribeKey", {"KeyId": "alias/x\u0000"}),
    ("TrentService.DescribeKey", {"KeyId": "arn:aws:kms:us-east-1:111122223333:key/\u0000"}),
    ("TrentService.ListKeys", {"Marker": base64.urlsafe_b64encode(b"\x00").decode()}),
    ("OpenKMSAdmin.CreateAccount", {"Name": "n\u0000"}),
])
def test_nul_in_strings_is_a_client_error(server: ServerProcess, target: str, body: dict[str, Any]) -> None:
    check_protocol(call(server, target, body))
