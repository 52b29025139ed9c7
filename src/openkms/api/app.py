"""The HTTP application: AWS JSON 1.1 on `POST /`, `GET /health` (liveness), `GET /ready` (readiness),
served over RSGI or ASGI.

`App.handle` is one synchronous function from (method, path, headers, body) to a response, so
the protocol adapters below stay a few lines each and tests can call it without a socket. Every
failure becomes a JSON error body with an AWS error code; an unexpected exception is logged
(type and traceback only, never request data) and answered with KMSInternalException.

The app only adapts HTTP: it authenticates (SigV4), routes by X-Amz-Target to an API of
dispatch.py, records the call in the audit log and answers once the record is durable. The node
(node.py) and the scheduler (scheduler.py) are built outside it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from .. import heap, onloop
from ..audit import context as audit_context
from ..audit.record import build_event, new_id
from ..config import Settings
from ..errors import (
    InternalServiceError,
    KMSError,
    KMSInternalException,
    RequestEntityTooLarge,
    SerializationException,
    ThrottlingException,
    UnknownOperationException,
)
from ..lane import Lane
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..metrics import Metrics
from ..model import Caller
from ..node import Node, serving_node
from ..onloop import ON_LOOP, OnLoop
from ..scheduler import Scheduler
from ..storage import Tx, before_commit
from . import sts
from .dispatch import READ_ONLY_PREFIXES, AdminJsonApi, Dispatcher, JsonApi, KmsApi, SecretsManagerApi
from .sigv4 import SigV4Verifier

log = logging.getLogger("openkms.api")
access = logging.getLogger("openkms.access")

MAX_BODY_BYTES = 256 * 1024
JSON_HEADERS = "application/x-amz-json-1.1"
Response = tuple[int, list[tuple[str, str]], bytes]
Event = dict[str, Any]
_CREDENTIAL_RE = re.compile(r"Credential=([A-Za-z0-9]{1,128})/")


def _error_body(exc: KMSError) -> bytes:
    return orjson.dumps({"__type": exc.code, "message": exc.message})


def _refusal(response: Response) -> Response:
    exc = KMSInternalException("The call could not be recorded in the audit log, so it is refused.")
    return exc.status, response[1], _error_body(exc)


READY_CACHE_S = 1.0  # /ready answers anyone: its checks (a write, HSM calls) run at most once a second
API_LABELS = {"TrentService.": "kms", "secretsmanager.": "secretsmanager", "OpenKMSAdmin.": "admin"}


class App:
    def __init__(self, node: Node) -> None:
        if node.audit is None or node.admin is None or node.usage is None:
            raise ValueError("App needs a serving node (node.serving_node)")
        self.node = node
        self.settings = node.settings
        self.usage = node.usage
        self.audit = node.audit
        self.audit_enabled = node.settings.audit.lower() != "off"
        if not self.audit_enabled:
            log.warning("OPENKMS_AUDIT=off: API calls are NOT recorded in the audit log")
        self.verifier = SigV4Verifier(node.settings.region, "kms", node.accounts.credentials)
        if node.quotas is None:
            raise ValueError("App needs a serving node (node.serving_node)")
        self.quotas = node.quotas
        self.kms_api = KmsApi(node.service)
        self.dispatch = Dispatcher([self.kms_api, SecretsManagerApi(node.service), AdminJsonApi(node.admin)])
        self.scheduler = Scheduler(node)
        self.metrics = Metrics(node)
        node.audit.on_batch = self.metrics.audit_batch.observe
        node.audit.on_commit = self.metrics.audit_commit.observe
        self._metrics_token = node.settings.metrics_token.encode()
        self._metrics_server: Any = None
        self._ready: tuple[float, Response] | None = None  # the last /ready answer, and when
        self.access_log = node.settings.access_log and access.isEnabledFor(logging.INFO)

    # -- the protocol-independent core ------------------------------------------------------------
    def handle(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
               source_ip: str = "") -> tuple[Response, Event | None, bool]:
        """The response; the audit record of the call (None for requests that are not API calls);
        and whether the call wrote an intent with a state change (see audit/writer.py)."""
        if method == "GET" and path == "/health":
            return (200, [("content-type", "application/json")],
                    orjson.dumps({"status": "ok", "region": self.settings.region})), None, False
        if method == "GET" and path == "/metrics" and self._metrics_token:
            given = headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
            if not hmac.compare_digest(given, self._metrics_token):
                return (401, [("content-type", "application/json"), ("www-authenticate", "Bearer")],
                        orjson.dumps({"message": "GET /metrics needs Authorization: Bearer <OPENKMS_METRICS_TOKEN>"}
                                     )), None, False
            return (200, [("content-type", METRICS_CONTENT_TYPE)], self.metrics.render()), None, False
        request_id = new_id()
        event_id = new_id()
        out_headers = [("content-type", JSON_HEADERS), ("x-amzn-requestid", request_id)]
        started = time.perf_counter()
        target = headers.get("x-amz-target", "")
        is_sts = sts.is_sts_request(headers)
        principal = None
        access_key_id: str | None = None
        result = None
        error: KMSError | None = None
        noted: dict[str, Any] = {}  # the redacted request, recorded for failed calls too
        touched = audit_context.touched.set([])
        request = audit_context.current_request.set(None)
        routed = None if is_sts else self.dispatch.route(target)
        api: JsonApi | None = routed[0] if routed else None
        name = sts.action_of(body)[:64] if is_sts else routed[1] if routed else ""
        read_only = api.read_only(name) if api is not None else name.startswith(READ_ONLY_PREFIXES)

        def event_of(result: dict[str, Any] | None, error: KMSError | None, resources: list[tuple[str, str]],
                     key_id: str | None) -> Event:
            return build_event(
                request_id=request_id, event_id=event_id, event_time=time.time(),
                event_name=name or "Unknown", region=self.settings.region, source_ip=source_ip,
                user_agent=headers.get("user-agent", ""), principal=principal, access_key_id=key_id,
                request_parameters=noted.get("params"), response_elements=result,
                error_code=error.code if error else None, error_message=error.message if error else None,
                resources=resources, read_only=read_only,
                event_source="sts.amazonaws.com" if is_sts else api.event_source if api is not None else None)

        intents: list[bool] = []

        def write_intent(tx: Tx) -> None:  # in each transaction of this call that changes state
            self.audit.write_intent(tx, event_of(None, None, list(audit_context.touched.get() or []),
                                                 access_key_id))
            intents.append(True)

        hook = before_commit.set(write_intent if self.audit_enabled else None)
        try:
            if method != "POST" or path != "/":
                raise UnknownOperationException(f"No operation at {method} {path}.")
            if len(body) > MAX_BODY_BYTES:
                raise RequestEntityTooLarge(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
            principal, access_key_id = self.verifier.verify(
                method, path, query, headers, body,
                service="sts" if is_sts else api.signing_service if api is not None else "kms")
            caller = Caller(principal, access_key_id, source_ip)
            audit_context.current_request.set(audit_context.RequestInfo(request_id, name, principal.arn))
            if is_sts:
                _, data = sts.call(caller, body, request_id)
                status = 200
            else:
                payload = self._parse_json(body)
                if api is None:
                    raise UnknownOperationException(f"Unknown operation {target or '(no X-Amz-Target)'}.")
                if self.quotas.enabled and isinstance(payload, dict):
                    quota = api.quota(name, principal.account_id, payload)
                    if quota is not None and not self.quotas.take(principal.account_id, quota):
                        raise ThrottlingException(api.throttled)
                rendered, result = api.call(caller, name, payload, noted)
                status, data = 200, orjson.dumps(rendered)
        except KMSError as exc:
            error = exc
            status, data = exc.status, (sts.error_document(exc, request_id) if is_sts else _error_body(exc))
        except Exception:
            log.exception("internal error in %s (request %s)", target or "-", request_id)
            error = InternalServiceError("An internal error occurred.") if api is not None and \
                api.signing_service == "secretsmanager" else KMSInternalException("An internal error occurred.")
            status, data = error.status, (sts.error_document(error, request_id) if is_sts else _error_body(error))
        finally:
            resources = audit_context.touched.get() or []
            audit_context.touched.reset(touched)
            audit_context.current_request.reset(request)
            before_commit.reset(hook)
        if access_key_id is None:
            m = _CREDENTIAL_RE.search(headers.get("authorization", ""))
            access_key_id = m.group(1) if m else None
        if is_sts:
            out_headers[0] = ("content-type", sts.CONTENT_TYPE)
        event = event_of(result, error, resources, access_key_id)
        # Labels from closed sets only: an API's own operation names, never what a caller sent.
        known = api.known(name) if api is not None else is_sts and name == "GetCallerIdentity"
        label = API_LABELS.get(api.prefix, "other") if api is not None else ("sts" if is_sts else "none")
        self.metrics.observe(label, name if known else "unknown", error.code if error else "ok",
                             time.perf_counter() - started)
        if self.access_log:
            access.info("%s %s %s %d %.1fms %s %s", request_id, label, name if known else "unknown", status,
                        (time.perf_counter() - started) * 1000, principal.arn if principal is not None else "-",
                        source_ip or "-", extra={"access": {
                            "requestId": request_id, "api": label, "operation": name if known else "unknown",
                            "status": status, "errorCode": error.code if error else None,
                            "ms": round((time.perf_counter() - started) * 1000, 2),
                            "principal": principal.arn if principal is not None else None,
                            "sourceIp": source_ip or None}})
        return (status, out_headers, data), event, bool(intents)

    @staticmethod
    def _parse_json(body: bytes) -> Any:
        if not body.strip():
            return {}
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise SerializationException("The request body is not valid JSON.") from None
        if not isinstance(payload, dict):
            raise SerializationException("The request body must be a JSON object.")
        return payload

    # -- background work --------------------------------------------------------------------------
    def start_background(self, loop: asyncio.AbstractEventLoop) -> None:
        # Calls that wait on an HSM or an XKS proxy run in these threads: mostly waiting, not
        # computing, so many more than the machine has cores (asyncio's default is cores + 4).
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.blocking_threads, thread_name_prefix="openkms-blocking"))
        self.scheduler.start(loop)
        if self.settings.metrics_listen and self._metrics_server is None:
            from prometheus_client import start_http_server

            host, port = self.settings.metrics_address()
            try:
                self._metrics_server = start_http_server(port, host, registry=self.metrics.registry)[0]
            except OSError as exc:
                log.error("cannot serve metrics on %s: %s", self.settings.metrics_listen, exc.strerror)

    def stop_background(self) -> None:
        self.scheduler.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None

    # -- RSGI (granian) -------------------------------------------------------------------------
    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.start_background(loop)
        heap.freeze_startup()  # what the worker holds from now on is never walked by the GC

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop_background()
        self.node.close()  # the audit log flushes pending records and signs a final digest

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        headers: dict[str, str] = {}
        for name, value in scope.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= MAX_BODY_BYTES:
            body = await proto()  # one await: the body's size is known and bounded
        elif length is not None and length.isdigit():
            body = b"x" * (MAX_BODY_BYTES + 1)  # rejected by handle() without reading the stream
        else:
            body = await _read_limited_rsgi(proto)
        client = scope.client.rsplit(":", 1)[0] if scope.client else ""
        answer = await self._handle_async(scope.method, scope.path, scope.query_string, headers, body, client,
                                          proto.response_bytes)
        if answer is not None:
            proto.response_bytes(*answer)

    async def _handle_async(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
                            client: str, send: Callable[[int, list[tuple[str, str]], bytes], None] | None = None
                            ) -> Response | None:
        """The response to send; or None when it has been sent already through `send`, which an
        audited call uses to answer the moment its record is durable."""
        if method == "GET" and path == "/ready":  # it writes to the store and asks HSMs: off the loop
            ready = self._ready
            if ready is None or time.monotonic() - ready[0] >= READY_CACHE_S:
                answer = await asyncio.get_running_loop().run_in_executor(None, self.readiness)
                self._ready = ready = (time.monotonic(), answer)
            return ready[1]
        lane = self._blocking(headers, body, path)
        if lane is ON_LOOP:  # it waits on an XKS proxy: on this loop, suspended meanwhile
            response, event, intent = await onloop.run(
                functools.partial(self.handle, method, path, query, headers, body, client))
        elif isinstance(lane, Lane):
            response, event, intent = await lane.call(
                functools.partial(self.handle, method, path, query, headers, body, client))
        elif lane:
            response, event, intent = await asyncio.get_running_loop().run_in_executor(
                None, self.handle, method, path, query, headers, body, client)
        else:
            response, event, intent = self.handle(method, path, query, headers, body, client)
        if event is None:
            return response
        if not self.audit_enabled:
            self._note_usage(event)
            return response
        outcome: list[Response] = []

        def durable(ok: bool) -> None:
            answer = response if ok else _refusal(response)
            if ok:
                self._note_usage(event)
            if send is not None:
                send(*answer)
            outcome.append(answer)

        with contextlib.suppress(Exception):  # a failure has called `durable(False)`
            await self.audit.submit(event, durable, intent)  # answered only once the record is durable
        if not outcome:  # the audit log failed without calling back
            return _refusal(response)
        return None if send is not None else outcome[0]

    def readiness(self) -> Response:
        """GET /ready: 200 when this node can serve calls, else 503; each check, and what failed.
        The store must take a write, the root key seal and open, the audit writer be running and
        committing (unless OPENKMS_AUDIT=off), and every connected custom key store's backend answer."""
        checks: dict[str, str] = {}
        try:
            with self.node.store.begin() as tx:
                tx.meta.put("ready_probe", str(time.time()).encode())
            checks["store"] = "ok"
        except Exception as exc:
            checks["store"] = f"the store refused a write ({type(exc).__name__})"
        try:
            root = self.node.root
            checks["root_key"] = "ok" if root.unseal(root.seal(b"ready", b"openkms ready"), b"openkms ready") == \
                b"ready" else "the root key did not open what it sealed"
        except Exception as exc:
            checks["root_key"] = f"the root key cannot be used ({type(exc).__name__})"
        problem = self.audit.problem() if self.audit_enabled else None
        checks["audit"] = problem or ("ok" if self.audit_enabled else "off (OPENKMS_AUDIT=off)")
        try:
            failing = self.node.service.keystores.check_backends()
            # Which stores, and why, only in the log: /ready answers anyone, and a custom key store
            # is a tenant's.
            for cks_id, why in sorted(failing.items()):
                log.warning("not ready: custom key store %s: %s", cks_id, why)
            checks["custom_key_stores"] = "ok" if not failing else \
                f"{len(failing)} connected custom key store(s) do not answer (the server's log says which)"
        except Exception as exc:
            checks["custom_key_stores"] = f"cannot be checked ({type(exc).__name__})"
        ready = all(v == "ok" or v.startswith("off ") for v in checks.values())
        body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": checks}
        if not ready:
            body["failed"] = sorted(k for k, v in checks.items() if v != "ok" and not v.startswith("off "))
        return 200 if ready else 503, [("content-type", "application/json")], orjson.dumps(body)

    def _blocking(self, headers: dict[str, str], body: bytes, path: str = "/") -> bool | Lane | OnLoop:
        """Whether the request runs off the event loop (True: on the shared pool; a lane: on that
        thread, an HSM token's), or ON_LOOP: on the loop, suspended while it waits on an XKS proxy
        (onloop.py). Deciding may read the store (the caller's
        account, whether a key is in a custom key store); if that fails, the request runs off the
        loop, where `handle` answers whatever goes wrong with an AWS error and an audit record."""
        routed = self.dispatch.route(headers.get("x-amz-target", ""))
        if routed is None:
            return False
        try:
            return routed[0].blocking(routed[1], self._caller_account(headers), body)
        except Exception:
            return True

    def _caller_account(self, headers: dict[str, str]) -> str | None:
        """The account of the access key a request names (unverified: only to route it)."""
        m = _CREDENTIAL_RE.search(headers.get("authorization", ""))
        found = self.node.accounts.credentials(m.group(1)) if m else None
        return found[1].account_id if found else None

    def _note_usage(self, event: Event) -> None:
        """GetKeyLastUsage: the last successful cryptographic call on each key. Noted only once the
        call is answered (its record durable), so that it never names a refused call's record."""
        if "errorCode" not in event and event["eventSource"] == "kms.amazonaws.com" and \
                self.kms_api.tracked(event["eventName"]):
            now = time.time()
            for resource in event["resources"]:
                self.usage.record(resource["ARN"].rsplit("/", 1)[1], event["eventName"], now, event["eventID"],
                                  event["requestID"])

    # -- ASGI (uvicorn and others) ------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.start_background(asyncio.get_running_loop())
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.stop_background()
                    self.audit.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= MAX_BODY_BYTES + 1:
                chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        client = scope.get("client") or ("", 0)
        answer = await self._handle_async(
            scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"), headers, body,
            client[0])
        assert answer is not None  # no `send`: the response comes back
        status, out_headers, data = answer
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in out_headers]})
        await send({"type": "http.response.body", "body": data})


async def _read_limited_rsgi(proto: Any) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in proto:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"x" * (MAX_BODY_BYTES + 1)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings | None = None) -> App:
    """Factory used by the server process (`openkms serve`), by tests and by other ASGI servers."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    return App(serving_node(settings))


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])


class JsonFormatter(logging.Formatter):
    """OPENKMS_LOG_FORMAT=json: one JSON object per line (an access line's fields as members)."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"time": moment.replace("+00:00", "Z"), "level": record.levelname,
                               "logger": record.name}
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if v is not None})
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()
