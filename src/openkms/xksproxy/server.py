"""HTTP/1.1 for the XKS proxy: asyncio, the stdlib `ssl` module and h11.

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
  it), bodies up to [limits]' sizes plus room for requestMetadata (413 past it). A request refused
  that way is answered, then the connection is half-closed and what the client still sends is read
  and dropped for a second, so that its kernel does not reset the connection before it reads the
  answer.
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
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import h11

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


class Connection(asyncio.Protocol):
    """One client connection: h11 parses, the app answers, one request at a time."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()  # made by the server's protocol factory, on the loop
        self.transport: asyncio.Transport | None = None
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.peer = ""
        self.reading = False  # a request has begun to arrive
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
        try:
            self.h11.receive_data(data)
        except h11.RemoteProtocolError:
            self._close()
            return
        self._next()

    def eof_received(self) -> bool | None:
        if self.draining:
            self._close()
            return None
        with contextlib.suppress(h11.RemoteProtocolError):
            self.h11.receive_data(b"")
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
        else:
            self._close()  # idle, or a request that did not arrive in time

    # -- requests -----------------------------------------------------------------------------
    def _next(self) -> None:
        """Take h11's events until a request is complete (then answer it) or more data is needed."""
        limits = self.server.config.limits
        while self.task is None and self.transport is not None:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                self._refuse(status, f"The request's line and headers are larger than {MAX_HEADER_BYTES} bytes."
                             if status == 431 else "The request is not valid HTTP/1.1.")
                return
            if event is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue and self.request is not None:
                    self._write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                # h11 holds back only a head that is still incomplete at 16 KiB; one that arrived
                # whole in one read is measured here (its bytes less the optional whitespace).
                size, length = len(event.method) + len(event.target) + 13, None
                for name, value in event.headers:
                    size += len(name) + len(value) + 4
                    if name == b"content-length":
                        length = value
                if size > MAX_HEADER_BYTES:
                    self._refuse(431, f"The request's line and headers are larger than {MAX_HEADER_BYTES} bytes.")
                    return
                if not self.reading:  # pipelined: it began in the buffer, not with a read
                    self.reading = True
                    self.server.idle.pop(self, None)
                    self._arm(self.server.config.server.request_timeout_s)
                self.request = event
                self.body = bytearray()
                if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
                    self._refuse(413, f"The body is larger than {limits.max_body_bytes} bytes.")
                    return
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > limits.max_body_bytes:
                    self._refuse(413, f"The body is larger than {limits.max_body_bytes} bytes.")
                    return
            elif isinstance(event, h11.EndOfMessage):
                assert self.request is not None
                assert self.transport is not None
                self.transport.pause_reading()
                self._arm(self.server.config.server.request_timeout_s)
                self.task = self.loop.create_task(self._answer(self.request, bytes(self.body)))
                self.request, self.body = None, bytearray()
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    async def _answer(self, event: h11.Request, body: bytes) -> None:
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        request = Request(event.method.decode("latin-1"), path, query, headers, body, self.peer)
        try:
            response = await self.server.app.handle(request)
        except asyncio.CancelledError:
            if not self.timed_out or self.transport is None:
                raise
            error = DependencyTimeoutException("The request was not answered in time.")
            response = Response.json(error.status, {"errorName": error.name, "errorMessage": error.message})
        self.timed_out = False
        self.task = None
        self._respond(response, head=event.method == b"HEAD")
        if self.transport is None:
            return
        if self.h11.our_state is h11.MUST_CLOSE or self.server.stopping:
            self._close()
            return
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self._close()
            return
        self.reading = False
        self.server.idle[self] = None
        self._arm(self.server.config.server.idle_timeout_s)
        self.transport.resume_reading()
        self._next()  # a pipelined request may be waiting in h11's buffer already

    def _respond(self, response: Response, head: bool = False, close: bool = False) -> None:
        headers = [(b"content-type", JSON), (b"content-length", str(len(response.body)).encode())]
        if response.allow:
            headers.append((b"allow", response.allow.encode()))
        if close or self.server.stopping:
            headers.append((b"connection", b"close"))
        try:
            phrase = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            phrase = b""
        try:
            data = self.h11.send(h11.Response(status_code=response.status, headers=headers, reason=phrase))
            if not head:
                data += self.h11.send(h11.Data(data=response.body))
            data += self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self._close()
            return
        self._write(data or b"")

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot be read (bad HTTP, too large) and close the connection:
        half-closed at once, closed once the client closes too (or after REFUSED_DRAIN_S). Closing
        a socket with unread data makes the kernel send a reset, which can destroy the answer in
        the client's buffers before it reads it; so what the client still sends is read and dropped."""
        error = {"errorName": "ValidationException", "errorMessage": message}
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._respond(Response.json(status, error), close=True)
        if self.transport is None:
            return
        self.draining = True
        self._release()
        self._shutdown_tls()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # after what is written: the client reads the answer, then EOF
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
