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


def test_calls_that_use_an_open_hsm_store_run_on_its_tokens_lane(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cryptographic calls with a key of a PKCS#11 store this node has opened run on its token's
    lane; other calls naming the key, and any call before the store is open, on the shared pool."""
    from openkms.lane import Lane
    from openkms.model import Key, KeyState, KeyUsage, Origin

    lane = Lane("test-routing")
    service = app.node.service
    key = Key(key_id="11111111-2222-3333-4444-555555555555", account_id="111122223333", region="us-east-1",
              description="", key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT,
              origin=Origin.AWS_CLOUDHSM, state=KeyState.ENABLED, created=datetime.now(UTC),
              custom_key_store_id="cks-1234567890abcdef0")
    opened = {"cks-1234567890abcdef0": lane}
    monkeypatch.setattr(service.keystores, "any_custom_key_stores", lambda: True)
    monkeypatch.setattr(service.keystores, "lane", opened.get)
    monkeypatch.setattr(service.keys, "peek", lambda account, ref: key if ref == key.key_id else None)

    def route(op: str, **payload: str) -> object:
        return app.kms_api.blocking(op, "111122223333", orjson.dumps(payload))

    try:
        assert route("Encrypt", KeyId=key.key_id, Plaintext="AA==") is lane
        assert route("GenerateRandom", CustomKeyStoreId="cks-1234567890abcdef0") is lane
        assert route("DescribeKey", KeyId=key.key_id) is True
        assert route("Encrypt", KeyId="22222222-2222-3333-4444-555555555555", Plaintext="AA==") is False
        opened.clear()  # not opened on this node yet: the first call opens it from the shared pool
        assert route("Encrypt", KeyId=key.key_id, Plaintext="AA==") is True
    finally:
        lane.close()


def test_calls_that_use_an_open_external_store_run_on_the_loop(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cryptographic calls whose keys are all in external key stores this node has opened run on
    the event loop (waiting on the proxy there: onloop.py); a call that also uses an HSM key goes
    to that token's lane, other calls naming the key and any call before the store is open, to the
    shared pool."""
    from openkms.lane import Lane
    from openkms.model import Key, KeyState, KeyUsage, Origin
    from openkms.onloop import ON_LOOP

    def key(key_id: str, origin: Origin, cks_id: str) -> Key:
        return Key(key_id=key_id, account_id="111122223333", region="us-east-1", description="",
                   key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT, origin=origin,
                   state=KeyState.ENABLED, created=datetime.now(UTC), custom_key_store_id=cks_id)

    xks = key("11111111-2222-3333-4444-555555555555", Origin.EXTERNAL_KEY_STORE, "cks-xxxxxxxxxxxxxxxx1")
    hsm = key("33333333-2222-3333-4444-555555555555", Origin.AWS_CLOUDHSM, "cks-hhhhhhhhhhhhhhhh1")
    keys = {k.key_id: k for k in (xks, hsm)}
    lane = Lane("test-routing-xks")
    external = {xks.custom_key_store_id}
    service = app.node.service
    monkeypatch.setattr(service.keystores, "any_custom_key_stores", lambda: True)
    monkeypatch.setattr(service.keystores, "external", lambda cks: cks in external)
    monkeypatch.setattr(service.keystores, "lane", {hsm.custom_key_store_id: lane}.get)
    monkeypatch.setattr(service.keys, "peek", lambda account, ref: keys.get(ref))

    def route(op: str, **payload: str) -> object:
        return app.kms_api.blocking(op, "111122223333", orjson.dumps(payload))

    try:
        assert route("Encrypt", KeyId=xks.key_id, Plaintext="AA==") is ON_LOOP
        assert route("GenerateDataKey", KeyId=xks.key_id, NumberOfBytes="32") is ON_LOOP
        assert route("ReEncrypt", DestinationKeyId=xks.key_id, SourceKeyId=xks.key_id) is ON_LOOP
        assert route("ReEncrypt", DestinationKeyId=hsm.key_id, SourceKeyId=xks.key_id) is lane  # an HSM call too
        assert route("DescribeKey", KeyId=xks.key_id) is True
        external.clear()  # not opened on this node yet: the first call opens it from the shared pool
        assert route("Encrypt", KeyId=xks.key_id, Plaintext="AA==") is True
    finally:
        lane.close()


def test_the_worker_freezes_what_it_starts_with(app: App) -> None:
    """Once the worker is ready to serve, nothing it holds from its start (the app, the models, the
    caches) is walked by a garbage collection again (heap.py): a full collection of the serving
    worker's heap was an 80 ms pause of the event loop."""
    import gc

    async def start() -> None:
        app.__rsgi_init__(asyncio.get_running_loop())
        try:
            assert gc.get_freeze_count() > 10_000
            tracked = gc.get_objects()  # the objects the collector walks (the frozen ones are not among them)
            assert not any(o is app or o is app.kms_api for o in tracked)
            fresh = [app]  # made after the start: walked as usual
            assert any(o is fresh for o in gc.get_objects())
        finally:
            gc.unfreeze()
            app.stop_background()

    asyncio.run(start())
