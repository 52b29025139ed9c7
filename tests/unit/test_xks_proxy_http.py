"""The XKS proxy's HTTP/1.1 (src/openkms/xksproxy/server.py's Connection) over a fake transport:
whatever bytes a client sends, in whatever pieces, it gets HTTP answers or a closed connection,
never a traceback in the log nor a connection left without a timer to end it; and the answers'
bytes are those the proxy wrote with h11 (checked against its output before httptools replaced it).
"""

from __future__ import annotations

import asyncio
import logging
import re
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openkms.xksproxy.app import Request, Response
from openkms.xksproxy.server import CONTINUE, MAX_HEADER_BYTES, Connection

MAX_BODY = 1000
PING = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.half_closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed and not self.half_closed, "written after close"
        self.written += data

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.half_closed = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Recording(Transport):
    """A transport that records the proxy's pausing and resuming of reading."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


class App:
    def __init__(self) -> None:
        self.requests: list[Request] = []

    async def handle(self, request: Request) -> Response:
        self.requests.append(request)
        if request.path == "/ping" and request.method not in ("GET", "HEAD"):
            return Response.json(405, {"errorName": "MethodNotAllowed"}, "GET, HEAD")
        return Response.json(200, {"body": len(request.body)})


def fake_server(app: App) -> Any:
    settings = SimpleNamespace(request_timeout_s=5.0, idle_timeout_s=60.0, max_handshakes=10, max_connections=10)
    tally = SimpleNamespace(add=lambda detail: None)
    return SimpleNamespace(config=SimpleNamespace(server=settings, limits=SimpleNamespace(max_body_bytes=MAX_BODY)),
                           app=app, context=None, client_dns_name=None, connections=set(), handshaking={},
                           idle={}, refusals=tally, closed_idle=tally, stopping=False)


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def exchange(chunks: list[bytes], eof: bool = True) -> tuple[bytes, Transport, Connection, App, list[str]]:
    """Send `chunks` one read at a time (then EOF); what the proxy wrote, and any error logged."""
    problems: list[str] = []
    errors = Errors()
    logging.getLogger().addHandler(errors)

    async def run() -> tuple[Transport, Connection, App]:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(str(context)))
        app = App()
        connection = Connection(fake_server(app))
        transport = Transport()
        connection.connection_made(transport)
        for chunk in [*chunks, None] if eof else chunks:
            if transport.closed:
                break
            if chunk is None:
                connection.eof_received()
            elif not connection.draining:
                connection.data_received(chunk)
            for _ in range(20):  # the app answers at once: a few turns of the loop
                await asyncio.sleep(0)
        hung = not transport.closed and connection.timer is None
        task = connection.task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            problems.append(f"the answer failed: {task.exception()!r}")
        connection.connection_lost(None)
        if hung:
            problems.append("open, with no timer to close it")
        return transport, connection, app

    try:
        transport, connection, app = asyncio.run(run())
    finally:
        logging.getLogger().removeHandler(errors)
    problems += [record.getMessage() for record in errors.records]
    return bytes(transport.written), transport, connection, app, problems


HEAD_RE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n((?:[^\r\n]+\r\n)*)\r\n")


def answers(written: bytes) -> list[tuple[int, bytes, bytes]]:
    """Split what the proxy wrote into answers (status, head, body); AssertionError if it is not
    a sequence of HTTP/1.1 answers. A HEAD answer's body is absent: told by what follows."""
    found, at = [], 0
    while at < len(written):
        match = HEAD_RE.match(written, at)
        assert match is not None, written[at:at + 200]
        status, head = int(match[1]), match[0]
        at = match.end()
        length = re.search(rb"(?i)content-length: (\d+)\r\n", match[2])
        body = b""
        if status != 100:
            assert length is not None, head
            rest = written[at:at + int(length[1])]
            if len(rest) == int(length[1]) and not rest.startswith(b"HTTP/1.1 "):
                body, at = rest, at + len(rest)
        found.append((status, head, body))
    return found


LINES = [b"GET /ping HTTP/1.1", b"HEAD /ping HTTP/1.1", b"POST /e?x=1 HTTP/1.1", b"POST /ping HTTP/1.1",
         b"GET /ping HTTP/1.0", b"CONNECT x:1 HTTP/1.1", b"GET /ping", b"FOO / HTTP/1.1"]
HEADERS = [b"Connection: close", b"Connection: keep-alive", b"Connection: upgrade\r\nUpgrade: h2c",
           b"Expect: 100-continue", b"X-A: 1", b"X-A: 2 ", b"Host: y", b"Content-Length: 3", b"Bad Header"]
header = st.one_of(st.sampled_from(HEADERS), st.binary(max_size=12),
                   st.integers(1, MAX_HEADER_BYTES + 100).map(lambda n: b"X-Padding: " + b"a" * n))
body = st.one_of(
    st.just(b""),
    st.integers(0, MAX_BODY + 10).map(lambda n: b"Content-Length: %d\r\n\r\n" % n + b"b" * n),
    st.integers(0, 30).map(lambda n: b"Content-Length: %d\r\n\r\n" % (n + 5) + b"b" * n),
    st.lists(st.integers(0, 600), max_size=3).map(lambda sizes: b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (n, b"c" * n) for n in sizes if n) + b"0\r\n\r\n"),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Mostly well-formed requests (with Host, framed bodies), some bent: bytes replaced or cut."""
    parts = [draw(st.sampled_from(LINES))]
    if draw(st.integers(0, 9)):
        parts.append(b"Host: x")
    parts += draw(st.lists(header, max_size=3))
    framing = draw(body)
    data = b"\r\n".join(parts) + b"\r\n" + (framing or b"\r\n")
    if draw(st.integers(0, 5)) == 0:  # bent
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at + draw(st.integers(0, 8)):]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(requests(), min_size=1, max_size=5).map(b"".join), st.data(), st.booleans())
def test_any_bytes_get_answers_or_a_closed_connection(data: bytes, draw: st.DataObject, eof: bool) -> None:
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=6)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]
    written, transport, _, app, problems = exchange(chunks, eof)
    assert not problems
    found = answers(written)
    final = [status for status, _, _ in found if status != 100]
    refused = [status for status in final if status in (400, 413, 431)]
    # Each request the app saw has its answer, in order; a refusal can only be the last answer.
    assert len(final) in (len(app.requests), len(app.requests) + 1)
    if len(final) > len(app.requests):
        assert final[-1] in (400, 413, 431) and b"connection: close" in found[-1][1].lower()
        assert transport.half_closed or transport.closed
    assert len(refused) <= 1
    if eof:
        assert transport.closed or (transport.half_closed and len(final) > len(app.requests))
    # However it is cut, the same answers (but for 100 Continue, sent when a body has yet to
    # come, and 431, told from the bytes received in pieces but from the headers read whole).
    if len(chunks) > 1 and 431 not in final:
        whole, _, _, _, problems = exchange([data], eof)
        assert not problems
        assert whole.replace(CONTINUE, b"") == written.replace(CONTINUE, b"")


def test_pipelined_requests_are_answered_in_order_whatever_the_pieces() -> None:
    data = PING + PING.replace(b"GET", b"HEAD") + b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}" + \
        PING.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + PING
    for size in (1, 7, len(data)):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        written, transport, _, app, problems = exchange(chunks, eof=False)
        assert not problems and transport.closed
        assert [r.method for r in app.requests] == ["GET", "HEAD", "POST", "GET"]
        assert written == (
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{"body":0}'
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n'
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{"body":2}'
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\nConnection: close\r\n\r\n'
            b'{"body":0}'), size


def test_a_head_past_16_kib_is_refused_in_pieces_or_whole() -> None:
    head = b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n"
    for size in (1000, 9000, len(head)):
        written, transport, _, app, problems = exchange([head[i:i + size] for i in range(0, len(head), size)])
        assert not problems and not app.requests and transport.half_closed
        assert written.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    # Just under: answered, and a pipelined one after it too (a read that holds the end of one
    # request and the start of the next).
    ok = b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * (MAX_HEADER_BYTES - 100) + b"\r\n\r\n"
    data = ok + ok
    written, _, _, app, problems = exchange([data[:10000], data[10000:len(ok) + 5000], data[len(ok) + 5000:]])
    assert not problems and len(app.requests) == 2 and written.count(b"HTTP/1.1 200 OK") == 2


def test_bodies_past_the_limit_and_100_continue() -> None:
    post = b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
    written, transport, _, app, _ = exchange([post % (MAX_BODY + 1) + b"\r\n"], eof=False)
    assert written.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n") and transport.half_closed
    chunked = b"POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    written, _, _, app, _ = exchange([chunked, b"400\r\n" + b"x" * 1024 + b"\r\n", b"0\r\n\r\n"], eof=False)
    assert written.startswith(b"HTTP/1.1 413 ") and not app.requests
    # Expect: 100-continue: the interim answer once the head is read, not when the body came with it.
    expect = post % 2 + b"Expect: 100-continue\r\n\r\n"
    written, _, _, app, _ = exchange([expect, b"{}"], eof=False)
    assert written.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n") and len(app.requests) == 1
    written, _, _, app, _ = exchange([expect + b"{}"], eof=False)
    assert written.startswith(b"HTTP/1.1 200 OK\r\n") and app.requests[0].body == b"{}"


def test_what_h11_refused_and_what_it_took() -> None:
    two_hosts = b"GET /ping HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    for bad in (b"NOT HTTP\r\n\r\n", b"GET /ping HTTP/1.1\r\n\r\n", two_hosts):
        written, transport, _, app, _ = exchange([bad], eof=False)
        assert written == (b'HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 87\r\n'
                           b'connection: close\r\n\r\n{"errorName":"ValidationException",'
                           b'"errorMessage":"The request is not valid HTTP/1.1."}'), bad
        assert transport.half_closed and not app.requests
    # HTTP/1.0 is closed after its answer, even with keep-alive (as h11 did).
    written, transport, _, _, _ = exchange([b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", PING], eof=False)
    assert written.count(b"HTTP/1.1 200 OK") == 1 and b"\r\nConnection: close\r\n" in written and transport.closed
    # An Upgrade request is answered as any other (the proxy never switches), its body read.
    upgrade = b"POST /e HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\n{}"
    written, transport, _, app, problems = exchange([upgrade + PING], eof=False)
    assert not problems and not transport.closed
    assert [(r.method, r.path, r.body) for r in app.requests] == [("POST", "/e", b"{}"), ("GET", "/ping", b"")]
    assert app.requests[0].headers["upgrade"] == "h2c" and written.count(b"HTTP/1.1 200 OK") == 2
    # Repeated headers joined by ","; the optional whitespace around a value left out.
    _, _, _, app, _ = exchange([b"GET /ping?a=b HTTP/1.1\r\nHost: x\r\nX-A:  1 \r\nx-a: 2\r\n\r\n"])
    assert (app.requests[0].query, app.requests[0].headers) == ("a=b", {"host": "x", "x-a": "1,2"})


def test_reading_goes_on_behind_an_answer_until_more_than_a_request_waits() -> None:
    """Requests that arrive while one is answered wait in the connection's buffer (reading is not
    paused per request); past the largest request's worth, reading pauses until the answer is sent."""
    release = asyncio.Event()

    class Slow(App):
        async def handle(self, request: Request) -> Response:
            await release.wait()
            return await super().handle(request)

    async def run() -> None:
        app = Slow()
        connection, transport = Connection(fake_server(app)), Recording()
        connection.connection_made(transport)
        connection.data_received(PING)
        await asyncio.sleep(0)
        assert connection.task is not None  # the first is being answered
        connection.data_received(PING * 3)
        assert transport.calls == []  # a few small ones wait: reading goes on
        connection.data_received(PING * ((MAX_BODY + MAX_HEADER_BYTES) // len(PING) + 1))
        assert transport.calls == ["pause"]  # more than the largest request: the client waits
        release.set()
        for _ in range(2000):
            await asyncio.sleep(0)
            if len(app.requests) == 4 + (MAX_BODY + MAX_HEADER_BYTES) // len(PING) + 1:
                break
        assert transport.calls == ["pause", "resume"]
        assert len(answers(bytes(transport.written))) == len(app.requests)
        connection.connection_lost(None)

    asyncio.run(run())


def test_a_client_that_pipelines_without_end_holds_a_bounded_buffer() -> None:
    """A client that sends whenever the proxy reads: what waits stays within the largest request's
    worth plus one read, however many answers go out (reading resumes only once what waits has
    been parsed down below that, not after every answer)."""

    class Flow(Transport):
        def __init__(self) -> None:
            super().__init__()
            self.paused = False
            self.resumes = 0

        def pause_reading(self) -> None:
            self.paused = True

        def resume_reading(self) -> None:
            self.paused, self.resumes = False, self.resumes + 1

    class Yielding(App):
        async def handle(self, request: Request) -> Response:
            await asyncio.sleep(0)  # answered a turn of the loop later: reads come in meanwhile
            return await super().handle(request)

    read = PING * 128  # one read of about 4 KiB
    limit = MAX_BODY + MAX_HEADER_BYTES

    async def run() -> None:
        app = Yielding()
        connection, transport = Connection(fake_server(app)), Flow()
        connection.connection_made(transport)
        most = 0
        for _ in range(3000):
            if not transport.paused:
                connection.data_received(read)
            most = max(most, len(connection.buffer) - connection.offset)
            await asyncio.sleep(0)
        assert transport.resumes > 0 and len(app.requests) > 500  # it paused, resumed, and served
        assert most <= limit + len(read), f"{most} bytes waited"
        assert len(answers(bytes(transport.written))) == len(app.requests)
        connection.connection_lost(None)

    asyncio.run(run())


def test_a_client_that_does_not_read_its_answers_gets_no_more() -> None:
    """While the transport's send buffer is full (pause_writing), no more answers are started and
    reading pauses; once it drains (resume_writing), the waiting requests are answered in order."""

    async def run() -> None:
        app = App()
        connection, transport = Connection(fake_server(app)), Recording()
        connection.connection_made(transport)
        connection.data_received(PING)
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(app.requests) == 1
        connection.pause_writing()
        assert transport.calls == ["pause"]
        connection.data_received(PING * 3)  # in flight when reading paused
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(app.requests) == 1 and len(answers(bytes(transport.written))) == 1
        connection.resume_writing()
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(app.requests) == 4 and len(answers(bytes(transport.written))) == 4
        assert transport.calls == ["pause", "resume"]
        connection.connection_lost(None)

    asyncio.run(run())
