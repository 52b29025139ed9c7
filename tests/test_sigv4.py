"""SigV4 authentication of a real server: credentials, tampering, clock skew, scope, replays.

Requests are signed by botocore (through boto3 or botocore.auth.SigV4Auth directly) and sent on
the wire; the helpers are the protocol tests'.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.server import REGION, ServerProcess
from tests.test_protocol import call, check_protocol, expect_error, send, signed_headers

LIST_KEYS = "TrentService.ListKeys"


def client_error(caught: pytest.ExceptionInfo[ClientError]) -> tuple[int, str, str]:
    response = caught.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"], response["Error"]["Message"]


def boto_client(server: ServerProcess, access_key_id: str, secret: str, region: str = REGION,
                session_token: str | None = None) -> Any:
    return boto3.client("kms", endpoint_url=server.endpoint, region_name=region, aws_access_key_id=access_key_id,
                        aws_secret_access_key=secret, aws_session_token=session_token,
                        config=Config(retries={"max_attempts": 1}))


# -- credentials ------------------------------------------------------------------------------------
def test_valid_credentials(kms: Any) -> None:
    assert "Keys" in kms.list_keys()


def test_unknown_access_key(server: ServerProcess) -> None:
    client = boto_client(server, "AKIA" + secrets.token_hex(8).upper(), server.secret_access_key)
    with pytest.raises(ClientError) as caught:
        client.list_keys()
    status, code, message = client_error(caught)
    assert (status, code) == (400, "UnrecognizedClientException")
    assert server.secret_access_key not in message


def test_wrong_secret(server: ServerProcess) -> None:
    client = boto_client(server, server.access_key_id, server.secret_access_key + "x")
    with pytest.raises(ClientError) as caught:
        client.list_keys()
    status, code, message = client_error(caught)
    assert (status, code) == (400, "InvalidSignatureException")
    assert "signature we calculated does not match" in message
    assert server.secret_access_key not in message


def test_session_tokens_are_not_accepted(server: ServerProcess) -> None:
    client = boto_client(server, server.access_key_id, server.secret_access_key, session_token="FwoGZXIvYXdzE")
    with pytest.raises(ClientError) as caught:
        client.list_keys()
    assert client_error(caught)[:2] == (400, "UnrecognizedClientException")


def test_inactive_and_deleted_access_keys(server: ServerProcess) -> None:
    def admin(op: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = call(server, "OpenKMSAdmin." + op, body)
        assert reply.status == 200, reply.body
        return reply.json()  # type: ignore[no-any-return]

    account = admin("CreateAccount", {"Name": "sigv4-test"})["Account"]["AccountId"]
    admin("CreateUser", {"AccountId": account, "UserName": "bob"})
    admin("PutUserPolicy", {"AccountId": account, "UserName": "bob", "PolicyName": "list",
                            "PolicyDocument": json.dumps({"Version": "2012-10-17", "Statement": [
                                {"Effect": "Allow", "Action": "kms:ListKeys", "Resource": "*"}]})})
    issued = admin("CreateAccessKey", {"AccountId": account, "UserName": "bob"})["AccessKey"]
    bob = boto_client(server, issued["AccessKeyId"], issued["SecretAccessKey"])
    assert bob.list_keys()["Keys"] == []

    admin("UpdateAccessKey", {"AccessKeyId": issued["AccessKeyId"], "Status": "Inactive"})
    with pytest.raises(ClientError) as caught:
        bob.list_keys()
    assert client_error(caught)[:2] == (400, "UnrecognizedClientException")

    admin("UpdateAccessKey", {"AccessKeyId": issued["AccessKeyId"], "Status": "Active"})
    assert bob.list_keys()["Keys"] == []

    admin("DeleteAccessKey", {"AccessKeyId": issued["AccessKeyId"]})
    with pytest.raises(ClientError) as caught:
        bob.list_keys()
    assert client_error(caught)[:2] == (400, "UnrecognizedClientException")


# -- tampering --------------------------------------------------------------------------------------
def test_tampered_body(server: ServerProcess) -> None:
    signed_body = b'{"Limit": 10}'
    headers = signed_headers(server, LIST_KEYS, signed_body)
    assert send(server, signed_body, headers).status == 200
    for tampered in (b'{"Limit": 11}', b'{"Limit": 10} ', b"", signed_body + b"\n"):
        message = expect_error(send(server, tampered, headers), "InvalidSignatureException")
        assert "signature we calculated does not match" in message


def test_tampered_target(server: ServerProcess) -> None:
    headers = signed_headers(server, LIST_KEYS, b"{}")
    headers["X-Amz-Target"] = "TrentService.ListAliases"
    expect_error(send(server, b"{}", headers), "InvalidSignatureException")


def test_tampered_signature(server: ServerProcess) -> None:
    headers = signed_headers(server, LIST_KEYS, b"{}")
    signature = headers["Authorization"].rpartition("Signature=")[2]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    headers["Authorization"] = headers["Authorization"].replace(signature, flipped)
    expect_error(send(server, b"{}", headers), "InvalidSignatureException")


def test_signed_header_missing_on_arrival(server: ServerProcess) -> None:
    headers = signed_headers(server, LIST_KEYS, b"{}", extra={"X-Custom": "value"})
    del headers["X-Custom"]
    expect_error(send(server, b"{}", headers), "InvalidSignatureException")


# -- clock skew and replays -------------------------------------------------------------------------
@pytest.mark.parametrize(("skew", "words"), [(-timedelta(minutes=6), "Signature expired"),
                                             (timedelta(minutes=6), "Signature not yet current"),
                                             (-timedelta(days=2), "Signature expired")])
def test_clock_skew_over_five_minutes(server: ServerProcess, skew: timedelta, words: str) -> None:
    headers = signed_headers(server, LIST_KEYS, b"{}", when=datetime.now(UTC) + skew)
    message = expect_error(send(server, b"{}", headers), "InvalidSignatureException")
    assert message.startswith(words), message


@pytest.mark.parametrize("skew", [-timedelta(minutes=4), timedelta(minutes=4)])
def test_clock_skew_within_five_minutes(server: ServerProcess, skew: timedelta) -> None:
    headers = signed_headers(server, LIST_KEYS, b"{}", when=datetime.now(UTC) + skew)
    reply = send(server, b"{}", headers)
    check_protocol(reply)
    assert reply.status == 200


def test_replay_within_the_window_is_accepted(server: ServerProcess) -> None:
    body = json.dumps({"NumberOfBytes": 16}).encode()
    headers = signed_headers(server, "TrentService.GenerateRandom", body)
    first, second = send(server, body, headers), send(server, body, headers)
    for reply in (first, second):
        check_protocol(reply)
        assert reply.status == 200
    assert first.json()["Plaintext"] != second.json()["Plaintext"], "each replay is served afresh"
    assert first.headers["x-amzn-requestid"] != second.headers["x-amzn-requestid"]


# -- scope ------------------------------------------------------------------------------------------
def test_wrong_region_with_boto3(server: ServerProcess) -> None:
    client = boto_client(server, server.access_key_id, server.secret_access_key, region="eu-west-1")
    with pytest.raises(ClientError) as caught:
        client.list_keys()
    status, code, message = client_error(caught)
    assert (status, code) == (400, "InvalidSignatureException")
    assert "region" in message


@pytest.mark.parametrize(("region", "service"), [("eu-west-1", "kms"), (REGION, "s3"), (REGION, "iam"),
                                                 (REGION, "kms-xks-proxy")])
def test_wrong_scope(server: ServerProcess, region: str, service: str) -> None:
    headers = signed_headers(server, LIST_KEYS, b"{}", region=region, service=service)
    expect_error(send(server, b"{}", headers), "InvalidSignatureException")


def test_scope_date_must_match(server: ServerProcess) -> None:
    headers = signed_headers(server, LIST_KEYS, b"{}")
    today = headers["X-Amz-Date"][:8]
    other_day = (datetime.strptime(today, "%Y%m%d") - timedelta(days=1)).strftime("%Y%m%d")
    headers["Authorization"] = headers["Authorization"].replace(f"/{today}/", f"/{other_day}/")
    expect_error(send(server, b"{}", headers), "InvalidSignatureException")


# -- unreadable Authorization headers ---------------------------------------------------------------
@pytest.mark.parametrize("authorization", [
    "garbage",
    "Bearer abc.def.ghi",
    "AWS4-HMAC-SHA256",
    "AWS4-HMAC-SHA256 Credential=AKIA/20240101/us-east-1/kms/aws4_request",
    "AWS4-HMAC-SHA256 Credential=AKIA/20240101/us-east-1/kms, SignedHeaders=host, Signature=00",
    "AWS4-HMAC-SHA256 Credential=AKIA, SignedHeaders=host;x-amz-date, Signature=abcdef",
    "AWS AKIAIOSFODNN7EXAMPLE:frJIUN8DYpKDtOLCwo//yllqDzg=",
])
def test_garbage_authorization(server: ServerProcess, authorization: str) -> None:
    headers = signed_headers(server, LIST_KEYS, b"{}")
    headers["Authorization"] = authorization
    expect_error(send(server, b"{}", headers), "IncompleteSignatureException")


def test_missing_x_amz_date(server: ServerProcess) -> None:
    headers = signed_headers(server, LIST_KEYS, b"{}")
    del headers["X-Amz-Date"]
    expect_error(send(server, b"{}", headers), "IncompleteSignatureException")


def test_missing_authorization(server: ServerProcess) -> None:
    headers = signed_headers(server, LIST_KEYS, b"{}")
    del headers["Authorization"]
    expect_error(send(server, b"{}", headers), "MissingAuthenticationTokenException", 403)


def test_non_ascii_signature(server: ServerProcess) -> None:
    """A signature that is not hex must be a signature mismatch, not a server error."""
    headers = signed_headers(server, LIST_KEYS, b"{}")
    signature = headers["Authorization"].rpartition("Signature=")[2]
    headers["Authorization"] = headers["Authorization"].replace(signature, "\u00e9" * 64)  # sent as latin-1
    reply = send(server, b"{}", headers)
    check_protocol(reply)
    assert reply.error_code in ("InvalidSignatureException", "MissingAuthenticationTokenException"), reply.body
