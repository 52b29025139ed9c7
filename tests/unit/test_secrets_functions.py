"""Rotation functions (secrets/functions.py): the webhook signature a receiver checks, and the
registry on a real SQLite store: what is sealed under the root key stays sealed, and never shows."""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from openkms.crypto.root import RootKey
from openkms.errors import AlreadyExistsException, KMSInternalException, NotFoundException, ValidationException
from openkms.secrets.functions import RotationFunctions, signature, verify_signature
from openkms.storage import Store

ACCOUNT = "111122223333"
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_the_signature_is_hmac_sha256_of_time_dot_body() -> None:
    # Pinned: a receiver in any language recomputes exactly this.
    assert signature("s3cret", 1796130000, b'{"Step":"createSecret"}') == \
        "t=1796130000,v1=" + __import__("hmac").new(b"s3cret", b'1796130000.{"Step":"createSecret"}',
                                                   "sha256").hexdigest()
    header = signature("s3cret", int(time.time()), b"body")
    assert verify_signature("s3cret", header, b"body")
    assert not verify_signature("other", header, b"body")
    assert not verify_signature("s3cret", header, b"bodY")
    old = signature("s3cret", int(time.time()) - 600, b"body")
    assert not verify_signature("s3cret", old, b"body")  # a replay after five minutes
    for bad in ("", "t=x,v1=y", "v1=abc", "t=1", "garbage"):
        assert not verify_signature("s3cret", bad, b"body")


@given(st.binary(max_size=200), st.integers(0, 60))
@settings(max_examples=100, deadline=None)
def test_any_changed_byte_breaks_the_signature(body: bytes, flip_at: int) -> None:
    header = signature("k", int(time.time()), body + b"!")
    changed = bytearray(body + b"!")
    changed[flip_at % len(changed)] ^= 0x01
    assert not verify_signature("k", header, bytes(changed))


@pytest.fixture
def registry(tmp_path: Path) -> RotationFunctions:
    store = Store.open(f"sqlite:///{tmp_path / 'openkms.db'}")
    return RotationFunctions(store, RootKey(os.urandom(32), "test"), "us-east-1")


def test_register_list_delete(registry: RotationFunctions) -> None:
    hook, signing = registry.create(ACCOUNT, "hook", "webhook", {"Url": "https://rotate.example.com/x"}, NOW)
    assert signing and len(signing) >= 40
    assert hook.arn("us-east-1") == f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:hook"
    assert hook.signing_secret is not None and hook.signing_secret.reveal() == signing
    cmd, none = registry.create(ACCOUNT, "cmd", "command", {"Command": [sys.executable, "-c", "pass"],
                                                            "Environment": {"DB_PASSWORD": "hunter2-env"}}, NOW)
    assert none is None
    assert [f.name for f in registry.list(ACCOUNT)] == ["cmd", "hook"]
    found = registry.by_arn(f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:cmd")
    assert found is not None and (found.name, found.command) == ("cmd", cmd.command)
    assert [(k, v.reveal()) for k, v in found.environment] == [("DB_PASSWORD", "hunter2-env")]
    assert registry.by_arn(f"arn:aws:lambda:eu-west-1:{ACCOUNT}:function:cmd") is None  # another region
    assert registry.by_arn("arn:aws:lambda:us-east-1:999999999999:function:cmd") is None  # another account
    with pytest.raises(AlreadyExistsException):
        registry.create(ACCOUNT, "hook", "random-password", {}, NOW)
    registry.delete(ACCOUNT, "hook")
    with pytest.raises(NotFoundException):
        registry.delete(ACCOUNT, "hook")


def test_secret_parts_are_sealed_and_never_shown(registry: RotationFunctions) -> None:
    cmd, _ = registry.create(ACCOUNT, "cmd", "command", {"Command": [sys.executable],
                                                         "Environment": {"DB_PASSWORD": "hunter2-env"}}, NOW)
    hook, signing = registry.create(ACCOUNT, "hook", "webhook", {"Url": "https://h.example.com/"}, NOW)
    assert signing is not None
    for fn in (cmd, hook):
        shown = repr(fn) + repr(fn.view("us-east-1"))
        assert "hunter2-env" not in shown and signing not in shown
    assert cmd.view("us-east-1")["EnvironmentVariables"] == ["DB_PASSWORD"]
    with registry.store.begin() as tx:
        rows = tx.conn.execute(text("SELECT config, sealed FROM rotation_functions")).all()
    for config, sealed in rows:
        assert b"hunter2-env" not in bytes(sealed) and signing.encode() not in bytes(sealed)
        assert "hunter2-env" not in config and signing not in config
    # Sealed to its row: moved onto another function's row, it does not open.
    with registry.store.begin() as tx:
        tx.conn.execute(text("UPDATE rotation_functions SET sealed = (SELECT sealed FROM rotation_functions "
                             "WHERE name = 'cmd') WHERE name = 'hook'"))
    with pytest.raises(KMSInternalException):
        registry.get(ACCOUNT, "hook")


@pytest.mark.parametrize(("kind", "params"), [
    ("lambda", {}),
    ("webhook", {}),
    ("webhook", {"Url": "http://plain.example.com/"}),  # http:// needs OPENKMS_ROTATION_ALLOW_HTTP
    ("webhook", {"Url": "ftp://x.example.com/"}),
    ("webhook", {"Url": "https://"}),
    ("random-password", {"Url": "https://x.example.com/"}),
    ("command", {}),
    ("command", {"Command": "not a list"}),
    ("command", {"Command": ["relative/path"]}),
    ("command", {"Command": ["/no/such/program"]}),
    ("command", {"Command": [sys.executable], "Environment": {"1BAD": "x"}}),
    ("random-password", {"Environment": {"A": "b"}}),
    ("random-password", {"TimeoutSeconds": 0}),
    ("random-password", {"TimeoutSeconds": 901}),
    ("random-password", {"PasswordLength": 4}),
    ("webhook", {"Url": "https://x.example.com/", "PasswordLength": 20}),
    ("random-password", {"ExcludeCharacters": "".join(chr(c) for c in range(33, 127))}),
])
def test_bad_registrations(registry: RotationFunctions, kind: str, params: dict[str, object]) -> None:
    with pytest.raises(ValidationException):
        registry.create(ACCOUNT, "f", kind, params, NOW)


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/no", "dot.no"])
def test_bad_names(registry: RotationFunctions, name: str) -> None:
    with pytest.raises(ValidationException):
        registry.create(ACCOUNT, name, "random-password", {}, NOW)


def test_a_webhook_is_called_only_at_a_public_or_allowed_address() -> None:
    import ipaddress

    from openkms.secrets.functions import StepFailed, checked_address

    for host in ("127.0.0.1", "localhost", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "0.0.0.0"):
        with pytest.raises(StepFailed):
            checked_address(host, 443, ())
    assert checked_address("127.0.0.1", 443, (ipaddress.ip_network("127.0.0.0/8"),)) == "127.0.0.1"
    assert checked_address("8.8.8.8", 443, ()) == "8.8.8.8"  # a public address (no connection is made)
    with pytest.raises(StepFailed):
        checked_address("no-such-host.invalid", 443, ())


@pytest.mark.parametrize("params", [
    {"Kind": "postgresql-single-user"},  # no AllowedHosts
    {"Kind": "postgresql-single-user", "AllowedHosts": []},
    {"Kind": "postgresql-single-user", "AllowedHosts": ["/var/run/postgresql"]},
    {"Kind": "postgresql-single-user", "AllowedHosts": ["a,b"]},
    {"Kind": "postgresql-alternating-users", "AllowedHosts": ["db:5432"]},  # no MasterSecretArn
    {"Kind": "postgresql-single-user", "AllowedHosts": ["db"], "MasterSecretArn": "arn:aws:secretsmanager:x"},
    {"Kind": "random-password", "AllowedHosts": ["db"]},
    {"Kind": "webhook", "Url": "https://user:pw@h.example.com/"},
    {"Kind": "webhook", "Url": "https://[bad/"},
])
def test_bad_postgresql_and_url_registrations(registry: RotationFunctions, params: dict[str, object]) -> None:
    kind = str(params.pop("Kind"))
    with pytest.raises(ValidationException):
        registry.create(ACCOUNT, "f", kind, params, NOW)


def test_postgresql_hosts_get_their_port(registry: RotationFunctions) -> None:
    fn, _ = registry.create(ACCOUNT, "pg", "postgresql-single-user", {"AllowedHosts": ["DB.example.com", "db2:6432"]},
                            NOW)
    assert fn.allowed_hosts == ("db.example.com:5432", "db2:6432")
    assert fn.allows_host("db.example.com", 5432) and not fn.allows_host("db.example.com", 5433)
    assert not fn.allows_host("127.0.0.1", 5432)


def test_the_sealed_part_is_bound_to_the_kind_and_config(registry: RotationFunctions) -> None:
    registry.create(ACCOUNT, "rand", "random-password", {}, NOW)
    with registry.store.begin() as tx:  # someone with the store turns it into a command
        tx.conn.execute(text("UPDATE rotation_functions SET kind = 'command', "
                             "config = '{\"command\": [\"/bin/sh\", \"-c\", \"id\"], \"timeout_s\": 30, "
                             "\"password_length\": 32}' WHERE name = 'rand'"))
    with pytest.raises(KMSInternalException):
        registry.get(ACCOUNT, "rand")
