"""The access log (OPENKMS_ACCESS_LOG=on): a line per API call (operation, status, latency,
request id, principal, source address), never parameters or data; OPENKMS_LOG_FORMAT=json gives
one JSON object per line; off by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.conftest import bootstrap_env
from tests.server import ServerProcess

PLAINTEXT = b"access-log-must-not-show-this-7d1e"


def run_calls(server: ServerProcess) -> list[str]:
    """Three calls (one failing); their request ids, in order."""
    kms = server.client(retry=False)
    ids = []
    made = kms.create_key()
    ids.append(made["ResponseMetadata"]["RequestId"])
    out = kms.encrypt(KeyId=made["KeyMetadata"]["KeyId"], Plaintext=PLAINTEXT)
    ids.append(out["ResponseMetadata"]["RequestId"])
    with pytest.raises(ClientError) as failed:
        kms.describe_key(KeyId="alias/no-such-alias")
    ids.append(failed.value.response["ResponseMetadata"]["RequestId"])
    return ids


def test_a_text_line_per_call(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", env=dict(bootstrap_env(), OPENKMS_ACCESS_LOG="on"))
    server.start()
    try:
        ids = run_calls(server)
    finally:
        server.stop()
    lines = [line for line in server.output().splitlines() if " openkms.access " in line]
    found = {request_id: next((line for line in lines if request_id in line), None) for request_id in ids}
    assert all(found.values()), found
    assert " kms CreateKey 200 " in found[ids[0]] and " kms Encrypt 200 " in found[ids[1]]
    assert " kms DescribeKey 400 " in found[ids[2]]
    assert "arn:aws:iam::111122223333:user/" in found[ids[1]]
    assert PLAINTEXT.decode() not in server.output()


def test_json_lines(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", env=dict(bootstrap_env(), OPENKMS_LOG_FORMAT="json",
                                                       OPENKMS_ACCESS_LOG="on"))
    server.start()
    try:
        ids = run_calls(server)
    finally:
        server.stop()
    records = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    access = {r["requestId"]: r for r in records if r.get("logger") == "openkms.access"}
    assert set(ids) <= set(access)
    failed = access[ids[2]]
    assert (failed["operation"], failed["status"], failed["errorCode"]) == ("DescribeKey", 400, "NotFoundException")
    assert failed["ms"] >= 0 and failed["principal"].startswith("arn:aws:iam::")
    assert all("time" in r and "level" in r for r in records)
    assert PLAINTEXT.decode() not in server.output()


def test_access_log_off_by_default(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", env=bootstrap_env())
    server.start()
    try:
        run_calls(server)
    finally:
        server.stop()
    assert " openkms.access " not in server.output()


def test_a_bad_log_format_refuses_the_start(tmp_path: Path) -> None:
    from tests.test_one_server import refuse

    line = refuse(ServerProcess(tmp_path / "data", env=dict(bootstrap_env(), OPENKMS_LOG_FORMAT="xml")))
    assert "log-format" in line
