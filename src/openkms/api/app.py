"""The HTTP application: AWS JSON 1.1 on `POST /`, `GET /health`, served over RSGI or ASGI.

`App.handle` is one synchronous function from (method, path, headers, body) to a response, so
the protocol adapters below stay a few lines each and tests can call it without a socket. Every
failure becomes a JSON error body with an AWS error code; an unexpected exception is logged
(type and traceback only, never request data) and answered with KMSInternalException.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from ..audit import context as audit_context
from ..audit.log import AuditLog
from ..audit.record import build_event, new_id
from ..audit.usage import TRACKED_OPERATIONS, UsageTracker
from ..audit.verify import archive as archive_audit
from ..config import Settings
from ..errors import (
    KMSError,
    KMSInternalException,
    RequestEntityTooLarge,
    SerializationException,
    UnknownOperationException,
    UnsupportedOperationException,
)
from ..model import Caller
from ..node import Node, node_id, open_node
from ..storage.store import Tx, before_commit
from . import shapes, sts
from .admin import TARGET_PREFIX as ADMIN_PREFIX
from .admin import AdminAPI
from .sigv4 import SigV4Verifier

log = logging.getLogger("openkms.api")

KMS_PREFIX = "TrentService."
MAX_BODY_BYTES = 256 * 1024
JSON_HEADERS = "application/x-amz-json-1.1"
# Operations that may take a second of CPU (RSA key generation) run on a worker thread so they do
# not stall every other request on the event loop. The service's caches are plain dicts whose
# single operations are atomic, and SQLAlchemy's pool is thread-safe.
SLOW_TARGETS = frozenset(f"TrentService.{op}" for op in (
    "CreateKey", "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext", "GetParametersForImport"))
Response = tuple[int, list[tuple[str, str]], bytes]
Event = dict[str, Any]
_CREDENTIAL_RE = re.compile(r"Credential=([A-Za-z0-9]{1,128})/")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _error_body(exc: KMSError) -> bytes:
    return orjson.dumps({"__type": exc.code, "message": exc.message})


def _refusal(response: Response) -> Response:
    exc = KMSInternalException("The call could not be recorded in the audit log, so it is refused.")
    return exc.status, response[1], _error_body(exc)


class App:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        self.usage = UsageTracker(node.store)
        node.kms.usage = self.usage
        chain = node_id(node.settings.data_dir)
        self.audit = AuditLog(node.store, node.root, chain, node.settings.audit_digest_interval, self.usage,
                              node.settings.data_dir / "audit-digests" / f"{chain}.jsonl")
        self.admin = AdminAPI(node.accounts, node.store, self.audit, node.kms.access.forget_identity)
        self.audit_enabled = node.settings.audit.lower() != "off"
        if not self.audit_enabled:
            log.warning("OPENKMS_AUDIT=off: API calls are NOT recorded in the audit log")
        self.verifier = SigV4Verifier(node.settings.region, "kms", node.accounts.credentials)
        self.operations = shapes.operations()
        self.handlers: dict[str, Callable[[Caller, dict[str, Any]], dict[str, Any]]] = {}
        for name in self.operations:
            method = getattr(node.kms, _snake(name), None)
            if method is not None:
                self.handlers[name] = method
        self._scheduler: asyncio.Task[None] | None = None

    # -- the protocol-independent core ------------------------------------------------------------
    def handle(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
               source_ip: str = "") -> tuple[Response, Event | None, bool]:
        """The response; the audit record of the call (None for requests that are not API calls);
        and whether the call wrote an intent with a state change (see audit/writer.py)."""
        if method == "GET" and path == "/health":
            return (200, [("content-type", "application/json")],
                    orjson.dumps({"status": "ok", "region": self.settings.region})), None, False
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
        name = target.rpartition(".")[2] if target.startswith((KMS_PREFIX, ADMIN_PREFIX)) else ""
        if is_sts:
            name = sts.action_of(body)[:64]

        def event_of(result: dict[str, Any] | None, error: KMSError | None, resources: list[tuple[str, str]],
                     key_id: str | None) -> Event:
            return build_event(
                request_id=request_id, event_id=event_id, event_time=time.time(),
                event_name=name or "Unknown", region=self.settings.region, source_ip=source_ip,
                user_agent=headers.get("user-agent", ""), principal=principal, access_key_id=key_id,
                request_parameters=noted.get("params"), response_elements=result,
                error_code=error.code if error else None, error_message=error.message if error else None,
                resources=resources, event_source="sts.amazonaws.com" if is_sts else
                "openkms.admin" if target.startswith(ADMIN_PREFIX) else None)

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
            principal, access_key_id = self.verifier.verify(method, path, query, headers, body,
                                                            service="sts" if is_sts else "kms")
            caller = Caller(principal, access_key_id, source_ip)
            if is_sts:
                _, data = sts.call(caller, body, request_id)
                status = 200
            else:
                payload = self._parse_json(body)
                rendered, result = self._dispatch(caller, target, payload, noted)
                status, data = 200, orjson.dumps(rendered)
        except KMSError as exc:
            error = exc
            status, data = exc.status, (sts.error_document(exc, request_id) if is_sts else _error_body(exc))
        except Exception:
            log.exception("internal error in %s (request %s)", target or "-", request_id)
            error = KMSInternalException("An internal error occurred.")
            status, data = error.status, (sts.error_document(error, request_id) if is_sts else _error_body(error))
        finally:
            resources = audit_context.touched.get() or []
            audit_context.touched.reset(touched)
            before_commit.reset(hook)
        if access_key_id is None:
            m = _CREDENTIAL_RE.search(headers.get("authorization", ""))
            access_key_id = m.group(1) if m else None
        if is_sts:
            out_headers[0] = ("content-type", sts.CONTENT_TYPE)
        event = event_of(result, error, resources, access_key_id)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %d %.1fms %s", request_id, target or path, status,
                      (time.perf_counter() - started) * 1000, source_ip)
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

    def _dispatch(self, caller: Caller, target: str, payload: dict[str, Any], noted: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(rendered response, redacted response elements). The redacted request parameters go in
        `noted["params"]` as soon as the request parses, so that a call that then fails (not found,
        denied, invalid ciphertext) is recorded with what it asked for."""
        if target.startswith(KMS_PREFIX):
            name = target[len(KMS_PREFIX):]
            op = self.operations.get(name)
            if op is None:
                raise UnknownOperationException(f"Unknown operation {target}.")
            handler = self.handlers.get(name)
            if handler is None:
                raise UnsupportedOperationException(f"{name} is not supported by this server yet.")
            params = op.parse(payload)
            noted["params"] = op.redact_input(params) if op.redact_input else None
            caller = dataclasses.replace(caller, operation=name, grant_tokens=tuple(params.get("GrantTokens") or ()))
            result = handler(caller, params)
            return op.render(result), op.redact_output(result) if op.redact_output else None
        if target.startswith(ADMIN_PREFIX) and self.admin.has(target[len(ADMIN_PREFIX):]):
            name = target[len(ADMIN_PREFIX):]
            noted["params"] = self.admin.redact_input(name, payload)
            result = self.admin.call(caller, name, payload)
            return result, self.admin.redact_output(name, result)
        raise UnknownOperationException(f"Unknown operation {target or '(no X-Amz-Target)'}.")

    # -- background work --------------------------------------------------------------------------
    async def _run_scheduler(self) -> None:
        interval = self.settings.scheduler_interval
        while True:
            try:
                done = self.node.kms.run_scheduled_work()
                for what, key_ids in done.items():
                    if key_ids:
                        log.info("scheduler: %s %d key(s)", what, len(key_ids))
                if self.settings.audit_retention_days > 0:
                    moved = await asyncio.get_running_loop().run_in_executor(None, self._archive_audit)
                    if moved:
                        log.info("scheduler: archived %d audit record(s)", moved)
            except Exception:
                log.exception("scheduler run failed; will retry")
            await asyncio.sleep(interval)

    def _archive_audit(self) -> int:
        cutoff = time.time() - self.settings.audit_retention_days * 86400
        return archive_audit(self.node.store, self.audit.node_id, cutoff, self.settings.data_dir / "audit-archive")

    async def _run_audit_ticks(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.audit.tick()
            except Exception:
                log.exception("audit tick failed; will retry")

    def start_background(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._scheduler is None:
            self._scheduler = loop.create_task(self._run_scheduler())
            self._ticks = loop.create_task(self._run_audit_ticks())

    def stop_background(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
            self._ticks.cancel()
            self._scheduler = None

    # -- RSGI (granian) -------------------------------------------------------------------------
    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.start_background(loop)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop_background()
        self.audit.close()  # flushes pending records and signs a final digest
        self.node.close()

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
        if headers.get("x-amz-target") in SLOW_TARGETS:
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

    def _note_usage(self, event: Event) -> None:
        """GetKeyLastUsage: the last successful cryptographic call on each key. Noted only once the
        call is answered (its record durable), so that it never names a refused call's record."""
        name = event["eventName"]
        if "errorCode" not in event and name in TRACKED_OPERATIONS:
            now = time.time()
            for resource in event["resources"]:
                self.usage.record(resource["ARN"].rsplit("/", 1)[1], name, now, event["eventID"],
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
    logging.basicConfig(level=(settings or Settings.from_env()).log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return App(open_node(settings or Settings.from_env()))
