"""`openkms xks-proxy` as AWS KMS meets it: real proxy processes over TLS, SoftHSM2 tokens, keys
made with the proxy's own CLI, certificates made with openssl, requests signed by botocore.

Covered: the four APIs and /ping, every error of the spec's table the proxy can produce and the
order of its checks, SigV4 (two credentials at once, rotation by SIGHUP, clock skew, the headers
signed), the size minimums and limits, the AAD layout and the integrity value (recomputed here),
key usage from CKA_ENCRYPT/CKA_DECRYPT, the allow-list and disabled keys, the deep health check
and its cache, a token that goes away, mTLS at the handshake, and logs that hold requestMetadata
but never plaintext or secrets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from openkms.xksproxy.errors import DependencyTimeoutException
from openkms.xksproxy.worker import TokenWorker
from tests.conftest import SoftHsm
from tests.xks_proxy_helpers import (
    PIN,
    Answer,
    Pki,
    ProxyProcess,
    Store,
    XksClient,
    b64,
    cli,
    free_port,
    metadata,
    proxy_toml,
    secret_access_key,
    signed_headers,
    unb64,
)

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


def test_allow_list_and_test_key(client: XksClient, open_client: XksClient) -> None:
    for key in ("outside", "xks-health", "absent-from-token", "never-heard-of"):
        fails(client.encrypt(key, plaintext()), 404, "KeyNotFoundException")
        fails(client.metadata(key), 404, "KeyNotFoundException")
    # The store without an allow-list serves every AES-256 key of the token but the test key.
    assert open_client.metadata("outside").json["keyStatus"] == "ENABLED"
    sealed = sealed_of(open_client.encrypt("outside", b"x" * 5))
    assert unb64(open_client.decrypt("outside", sealed).json["plaintext"]) == b"x" * 5
    fails(open_client.metadata("xks-health"), 404, "KeyNotFoundException")
    fails(open_client.metadata("absent-from-token"), 404, "KeyNotFoundException")
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
