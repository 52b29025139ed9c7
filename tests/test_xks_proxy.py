"""`openkms xks-proxy` as AWS KMS meets it: real proxy processes over TLS, SoftHSM2 tokens, keys
made with the proxy's own CLI, certificates made with openssl, requests signed by botocore.

Covered: the four APIs and /ping, every error of the spec's table the proxy can produce and the
order of its checks, SigV4 (two credentials at once, rotation by SIGHUP, clock skew, the headers
signed), the size minimums and limits, the AAD layout and the integrity value (recomputed here),
key usage from CKA_ENCRYPT/CKA_DECRYPT, the allow-list and disabled keys, the deep health check
and its cache, a token that goes away, mTLS at the handshake, and logs that hold requestMetadata
but never plaintext or secrets. Also what a review found: one tenant's keys kept from a store
without an allow-list, connection slots that bare sockets cannot take, answers to refused requests
that survive the close, a SIGHUP while starting, a health check whose first caller goes away.

Faults of a slow token are injected into the proxy process with a sitecustomize module on its
PYTHONPATH (`slow_token`); what a hung token does to the worker's memory is in
tests/unit/test_xks_proxy_worker.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from openkms.xksproxy.errors import DependencyTimeoutException
from openkms.xksproxy.worker import TokenWorker
from tests.conftest import SoftHsm
from tests.xks_proxy_helpers import (
    CLIENT_NAME,
    PIN,
    REGION,
    Answer,
    Pki,
    ProxyProcess,
    Store,
    XksClient,
    b64,
    cli,
    free_port,
    health_metadata,
    metadata,
    proxy_toml,
    secret_access_key,
    signed_headers,
    unb64,
)

T = TypeVar("T")
PREFIX = "/example/uri/path/prefix"
KEYS = ["foo", "bar", "enc-only", "dec-only", "off", "outside"]
ALLOWED = ["foo", "bar", "enc-only", "dec-only", "off", "absent-from-token"]
MARKER = b"PLAINTEXT-NEVER-LOGGED-"
SENT: list[bytes] = []  # every plaintext sent to the main proxy, looked for in its log at the end


def plaintext(size: int = 32) -> bytes:
    data = (MARKER + os.urandom(max(0, size - len(MARKER))))[:size] if size >= len(MARKER) else os.urandom(size)
    SENT.append(data)
    return data


def sealed_of(answer: Answer) -> dict[str, str]:
    assert answer.status == 200, answer.body
    return dict(answer.json)


def with_settings(text: str, server: str = "", pkcs11: str = "") -> str:
    """A file made by proxy_toml with more [server] and [pkcs11] settings."""
    region = f'region = "{REGION}"\n'
    return text.replace(region, region + server, 1).replace("[health]\n", pkcs11 + "[health]\n", 1)


def in_background(call: Callable[[], T]) -> Future[T]:
    """`call()` on a thread of its own; the future holds its result or its exception."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


INJECTION = '''"""Fault injection for tests/test_xks_proxy.py (XKS_TEST_* variables): a slow token."""
import os
import time
from pathlib import Path

_health_s = float(os.environ.get("XKS_TEST_SLOW_HEALTH_S") or 0)
_start_marker = os.environ.get("XKS_TEST_SLOW_START_MARKER")
if _health_s or _start_marker:
    from openkms.xksproxy import keys as _keys

    if _health_s:  # the deep health check's token calls take this long
        _health_check = _keys.TokenKeys.health_check

        def _slow_health_check(self, label):
            time.sleep(_health_s)
            return _health_check(self, label)

        _keys.TokenKeys.health_check = _slow_health_check
    if _start_marker:  # at start, the test key's check says so in a file, then takes a second
        _ensure = _keys.TokenKeys.ensure

        def _slow_ensure(self, label):
            Path(_start_marker).write_text("starting")
            time.sleep(1.0)
            return _ensure(self, label)

        _keys.TokenKeys.ensure = _slow_ensure
'''


@pytest.fixture
def slow_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """`slow_token(XKS_TEST_...=value)`: proxies this test starts get a token slowed as INJECTION says."""

    def set_up(**variables: str) -> None:
        directory = tmp_path / "injection"
        directory.mkdir(exist_ok=True)
        (directory / "sitecustomize.py").write_text(INJECTION)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(directory),
                                                                        os.environ.get("PYTHONPATH")])))
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return set_up


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("xks-pki"))


@pytest.fixture(scope="module")
def token(softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A token with the keys the tests use, made with `openkms xks-proxy keys create`."""
    label = softhsm.init_token(pin=PIN)
    config = tmp_path_factory.mktemp("xks-keys") / "keys.toml"
    config.write_text(proxy_toml(port=1, token_label=label, stores=[Store.new("/k")]))
    for key in KEYS:
        flags = ["--encrypt-only"] if key == "enc-only" else ["--decrypt-only"] if key == "dec-only" else []
        done = cli("keys", "create", "--config", str(config), "--label", key, *flags)
        assert done.returncode == 0, done.stderr
    return label


@pytest.fixture(scope="module")
def stores() -> list[Store]:
    return [Store.new(PREFIX, 2, key_ids=ALLOWED, disabled=["off"]), Store.new("")]


@pytest.fixture(scope="module")
def proxy(token: str, pki: Pki, stores: list[Store],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    port = free_port()
    config = tmp_path_factory.mktemp("xks-proxy") / "xks-proxy.toml"
    config.write_text(proxy_toml(port=port, token_label=token, stores=stores, pki=pki))
    config.chmod(0o600)  # it holds the SigV4 secrets
    process = ProxyProcess(config, port, tls=True).start()
    yield process
    assert process.stop() == 0, process.output()[-3000:]
    assert "stopping" in process.output()


@pytest.fixture(scope="module")
def client(proxy: ProxyProcess, stores: list[Store], pki: Pki) -> Iterator[XksClient]:
    akid, secret = stores[0].credentials[0]
    c = XksClient(proxy.base, PREFIX, akid, secret, pki.client_context())
    yield c
    c.close()


@pytest.fixture(scope="module")
def open_client(proxy: ProxyProcess, stores: list[Store], pki: Pki) -> Iterator[XksClient]:
    """The store without a prefix and without an allow-list."""
    akid, secret = stores[1].credentials[0]
    c = XksClient(proxy.base, "", akid, secret, pki.client_context())
    yield c
    c.close()


def fails(answer: Answer, status: int, name: str) -> str:
    assert (answer.status, answer.error) == (status, name), (answer.status, answer.body)
    body = answer.body.decode()
    assert "\n" not in body and answer.headers["content-type"] == "application/json"
    message = answer.json["errorMessage"]
    assert len(message) < 512 and all(" " <= c <= "~" for c in message)
    return str(message)


# -- the CLI --------------------------------------------------------------------------------------

def test_keys_create_and_list(token: str, softhsm: SoftHsm, tmp_path: Path) -> None:
    config = tmp_path / "keys.toml"
    config.write_text(proxy_toml(port=1, token_label=token, stores=[Store.new("/k")]))
    listed = cli("keys", "list", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    usage = {row["label"]: row["usage"] for row in json.loads(listed.stdout)["Keys"]}
    assert usage["foo"] == ["ENCRYPT", "DECRYPT"]
    assert usage["enc-only"] == ["ENCRYPT"] and usage["dec-only"] == ["DECRYPT"]
    table = cli("keys", "list", "--config", str(config))
    assert table.returncode == 0 and "enc-only" in table.stdout and "ENCRYPT,DECRYPT" in table.stdout

    again = cli("keys", "create", "--config", str(config), "--label", "foo")
    assert again.returncode == 1 and "already in the token" in again.stderr
    bad = cli("keys", "create", "--config", str(config), "--label", "no/slash")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr

    # As an HSM administrator sees the key: sensitive, never extractable, only encrypt/decrypt.
    objects = softhsm.tool(token, PIN, "--list-objects", "--type", "secrkey").stdout
    block = objects.split("label:      enc-only")[1].split("Secret Key Object")[0]
    assert "sensitive" in block and "never extractable" in block
    assert block.split("Usage:")[1].splitlines()[0].strip() == "encrypt"


def test_config_file_for_the_aws_kms_console(proxy: ProxyProcess, stores: list[Store]) -> None:
    done = cli("config-file", "--config", str(proxy.config), "--prefix", PREFIX, "--endpoint",
               "https://xks.example.com", pin=None)
    assert done.returncode == 0, done.stderr
    newest = stores[0].credentials[-1]
    assert json.loads(done.stdout) == {"XksProxyUriPath": f"{PREFIX}/kms/xks/v1",
                                       "XksProxyAuthenticationCredential": {"AccessKeyId": newest[0],
                                                                            "RawSecretAccessKey": newest[1]}}
    first = cli("config-file", "--config", str(proxy.config), "--prefix", PREFIX, "--access-key-id",
                stores[0].credentials[0][0], pin=None)
    assert json.loads(first.stdout)["XksProxyAuthenticationCredential"]["AccessKeyId"] == stores[0].credentials[0][0]
    root = cli("config-file", "--config", str(proxy.config), "--prefix", "", pin=None)
    assert json.loads(root.stdout)["XksProxyUriPath"] == "/kms/xks/v1"
    unknown = cli("config-file", "--config", str(proxy.config), "--prefix", "/nope", pin=None)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "/nope" in unknown.stderr


GOOD_CRED = ("AKIAI2SFODNN7EXAMPLEAAAA", "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE")


@pytest.mark.parametrize(("change", "words"), [
    (lambda t: t.replace("[server]", "[server\n"), "not valid TOML"),
    (lambda t: t.replace(GOOD_CRED[0], "akiai2sfodnn7example"), "access_key_id must be 20-30 characters"),
    (lambda t: t.replace(GOOD_CRED[0], "AKIA1"), "access_key_id must be 20-30 characters"),
    (lambda t: t.replace(GOOD_CRED[1], "short"), "secret_access_key must be 43-64 characters"),
    (lambda t: t.replace(GOOD_CRED[1], GOOD_CRED[1][:-1] + "!"), "secret_access_key must be 43-64 characters"),
    (lambda t: t.replace('region = "us-east-1"', 'region = "us-east-1"\nthreads = 4'), "unknown setting threads"),
    (lambda t: t.replace('uri_path_prefix = "/p"', 'uri_path_prefix = "/p/"'), "uri_path_prefix must be"),
    (lambda t: t.replace('host = "127.0.0.1"', 'host = "0.0.0.0"'), "serves plain HTTP only on"),
    (lambda t: t.replace('token_label = "', 'pin = "1234"\ntoken_label = "'), "never read from the file"),
    (lambda t: t + Store("/p", [GOOD_CRED]).toml(), "appears twice"),
    (lambda t: t.replace("credentials = [ {", "credentials = [ ] # {"), "at least one credential"),
    (lambda t: t.replace("credentials = [", 'xks_key_id_set = ["xks-health"]\ncredentials = ['), "test key"),
])
def test_a_bad_file_is_refused_with_one_line(tmp_path: Path, change: object, words: str) -> None:
    store = Store("/p", [GOOD_CRED])
    text = proxy_toml(port=free_port(), token_label="whatever", stores=[store])
    config = tmp_path / "bad.toml"
    config.write_text(change(text))  # type: ignore[operator]
    done = cli("--config", str(config))
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert GOOD_CRED[1] not in done.stderr


def test_start_refused_without_pin_token_or_certificate(token: str, pki: Pki, tmp_path: Path) -> None:
    store = Store("/p", [GOOD_CRED])
    config = tmp_path / "x.toml"
    config.write_text(proxy_toml(port=free_port(), token_label=token, stores=[store]))
    for pin, words in ((None, "set OPENKMS_XKS_PKCS11_PIN"), ("wrong-pin", "is not the token user's PIN")):
        done = cli("--config", str(config), pin=pin)
        assert done.returncode == 2 and words in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert "wrong-pin" not in done.stderr
    config.write_text(proxy_toml(port=free_port(), token_label="no-such-token", stores=[store]))
    done = cli("--config", str(config))
    assert done.returncode == 2 and "no token labelled 'no-such-token'" in done.stderr
    assert done.stderr.count("\n") == 1
    config.write_text(proxy_toml(port=free_port(), token_label=token, stores=[store], pki=pki).replace(
        str(pki.server_key), str(tmp_path / "missing.key")))
    done = cli("--config", str(config))
    assert done.returncode == 2 and "no such file" in done.stderr and done.stderr.count("\n") == 1
    done = cli("--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 2 and "no such file" in done.stderr


def test_client_ca_without_a_name_is_refused_unless_asked_for(token: str, pki: Pki, tmp_path: Path) -> None:
    """With AWS KMS's client CAs (public roots), any certificate they issued would pass without a name."""
    store = Store.new("/any")
    port = free_port()
    config = tmp_path / "any.toml"
    named = proxy_toml(port=port, token_label=token, stores=[store], pki=pki, mtls=True)
    config.write_text(named.replace(f'client_dns_name = "{CLIENT_NAME}"\n', ""))
    done = cli("--config", str(config), timeout=20)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "client_ca without client_dns_name" in done.stderr and "client_any_name = true" in done.stderr
    config.write_text(named.replace("[pkcs11]", "client_any_name = true\n[pkcs11]"))  # and a name
    both = cli("--config", str(config), timeout=20)
    assert both.returncode == 2 and "client_any_name = true goes with client_ca and without" in both.stderr

    config.write_text(proxy_toml(port=port, token_label=token, stores=[store], pki=pki, mtls=True,
                                 client_dns_name=None))  # the helper asks for it: client_any_name = true
    proxy = ProxyProcess(config, port, tls=True).start()
    try:
        akid, secret = store.credentials[0]
        other = XksClient(proxy.base, "/any", akid, secret, pki.client_context(pki.wrong_name))
        assert other.health().status == 200  # another name, from the CA: accepted, as asked
        other.close()
        assert "(any name)" in proxy.output()
        assert _refused(port, pki.client_context(pki.self_signed)).startswith("after handshake:")  # the CA still counts
    finally:
        assert proxy.stop() == 0


def test_the_pin_leaves_the_environment(token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read once into a SecretStr, then gone from os.environ (a child process, a crash dump, /proc)."""
    from openkms.xksproxy.cli import _open_token
    from openkms.xksproxy.config import PIN_VARIABLE, load

    config = tmp_path / "pin.toml"
    config.write_text(proxy_toml(port=1, token_label=token, stores=[Store.new("/pin")]))
    monkeypatch.setenv(PIN_VARIABLE, PIN)
    keys = _open_token(load(config))
    assert PIN_VARIABLE not in os.environ
    assert keys.describe("foo").usage == ["ENCRYPT", "DECRYPT"]  # logged in all the same
    assert PIN not in repr(keys)


def test_the_proxy_uses_the_hsm_key_stores_helpers() -> None:
    """One copy of the GCM failed-tag errors and of the key template, in keystore/pkcs11.py."""
    from openkms.keystore import pkcs11
    from openkms.xksproxy import keys

    assert keys.gcm_failed_tag is pkcs11.gcm_failed_tag and keys.aes_key_template is pkcs11.aes_key_template
    assert keys.p11 is pkcs11.p11 is pkcs11._p11 and keys.reason is pkcs11.reason is pkcs11._reason
    assert not hasattr(keys.TokenKeys, "forget")  # nothing called it
    template = pkcs11.aes_key_template(encrypt=True, decrypt=False)
    attribute = pkcs11.p11().Attribute
    assert template[attribute.SENSITIVE] and not template[attribute.EXTRACTABLE] and not template[attribute.DECRYPT]


# -- the four APIs --------------------------------------------------------------------------------

def test_health(client: XksClient) -> None:
    answer = client.health()
    assert answer.status == 200, answer.body
    body = answer.json
    assert body["xksProxyFleetSize"] == 1 and body["xksProxyVendor"] == "openkms"
    assert body["xksProxyModel"].startswith("openkms xks-proxy ")
    assert body["ekmVendor"] == "SoftHSM project"
    [ekm] = body["ekmFleetDetails"]
    assert ekm["healthStatus"] == "ACTIVE" and ekm["id"] and "SoftHSM" in ekm["model"]
    assert b"\n" not in answer.body and answer.headers["content-type"] == "application/json"


def test_get_key_metadata(client: XksClient) -> None:
    expect = {"foo": ["ENCRYPT", "DECRYPT"], "enc-only": ["ENCRYPT"], "dec-only": ["DECRYPT"]}
    for key, usage in expect.items():
        assert client.metadata(key).json == {"keySpec": "AES_256", "keyUsage": usage, "keyStatus": "ENABLED"}
    assert client.metadata("off").json == {"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"],
                                           "keyStatus": "DISABLED"}


def integrity(aad: bytes, sealed: dict[str, str]) -> str:
    """Appendix C: SHA-256 over aad || ciphertextMetadata || iv || ciphertext || tag, base64."""
    parts = [aad, unb64(sealed.get("ciphertextMetadata", "")), unb64(sealed["initializationVector"]),
             unb64(sealed["ciphertext"]), unb64(sealed["authenticationTag"])]
    return b64(hashlib.sha256(b"".join(parts)).digest())


def test_encrypt_and_decrypt(client: XksClient) -> None:
    data, aad = plaintext(), b"project=nile,department=marketing"
    sealed = sealed_of(client.encrypt("foo", data, aad))
    assert set(sealed) == {"ciphertext", "initializationVector", "authenticationTag", "ciphertextDataIntegrityValue"}
    assert len(unb64(sealed["initializationVector"])) == 12 and len(unb64(sealed["authenticationTag"])) == 16
    assert len(unb64(sealed["ciphertext"])) == len(data)
    assert sealed["ciphertextDataIntegrityValue"] == integrity(aad, sealed)
    assert unb64(client.decrypt("foo", sealed, aad).json["plaintext"]) == data
    # Two encryptions never share an IV; another key cannot open the ciphertext.
    assert sealed_of(client.encrypt("foo", data, aad))["initializationVector"] != sealed["initializationVector"]
    fails(client.decrypt("bar", sealed, aad), 400, "InvalidCiphertextException")

    # Without AAD and without the integrity value (both optional).
    bare = sealed_of(client.encrypt("foo", data, integrity=False))
    assert "ciphertextDataIntegrityValue" not in bare
    assert unb64(client.decrypt("foo", bare).json["plaintext"]) == data
    no_aad = sealed_of(client.encrypt("foo", data))
    assert no_aad["ciphertextDataIntegrityValue"] == integrity(b"", no_aad)


def test_sizes(client: XksClient) -> None:
    data, aad = plaintext(4300), os.urandom(8192)
    sealed = sealed_of(client.encrypt("foo", data, aad))
    assert unb64(client.decrypt("foo", sealed, aad).json["plaintext"]) == data
    fails(client.encrypt("foo", plaintext(4301)), 501, "UnsupportedOperationException")
    fails(client.encrypt("foo", data, os.urandom(8193)), 501, "UnsupportedOperationException")
    too_long = dict(sealed, ciphertext=b64(os.urandom(4301)))
    fails(client.decrypt("foo", too_long, aad), 501, "UnsupportedOperationException")
    fails(client.decrypt("foo", sealed, os.urandom(8193)), 501, "UnsupportedOperationException")
    # A body past what the proxy reads at all is refused before it is read (and the connection closed).
    with socket.create_connection(("127.0.0.1", client.port), timeout=5) as raw, \
            client.context.wrap_socket(raw, server_hostname="localhost") as tls:  # type: ignore[union-attr]
        tls.sendall(f"POST {client.path('encrypt', 'foo')} HTTP/1.1\r\nHost: localhost\r\n"
                    "Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{".encode())
        head = tls.recv(4096)
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower()
    assert b'"errorName":"ValidationException"' in head


def test_aad_and_ciphertext_metadata_are_bound(client: XksClient) -> None:
    data, aad = plaintext(), b"context"
    sealed = sealed_of(client.encrypt("foo", data, aad))
    fails(client.decrypt("foo", sealed, b"other context"), 400, "InvalidCiphertextException")
    fails(client.decrypt("foo", sealed), 400, "InvalidCiphertextException")
    fails(client.decrypt("foo", sealed, aad, metadata_=b"v1"), 400, "InvalidCiphertextException")
    # The spec's example: the AAD passed as ciphertextMetadata instead must not decrypt.
    fails(client.decrypt("foo", sealed, b"", metadata_=aad), 400, "InvalidCiphertextException")
    bare = sealed_of(client.encrypt("foo", data, integrity=False))
    assert unb64(client.decrypt("foo", bare, metadata_=b"").json["plaintext"]) == data  # empty = absent
    fails(client.decrypt("foo", bare, metadata_=b"\x00"), 400, "InvalidCiphertextException")

    def flipped(name: str) -> dict[str, str]:
        raw = bytearray(unb64(sealed[name]))
        raw[0] ^= 1
        return dict(sealed, **{name: b64(bytes(raw))})

    for name in ("ciphertext", "initializationVector", "authenticationTag"):
        fails(client.decrypt("foo", flipped(name), aad), 400, "InvalidCiphertextException")
    fails(client.decrypt("foo", dict(sealed, initializationVector=b64(os.urandom(16))), aad), 400,
          "InvalidCiphertextException")
    fails(client.decrypt("foo", dict(sealed, initializationVector=b64(os.urandom(13))), aad), 400,
          "ValidationException")
    fails(client.decrypt("foo", dict(sealed, authenticationTag=b64(os.urandom(15))), aad), 400, "ValidationException")
    fails(client.decrypt("foo", sealed, aad, metadata_=os.urandom(21)), 400, "ValidationException")


def test_key_usage_follows_the_token_object(client: XksClient) -> None:
    data = plaintext()
    one_sided = sealed_of(client.encrypt("enc-only", data, integrity=False))  # no verifying decrypt asked
    assert "does not allow decryption" in fails(client.encrypt("enc-only", data), 400, "InvalidKeyUsageException")
    fails(client.decrypt("enc-only", one_sided), 400, "InvalidKeyUsageException")
    fails(client.encrypt("dec-only", data, integrity=False), 400, "InvalidKeyUsageException")
    fails(client.decrypt("dec-only", one_sided), 400, "InvalidCiphertextException")  # it may decrypt, not this


def test_disabled_key(client: XksClient) -> None:
    sealed = sealed_of(client.encrypt("foo", plaintext()))
    fails(client.encrypt("off", plaintext()), 400, "InvalidStateException")
    fails(client.decrypt("off", sealed), 400, "InvalidStateException")


def test_allow_list_and_test_key(client: XksClient, open_client: XksClient, proxy: ProxyProcess) -> None:
    for key in ("outside", "xks-health", "absent-from-token", "never-heard-of"):
        fails(client.encrypt(key, plaintext()), 404, "KeyNotFoundException")
        fails(client.metadata(key), 404, "KeyNotFoundException")
    # The store without an allow-list serves every AES-256 key of the token that no other store
    # lists, but the test key.
    assert open_client.metadata("outside").json["keyStatus"] == "ENABLED"
    sealed = sealed_of(open_client.encrypt("outside", b"x" * 5))
    assert unb64(open_client.decrypt("outside", sealed).json["plaintext"]) == b"x" * 5
    fails(open_client.metadata("xks-health"), 404, "KeyNotFoundException")
    fails(open_client.metadata("absent-from-token"), 404, "KeyNotFoundException")
    # The other prefix's keys are its own: never another tenant's by default.
    theirs = sealed_of(client.encrypt("foo", plaintext()))
    for key in ("foo", "bar", "enc-only", "dec-only", "off"):
        fails(open_client.metadata(key), 404, "KeyNotFoundException")
        fails(open_client.encrypt(key, plaintext(), integrity=False), 404, "KeyNotFoundException")
    fails(open_client.decrypt("foo", theirs), 404, "KeyNotFoundException")
    # And the operator is told at start that a store has no allow-list of its own.
    assert "(no prefix): no xks_key_id_set, so it may use every AES-256 key of the token that no other " \
        "store lists" in proxy.output()
    # A store's credentials are its own.
    answer = open_client.post(client.path("metadata", "foo"), {"requestMetadata": metadata("DescribeKey")})
    fails(answer, 401, "AuthenticationFailedException")


@pytest.mark.parametrize(("api", "document", "raw"), [
    ("encrypt", None, b"not json"),
    ("encrypt", None, b"[1, 2]"),
    ("encrypt", {"plaintext": "AAAA", "encryptionAlgorithm": "AES_GCM"}, None),
    ("encrypt", {"requestMetadata": {}, "plaintext": "AAAA", "encryptionAlgorithm": "AES_GCM"}, None),
    ("encrypt", {"requestMetadata": "yes", "plaintext": "AAAA", "encryptionAlgorithm": "AES_GCM"}, None),
    ("encrypt", {"requestMetadata": {"kmsOperation": "Encrypt"}, "plaintext": "AAAA",
                 "encryptionAlgorithm": "AES_GCM"}, None),
    ("encrypt", {"requestMetadata": "META", "encryptionAlgorithm": "AES_GCM"}, None),
    ("encrypt", {"requestMetadata": "META", "plaintext": "AAA*", "encryptionAlgorithm": "AES_GCM"}, None),
    ("encrypt", {"requestMetadata": "META", "plaintext": "AAAA"}, None),
    ("encrypt", {"requestMetadata": "META", "plaintext": "AAAA", "encryptionAlgorithm": "AES_CBC"}, None),
    ("encrypt", {"requestMetadata": "META", "plaintext": "AAAA", "encryptionAlgorithm": "AES_GCM",
                 "ciphertextDataIntegrityValueAlgorithm": "MD5"}, None),
    ("decrypt", {"requestMetadata": "META", "encryptionAlgorithm": "AES_GCM", "ciphertext": "AAAA"}, None),
    ("metadata", {"requestMetadata": {}}, None),
    ("health", {"requestMetadata": {}}, None),
    ("health", {"requestMetadata": {"kmsOperation": "KmsHealthCheck"}}, None),
])
def test_validation(client: XksClient, api: str, document: dict[str, object] | None, raw: bytes | None) -> None:
    if document is not None and document.get("requestMetadata") == "META":
        document = dict(document, requestMetadata=metadata())
    # An unknown key: the body is checked first (400 before 404), as AWS's test client expects.
    answer = client.post(client.path(api, "never-heard-of"), document, raw=raw)
    fails(answer, 400, "ValidationException")


def test_request_metadata_may_grow(client: XksClient) -> None:
    """Members the spec may add (Appendix B) and kmsOperations it does not list are accepted."""
    md = metadata("BulkEncrypt", kmsViaService="ebs", awsSourceVpc="vpc-1", awsSourceVpce="vpce-1",
                  SourceIdentity="someone", kmsRecipientAttestationPCR0="00")
    answer = client.post(client.path("encrypt", "foo"), {"requestMetadata": md, "plaintext": b64(plaintext()),
                                                         "encryptionAlgorithm": "AES_GCM", "future": 1})
    assert answer.status == 200, answer.body
    long_arn = "arn:aws:iam::111122223333:role/" + "r" * 2000
    answer = client.post(client.path("metadata", "foo"), {"requestMetadata": metadata(awsPrincipalArn=long_arn)})
    assert answer.status == 200


# -- the order of checks, authentication, methods -------------------------------------------------

def test_check_order(client: XksClient) -> None:
    unsigned = {"Content-Type": "application/json"}
    # 1. An unknown path is 404 before any signature check, for every method.
    for path in ("/other/kms/xks/v1/health", f"{PREFIX}/kms/xks/v2/health", f"{PREFIX}/kms/xks/v1/keys/foo/sign",
                 f"{PREFIX}/kms/xks/v1/keys/foo", f"{PREFIX}/kms/xks/v1/keys/a%2Fb/encrypt", "/"):
        fails(client.send("POST", path, b"garbage", unsigned), 404, "InvalidUriPathException")
        fails(client.send("GET", path, b"", unsigned), 404, "InvalidUriPathException")
    # 2. GET on an API is 405, before the signature.
    for api in ("metadata", "encrypt", "decrypt", "health"):
        answer = client.send("GET", client.path(api, "foo"), b"", unsigned)
        assert answer.status == 405 and answer.headers["allow"] == "POST", answer.body
    # 3. The signature before the body, 4. the body before the key.
    fails(client.send("POST", client.path("encrypt", "never-heard-of"), b"garbage", unsigned), 401,
          "AuthenticationFailedException")
    fails(client.post(client.path("encrypt", "never-heard-of"), None, raw=b"garbage"), 400, "ValidationException")
    fails(client.encrypt("never-heard-of", plaintext(4301)), 501, "UnsupportedOperationException")
    fails(client.encrypt("never-heard-of", plaintext()), 404, "KeyNotFoundException")
    # 5. The key before its usage, its state and its ciphertext.
    fails(client.encrypt("off", plaintext(4301)), 501, "UnsupportedOperationException")


def test_authentication(client: XksClient, stores: list[Store]) -> None:
    path = client.path("metadata", "foo")
    document = {"requestMetadata": metadata("DescribeKey")}
    body = json.dumps(document).encode()
    url = client.base + path

    # Both of the prefix's credentials work at once; each signs with either header set.
    for akid, secret in stores[0].credentials:
        for sign_content_type in (True, False):
            headers = signed_headers(url, body, akid, secret, sign_content_type=sign_content_type)
            expected = "content-type;host;x-amz-date" if sign_content_type else "host;x-amz-date"
            assert f"SignedHeaders={expected}," in headers["Authorization"]
            assert client.send("POST", path, body, headers).status == 200

    akid, secret = stores[0].credentials[0]
    wrong = [
        {},  # no Authorization at all
        signed_headers(url, body, "AAAAAAAAAAAAAAAAAAAAAAAA", secret),  # unknown access key id
        signed_headers(url, body, akid, secret[:-2] + "AA"),  # wrong secret
        signed_headers(url, body, akid, secret, service="kms"),
        signed_headers(url, body, akid, secret, region="eu-west-1"),
        signed_headers(url, b"{}", akid, secret),  # signed another body
        signed_headers(url.replace("metadata", "encrypt"), body, akid, secret),  # signed another path
    ]
    for headers in wrong:
        fails(client.send("POST", path, body, {"Content-Type": "application/json", **headers}), 401,
              "AuthenticationFailedException")
    tampered = signed_headers(url, body, akid, secret)
    tampered["Host"] = "evil.example.com"
    fails(client.send("POST", path, body, tampered), 401, "AuthenticationFailedException")


@pytest.mark.parametrize(("skew", "ok"), [(-6, False), (6, False), (-4, True), (4, True)])
def test_clock_skew(client: XksClient, skew: int, ok: bool) -> None:
    answer = client.post(client.path("metadata", "foo"), {"requestMetadata": metadata("DescribeKey")},
                         when=datetime.now(UTC) + timedelta(minutes=skew))
    if ok:
        assert answer.status == 200, answer.body
    else:
        fails(answer, 401, "AuthenticationFailedException")


def test_ping_and_keep_alive(client: XksClient, proxy: ProxyProcess) -> None:
    answer = client.send("GET", "/ping")
    assert (answer.status, answer.json) == (200, {"status": "ok"})
    assert client.send("HEAD", "/ping").status == 200
    assert client.send("POST", "/ping", b"{}").status == 405
    # One connection, many requests (keep-alive), errors included.
    conn = client.connection()
    sock = conn.sock
    for _ in range(20):
        assert client.metadata("foo").status == 200
        assert client.metadata("never-heard-of").status == 404
    assert conn.sock is sock and client.connection() is conn

    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", client.port), timeout=5) as plain, \
                client.context.wrap_socket(plain, server_hostname="localhost") as tls:  # type: ignore[union-attr]
            tls.sendall(data)
            received = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    return received
                received += chunk

    # Two pipelined requests are answered in order; then Connection: close is honoured.
    ping = b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answers = raw(ping + ping.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert answers.count(b"HTTP/1.1 200 ") == 2 and answers.endswith(b'{"status":"ok"}')
    # Not HTTP at all: 400, and the connection is closed.
    assert raw(b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_a_request_head_past_16_kib_is_refused_even_in_one_read(client: XksClient) -> None:
    def first_line(size: int) -> bytes:
        with socket.create_connection(("127.0.0.1", client.port), timeout=5) as raw, \
                client.context.wrap_socket(raw, server_hostname="localhost") as tls:  # type: ignore[union-attr]
            tls.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * size + b"\r\n\r\n")
            return tls.recv(4096).split(b"\r\n")[0]

    assert first_line(15 * 1024) == b"HTTP/1.1 200 OK"
    for size in (16 * 1024, 20 * 1024, 200 * 1024):  # httptools has no limit: the proxy measures
        assert first_line(size) == b"HTTP/1.1 431 Request Header Fields Too Large", size


def test_a_refused_request_is_answered_before_the_connection_closes(client: XksClient) -> None:
    """Most clients send the whole body before they read; closing on the unread rest would reset
    the connection and destroy the 413 before the client reads it."""
    for _ in range(3):
        conn = http.client.HTTPSConnection("localhost", client.port, context=client.context, timeout=10)
        try:
            conn.request("POST", client.path("encrypt", "foo"), body=b"{" + b" " * (2 * 1024 * 1024),
                         headers={"Content-Type": "application/json"})
            answer = conn.getresponse()
            assert answer.status == 413 and b'"errorName":"ValidationException"' in answer.read()
            assert answer.getheader("connection") == "close"
        finally:
            conn.close()


def test_logs_hold_request_metadata_and_never_plaintext(client: XksClient, proxy: ProxyProcess,
                                                        stores: list[Store]) -> None:
    assert client.metadata("never-heard-of").status == 404
    assert client.post(client.path("metadata", "foo"), {}, secret=secret_access_key()).status == 401
    request_id = "correlate-" + os.urandom(6).hex()
    assert client.encrypt("foo", plaintext(), request_id=request_id).status == 200
    proxy.wait_for(request_id)
    log = proxy.output()
    [line] = [line for line in log.splitlines() if request_id in line]
    record = json.loads(line.split(" INFO ", 1)[1])
    assert list(record)[:4] == ["kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"]
    assert record["kmsRequestId"] == request_id and record["outcome"] == "ok" and record["status"] == 200
    assert record["externalKeyId"] == "foo" and record["api"] == "encrypt"
    assert '"outcome":"KeyNotFoundException"' in log and '"outcome":"AuthenticationFailedException"' in log

    assert MARKER.decode() not in log
    for sent in SENT:
        assert b64(sent)[:24] not in log and sent.hex()[:32] not in log
    for store in stores:
        for _, secret in store.credentials:
            assert secret not in log
    assert PIN not in log
    assert "readable by" not in log  # the file is mode 0600


# -- rotation, quotas, health, the token ----------------------------------------------------------

def test_two_credentials_and_rotation_by_sighup(token: str, pki: Pki, tmp_path: Path) -> None:
    old, kept, new = Store.new("/rotate", 3).credentials
    throttled = Store.new("/throttled", requests_per_second=3)
    port = free_port()
    config = tmp_path / "rotate.toml"

    def write(credentials: list[tuple[str, str]], extra: str = "") -> None:
        config.write_text(proxy_toml(port=port, token_label=token, stores=[
            Store("/rotate", credentials), throttled], pki=pki) + extra)

    write([old, kept])
    proxy = ProxyProcess(config, port, tls=True).start()
    try:
        pid = proxy.proc.pid if proxy.proc else None
        clients = {name: XksClient(proxy.base, "/rotate", akid, secret, pki.client_context())
                   for name, (akid, secret) in (("old", old), ("kept", kept), ("new", new))}
        assert [clients[n].health().status for n in ("old", "kept", "new")] == [200, 200, 401]

        write([kept, new])  # the rotation's second step: add the new one, drop the old one
        proxy.sighup("SIGHUP: reloaded")
        # The old credential is refused at once, even on its kept-alive connection; the others work.
        fails(clients["old"].health(), 401, "AuthenticationFailedException")
        assert clients["kept"].health().status == 200
        assert clients["new"].health().status == 200
        assert proxy.proc is not None and proxy.proc.pid == pid  # no restart

        # A bad file on SIGHUP changes nothing.
        config.write_text(config.read_text().replace(new[0], "lowercase-is-not-allowed"))
        proxy.sighup("SIGHUP: kept the running configuration")
        assert clients["new"].health().status == 200
        assert new[1] not in proxy.output() and kept[1] not in proxy.output()

        # The per-prefix quota: 3 a second here.
        akid, secret = throttled.credentials[0]
        limited = XksClient(proxy.base, "/throttled", akid, secret, pki.client_context())
        statuses = [limited.health().status for _ in range(12)]
        assert 200 in statuses and 429 in statuses, statuses
        fails(limited.health(), 429, "ThrottlingException")
        assert clients["kept"].health().status == 200  # another prefix's quota is its own
        for c in (*clients.values(), limited):
            c.close()
    finally:
        assert proxy.stop() == 0


def test_a_sighup_while_starting_is_held_until_the_proxy_serves(token: str, tmp_path: Path,
                                                               slow_token: Callable[..., None]) -> None:
    marker = tmp_path / "starting"
    slow_token(XKS_TEST_SLOW_START_MARKER=str(marker))  # the test key's check at start takes a second
    store = Store.new("/hup")
    port = free_port()
    config = tmp_path / "hup.toml"
    config.write_text(proxy_toml(port=port, token_label=token, stores=[store]))
    proxy = ProxyProcess(config, port, tls=False)
    started = in_background(proxy.start)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline and not started.done(), started
            time.sleep(0.01)
        proxy.signal(signal.SIGHUP)  # the token is open, the loop not yet running
        proxy.signal(signal.SIGHUP)
        started.result(timeout=30)  # it did not die of it
        proxy.wait_for("SIGHUP: reloaded")
        time.sleep(0.2)
        assert proxy.output().count("SIGHUP: reloaded") == 1  # once for both
        akid, secret = store.credentials[0]
        client = XksClient(f"http://127.0.0.1:{port}", "/hup", akid, secret)
        assert client.health().status == 200
        client.close()
    finally:
        wait([started], timeout=30)
        code = proxy.stop()
    assert code == 0


def test_health_cache_degraded_and_a_token_that_goes_away(softhsm: SoftHsm, pki: Pki, tmp_path: Path) -> None:
    label = softhsm.init_token(pin=PIN)
    store = Store.new("/h")
    port = free_port()
    config = tmp_path / "health.toml"
    config.write_text(proxy_toml(port=port, token_label=label, stores=[store], pki=pki,
                                 health="cache_seconds = 1\n"))
    keys = tmp_path / "keys.toml"
    keys.write_text(proxy_toml(port=1, token_label=label, stores=[store]))
    assert cli("keys", "create", "--config", str(keys), "--label", "k").returncode == 0
    proxy = ProxyProcess(config, port, tls=True).start()
    assert "made the health check's test key 'xks-health'" in proxy.output()
    akid, secret = store.credentials[0]
    client = XksClient(proxy.base, "/h", akid, secret, pki.client_context())
    try:
        assert client.health().json["ekmFleetDetails"][0]["healthStatus"] == "ACTIVE"
        sealed = sealed_of(client.encrypt("k", b"kill switch"))

        # The test key deleted from the token: the cached answer first, DEGRADED within a second.
        deleted = softhsm.tool(label, PIN, "--delete-object", "--type", "secrkey", "--label", "xks-health")
        assert deleted.returncode == 0, deleted.stderr
        assert client.health().json["ekmFleetDetails"][0]["healthStatus"] == "ACTIVE"
        time.sleep(1.1)
        assert client.health().json["ekmFleetDetails"][0]["healthStatus"] == "DEGRADED"
        assert unb64(client.decrypt("k", sealed).json["plaintext"]) == b"kill switch"  # still serves

        # The token goes away: everything fails with InternalException, health too (UNAVAILABLE).
        token_dir = next(d for d in softhsm.tokens.iterdir() if (d / "token.object").exists()
                         and label.encode() in (d / "token.object").read_bytes())
        away = tmp_path / "away"
        shutil.move(str(token_dir), str(away))
        try:
            fails(client.decrypt("k", sealed), 500, "InternalException")
            time.sleep(1.1)
            assert "UNAVAILABLE" in fails(client.health(), 500, "InternalException")
        finally:
            shutil.move(str(away), str(token_dir))
        # Back: it serves again without a restart.
        deadline = time.monotonic() + 10
        while client.decrypt("k", sealed).status != 200:
            assert time.monotonic() < deadline, "the token came back but the proxy did not serve again"
            time.sleep(0.2)
        time.sleep(1.1)
        assert client.health().status == 200

        # A customer key removed from the token: KeyNotFoundException at once.
        assert softhsm.tool(label, PIN, "--delete-object", "--type", "secrkey", "--label", "k").returncode == 0
        fails(client.decrypt("k", sealed), 404, "KeyNotFoundException")
        fails(client.metadata("k"), 404, "KeyNotFoundException")
    finally:
        client.close()
        assert proxy.stop() == 0


def test_health_waiters_keep_their_answer_when_the_first_is_cancelled(token: str, tmp_path: Path,
                                                                     slow_token: Callable[..., None]) -> None:
    """Requests that arrive during a deep check wait for it; the first request (whose check it is)
    timing out must not take their answers with it."""
    slow_token(XKS_TEST_SLOW_HEALTH_S="2")
    store = Store.new("/hc")
    port = free_port()
    config = tmp_path / "health-cancel.toml"
    config.write_text(with_settings(proxy_toml(port=port, token_label=token, stores=[store]),
                                    server="request_timeout_ms = 1500\n", pkcs11="call_timeout_ms = 5000\n"))
    proxy = ProxyProcess(config, port, tls=False).start()
    akid, secret = store.credentials[0]

    def health() -> Answer:
        c = XksClient(f"http://127.0.0.1:{port}", "/hc", akid, secret)
        try:
            return c.health()
        finally:
            c.close()

    try:
        first = in_background(health)  # starts the check (2 s), cancelled at its 1.5 s
        time.sleep(0.8)
        second = in_background(health)  # waits for the same check: due at 2.3 s, answered at 2 s
        fails(first.result(timeout=10), 503, "DependencyTimeoutException")
        answer = second.result(timeout=10)
        assert answer.status == 200, answer
        assert answer.json["ekmFleetDetails"][0]["healthStatus"] == "ACTIVE"
        assert health().status == 200  # cached now: at once
    finally:
        assert proxy.stop() == 0


def test_a_call_the_token_does_not_answer_in_time() -> None:
    """The worker's timeout (the token's hang would be the same to the request)."""
    worker = TokenWorker()

    async def run() -> None:
        with pytest.raises(DependencyTimeoutException):
            await worker.call(lambda: time.sleep(0.3), timeout=0.05)
        assert await worker.call(lambda: 42, timeout=2) == 42

    try:
        asyncio.run(run())
    finally:
        worker.close()


# -- TLS and mTLS ---------------------------------------------------------------------------------

def test_tls_versions_and_cipher_suites(proxy: ProxyProcess, pki: Pki) -> None:
    def handshake(context: ssl.SSLContext) -> tuple[str, str]:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            cipher = tls.cipher()
            assert cipher is not None
            return str(tls.version()), cipher[0]

    assert handshake(pki.client_context())[0] == "TLSv1.3"
    for suite in ("ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"):
        assert handshake(pki.client_context(maximum=ssl.TLSVersion.TLSv1_2, ciphers=suite)) == ("TLSv1.2", suite)
    for weak in ("AES256-SHA256", "ECDHE-RSA-AES256-SHA384"):  # no forward secrecy / no AEAD
        with pytest.raises(ssl.SSLError):
            handshake(pki.client_context(maximum=ssl.TLSVersion.TLSv1_2, ciphers=weak))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated: that is the point
        old = pki.client_context()
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        handshake(old)


def _refused(port: int, context: ssl.SSLContext) -> str:
    """Connect, handshake and send a request; returns how the proxy refused (it must refuse)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="localhost")
        except (ssl.SSLError, ConnectionError) as exc:
            return f"handshake: {exc}"
        with tls:
            try:
                tls.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
                data = tls.recv(4096)
            except (ssl.SSLError, ConnectionError) as exc:
                return f"after handshake: {exc}"  # TLS 1.3: the server's alert arrives after the client's Finished
            assert data == b"", f"the proxy answered a refused client: {data[:200]!r}"
            return "closed"


def test_mtls(token: str, pki: Pki, tmp_path: Path) -> None:
    store = Store.new("/m")
    port = free_port()
    config = tmp_path / "mtls.toml"
    config.write_text(proxy_toml(port=port, token_label=token, stores=[store], pki=pki, mtls=True))
    proxy = ProxyProcess(config, port, tls=True).start()
    try:
        akid, secret = store.credentials[0]
        good = XksClient(proxy.base, "/m", akid, secret, pki.client_context(pki.client))
        assert good.health().status == 200
        assert good.send("GET", "/ping").status == 200
        good.close()
        # Refused in the handshake, with OpenSSL's alert. With TLS 1.3 the client has sent its
        # Finished before the server checks its certificate, so it reads the alert after.
        refusals = [(None, {"TLSv1_2": "alert handshake failure", "TLSv1_3": "alert certificate required"},
                     "peer did not return a certificate"),
                    (pki.expired, "alert certificate expired", "certificate has expired"),
                    (pki.self_signed, "alert unknown ca", "self-signed certificate")]
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            for cert, alert, logged in refusals:
                context = pki.client_context(cert)
                context.maximum_version = version
                how = _refused(port, context)
                expected = alert if isinstance(alert, str) else alert[version.name]
                stage = "handshake" if version is ssl.TLSVersion.TLSv1_2 else "after handshake"
                assert how.startswith(stage + ":") and expected in how, (version, cert, how)
                proxy.wait_for(f"at the handshake: {logged}")  # logged once the alert is on its way
            # The right CA but another name: the handshake completes, and the connection is closed
            # (close_notify) before any request is read.
            context = pki.client_context(pki.wrong_name)
            context.maximum_version = version
            assert _refused(port, context) == "closed"
        proxy.wait_for("its certificate does not name kms.example.test", count=2)
        proxy.wait_for('"api":"health"')
        output = proxy.output()
        assert output.count('"api":"health"') == 1  # only the good client's request was answered
    finally:
        assert proxy.stop() == 0


def test_connection_slots(token: str, pki: Pki, tmp_path: Path) -> None:
    """Sockets that never start TLS cannot lock a client out, idle connections make room for new
    ones, and refusals are logged at most once a second."""
    store = Store.new("/slots")
    port = free_port()
    config = tmp_path / "slots.toml"
    config.write_text(with_settings(proxy_toml(port=port, token_label=token, stores=[store], pki=pki),
                                    server="max_connections = 20\n"))
    proxy = ProxyProcess(config, port, tls=True).start()
    akid, secret = store.credentials[0]

    def new_client() -> XksClient:
        return XksClient(proxy.base, "/slots", akid, secret, pki.client_context())

    bare: list[socket.socket] = []
    clients: list[XksClient] = []
    try:
        # 30 connections that never send a byte: at most max_handshakes (16 here) of the 20 slots,
        # and a newcomer takes the place of a handshake that has gone on for half a second.
        bare += [socket.create_connection(("127.0.0.1", port)) for _ in range(25)]
        time.sleep(0.6)
        bare += [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        time.sleep(0.6)
        client = new_client()
        assert client.health().status == 200
        client.close()
        refusals = [line for line in proxy.output().splitlines() if "refused a connection" in line]
        assert 1 <= len(refusals) <= 3, refusals  # not one line per refusal
        assert "TLS handshakes are in progress already" in refusals[0]
        for s in bare:
            s.close()

        # A handshake must begin and end within 2 s.
        with socket.create_connection(("127.0.0.1", port), timeout=8) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""
            assert time.monotonic() - started < 3.5
        time.sleep(0.2)

        # All 20 slots held by idle keep-alive clients: the 21st closes the longest idle.
        clients = [new_client() for _ in range(20)]
        for c in clients:
            assert c.health().status == 200
        late = new_client()
        clients.append(late)
        assert late.health().status == 200
        proxy.wait_for("closed an idle connection for a new one (max_connections 20)")
        for c in clients[1:]:
            assert c.health().status == 200  # one request each on the connections that were kept
    finally:
        for s in bare:
            s.close()
        for c in clients:
            c.close()
        assert proxy.stop() == 0


def test_server_names_refuse_a_request_signed_for_another_proxy(token: str, tmp_path: Path) -> None:
    """Two proxies that share credentials (a fleet behind names of its own, or a copied file): a
    request captured on its way to one is refused by the other, before its signature is checked."""
    store = Store.new("/names")
    port = free_port()
    config = tmp_path / "names.toml"
    config.write_text(with_settings(proxy_toml(port=port, token_label=token, stores=[store]),
                                    server='server_names = ["localhost", "XKS.example.com"]\n'))
    config.chmod(0o644)
    proxy = ProxyProcess(config, port, tls=False).start()
    akid, secret = store.credentials[0]
    client = XksClient(f"http://127.0.0.1:{port}", "/names", akid, secret)
    path = client.path("health")
    body = json.dumps({"requestMetadata": health_metadata()}).encode()

    def signed_for(host: str) -> dict[str, str]:
        headers = signed_headers(f"https://{host}{path}", body, akid, secret)
        headers["Host"] = host
        return headers

    try:
        assert client.send("POST", path, body, signed_for(f"localhost:{port}")).status == 200  # listed without port
        assert client.send("POST", path, body, signed_for("xks.example.com")).status == 200
        message = fails(client.send("POST", path, body, signed_for("xks-other.example.com")), 401,
                        "AuthenticationFailedException")
        assert "Host header does not name this XKS proxy" in message
        fails(client.send("POST", path, b"not signed", {"Host": "xks-other.example.com"}), 401,
              "AuthenticationFailedException")
        proxy.wait_for('"host":"xks-other.example.com"')
        # The file holds the secrets: the operator is told that others can read it.
        assert f"{config} is readable by its group and every user (mode 0644)" in proxy.output()
    finally:
        client.close()
        assert proxy.stop() == 0


def test_plain_http_on_loopback_only(token: str, tmp_path: Path) -> None:
    store = Store.new("/plain")
    port = free_port()
    config = tmp_path / "plain.toml"
    config.write_text(proxy_toml(port=port, token_label=token, stores=[store]))
    proxy = ProxyProcess(config, port, tls=False).start()
    try:
        akid, secret = store.credentials[0]
        client = XksClient(f"http://127.0.0.1:{port}", "/plain", akid, secret)
        assert client.health().status == 200
        sealed = sealed_of(client.encrypt("foo", b"over plain http on loopback"))
        assert unb64(client.decrypt("foo", sealed).json["plaintext"]) == b"over plain http on loopback"
        client.close()
        proxy.signal(signal.SIGINT)
        assert proxy.proc is not None and proxy.proc.wait(timeout=10) == 0
    finally:
        proxy.stop()
