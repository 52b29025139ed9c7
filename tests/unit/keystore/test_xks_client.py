"""The XKS client's checks of what a proxy answers, against a scripted HTTP server in this process
(the real proxy, `openkms xks-proxy`, is tested in tests/test_xks.py and tests/test_xks_proxy.py):
every answer that is not what the XKS API specifies is refused with its cause, never used; the
budget holds for a slow proxy; the rate limit throttles; requests are signed and carry the
requestMetadata of the request being served. The transport against a raw TCP server that writes
given bytes: calls share kept-alive connections, every framing of an answer (Content-Length,
chunked, to the end of the connection) is read, a connection the proxy closed is not reused, one
lost mid-answer is retried once, and any bytes as an answer are an answer or an XksError. The
transport's checks run twice: called from a thread (the connection blocks it), and under
onloop.run on an event loop (a request served there: the exchange is awaited on the loop)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openkms import onloop
from openkms.api.sigv4 import SigV4Verifier
from openkms.audit.context import RequestInfo, current_request
from openkms.crypto import blob
from openkms.errors import ThrottlingException
from openkms.keystore import xks as xks_module
from openkms.keystore.xks import XksClient, XksEndpoint, XksError, XksOptions
from openkms.model import Key, KeyState, KeyUsage, Origin, SecretStr
from openkms.ratelimit import TokenBucket

ACCESS_KEY = "ABCDEFGHIJKLMNOPQRSTUVWX"
SECRET = base64.b64encode(b"s" * 32).decode()
PATH = "/tenant-a/kms/xks/v1"

Reply = Callable[[str, dict[str, Any]], tuple[int, Any]]


class Scripted:
    """An HTTP server whose answer to each request is `reply(path, body)`; it keeps the requests."""

    def __init__(self) -> None:
        self.reply: Reply = lambda path, body: (200, {})
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", "0")))
                body = json.loads(raw)
                outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, answer = outer.reply(self.path, body)
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.close()


Call = Callable[[Callable[[], Any]], Any]


@pytest.fixture(params=["thread", "loop"])
def call(request: pytest.FixtureRequest) -> Iterator[Call]:
    """How a test makes its calls: `call(fn)` is fn() on this thread, or fn() under onloop.run on
    one event loop that lives as long as the test (so its connections are kept alive between calls)."""
    if request.param == "thread":
        yield lambda fn: fn()
        return
    with asyncio.Runner() as runner:
        yield lambda fn: runner.run(onloop.run(fn))


def client_for(proxy: Scripted, **options: Any) -> XksClient:
    """A client of the scripted proxy; its budget is 5 s unless a test sets one, so that a busy machine
    (a CI run on two cores) never turns an answer the test expects into a timeout."""
    endpoint = XksEndpoint(f"http://127.0.0.1:{proxy.port}", PATH, ACCESS_KEY, SecretStr(SECRET), "us-east-1")
    return XksClient(endpoint, XksOptions(allow_http=True, **({"timeout": 5.0} | options)))


KEY = Key(key_id=str(uuid.uuid4()), account_id="111122223333", region="us-east-1", description="",
          key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT, origin=Origin.EXTERNAL_KEY_STORE,
          state=KeyState.ENABLED, created=datetime.now(UTC), custom_key_store_id="cks-0", xks_key_id="ext-1")
AAD = b"a" * 53


def good_encrypt(path: str, body: dict[str, Any], iv: bytes = b"i" * 12, metadata: bytes = b"") -> tuple[int, Any]:
    """What a correct proxy answers (not real AES-GCM: only lengths and the integrity value count)."""
    plaintext = base64.b64decode(body["plaintext"])
    aad = base64.b64decode(body["additionalAuthenticatedData"])
    ciphertext, tag = bytes(b ^ 0x5A for b in plaintext), b"t" * 16
    answer = {"ciphertext": base64.b64encode(ciphertext).decode(),
              "initializationVector": base64.b64encode(iv).decode(),
              "authenticationTag": base64.b64encode(tag).decode(),
              "ciphertextDataIntegrityValue": base64.b64encode(
                  hashlib.sha256(aad + metadata + iv + ciphertext + tag).digest()).decode()}
    if metadata:
        answer["ciphertextMetadata"] = base64.b64encode(metadata).decode()
    return 200, answer


def test_a_request_is_signed_and_says_who_asks(proxy: Scripted, call: Call) -> None:
    proxy.reply = good_encrypt

    def encrypt() -> blob.XksParts:  # as the server does: the request's own context says who asks
        token = current_request.set(RequestInfo("req-123", "GenerateDataKey",
                                                "arn:aws:iam::111122223333:user/app"))
        try:
            return client_for(proxy).encrypt(KEY, "ext-1", b"p" * 70, AAD)
        finally:
            current_request.reset(token)

    parts = call(encrypt)
    assert len(parts.iv) == 12 and len(parts.ciphertext) == 70
    path, headers, body = proxy.requests[0]
    assert path == f"{PATH}/keys/ext-1/encrypt"
    assert body["requestMetadata"] == {"kmsRequestId": "req-123", "kmsOperation": "GenerateDataKey",
                                       "awsPrincipalArn": "arn:aws:iam::111122223333:user/app", "kmsKeyArn": KEY.arn}
    assert body["encryptionAlgorithm"] == "AES_GCM" and body["ciphertextDataIntegrityValueAlgorithm"] == "SHA_256"
    # The signature verifies as the proxy checks it: SigV4, service kms-xks-proxy, this credential.
    verifier = SigV4Verifier("us-east-1", "kms-xks-proxy",
                             lambda k: (SecretStr(SECRET), k) if k == ACCESS_KEY else None)
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert verifier.verify("POST", path, "", headers, raw)[0] == ACCESS_KEY
    with pytest.raises(Exception, match=r"[Ss]ignature"):
        verifier.verify("POST", path, "", headers, raw + b" ")


@pytest.mark.parametrize("damage, why", [
    (lambda a: a.update(initializationVector=base64.b64encode(b"i" * 11).decode()), "lengths"),
    (lambda a: a.update(authenticationTag=base64.b64encode(b"t" * 15).decode()), "lengths"),
    (lambda a: a.update(ciphertextMetadata=base64.b64encode(b"m" * 21).decode()), "lengths"),
    (lambda a: a.update(ciphertext=base64.b64encode(b"c" * 69).decode()), "lengths"),
    (lambda a: a.update(ciphertextDataIntegrityValue=base64.b64encode(b"x" * 32).decode()), "integrity"),
    (lambda a: a.pop("ciphertextDataIntegrityValue"), "ciphertextDataIntegrityValue"),
    (lambda a: a.update(ciphertext="not base64!"), "base64"),
    (lambda a: a.pop("ciphertext"), "ciphertext"),
])
def test_a_wrong_encrypt_answer_is_refused(proxy: Scripted, damage: Callable[[dict[str, Any]], Any], why: str) -> None:
    def reply(path: str, body: dict[str, Any]) -> tuple[int, Any]:
        status, answer = good_encrypt(path, body)
        damage(answer)
        return status, answer

    proxy.reply = reply
    with pytest.raises(XksError) as e:
        client_for(proxy).encrypt(KEY, "ext-1", b"p" * 70, AAD)
    assert e.value.cause == "invalid_response" and why in e.value.message


def test_metadata_of_up_to_20_bytes_and_16_byte_ivs_are_kept(proxy: Scripted) -> None:
    proxy.reply = lambda path, body: good_encrypt(path, body, iv=b"v" * 16, metadata=b"m" * 20)
    parts = client_for(proxy).encrypt(KEY, "ext-1", b"p" * 70, AAD)
    packed = blob.pack_v3(blob.header_v3(KEY.key_id, 1), parts)
    assert blob.unpack_v3(packed) == parts


@pytest.mark.parametrize("status, name, cause", [
    (401, "AuthenticationFailedException", "auth"), (403, "AccessDeniedException", "denied"),
    (404, "InvalidUriPathException", "uri_path"), (404, "KeyNotFoundException", "key_not_found"),
    (400, "InvalidStateException", "invalid_state"), (400, "InvalidKeyUsageException", "invalid_key_usage"),
    (400, "InvalidCiphertextException", "invalid_ciphertext"), (400, "ValidationException", "validation"),
    (429, "ThrottlingException", "throttled"), (500, "InternalException", "internal"),
    (501, "UnsupportedOperationException", "unsupported"), (503, "DependencyTimeoutException", "dependency_timeout"),
    (418, "Teapot", "invalid_response"), (502, None, "invalid_response"),
])
def test_each_error_of_the_spec_has_its_cause(proxy: Scripted, status: int, name: str | None, cause: str) -> None:
    proxy.reply = lambda path, body: (status, {"errorName": name, "errorMessage": "x"} if name else b"<html>")
    with pytest.raises(XksError) as e:
        client_for(proxy).decrypt(KEY, "ext-1", blob.XksParts(b"i" * 12, b"", b"t" * 16, b"c" * 70), AAD)
    assert e.value.cause == cause
    # A cryptographic call sees KMSInvalidStateException, but for a ciphertext the key cannot open.
    assert type(e.value.unavailable()).__name__ == ("InvalidCiphertextException" if cause == "invalid_ciphertext"
                                                    else "KeyStoreUnavailable")


def test_the_proxy_message_is_never_echoed(proxy: Scripted) -> None:
    proxy.reply = lambda path, body: (500, {"errorName": "InternalException", "errorMessage": "pin=1234 secret"})
    with pytest.raises(XksError) as e:
        client_for(proxy).health()
    assert "1234" not in e.value.message and "secret" not in e.value.message


def test_a_slow_proxy_fails_within_the_budget(proxy: Scripted, call: Call) -> None:
    def slow(path: str, body: dict[str, Any]) -> tuple[int, Any]:
        time.sleep(2.0)
        return good_encrypt(path, body)

    proxy.reply = slow
    client = client_for(proxy, timeout=0.15)
    started = time.monotonic()
    with pytest.raises(XksError) as e:
        call(lambda: client.encrypt(KEY, "ext-1", b"p" * 70, AAD))
    took = time.monotonic() - started
    assert e.value.cause == "timeout" and "150 ms" in e.value.message
    assert took < 1.2, f"the call took {took:.3f} s"  # the budget plus scheduling slack; never the proxy's 2 s


def test_an_unreachable_proxy_is_named(proxy: Scripted, call: Call) -> None:
    proxy.close()
    with pytest.raises(XksError) as e:
        call(client_for(proxy).health)
    assert e.value.cause in ("unreachable", "timeout")


def test_the_rate_limit_throttles(proxy: Scripted) -> None:
    proxy.reply = lambda path, body: (200, {"xksProxyFleetSize": 1, "xksProxyVendor": "t", "xksProxyModel": "t",
                                            "ekmVendor": "t", "ekmFleetDetails": [{"id": "a", "model": "m",
                                                                                  "healthStatus": "ACTIVE"}]})
    client = client_for(proxy, rate_limit=5)
    client.limit = TokenBucket(5, clock=lambda: 0.0)  # time stands still: no token comes back mid-test
    outcomes = []
    for _ in range(8):
        try:
            client.health()
            outcomes.append("ok")
        except ThrottlingException:
            outcomes.append("throttled")
    assert outcomes.count("ok") == 5 and outcomes[5:] == ["throttled"] * 3


def test_health_with_every_manager_unavailable_fails(proxy: Scripted) -> None:
    proxy.reply = lambda path, body: (200, {"xksProxyFleetSize": 1, "ekmFleetDetails": [
        {"id": "a", "model": "m", "healthStatus": "UNAVAILABLE"}]})
    with pytest.raises(XksError, match="UNAVAILABLE"):
        client_for(proxy).health()
    assert "awsPrincipalArn" not in proxy.requests[0][2]["requestMetadata"]  # health names no caller


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_any_bytes_are_a_format_3_blob_or_invalid_ciphertext(data: bytes) -> None:
    from openkms.errors import InvalidCiphertextException

    candidate = bytes([blob.FORMAT_V3]) + data
    try:
        header = blob.parse_header(candidate)
    except InvalidCiphertextException:
        return
    parts = blob.unpack_v3(candidate)
    assert header.format == blob.FORMAT_V3 and len(header.raw) == blob.HEADER_V3_BYTES
    assert blob.pack_v3(header.raw, parts) == candidate


def test_blob_v3_round_trip() -> None:
    parts = blob.XksParts(os.urandom(12), b"meta", os.urandom(16), os.urandom(99))
    header = blob.header_v3(KEY.key_id, 7)
    packed = blob.pack_v3(header, parts)
    parsed = blob.parse_header(packed)
    assert (parsed.key_id, parsed.version, parsed.format) == (KEY.key_id, 7, blob.FORMAT_V3)
    assert blob.unpack_v3(packed) == parts
    assert blob.xks_aad(header, {"a": "b"}) != blob.xks_aad(header, {"a": "c"})


# -- the transport: keep-alive, framing, answers that are not HTTP ------------------------------------
HEALTHY = {"xksProxyFleetSize": 1, "xksProxyVendor": "t", "xksProxyModel": "t", "ekmVendor": "t",
           "ekmFleetDetails": [{"id": "a", "model": "m", "healthStatus": "ACTIVE"}]}


class RawProxy:
    """A TCP server that reads each request (head and Content-Length body) and writes `answer(n)`,
    the bytes of its n-th answer (from 0), as they are; it closes the connection after an answer
    when `close_after` says so. `connections` counts the connections it accepted."""

    def __init__(self, answer: Callable[[int], bytes], close_after: Callable[[int], bool] = lambda n: False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.count = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                n, self.count = self.count, self.count + 1
                try:
                    conn.sendall(self.answer(n))
                except OSError:
                    return
                if self.close_after(n):
                    return

    def close(self) -> None:
        self.sock.close()

    def client(self, **options: Any) -> XksClient:
        endpoint = XksEndpoint(f"http://127.0.0.1:{self.port}", PATH, ACCESS_KEY, SecretStr(SECRET), "us-east-1")
        return XksClient(endpoint, XksOptions(allow_http=True, **({"timeout": 5.0} | options)))


def http_answer(body: bytes, status: str = "200 OK", version: str = "HTTP/1.1", framing: str = "length",
                extra: str = "") -> bytes:
    head = f"{version} {status}\r\nContent-Type: application/json\r\n{extra}"
    if framing == "length":
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    if framing == "chunked":
        chunks = b"".join(f"{len(body[i:i + 7]):x}\r\n".encode() + body[i:i + 7] + b"\r\n"
                          for i in range(0, len(body), 7))
        return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"
    return f"{head}\r\n".encode() + body  # the body runs to the end of the connection


@pytest.fixture
def raw_proxies() -> Iterator[Callable[..., RawProxy]]:
    made: list[RawProxy] = []

    def make(*args: Any, **kwargs: Any) -> RawProxy:
        made.append(RawProxy(*args, **kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_calls_share_one_kept_alive_connection(proxy: Scripted, call: Call) -> None:
    proxy.reply = good_encrypt
    client = client_for(proxy)
    for _ in range(20):
        call(lambda: client.encrypt(KEY, "ext-1", b"p" * 70, AAD))
    assert client.connections_opened == 1 and len(proxy.requests) == 20


def test_concurrent_calls_open_at_most_pool_size_connections_that_stay(proxy: Scripted) -> None:
    proxy.reply = good_encrypt
    client = client_for(proxy, pool_size=4)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(10):
                client.encrypt(KEY, "ext-1", b"p" * 70, AAD)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(proxy.requests) == 80
    assert len(client._idle) <= 4  # the rest were closed after use
    opened = client.connections_opened
    for _ in range(10):  # one at a time now: the kept connections serve them all
        client.encrypt(KEY, "ext-1", b"p" * 70, AAD)
    assert client.connections_opened == opened


def test_concurrent_calls_on_one_loop_keep_at_most_pool_size_connections(proxy: Scripted) -> None:
    proxy.reply = good_encrypt
    # 8 connects at once overflow the test server's listen backlog (5): a dropped SYN waits 1 s.
    client = client_for(proxy, pool_size=4, timeout=5.0)

    def ten() -> None:
        for _ in range(10):
            client.encrypt(KEY, "ext-1", b"p" * 70, AAD)

    async def main() -> tuple[int, int, int]:
        await asyncio.gather(*(onloop.run(ten) for _ in range(8)))  # all eight on this one thread
        loop = asyncio.get_running_loop()
        kept, opened = len(client._loop_idle[loop]), client.connections_opened
        for _ in range(10):
            await onloop.run(lambda: client.encrypt(KEY, "ext-1", b"p" * 70, AAD))
        return kept, opened, client.connections_opened

    kept, opened, after = asyncio.run(main())
    assert len(proxy.requests) == 90 and kept <= 4 and opened > 1  # they overlapped: more than one at once
    assert after == opened  # one at a time: the kept connections serve them all
    assert not client._idle  # none of the thread's pool


@pytest.mark.parametrize("version, framing, extra", [
    ("HTTP/1.1", "length", ""), ("HTTP/1.1", "chunked", ""), ("HTTP/1.0", "eof", ""),
    ("HTTP/1.1", "length", "Connection: close\r\n"), ("HTTP/1.0", "length", ""),
])
def test_every_framing_of_an_answer_is_read(raw_proxies: Callable[..., RawProxy], version: str, framing: str,
                                            extra: str, call: Call) -> None:
    data = json.dumps(HEALTHY).encode()
    keeps = version == "HTTP/1.1" and not extra
    server = raw_proxies(lambda n: http_answer(data, version=version, framing=framing, extra=extra),
                         close_after=lambda n: not keeps)
    client = server.client()
    for _ in range(3):
        assert call(client.health)["xksProxyFleetSize"] == 1
    # Kept alive only where HTTP/1.1 says so; otherwise a connection per call, none reused after its end.
    assert client.connections_opened == (1 if keeps else 3) == server.connections


def test_a_connection_the_proxy_closed_while_idle_is_not_used(raw_proxies: Callable[..., RawProxy],
                                                              monkeypatch: pytest.MonkeyPatch, call: Call) -> None:
    # The proxy answers keep-alive and then closes anyway (its idle timeout, a restart).
    server = raw_proxies(lambda n: http_answer(json.dumps(HEALTHY).encode()), close_after=lambda n: True)
    exchanges = []
    original, original_on_loop = xks_module._Connection.exchange, xks_module._LoopConnection.exchange

    def counted(self: Any, *args: Any) -> Any:
        exchanges.append(1)
        return original(self, *args)

    def counted_on_loop(self: Any, *args: Any) -> Any:
        exchanges.append(1)
        return original_on_loop(self, *args)

    monkeypatch.setattr(xks_module._Connection, "exchange", counted)
    monkeypatch.setattr(xks_module._LoopConnection, "exchange", counted_on_loop)
    client = server.client()

    def health_then_idle() -> None:
        client.health()
        if onloop.suspendable():
            onloop.wait(asyncio.sleep(0.05))  # the loop runs meanwhile: it sees the close arrive
        else:
            time.sleep(0.05)  # the close arrives while the connection is idle in the pool

    for _ in range(3):
        call(health_then_idle)
    # Each call found the closed connection unusable before it sent anything: no failed try, no retry.
    assert client.connections_opened == 3 and server.count == 3 and len(exchanges) == 3


def test_a_connection_lost_mid_answer_is_retried_once(raw_proxies: Callable[..., RawProxy], call: Call) -> None:
    good = http_answer(json.dumps(HEALTHY).encode())
    server = raw_proxies(lambda n: good if n != 1 else good[:40], close_after=lambda n: n == 1)
    client = server.client()
    call(client.health)
    call(client.health)  # its first try is cut off after 40 bytes; the retry on a new connection succeeds
    assert server.count == 3 and client.connections_opened == 2


@pytest.mark.parametrize("answer, cause", [
    (b"HELLO\r\n\r\n", "invalid_response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "invalid_response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 1_100_000, "invalid_response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", "unreachable"),  # cut short, again on the retry
    (b"", "unreachable"),  # closed without a word, twice
    (http_answer(b"not json"), "invalid_response"),
    (http_answer(b"[1, 2]"), "invalid_response"),
])
def test_an_answer_that_is_not_one_is_named(raw_proxies: Callable[..., RawProxy], answer: bytes,
                                            cause: str, call: Call) -> None:
    server = raw_proxies(lambda n: answer, close_after=lambda n: True)
    with pytest.raises(XksError) as e:
        call(server.client(timeout=2.0).health)
    assert e.value.cause == cause


def test_a_proxy_that_never_answers_times_out_within_the_budget(raw_proxies: Callable[..., RawProxy],
                                                                call: Call) -> None:
    server = raw_proxies(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")  # and then nothing
    started = time.monotonic()
    with pytest.raises(XksError) as e:
        call(server.client(timeout=0.1).health)
    assert e.value.cause == "timeout" and "100 ms" in e.value.message
    assert time.monotonic() - started < 1.0


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300) | st.builds(
    lambda head, body: head + b"\r\n\r\n" + body,
    st.sampled_from([b"HTTP/1.1 200 OK\r\nContent-Length: 12", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",
                     b"HTTP/1.0 200 OK", b"HTTP/1.1 500 Oops\r\nContent-Length: 3"]),
    st.binary(max_size=60)))
def test_any_bytes_as_an_answer_are_an_answer_or_an_xks_error(data: bytes) -> None:
    server = RawProxy(lambda n: data, close_after=lambda n: True)
    try:
        for on_loop in (False, True):
            client = server.client(timeout=1.0)
            try:  # anything but an XksError (a parser's own, a KeyError) fails
                asyncio.run(onloop.run(client.health)) if on_loop else client.health()
            except XksError as exc:
                assert exc.message and "Traceback" not in exc.message
    finally:
        server.close()


def test_a_connection_above_descriptor_1023_is_kept_alive_too(proxy: Scripted) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # the next socket gets a high number
    try:
        proxy.reply = good_encrypt
        client = client_for(proxy)
        for _ in range(5):
            client.encrypt(KEY, "ext-1", b"p" * 70, AAD)
        assert client._idle and client._idle[0]._sock.fileno() > 1023
        assert client.connections_opened == 1  # select.select could not have told it was still open
        client.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
