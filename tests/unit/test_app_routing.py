"""Deciding where a request runs (on the event loop or off it) reads the store; when that read
fails, the request still gets an AWS error body with a request id and an audit record, never a
bare 500 from the HTTP server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from openkms.api.app import App
from openkms.config import Settings
from openkms.errors import DependencyTimeoutException
from openkms.node import serving_node


@pytest.fixture
def app(tmp_path: Path) -> Any:
    settings = Settings.from_env({"OPENKMS_AUDIT": "off"}, data_dir=tmp_path)
    app = App(serving_node(settings))
    yield app
    app.node.close()


def test_a_failing_store_while_routing_gets_an_aws_error(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(access_key_id: str) -> Any:
        raise DependencyTimeoutException("The store did not answer in time.")

    monkeypatch.setattr(app.node.accounts, "credentials", unreachable)  # routing reads it ...
    monkeypatch.setattr(app.verifier, "_lookup", unreachable)  # ... and so does the signature check
    now = datetime.now(UTC)
    headers = {"x-amz-target": "TrentService.ListKeys", "content-type": "application/x-amz-json-1.1",
               "authorization": f"AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE000000000/{now:%Y%m%d}/us-east-1/kms/"
                                "aws4_request, SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
               "x-amz-date": f"{now:%Y%m%dT%H%M%SZ}", "host": "localhost"}
    answer = asyncio.run(app._handle_async("POST", "/", "", headers, b"{}", "127.0.0.1"))
    assert answer is not None
    status, out_headers, body = answer
    assert status == 503
    assert orjson.loads(body)["__type"] == "DependencyTimeoutException"
    assert dict(out_headers).get("x-amzn-requestid")


def test_routing_falls_back_to_off_the_loop(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> bool:
        raise RuntimeError("the store is failing over")

    monkeypatch.setattr(app.kms_api, "blocking", broken)
    assert app._blocking({"x-amz-target": "TrentService.Encrypt"}, b"{}") is True
    assert app._blocking({"x-amz-target": "NoSuchService.Encrypt"}, b"{}") is False


def test_ready_fails_when_the_root_key_cannot_be_used(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root key check of GET /ready (the other checks fail for real in tests/test_ready.py;
    a root key, once opened, lives in the node's memory, so here it is replaced by one that fails)."""
    status, _, body = app.readiness()
    assert status == 200 and orjson.loads(body)["checks"]["root_key"] == "ok"

    class BrokenRoot:
        def seal(self, data: bytes, aad: bytes) -> bytes:
            raise OSError("the token went away")

        def unseal(self, data: bytes, aad: bytes) -> bytes:
            raise OSError("the token went away")

    monkeypatch.setattr(app.node, "root", BrokenRoot())
    status, _, body = app.readiness()
    answer = orjson.loads(body)
    assert status == 503 and answer["failed"] == ["root_key"], answer
    assert answer["checks"]["root_key"] == "the root key cannot be used (OSError)"
