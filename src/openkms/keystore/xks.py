"""External key stores: every use of a key calls out to the customer's XKS proxy (XKS proxy API
v1.0.3), which encrypts and decrypts with a key the customer's external key manager holds.

`XksClient` speaks the proxy API: JSON over HTTPS (or plain HTTP where the operator allows it),
requests signed with SigV4 for the service `kms-xks-proxy` (openkms/sigv4.py, botocore's
algorithm), over pooled keep-alive HTTP/1.1 connections whose answers httptools (llhttp) parses.
Each call has a budget (250 ms by default) that covers one retry after a
network failure, and a per-store rate limit (1,800 calls/s by default: AWS's quota per external key
store) beyond which callers get ThrottlingException. Every answer is checked before it is used
(lengths, the ciphertext's integrity value); a failure becomes an `XksError` that names its cause.

`XksKeyStore` is a KeyStore for one external key store. Keys are double-encrypted, as AWS does it:
the key's own material (made here and sealed under the root key, like the software store's) seals
the plaintext first, then the external key seals that inner blob through the proxy (format 3 of
crypto/blob.py). Neither openkms nor the external key manager alone can decrypt; switching off the
external key, the proxy or the credential makes the data unreadable at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import re
import select
import socket
import ssl
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import httptools
import orjson

from .. import onloop
from ..audit.context import current_request
from ..crypto import blob
from ..crypto.aead import TAG_BYTES
from ..crypto.openssl import clear_error_queue
from ..errors import InvalidCiphertextException, KeyStoreUnavailable, ThrottlingException
from ..model import Key, KeyFamily, KeySpecInfo, SecretStr
from ..ratelimit import TokenBucket
from ..sigv4 import SigV4Signer
from .base import KeyStore, StoredVersion

log = logging.getLogger("openkms.keystore.xks")

SERVICE = "kms-xks-proxy"
API = "/kms/xks/v1"
MIN_PLAINTEXT = 4300  # what a proxy must accept (spec); openkms's inner blobs are far smaller
MAX_ANSWER = 1 << 20  # bytes of a proxy's answer, head and body (a real one is a few KiB)
DEFAULT_TIMEOUT = 0.25
DEFAULT_RATE = 1800.0


@dataclass(frozen=True)
class XksOptions:
    """How this node reaches XKS proxies (OPENKMS_XKS_* settings)."""

    ca_bundle: str = ""  # PEM file of the CAs a proxy's certificate must chain to ("" = system CAs)
    client_cert: str = ""  # PEM certificate (chain) to present to proxies that require mTLS
    client_key: str = ""
    allow_http: bool = False  # plain http:// endpoints (a proxy on a trusted network only)
    timeout: float = DEFAULT_TIMEOUT  # seconds per proxy call, a retry included
    rate_limit: float = DEFAULT_RATE  # calls per second per external key store, on this node
    # Idle keep-alive connections kept per external key store (per event loop, and for threads).
    # Above the calls in flight at once (each needs its own), or every call past it would pay a
    # TLS handshake; the proxy closes the ones it finds idle too long, and they are not used then.
    pool_size: int = 256


@dataclass(frozen=True)
class XksEndpoint:
    """Where one external key store's proxy is, and the credential that signs its requests."""

    uri_endpoint: str  # scheme://host[:port]
    uri_path: str  # the prefix ending in /kms/xks/v1
    access_key_id: str
    secret: SecretStr
    region: str

    def __repr__(self) -> str:
        return f"XksEndpoint({self.uri_endpoint}{self.uri_path}, access key {self.access_key_id[:4]}...)"


class XksError(Exception):
    """A proxy call that failed, with its cause:

    unreachable, timeout, tls: the network; auth (401), denied (403), uri_path (404 InvalidUriPath),
    key_not_found (404), invalid_state, invalid_key_usage, invalid_ciphertext, validation (400),
    throttled (429), internal (500), unsupported (501), dependency_timeout (503); invalid_response:
    an answer that is not what the spec says.
    """

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.message = message

    def unavailable(self) -> Exception:
        """What a cryptographic call answers: KMSInvalidStateException naming the cause, but for a
        ciphertext the external key cannot open (InvalidCiphertextException)."""
        if self.cause == "invalid_ciphertext":
            return InvalidCiphertextException()
        return KeyStoreUnavailable(self.message)


_ERROR_CAUSES = {
    "AuthenticationFailedException": "auth",
    "AccessDeniedException": "denied",
    "InvalidUriPathException": "uri_path",
    "KeyNotFoundException": "key_not_found",
    "InvalidStateException": "invalid_state",
    "InvalidKeyUsageException": "invalid_key_usage",
    "InvalidCiphertextException": "invalid_ciphertext",
    "ValidationException": "validation",
    "ThrottlingException": "throttled",
    "InternalException": "internal",
    "UnsupportedOperationException": "unsupported",
    "DependencyTimeoutException": "dependency_timeout",
}
_MESSAGES = {
    "auth": "The external key store proxy rejected the authentication credential (AuthenticationFailedException).",
    "denied": "The external key store proxy denied the request (AccessDeniedException).",
    "uri_path": "The external key store proxy does not serve the key store's URI path (InvalidUriPathException).",
    "key_not_found": "The external key manager has no key {key} (KeyNotFoundException).",
    "invalid_state": "The external key {key} is not enabled in the external key manager (InvalidStateException).",
    "invalid_key_usage": "The external key {key} does not allow this operation (InvalidKeyUsageException).",
    "invalid_ciphertext": "The external key manager cannot decrypt the ciphertext (InvalidCiphertextException).",
    "validation": "The external key store proxy refused the request as invalid (ValidationException).",
    "throttled": "The external key store proxy is throttling requests (ThrottlingException).",
    "internal": "The external key store proxy failed (InternalException).",
    "unsupported": "The external key store proxy does not support the operation (UnsupportedOperationException).",
    "dependency_timeout": "The external key manager did not answer the proxy in time (DependencyTimeoutException).",
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise XksError("invalid_response", f"The external key store proxy returned no valid {what}.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise XksError("invalid_response", f"The external key store proxy returned a {what} that is not base64.") \
            from None


def request_metadata(operation: str | None = None, key: Key | None = None, *, health: bool = False
                     ) -> dict[str, str]:
    """The spec's requestMetadata: who is calling, on which key, in which KMS operation and request
    (the request id the caller and the audit log see), so the proxy can log and authorize each use."""
    current = current_request.get()
    meta: dict[str, str] = {
        "kmsRequestId": current.request_id if current is not None else str(uuid.uuid4()),
        "kmsOperation": operation or (current.operation if current is not None else "") or "Unknown",
    }
    if not health:
        principal = current.principal_arn if current is not None and current.principal_arn else None
        if principal is None and key is not None:
            principal = f"arn:aws:iam::{key.account_id}:root"  # work of the service itself
        meta["awsPrincipalArn"] = principal or "arn:aws:iam::000000000000:root"
    if key is not None:
        meta["kmsKeyArn"] = key.arn
    return meta


class XksClient:
    """The XKS proxy API of one external key store."""

    def __init__(self, endpoint: XksEndpoint, options: XksOptions) -> None:
        self.endpoint = endpoint
        self.options = options
        self.limit = TokenBucket(options.rate_limit)
        parts = urlsplit(endpoint.uri_endpoint)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("not an http(s) endpoint")
        self._host_header = parts.netloc
        self._address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        self._tls = tls_context(options) if parts.scheme == "https" else None
        # Idle keep-alive connections, the last used first (deque's append and pop are atomic);
        # a call that finds none opens one, and a connection beyond pool_size is closed after use.
        self._idle: deque[_Connection] = deque()
        # A request served on the event loop (onloop.py) uses a connection of that loop's own.
        self._loop_idle: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, deque[_LoopConnection]] = \
            weakref.WeakKeyDictionary()
        self._closed = False
        self._lock = threading.Lock()
        self._signer = SigV4Signer(endpoint.access_key_id, endpoint.secret, endpoint.region, SERVICE)
        self.connections_opened = 0  # for tests: keep-alive at work

    def __repr__(self) -> str:
        return f"XksClient({self.endpoint!r})"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            on_loops = [(loop, list(idle)) for loop, idle in self._loop_idle.items()]
            self._loop_idle.clear()
        while self._idle:
            self._idle.pop().close()
        for loop, connections in on_loops:  # closed on their own loop's thread
            for connection in connections:
                with contextlib.suppress(RuntimeError):  # that loop is closed: so are its connections
                    loop.call_soon_threadsafe(connection.close)

    # -- the four APIs ------------------------------------------------------------------------------
    def health(self, operation: str = "KmsHealthCheck") -> dict[str, Any]:
        """GetHealthStatus: the proxy's answer, checked. An answer whose every external key manager
        is UNAVAILABLE is a failure (the store cannot serve)."""
        answer = self._post(f"{API}/health", {"requestMetadata": request_metadata(operation, health=True)}, None)
        fleet = answer.get("ekmFleetDetails")
        if not isinstance(answer.get("xksProxyFleetSize"), int) or not isinstance(fleet, list) or not fleet or \
                not all(isinstance(e, dict) and e.get("healthStatus") in ("ACTIVE", "DEGRADED", "UNAVAILABLE")
                        for e in fleet):
            raise XksError("invalid_response", "The external key store proxy's health status is not what the XKS "
                                               "API specifies.")
        if all(e["healthStatus"] == "UNAVAILABLE" for e in fleet):
            raise XksError("dependency_timeout", "The external key store proxy reports every external key manager "
                                                 "UNAVAILABLE.")
        return answer

    def metadata(self, xks_key_id: str, operation: str = "CreateKey") -> dict[str, Any]:
        answer = self._post(f"{API}/keys/{xks_key_id}/metadata",
                            {"requestMetadata": request_metadata(operation)}, xks_key_id)
        usage = answer.get("keyUsage")
        if not isinstance(answer.get("keySpec"), str) or not isinstance(usage, list) or \
                not isinstance(answer.get("keyStatus"), str):
            raise XksError("invalid_response", "The external key store proxy's key metadata is not what the XKS API "
                                               "specifies.")
        return answer

    def encrypt(self, key: Key, xks_key_id: str, plaintext: bytes, aad: bytes) -> blob.XksParts:
        answer = self._post(f"{API}/keys/{xks_key_id}/encrypt", {
            "requestMetadata": request_metadata(None, key), "plaintext": _b64(plaintext),
            "encryptionAlgorithm": "AES_GCM", "additionalAuthenticatedData": _b64(aad),
            "ciphertextDataIntegrityValueAlgorithm": "SHA_256"}, xks_key_id)
        ciphertext = _unb64(answer.get("ciphertext"), "ciphertext")
        iv = _unb64(answer.get("initializationVector"), "initializationVector")
        tag = _unb64(answer.get("authenticationTag"), "authenticationTag")
        metadata = _unb64(answer["ciphertextMetadata"], "ciphertextMetadata") \
            if answer.get("ciphertextMetadata") is not None else b""
        integrity = _unb64(answer.get("ciphertextDataIntegrityValue"), "ciphertextDataIntegrityValue")
        if len(iv) not in blob.XKS_IV_BYTES or len(tag) != TAG_BYTES or len(metadata) > blob.XKS_MAX_METADATA \
                or len(ciphertext) != len(plaintext):
            raise XksError("invalid_response", "The external key store proxy's ciphertext has invalid lengths.")
        expected = hashlib.sha256(aad + metadata + iv + ciphertext + tag).digest()
        if not hmac.compare_digest(expected, integrity):
            raise XksError("invalid_response", "The external key store proxy's ciphertext fails its integrity "
                                               "check.")
        return blob.XksParts(iv, metadata, tag, ciphertext)

    def decrypt(self, key: Key, xks_key_id: str, parts: blob.XksParts, aad: bytes) -> bytes:
        payload: dict[str, Any] = {
            "requestMetadata": request_metadata(None, key), "ciphertext": _b64(parts.ciphertext),
            "encryptionAlgorithm": "AES_GCM", "initializationVector": _b64(parts.iv),
            "authenticationTag": _b64(parts.tag), "additionalAuthenticatedData": _b64(aad)}
        if parts.metadata:
            payload["ciphertextMetadata"] = _b64(parts.metadata)
        plaintext = _unb64(self._post(f"{API}/keys/{xks_key_id}/decrypt", payload, xks_key_id).get("plaintext"),
                           "plaintext")
        if len(plaintext) != len(parts.ciphertext):
            raise XksError("invalid_response", "The external key store proxy's plaintext has an invalid length.")
        return plaintext

    # -- transport ----------------------------------------------------------------------------------
    def _post(self, api: str, payload: dict[str, Any], xks_key_id: str | None) -> dict[str, Any]:
        if not self.limit.take():
            raise ThrottlingException("The external key store's request rate is above its quota "
                                      f"({self.options.rate_limit:g}/s).")
        path = self.endpoint.uri_path + api[len(API):] if api.startswith(API) else api
        body = orjson.dumps(payload)
        deadline = time.monotonic() + self.options.timeout
        for attempt in (1, 2):
            try:
                status, data = self._send(path, body, deadline)
                break
            except XksError as exc:
                # One retry after a network failure (a kept-alive connection the proxy closed, a
                # lost packet), if the budget leaves time for it.
                if attempt == 2 or exc.cause not in ("unreachable", "timeout") or \
                        deadline - time.monotonic() < 0.005:
                    raise
        return self._answer(status, data, xks_key_id)

    def _send(self, path: str, body: bytes, deadline: float) -> tuple[int, bytes]:
        """One exchange on a kept-alive connection (or a new one); XksError on any failure."""
        if deadline - time.monotonic() <= 0:
            raise XksError("timeout", self._timed_out())
        headers = {"Host": self._host_header, "Content-Type": "application/json"}
        headers.update(self._signer.sign("POST", path, headers, body))
        request = (f"POST {quote(path, safe='/~')} HTTP/1.1\r\n" +
                   "".join(f"{k}: {v}\r\n" for k, v in headers.items()) +
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        if onloop.suspendable():  # a request served on the event loop: wait there, not on this thread
            return onloop.wait(self._send_on_loop(request, deadline))
        clear_error_queue()  # what a PKCS#11 module on this thread may have left (crypto/openssl.py)
        connection = _reuse(self._idle)
        if connection is None:
            self.connections_opened += 1
            connection = _Connection.open(self._address, self._tls, deadline, self._timed_out)
        try:
            status, data, keep = connection.exchange(request, deadline, self._timed_out)
        except BaseException:
            connection.close()
            raise
        self._done_with(self._idle, connection, keep)
        return status, data

    async def _send_on_loop(self, request: bytes, deadline: float) -> tuple[int, bytes]:
        """`_send`'s exchange on the running event loop, on a connection of its own."""
        loop = asyncio.get_running_loop()
        with self._lock:
            idle = self._loop_idle.setdefault(loop, deque())
        connection: _LoopConnection | None = None
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                connection = _reuse(idle)
                if connection is None:
                    self.connections_opened += 1
                    connection = await _LoopConnection.open(self._address, self._tls)
                status, data, keep = await connection.exchange(request)
        except BaseException as exc:
            if connection is not None:
                connection.close()
            if isinstance(exc, OSError):  # TimeoutError (the budget) among them
                raise _network_error(exc, self._timed_out) from None
            raise
        self._done_with(idle, connection, keep)
        return status, data

    def _done_with(self, idle: deque[_C], connection: _C, keep: bool) -> None:
        """Back to the idle ones if it may be reused and there is room (and the client is open)."""
        with self._lock:
            keep = keep and not self._closed and len(idle) < self.options.pool_size
            if keep:
                idle.append(connection)
        if not keep:
            connection.close()

    def _timed_out(self) -> str:
        return f"The external key store proxy did not answer within {self.options.timeout * 1000:g} ms."

    def _answer(self, status: int, data: bytes, xks_key_id: str | None) -> dict[str, Any]:
        try:
            parsed = orjson.loads(data) if data else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if status == 200:
            if not isinstance(parsed, dict):
                raise XksError("invalid_response", "The external key store proxy's answer is not a JSON object.")
            return parsed
        name = parsed.get("errorName") if isinstance(parsed, dict) else None
        cause = _ERROR_CAUSES.get(name) if isinstance(name, str) else None
        if cause is None:
            cause = {401: "auth", 403: "denied", 429: "throttled"}.get(status)
        if cause is None:
            raise XksError("invalid_response", f"The external key store proxy answered HTTP {status} without an error "
                                               "the XKS API specifies.")
        raise XksError(cause, _MESSAGES[cause].format(key=xks_key_id or "?"))


class _Pooled(Protocol):
    def usable(self) -> bool: ...

    def close(self) -> None: ...


_C = TypeVar("_C", bound=_Pooled)


def _reuse(idle: deque[_C]) -> _C | None:
    """The idle connection used last that is still usable (closing those that are not: the proxy
    closed them while idle, or sent what it should not), or None."""
    while True:
        try:
            connection = idle.pop()
        except IndexError:
            return None
        if connection.usable():
            return connection
        connection.close()


TOO_LARGE = "The external key store proxy's answer is too large."
NOT_HTTP = "The external key store proxy's answer is not HTTP/1.1."


def _short(exc: BaseException) -> str:
    """A reason for a message: what the error says in its first line, never request data."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"[:160]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:160]
    text = str(exc).splitlines()[0] if str(exc) else ""
    return re.sub(r"^\[[^\]]*\] ", "", text)[:160] or type(exc).__name__


def _network_error(exc: OSError, timed_out: Callable[[], str]) -> XksError:
    """A socket's failure as the cause it names: no answer in time, TLS, or the proxy not reachable
    (refused, reset, no route, no such name)."""
    if isinstance(exc, TimeoutError):
        return XksError("timeout", timed_out())
    if isinstance(exc, ssl.SSLError):
        return XksError("tls", f"The TLS connection to the external key store proxy failed: {_short(exc)}.")
    return XksError("unreachable", f"The external key store proxy is not reachable: {_short(exc)}.")


class _Answer:
    """httptools' callbacks for one answer."""

    __slots__ = ("body", "complete", "framed", "headers_done", "keep_alive", "messages", "parser")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.complete = False
        self.framed = False  # Content-Length or chunked; otherwise the body runs to the connection's end
        self.headers_done = False
        self.keep_alive = False
        self.messages = 0

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # what it says only inside this callback


class _Connection:
    """One HTTP/1.1 connection to a proxy (TLS unless the endpoint is http://), one exchange at a
    time, kept alive between exchanges."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def open(cls, address: tuple[str, int], tls: ssl.SSLContext | None, deadline: float,
             timed_out: Callable[[], str]) -> _Connection:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise XksError("timeout", timed_out())
        try:
            sock = socket.create_connection(address, timeout=remaining)
        except OSError as exc:  # refused, no route, no such name, no answer in time
            raise _network_error(exc, timed_out) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock = tls.wrap_socket(sock, server_hostname=address[0])
        except OSError as exc:
            sock.close()
            raise _network_error(exc, timed_out) from None
        return cls(sock)

    def usable(self) -> bool:
        """An idle connection the proxy has neither closed nor written to."""
        try:
            if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
                return False
            poller = select.poll()  # not select.select: it cannot watch a descriptor above 1023
            poller.register(self._sock, select.POLLIN)
            return not poller.poll(0)  # readable while idle: closed by the proxy, or data it should not send
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def exchange(self, request: bytes, deadline: float, timed_out: Callable[[], str]) -> tuple[int, bytes, bool]:
        """(status, body, whether the connection may be reused)."""
        answer = _Answer()
        parser = answer.parser
        received = 0
        try:
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            self._sock.sendall(request)
            while not answer.complete:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self._sock.settimeout(remaining)
                data = self._sock.recv(65536)
                if not data:
                    if answer.headers_done and not answer.framed:
                        break  # the body ran to the end of the connection
                    raise ConnectionResetError("the proxy closed the connection before it answered")
                received += len(data)
                if received > MAX_ANSWER:
                    raise XksError("invalid_response", TOO_LARGE)
                parser.feed_data(data)
        except httptools.HttpParserError:
            raise XksError("invalid_response", NOT_HTTP) from None
        except OSError as exc:
            raise _network_error(exc, timed_out) from None
        keep = answer.complete and answer.keep_alive and answer.messages == 1
        return parser.get_status_code(), b"".join(answer.body), keep


class _LoopConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a proxy on an event loop (TLS by the loop, unless http://), one
    exchange at a time, kept alive between exchanges; what arrives is fed to httptools as it comes.
    Used only on its loop's thread."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._answer: _Answer | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._received = 0
        self._broken = False  # the proxy closed it, or wrote to it while no answer was due

    @classmethod
    async def open(cls, address: tuple[str, int], tls: ssl.SSLContext | None) -> _LoopConnection:
        """Connected (and through the TLS handshake); OSError as the loop raises it."""
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, address[0], address[1], ssl=tls,
                                                   server_hostname=address[0] if tls is not None else None)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport: create_connection

    def data_received(self, data: bytes) -> None:
        answer = self._answer
        if answer is None or self._waiter is None or self._waiter.done():
            self._broken = True  # bytes no request asked for: never reused
            return
        self._received += len(data)
        if self._received > MAX_ANSWER:
            self._settle(XksError("invalid_response", TOO_LARGE))
            return
        try:
            answer.parser.feed_data(data)
        except httptools.HttpParserError:
            self._settle(XksError("invalid_response", NOT_HTTP))
            return
        if answer.complete:
            self._settle(None)

    def eof_received(self) -> bool:
        self._ended()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()

    def _ended(self) -> None:
        self._broken = True
        answer = self._answer
        if answer is not None and answer.headers_done and not answer.framed:
            self._settle(None)  # the body ran to the end of the connection
        else:
            self._settle(ConnectionResetError("the proxy closed the connection before it answered"))

    def _settle(self, error: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def usable(self) -> bool:
        """An idle connection the proxy has neither closed nor written to."""
        return not self._broken and self._transport is not None and not self._transport.is_closing()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """(status, body, whether the connection may be reused); OSError or XksError."""
        assert self._transport is not None
        answer = self._answer = _Answer()
        self._received = 0
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        await self._waiter
        keep = answer.complete and answer.keep_alive and answer.messages == 1 and not self._broken
        return answer.parser.get_status_code(), b"".join(answer.body), keep


def tls_context(options: XksOptions) -> ssl.SSLContext:
    """TLS 1.2 or later; the proxy's certificate checked against the configured CAs and its name;
    the node's client certificate presented where one is configured (mTLS)."""
    context = ssl.create_default_context(cafile=options.ca_bundle or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.client_cert:
        context.load_cert_chain(options.client_cert, options.client_key or None)
    return context


@dataclass(frozen=True)
class XksHealth:
    """What this node last learnt of a proxy's health (polled in the background)."""

    status: str  # ACTIVE, DEGRADED (some external key managers down), UNAVAILABLE (the proxy cannot serve)
    checked: datetime
    detail: str


class XksKeyStore:
    """The keys of one external key store: double encryption (see the module docstring)."""

    name = "xks"
    blocking = True

    def __init__(self, inner: KeyStore, client: XksClient, custom_key_store_id: str) -> None:
        self._inner = inner  # the node's default store: keeps each key's own material
        self.client = client
        self._id = custom_key_store_id
        self.health: XksHealth | None = None

    def check_health(self) -> XksHealth:
        """GetHealthStatus now; the answer is kept in `health` (DescribeCustomKeyStores shows it)."""
        now = datetime.now(UTC)
        try:
            answer = self.client.health("KmsHealthCheck")
        except XksError as exc:
            health = XksHealth("UNAVAILABLE", now, exc.message)
        except ThrottlingException:
            return self.health or XksHealth("ACTIVE", now, "not checked: the store's request rate is at its quota")
        else:
            fleet = answer["ekmFleetDetails"]
            down = sum(1 for e in fleet if e["healthStatus"] != "ACTIVE")
            health = XksHealth("DEGRADED" if down else "ACTIVE", now,
                               f"{len(fleet) - down} of {len(fleet)} external key managers ACTIVE")
        if self.health is None or self.health.status != health.status:
            log.log(logging.INFO if health.status == "ACTIVE" else logging.WARNING,
                    "external key store %s: proxy health %s (%s)", self._id, health.status, health.detail)
        self.health = health
        return health

    def __repr__(self) -> str:
        return f"XksKeyStore({self._id!r})"

    @staticmethod
    def supports(spec: KeySpecInfo) -> bool:
        return spec.family is KeyFamily.SYMMETRIC and spec.name == "SYMMETRIC_DEFAULT"

    def close(self) -> None:
        self.client.close()

    def create_version(self, key: Key, version: int) -> StoredVersion:
        return self._inner.create_version(key, version)

    def destroy(self, key: Key, version: int | None = None) -> None:
        # The key's own material is in the rows the caller deletes; the external key stays in the
        # external key manager, which the customer runs (as in AWS).
        self._inner.destroy(key, version)

    def evict(self, key_id: str, version: int | None = None) -> None:
        self._inner.evict(key_id, version)

    @staticmethod
    def _xks_key_id(key: Key) -> str:
        if not key.xks_key_id:
            raise KeyStoreUnavailable(f"{key.arn} has no external key.")
        return key.xks_key_id

    def encrypt(self, key: Key, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        inner = self._inner.encrypt(key, plaintext, context)
        header = blob.header_v3(key.key_id, key.current_version)
        try:
            parts = self.client.encrypt(key, self._xks_key_id(key), inner, blob.xks_aad(header, context))
        except XksError as exc:
            raise exc.unavailable() from None
        return blob.pack_v3(header, parts)

    def decrypt(self, key: Key, version: int, ciphertext: bytes, context: Mapping[str, str] | None) -> bytes:
        header = blob.parse_header(ciphertext)
        if header.format != blob.FORMAT_V3 or header.key_id != key.key_id or header.version != version:
            raise InvalidCiphertextException()
        parts = blob.unpack_v3(ciphertext)
        try:
            inner = self.client.decrypt(key, self._xks_key_id(key), parts, blob.xks_aad(header.raw, context))
        except XksError as exc:
            raise exc.unavailable() from None
        opened = blob.parse_header(inner)
        if opened.format != blob.FORMAT_V1 or opened.key_id != key.key_id or opened.version != version:
            raise InvalidCiphertextException()
        return self._inner.decrypt(key, version, inner, context)
