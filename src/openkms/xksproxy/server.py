"""HTTP/1.1 for the XKS proxy: asyncio, the stdlib `ssl` module and httptools (llhttp, Node.js's
parser, in C; h11, in pure Python, cost some 100 us of CPU more per request).

Why not the server openkms itself runs on (granian): the proxy must see the client's certificate.
granian's TLS cannot show the application the peer's certificate, so it cannot check the subject
name AWS KMS presents; Python's `ssl` can require a client certificate from a given CA during the
handshake and hand the verified certificate to the application right after it.

TLS runs here over memory BIOs (ssl.SSLObject) rather than through asyncio's `ssl=` transports:
asyncio closes a connection whose handshake failed without sending the alert OpenSSL wrote, so a
refused client would see only an EOF, and the proxy could not log why it refused. Here the alert
is sent (handshake failure / certificate required, certificate expired, unknown CA, ...) and a
warning names the client and the reason. It is also cheaper than asyncio's layering.

- TLS 1.2 or later only; TLS 1.2 offers only forward-secret AEAD suites (ECDHE with AES-GCM or
  ChaCha20-Poly1305: the spec's TLS_ECDHE_RSA/ECDSA_WITH_AES_256_GCM_SHA384 among them), TLS 1.3
  its defaults (TLS_AES_256_GCM_SHA384 and TLS_CHACHA20_POLY1305_SHA256 among them).
- mTLS with [tls] client_ca: a client certificate chained to that CA is required at the handshake;
  a missing, expired or otherwise unverifiable one fails the handshake. With client_dns_name (which
  config.py requires with client_ca unless client_any_name = true) the name must also be among the
  certificate's subjectAltName DNS names (or be its subject CN when it has none). Python's `ssl`
  cannot check a client's name inside the handshake, so that check is made the moment the
  handshake completes, and the connection is closed (close_notify) before a byte of any request is
  read.
- Keep-alive connections, one request at a time on each (pipelined requests wait their turn); a
  request line and headers of up to 16 KiB, whether they arrive in pieces or in one read (431 past
  it), bodies up to [limits]' sizes plus room for requestMetadata (413 past it). What llhttp's
  strict parse refuses, HTTP/0.9, and an HTTP/1.1 request without Host (or any with two) get 400.
  A request refused that way is answered, then the connection is half-closed and what the client
  still sends is read and dropped for a second, so that its kernel does not reset the connection
  before it reads the answer. `Expect: 100-continue` gets `100 Continue` once the headers are read.
- A handshake must complete within 2 s; a request must arrive within [server] request_timeout_ms
  of its first byte and be answered within the same time again (503 past it); an idle connection
  is closed after idle_timeout_seconds.
- At most max_connections are open at once, and at most max_handshakes of them still in their TLS
  handshake. A connection past max_connections closes the longest-idle one (no request in flight)
  to make room, and is refused only when none is idle; one past max_handshakes takes the place of
  the oldest handshake if that has gone on for HANDSHAKE_GRACE_S already (a client's handshake
  takes a round trip or two; sockets that never start one are what fills the slots). Refusals are
  logged at most once a second, with their count.
- SIGHUP reloads the file's key stores (credentials, allow-lists, disabled keys, quotas) without
  dropping a connection; one that arrives while the proxy is starting is held and acted on once
  the proxy serves (cli.py's StartupSighup). SIGTERM and SIGINT stop accepting, let requests in flight
  finish (5 s at most) and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, NamedTuple, cast

import httptools

from .app import JSON, Request, Response, XksApp, compare
from .config import Config, ConfigError, TlsSettings, load
from .errors import DependencyTimeoutException

log = logging.getLogger("openkms.xksproxy")

MAX_HEADER_BYTES = 16 * 1024
HANDSHAKE_TIMEOUT_S = 2.0
HANDSHAKE_GRACE_S = 0.5  # a handshake younger than this is not displaced by a new connection
DRAIN_S = 5.0  # at SIGTERM: how long requests in flight may take to finish
REFUSED_DRAIN_S = 1.0  # after a refused request: how long what the client still sends is read and dropped
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
FEED_BYTES = 16 * 1024  # what is given to the parser at a time (see Connection._parse)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
TOO_LARGE_HEAD = f"The request's line and headers are larger than {MAX_HEADER_BYTES} bytes."
NOT_HTTP = "The request is not valid HTTP/1.1."


def _no_password() -> str:
    raise ConfigError("the [tls] key is encrypted; give the proxy an unencrypted key file (mode 0600)")


def ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The server's TLS context; ConfigError (one line) if a file is missing or unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    for what, path in (("cert", tls.cert), ("key", tls.key), ("client_ca", tls.client_ca)):
        if path is not None and not path.is_file():
            raise ConfigError(f"[tls] {what}: no such file {path}")
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(f"[tls] cert {tls.cert} and key {tls.key}: not a certificate and its key "
                          f"({exc.reason or exc.__class__.__name__})") from None
    except OSError as exc:
        raise ConfigError(f"[tls] cert/key: {exc.strerror}") from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (ssl.SSLError, OSError):
            raise ConfigError(f"[tls] client_ca {tls.client_ca}: not a PEM CA certificate") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def name_in_certificate(cert: dict[str, Any], name: str) -> bool:
    """Whether the verified peer certificate names `name`: among its subjectAltName DNS names, or,
    for a certificate without any, as its subject CN (exact, case-insensitive)."""
    wanted = name.lower().rstrip(".")
    dns = [str(value).lower().rstrip(".") for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if dns:
        return wanted in dns
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and str(value).lower().rstrip(".") == wanted:
                return True
    return False


class _Stop(Exception):
    """Raised in a parser callback: the request is refused, nothing more is parsed."""


class Refusal(NamedTuple):
    """A request that cannot be read, answered in its turn (after the requests before it)."""
    status: int
    message: str
    client_close: bool = False  # the client had asked to close (its headers were read)


class Complete(NamedTuple):
    """A request read whole, answered in its turn."""
    request: Request
    head: bool  # HEAD: the answer carries no body
    close: bool  # the client ends keep-alive (Connection: close, HTTP/1.0)


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    """The status line, with the reason phrase HTTPStatus knows (none for a code it does not)."""
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
    return line


class Connection(asyncio.Protocol):
    """One client connection: httptools (llhttp) parses, the app answers, one request at a time.

    llhttp cannot stop in the middle of what it is given: the requests it completes are queued and
    answered in order. Bytes are given to it FEED_BYTES at a time, and no more while a request
    waits, so that what a client pipelines waits as bytes, not as parsed requests. Reading goes on
    while a request is answered until more than the largest request's worth waits (`_waiting_max`);
    then it pauses, and resumes only once what waits has been parsed down below that, so a client
    that pipelines without end holds at most that plus one read here. The on_* methods are llhttp's
    callbacks, for the request being parsed."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()  # made by the server's protocol factory, on the loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[Complete | Refusal] = deque()  # parsed, not yet answered
        self.buffer = b""  # received, not yet parsed: from self.offset on
        self.offset = 0
        self.broken = False  # a Refusal is queued: nothing more is parsed
        self.eof = False  # the client has sent all it will
        # The request being parsed.
        self.in_head = False  # begun, its line and headers not complete
        self.in_body = False  # its headers complete, its body not
        self.head_size = 0  # the line and headers as h11 measured them (the optional whitespace left out)
        self.head_read = 0  # the bytes given to the parser since it began, when known (see _parse)
        self.completed = False  # a request completed in the bytes given to the parser last
        self.url = b""
        self.headers: dict[str, str] = {}
        self.hosts = 0
        self.body = bytearray()
        self.method = b""
        self.keep_alive = True
        self.expect_continue = False  # Expect: 100-continue, and no body yet
        self.upgrade = False
        self.upgraded: tuple[bytes, bytes, dict[str, str], bool] | None = None  # see _upgraded
        self.resume: tuple[bytes, bytes, dict[str, str], bool] | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.peer = ""
        self.reading = False  # a request has begun to arrive
        self.paused = False  # reading paused: more than a request's worth waits behind the answer in progress
        self.write_paused = False  # the transport's send buffer is full (a client that does not read)
        self.timed_out = False
        self.tls: ssl.SSLObject | None = None
        self.incoming: ssl.MemoryBIO | None = None
        self.outgoing: ssl.MemoryBIO | None = None
        self.handshaken = False
        self.shut = False  # close_notify sent
        self.draining = False  # refused: what arrives is dropped until the client closes

    # -- the connection: TCP, then TLS over memory BIOs ---------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        server = self.server
        settings = server.config.server
        context = server.context
        if context is not None and len(server.handshaking) >= settings.max_handshakes:
            oldest = next(iter(server.handshaking))
            if self.loop.time() - server.handshaking[oldest] < HANDSHAKE_GRACE_S:
                self._refused(f"{len(server.handshaking)} TLS handshakes are in progress already")
                return
            oldest._abort()  # a socket that has not finished its handshake yet: it makes room
        if len(server.connections) >= settings.max_connections:
            if not server.idle:
                self._refused(f"{len(server.connections)} connections are open already, none of them idle")
                return
            server.closed_idle.add(f"for a new one (max_connections {settings.max_connections})")
            next(iter(server.idle))._close()  # the longest idle: its client opens another when it needs one
        server.connections.add(self)
        if context is None:
            server.idle[self] = None
            self._arm(settings.idle_timeout_s)
            return
        server.handshaking[self] = self.loop.time()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self._arm(HANDSHAKE_TIMEOUT_S)

    def _refused(self, why: str) -> None:
        assert self.transport is not None
        self.server.refusals.add(f"from {self.peer}: {why}")
        self.transport.abort()
        self.transport = None

    def _release(self) -> None:
        """No longer counted: the connection is closing."""
        server = self.server
        server.connections.discard(self)
        server.handshaking.pop(self, None)
        server.idle.pop(self, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self._disarm()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.draining:
            return
        if self.tls is None or self.incoming is None:
            self._received(data)
            return
        self.incoming.write(data)
        if not self.handshaken and not self._handshake():
            return
        chunks, closed = [], False
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the client's close_notify
                closed = True
                break
            except ssl.SSLError:
                self._flush()
                self._abort()
                return
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
        self._flush()  # what reading produced (a key update's answer, an alert)
        if chunks:
            self._received(b"".join(chunks))
        if closed:
            self.eof_received()

    def _handshake(self) -> bool:
        """Go on with the TLS handshake; True once it is complete and the client accepted. A
        refused client gets OpenSSL's alert (the BIO is flushed before the connection closes) and
        a log line saying why; nothing it sent is read."""
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLCertVerificationError as exc:
            self._flush()
            log.warning("refused a TLS client %s at the handshake: %s", self.peer, exc.verify_message or exc.reason)
            self._abort()
            return False
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            reason = getattr(exc, "reason", None) or type(exc).__name__
            if reason not in ("UNEXPECTED_EOF_WHILE_READING", "WRONG_VERSION_NUMBER", "HTTP_REQUEST"):
                log.warning("refused a TLS client %s at the handshake: %s", self.peer, str(reason).lower().replace(
                    "_", " "))
            self._abort()
            return False
        self.handshaken = True
        self.server.handshaking.pop(self, None)
        self._flush()
        wanted = self.server.client_dns_name
        # Right after the handshake (which checked the chain), before any request is read.
        if wanted is not None and not name_in_certificate(self.tls.getpeercert() or {}, wanted):
            log.warning("refused a TLS client %s: its certificate does not name %s", self.peer, wanted)
            self._close()  # nothing read; close_notify tells the client it is over
            return False
        self.server.idle[self] = None
        self._arm(self.server.config.server.idle_timeout_s)
        return True

    def _received(self, data: bytes) -> None:
        if not self.reading and self.task is None:
            self.reading = True
            self.server.idle.pop(self, None)
            self._arm(self.server.config.server.request_timeout_s)
        if self.broken:
            return
        if self.offset < len(self.buffer):  # what arrived while a request was being answered
            self.buffer = self.buffer[self.offset:] + data
        else:
            self.buffer = data
        self.offset = 0
        if self.task is not None:
            # Reading goes on while a request is answered (pausing and resuming it cost two epoll
            # calls per request), until more than the largest request waits: then the client
            # waits, not the proxy's memory.
            if not self.paused and self.transport is not None and len(self.buffer) > self._waiting_max():
                self.paused = True
                self.transport.pause_reading()
            return
        self._next()

    # -- a client that does not read its answers ---------------------------------------------------
    def pause_writing(self) -> None:
        """The transport's send buffer is past its high-water mark: no more answers are started
        and no more is read until it drains (a client that pipelines and never reads would
        otherwise grow it without end). The idle timer still closes a client that never reads."""
        self.write_paused = True
        if not self.paused and self.transport is not None and not self.draining:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._next()
        self._resume_if_room()

    def _resume_if_room(self) -> None:
        """Resume reading once what waits is below the limit again (or all parsed, with no request
        in progress), unless the send buffer is full: resuming after every answer would let in a
        read per answer, without end."""
        if self.paused and self.transport is not None and not self.draining and not self.write_paused and \
                (self.task is None or len(self.buffer) - self.offset <= self._waiting_max()):
            self.paused = False
            self.transport.resume_reading()

    def _waiting_max(self) -> int:
        """How many received bytes may wait behind the answer in progress before reading pauses."""
        return self.server.config.limits.max_body_bytes + MAX_HEADER_BYTES

    def eof_received(self) -> bool | None:
        if self.draining:
            self._close()
            return None
        self.eof = True  # the requests complete already are answered; one begun is dropped
        if self.task is None:
            self._close()
            return None
        return True  # keep the transport for the answer in progress; it is closed after it

    # -- timers -------------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.task is not None and not self.task.done():
            self.timed_out = True  # the answer in progress becomes DependencyTimeoutException
            self.task.cancel()
        elif self.write_paused:
            self._abort()  # a client that has not read its answers for the idle timeout: closing would wait on it
        else:
            self._close()  # idle, or a request that did not arrive in time

    # -- parsing: httptools' callbacks --------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_size = 13  # "  HTTP/1.1\r\n" and the blank line
        self.head_read = 0
        self.url = b""
        self.headers = {}
        self.hosts = 0
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url  # in pieces when it arrives in pieces
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        value = value.rstrip(b" \t")  # llhttp leaves the trailing whitespace (h11 did not)
        self.head_size += len(name) + len(value) + 4
        key = name.lower().decode("latin-1")
        text = value.decode("latin-1")
        if key == "host":
            self.hosts += 1
        headers = self.headers
        headers[key] = f"{headers[key]},{text}" if key in headers else text

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.in_head, self.in_body = False, True
        if self.resume is not None:  # _upgraded's stand-in head: the request is the one before it
            (self.method, self.url, self.headers, self.keep_alive), self.resume = self.resume, None
            self.expect_continue = self.upgrade = False
            return
        self.method = parser.get_method()
        self.head_size += len(self.method)
        version = parser.get_http_version()
        # What h11 refused: HTTP/0.9 (llhttp takes a request line without a version for it), an
        # HTTP/1.1 request without Host, any with two.
        if version not in ("1.1", "1.0") or self.hosts > 1 or (self.hosts == 0 and version == "1.1"):
            self._stop(400, NOT_HTTP)
        # h11's test and ours: HTTP/1.0 is not kept alive, even when it asks to be.
        self.keep_alive = parser.should_keep_alive() and version != "1.0"  # only inside a callback
        if self.head_size > MAX_HEADER_BYTES:
            self._stop(431, TOO_LARGE_HEAD, not self.keep_alive)
        limit = self.server.config.limits.max_body_bytes
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self._stop(413, f"The body is larger than {limit} bytes.", not self.keep_alive)
        self.expect_continue = version == "1.1" and "100-continue" in (
            part.strip().lower() for part in self.headers.get("expect", "").split(","))
        self.upgrade = parser.should_upgrade()

    def on_body(self, body: bytes) -> None:
        self.expect_continue = False
        self.body += body
        limit = self.server.config.limits.max_body_bytes
        if len(self.body) > limit:
            self._stop(413, f"The body is larger than {limit} bytes.", not self.keep_alive)

    def on_message_complete(self) -> None:
        self.in_body = False
        self.expect_continue = False
        self.completed = True
        if self.upgrade and ("content-length" in self.headers or "transfer-encoding" in self.headers):
            # llhttp leaves an Upgrade request's body (and CONNECT's) unread; h11 read it and went
            # on (the proxy never switches protocols): see _upgraded.
            self.upgraded = (self.method, self.url, self.headers, self.keep_alive)
            return
        path, _, query = self.url.decode("latin-1").partition("?")
        request = Request(self.method.decode("latin-1"), path, query, self.headers, bytes(self.body), self.peer)
        self.pending.append(Complete(request, self.method == b"HEAD", not self.keep_alive))
        self.body = bytearray()

    def _stop(self, status: int, message: str, client_close: bool = False) -> None:
        self.pending.append(Refusal(status, message, client_close))
        self.broken = True
        raise _Stop  # httptools raises it again as HttpParserCallbackError, from feed_data

    def _parse(self) -> None:
        """Give the parser the next FEED_BYTES of what was received."""
        end = min(self.offset + FEED_BYTES, len(self.buffer))
        chunk = memoryview(self.buffer)[self.offset:end]
        self.completed = False
        try:
            self.parser.feed_data(chunk)
            self.offset = end
        except httptools.HttpParserUpgrade as exc:  # an Upgrade request (or CONNECT) is complete
            self.offset += int(exc.args[0])
            self._upgraded()
        except httptools.HttpParserError:  # invalid HTTP, or _Stop
            if not self.broken:
                self.pending.append(Refusal(400, NOT_HTTP))
                self.broken = True
        if self.broken:
            self.buffer, self.offset = b"", 0
            return
        if self.offset >= len(self.buffer):
            self.buffer, self.offset = b"", 0
        if self.in_head:
            # The parser buffers a header until it is complete, so its bytes are counted here:
            # all the chunk's bytes, unless a request also completed in it (where the next began
            # is then unknown: its headers are counted as they complete, in head_size).
            if not self.completed:
                self.head_read += len(chunk)
            if max(self.head_read, self.head_size) > MAX_HEADER_BYTES:
                self.pending.append(Refusal(431, TOO_LARGE_HEAD))
                self.broken = True
                self.buffer, self.offset = b"", 0

    def _upgraded(self) -> None:
        """llhttp stopped after an Upgrade request (the proxy does not upgrade). One with a body:
        a new parser reads that body as a request with the same framing would have, then what
        follows; the request is queued from on_message_complete with its own line and headers."""
        upgraded, self.upgraded = self.upgraded, None
        if upgraded is None:
            return  # queued already; the parser goes on with what follows
        headers = upgraded[2]
        framing = (b"Transfer-Encoding: chunked" if "transfer-encoding" in headers
                   else b"Content-Length: " + headers["content-length"].encode("latin-1"))
        self.resume = upgraded
        self.parser = httptools.HttpRequestParser(self)
        try:
            self.parser.feed_data(b"POST / HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
        except httptools.HttpParserError:
            if not self.broken:
                self.pending.append(Refusal(400, NOT_HTTP))
                self.broken = True

    # -- requests -----------------------------------------------------------------------------
    def _next(self) -> None:
        """Parse what was received until a request is complete (then answer it), a refusal is
        due, or more data is needed."""
        if self.task is not None or self.transport is None or self.write_paused:
            return
        while not self.pending and self.offset < len(self.buffer):
            self._parse()
        if self.pending:
            item = self.pending.popleft()
            if isinstance(item, Refusal):
                self.pending.clear()
                self._refuse(item.status, item.message, item.client_close)
                return
            if not self.reading:  # pipelined: it began in the buffer, not with a read
                self.reading = True
                self.server.idle.pop(self, None)
            self._arm(self.server.config.server.request_timeout_s)
            self.task = self.loop.create_task(self._answer(item))
            return
        if self.eof:
            self._close()
            return
        if self.in_head or self.in_body:
            if not self.reading:  # a pipelined request, begun: it must arrive in time too
                self.reading = True
                self.server.idle.pop(self, None)
                self._arm(self.server.config.server.request_timeout_s)
            if self.expect_continue:
                self.expect_continue = False
                self._write(CONTINUE)

    async def _answer(self, item: Complete) -> None:
        try:
            response = await self.server.app.handle(item.request)
        except asyncio.CancelledError:
            if not self.timed_out or self.transport is None:
                raise
            error = DependencyTimeoutException("The request was not answered in time.")
            response = Response.json(error.status, {"errorName": error.name, "errorMessage": error.message})
        self.timed_out = False
        self.task = None
        self._respond(response, head=item.head, client_close=item.close)
        if self.transport is None:
            return
        if item.close or self.server.stopping:
            self._close()
            return
        self.reading = False
        self.server.idle[self] = None
        self._arm(self.server.config.server.idle_timeout_s)
        self._next()  # a pipelined request may be waiting already
        self._resume_if_room()

    def _respond(self, response: Response, head: bool = False, close: bool = False,
                 client_close: bool = False) -> None:
        """The answer's bytes, as h11 wrote them: the proxy's own `connection: close` as given,
        h11's `Connection: close` (last) when the client ended keep-alive."""
        body = response.body
        data = _status_line(response.status) + b"content-type: " + JSON + b"\r\ncontent-length: " + \
            str(len(body)).encode() + b"\r\n"
        if response.allow:
            data += b"allow: " + response.allow.encode() + b"\r\n"
        if client_close:
            data += b"Connection: close\r\n"
        elif close or self.server.stopping:
            data += b"connection: close\r\n"
        data += b"\r\n"
        self._write(data if head else data + body)

    def _refuse(self, status: int, message: str, client_close: bool = False) -> None:
        """Answer a request that cannot be read (bad HTTP, too large) and close the connection:
        half-closed at once, closed once the client closes too (or after REFUSED_DRAIN_S). Closing
        a socket with unread data makes the kernel send a reset, which can destroy the answer in
        the client's buffers before it reads it; so what the client still sends is read and dropped."""
        error = {"errorName": "ValidationException", "errorMessage": message}
        self._respond(Response.json(status, error), close=True, client_close=client_close)
        if self.transport is None:
            return
        self.draining = True
        self._release()
        self._shutdown_tls()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # after what is written: the client reads the answer, then EOF
        self.paused = False
        self.transport.resume_reading()
        self._arm(REFUSED_DRAIN_S)

    def _write(self, data: bytes) -> None:
        if self.transport is None or not data:
            return
        if self.tls is None:
            self.transport.write(data)
            return
        try:
            self.tls.write(data)
        except ssl.SSLError:
            self._abort()
            return
        self._flush()

    def _flush(self) -> None:
        """Send what TLS has to send (handshake records, alerts, ciphertext)."""
        if self.outgoing is not None and self.outgoing.pending and self.transport is not None:
            self.transport.write(self.outgoing.read())

    def _shutdown_tls(self) -> None:
        if self.tls is not None and self.handshaken and not self.shut:
            self.shut = True
            with contextlib.suppress(ssl.SSLError, ValueError):
                self.tls.unwrap()  # writes close_notify; the client's answer is not awaited
            self._flush()

    def _close(self) -> None:
        """Close after what is written (with TLS, after a close_notify)."""
        self._disarm()
        self._release()
        if self.transport is None:
            return
        self._shutdown_tls()
        self.transport.close()

    def _abort(self) -> None:
        self._disarm()
        self._release()
        if self.transport is not None:
            self.transport.close()  # after the alert already written


class Tally:
    """A kind of event logged at most once a second: the first at once, the others counted and
    logged together a second later (a flood of refused connections must not flood the log too)."""

    def __init__(self, level: int, what: str) -> None:
        self.level = level
        self.what = what
        self.count = 0
        self.last = ""
        self._timer: asyncio.TimerHandle | None = None

    def add(self, detail: str) -> None:
        if self._timer is not None:
            self.count += 1
            self.last = detail
            return
        log.log(self.level, "%s %s", self.what, detail)
        self._timer = asyncio.get_running_loop().call_later(1.0, self._tick)

    def _tick(self) -> None:
        if not self.count:
            self._timer = None
            return
        log.log(self.level, "%s: %d more in the last second, the last %s", self.what, self.count, self.last)
        self.count = 0
        self._timer = asyncio.get_running_loop().call_later(1.0, self._tick)


class ProxyServer:
    """The listening socket, its connections, the signals."""

    def __init__(self, config: Config, app: XksApp, sock: socket.socket, context: ssl.SSLContext | None,
                 sighup_while_starting: Callable[[], bool] | None = None) -> None:
        self.config = config
        self.app = app
        self.sock = sock
        self.context = context
        self.sighup_while_starting = sighup_while_starting  # cli.py notes one until run() takes over
        self.client_dns_name = config.tls.client_dns_name if config.tls is not None else None
        self.connections: set[Connection] = set()
        # Insertion-ordered, oldest first: connections in their TLS handshake (since when), and
        # connections with nothing to do (since they became idle).
        self.handshaking: dict[Connection, float] = {}
        self.idle: dict[Connection, None] = {}
        self.refusals = Tally(logging.WARNING, "refused a connection")
        self.closed_idle = Tally(logging.INFO, "closed an idle connection")
        self.stopping = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if self.sighup_while_starting is not None and self.sighup_while_starting():
            self.reload()  # once, however many arrived: the file is read as it is now
        server = await loop.create_server(lambda: Connection(self), sock=self.sock)  # TLS: in Connection
        try:
            await stop.wait()
        finally:
            log.info("stopping: %d connection(s) open", len(self.connections))
            self.stopping = True
            server.close()
            for connection in list(self.connections):
                if connection.task is None:
                    connection._close()
            deadline = loop.time() + DRAIN_S
            while any(c.task is not None for c in self.connections) and loop.time() < deadline:
                await asyncio.sleep(0.02)
            for connection in list(self.connections):
                connection._close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    def reload(self) -> None:
        """SIGHUP: read the file again and take its key stores; a bad file changes nothing."""
        try:
            new = load(self.config.path)
        except ConfigError as exc:
            log.error("SIGHUP: kept the running configuration: %s", exc)
            return
        diff = compare(self.app.config, new)
        self.app.apply(new)
        parts = [f"{len(new.key_stores)} external key store(s)"]
        for what, names in (("added", diff.added), ("removed", diff.removed), ("changed", diff.changed)):
            if names:
                parts.append(f"{what} {', '.join(names)}")
        log.info("SIGHUP: reloaded %s: %s", self.config.path, "; ".join(parts))
        if diff.needs_restart:
            log.warning("SIGHUP: %s changed in the file; restart the proxy to apply that",
                        ", ".join(diff.needs_restart))
