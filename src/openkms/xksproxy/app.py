"""The XKS proxy API (spec v1.0.3): GetKeyMetadata, Encrypt, Decrypt, GetHealthStatus, and /ping.

URIs are `{uri_path_prefix}/kms/xks/v1/keys/{externalKeyId}/{metadata|encrypt|decrypt}` and
`{uri_path_prefix}/kms/xks/v1/health`, POST only. Checks run in the order AWS's XKS test client
expects, each answering the spec's error:

1. a path that is no API of a configured prefix: 404 InvalidUriPathException (before the signature,
   so a misconfigured XksProxyUriPath is told apart from bad credentials); GET: 405;
2. with [server] server_names, a Host header that is none of them (a request signed for another
   proxy that shares the credentials), then SigV4 (service `kms-xks-proxy`, the [server] region,
   one of the prefix's credentials, the headers the request says it signed, 5 minutes of clock
   skew): 401 AuthenticationFailedException;
3. the prefix's request quota: 429 ThrottlingException;
4. the body: JSON with a requestMetadata holding the API's required members (health too), the
   spec's encodings and lengths: 400 ValidationException; sizes past this proxy's limits (at least
   the spec's 4,300-byte plaintext and 8,192-byte AAD): 501 UnsupportedOperationException, as the
   spec's table says for "a parameter value [that] exceeded the maximum size ... supported";
5. the key: not in xks_key_id_set (with none, listed in another store's), the health check's test
   key, or not in the token: 404 KeyNotFoundException; listed in disabled_xks_key_ids: 400
   InvalidStateException; an operation its CKA_ENCRYPT/CKA_DECRYPT forbids: 400
   InvalidKeyUsageException;
6. the token: a failed GCM tag 400 InvalidCiphertextException; the token down 500
   InternalException; no answer within [pkcs11] call_timeout_ms 503 DependencyTimeoutException.

The AAD given to the HSM binds the caller's AAD and the ciphertextMetadata with their lengths
(the spec's Encrypt section): `len16be(aad) || aad || len8(metadata) || metadata`. This proxy
returns no ciphertextMetadata, so a Decrypt that sends some fails its tag check.

One log line per request (JSON after the logger's prefix): requestMetadata with kmsRequestId
first, what was asked, and the outcome. Never plaintext, ciphertext, AAD, key material or secrets.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from .. import __version__
from ..api.sigv4 import SigV4Verifier
from ..errors import KMSError
from ..model import SecretStr
from ..ratelimit import TokenBucket
from .config import API_PATH, SERVICE, Config, KeyStoreSettings, valid_key_id
from .errors import (
    AuthenticationFailedException,
    DependencyTimeoutException,
    InternalException,
    InvalidStateException,
    InvalidUriPathException,
    KeyNotFoundException,
    MethodNotAllowed,
    ThrottlingException,
    UnsupportedOperationException,
    ValidationException,
    XksError,
)
from .keys import TokenKeys
from .worker import TokenWorker

log = logging.getLogger("openkms.xksproxy")
T = TypeVar("T")

VENDOR = "openkms"
MODEL = f"openkms xks-proxy {__version__}"
ALGORITHM = "AES_GCM"
INTEGRITY_ALGORITHM = "SHA_256"
MAX_METADATA_BYTES = 20
OPERATIONS = ("metadata", "encrypt", "decrypt")
REQUIRED_METADATA = {
    "metadata": ("kmsRequestId", "kmsOperation", "awsPrincipalArn"),
    "encrypt": ("kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"),
    "decrypt": ("kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn"),
    "health": ("kmsRequestId", "kmsOperation"),
}
LOGGED_METADATA = ("kmsRequestId", "kmsOperation", "awsPrincipalArn", "kmsKeyArn", "kmsViaService",
                   "awsSourceVpc", "awsSourceVpce")
JSON = b"application/json"


def hsm_aad(aad: bytes, metadata: bytes) -> bytes:
    """The AAD the HSM's AES-GCM binds: both fields with their lengths, so that moving bytes
    between the AAD and the ciphertextMetadata never decrypts."""
    return len(aad).to_bytes(2, "big") + aad + len(metadata).to_bytes(1, "big") + metadata


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined by ","
    body: bytes
    peer: str = ""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    allow: str | None = None  # the Allow header of a 405

    @classmethod
    def json(cls, status: int, document: Mapping[str, Any], allow: str | None = None) -> Response:
        return cls(status, orjson.dumps(document), allow)  # orjson writes one line


class _Store:
    """A configured external key store as the app serves it: its verifier, its quota, and the keys
    it may not use: with no xks_key_id_set, those that other stores list (`claimed`)."""

    def __init__(self, settings: KeyStoreSettings, region: str, claimed: frozenset[str]) -> None:
        self.settings = settings
        self.allowed = settings.xks_key_id_set
        self.excluded = claimed if settings.xks_key_id_set is None else frozenset()
        secrets: dict[str, tuple[SecretStr, str]] = {
            c.access_key_id: (c.secret_access_key, c.access_key_id) for c in settings.credentials}
        self.verifier: SigV4Verifier[str] = SigV4Verifier(region, SERVICE, secrets.get)
        self.bucket = TokenBucket(settings.requests_per_second)


@dataclass
class _Health:
    at: float
    body: dict[str, Any] | None = None
    error: XksError | None = None
    status: str = "ACTIVE"


def _b64(document: Mapping[str, Any], name: str, required: bool = False) -> bytes | None:
    value = document.get(name)
    if value is None:
        if required:
            raise ValidationException(f"{name} is required.")
        return None
    if not isinstance(value, str):
        raise ValidationException(f"{name} must be a Base64 string.")
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ValidationException(f"{name} is not valid standard Base64.") from None


def _b64text(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


def _algorithm(document: Mapping[str, Any]) -> None:
    value = document.get("encryptionAlgorithm")
    if value is None:
        raise ValidationException("encryptionAlgorithm is required.")
    if value != ALGORITHM:
        raise ValidationException(f"encryptionAlgorithm must be {ALGORITHM}.")


class XksApp:
    """The API over one token. `handle` never raises: every outcome is a Response."""

    def __init__(self, config: Config, keys: TokenKeys, worker: TokenWorker) -> None:
        self.keys = keys
        self.worker = worker
        self.config = config
        self._stores: dict[str, _Store] = {}
        self._health: _Health | None = None
        self._health_task: asyncio.Task[_Health] | None = None
        self._server_names = config.server.server_names
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Take the key stores (credentials, allow-lists, disabled keys, quotas) of `config`: what a
        SIGHUP reloads. A request already past its signature check finishes under the old ones."""
        claimed = config.claimed_key_ids()
        self._stores = {store.uri_path: _Store(store, self.config.server.region, claimed)
                        for store in config.key_stores}
        self.config = Config(self.config.path, self.config.server, self.config.tls, self.config.pkcs11,
                             self.config.health, self.config.limits, config.key_stores)
        # About as many calls as can arrive within one call's timeout: more could not be answered
        # in time, and each queued call holds its request's body.
        rate = sum(store.requests_per_second for store in config.key_stores)
        self.worker.max_queued = max(256, int(rate * self.config.pkcs11.call_timeout_s))
        warning = config.isolation_warning()
        if warning is not None:
            log.warning("%s", warning)

    # -- the request --------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        if request.path == "/ping":  # a load balancer's probe: answered, not logged (it comes every few seconds)
            if request.method in ("GET", "HEAD"):
                return Response.json(200, {"status": "ok"})
            return Response.json(405, {"errorName": MethodNotAllowed.name, "errorMessage": "/ping answers GET."},
                                 "GET, HEAD")
        started = time.perf_counter()
        record: dict[str, Any] = {}
        try:
            response = await self._handle(request, record)
            record["outcome"] = "ok"
        except XksError as exc:
            response = Response.json(exc.status, {"errorName": exc.name, "errorMessage": exc.message},
                                     "POST" if isinstance(exc, MethodNotAllowed) else None)
            record["outcome"] = exc.name
            record["errorMessage"] = exc.message
        except asyncio.CancelledError:  # past [server] request_timeout_ms, or the client went away
            record.update(outcome=DependencyTimeoutException.name, status=503,
                          ms=round((time.perf_counter() - started) * 1000, 3))
            log.info("%s", orjson.dumps(record).decode())
            raise
        except Exception:  # a fault of the proxy itself: logged here, a plain InternalException outside
            log.exception("unexpected error answering %s %s", request.method, request.path[:300])
            response = Response.json(500, {"errorName": InternalException.name,
                                           "errorMessage": InternalException.default})
            record["outcome"] = InternalException.name
        record["status"] = response.status
        record["ms"] = round((time.perf_counter() - started) * 1000, 3)
        if request.peer:
            record["peer"] = request.peer
        log.info("%s", orjson.dumps(record).decode())
        return response

    def _route(self, path: str) -> tuple[_Store, str, str | None]:
        """(store, api, external key id) of a path, or InvalidUriPathException."""
        cut = path.rfind(API_PATH)  # the suffix after it (/health, /keys/<id>/<op>) never holds it
        store = self._stores.get(path[:cut + len(API_PATH)]) if cut >= 0 else None
        if store is None:
            raise InvalidUriPathException()
        rest = path[cut + len(API_PATH):]
        if rest == "/health":
            return store, "health", None
        parts = rest.split("/")
        if len(parts) == 4 and parts[0] == "" and parts[1] == "keys" and parts[3] in OPERATIONS \
                and valid_key_id(parts[2]):
            return store, parts[3], parts[2]
        raise InvalidUriPathException()

    async def _handle(self, request: Request, record: dict[str, Any]) -> Response:
        try:
            store, api, key_id = self._route(request.path)
        except InvalidUriPathException:
            record["path"] = request.path[:300]
            raise
        record["api"] = api
        record["uriPathPrefix"] = store.settings.uri_path_prefix
        if key_id is not None:
            record["externalKeyId"] = key_id
        if request.method != "POST":
            raise MethodNotAllowed(f"{request.method} is not allowed; the XKS proxy APIs accept only POST.")
        if self._server_names is not None and not _names_this_server(request.headers.get("host", ""),
                                                                     self._server_names):
            # A request signed for another proxy that shares these credentials (SigV4 signs the
            # Host header, so it would verify here): not ours to answer.
            record["host"] = request.headers.get("host", "")[:300]
            raise AuthenticationFailedException("The request's Host header does not name this XKS proxy.")
        try:
            _, access_key_id = store.verifier.verify(request.method, request.path, request.query, request.headers,
                                                     request.body)
        except KMSError as exc:
            raise AuthenticationFailedException(exc.message) from None
        record["accessKeyId"] = access_key_id
        if not store.bucket.take():
            raise ThrottlingException(f"More than {store.settings.requests_per_second} requests a second "
                                      "for this URI path prefix.")

        try:
            document = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            raise ValidationException("The body is not JSON.") from None
        if not isinstance(document, dict):
            raise ValidationException("The body must be a JSON object.")
        metadata = document.get("requestMetadata")
        if not isinstance(metadata, dict) or not metadata:
            raise ValidationException("requestMetadata is required.")
        for name in LOGGED_METADATA:
            value = metadata.get(name)
            if isinstance(value, str):
                record[name] = value[:4096]
        record.update({k: record.pop(k) for k in list(record) if k not in LOGGED_METADATA})  # metadata first
        for name in REQUIRED_METADATA[api]:
            if not isinstance(metadata.get(name), str):
                raise ValidationException(f"requestMetadata.{name} is required (a string).")

        if api == "health":
            return await self._get_health(record)
        assert key_id is not None
        # The whole body is checked before the key is looked at (400 before 404, as AWS's test
        # client expects), and the token is called only once everything else has passed.
        use: Callable[[], Response] | None = None
        if api == "encrypt":
            use = self._encrypt(document, key_id)
        elif api == "decrypt":
            use = self._decrypt(document, key_id)
        settings = store.settings
        if key_id == self.config.health.test_key_label or key_id in store.excluded or \
                (store.allowed is not None and key_id not in store.allowed):
            raise KeyNotFoundException(f"No external key {key_id} in this external key store.")
        disabled = key_id in settings.disabled_xks_key_ids
        if use is None:
            info = await self._token(lambda: self.keys.describe(key_id))
            return Response.json(200, {"keySpec": "AES_256", "keyUsage": info.usage,
                                       "keyStatus": "DISABLED" if disabled else "ENABLED"})
        if disabled:
            raise InvalidStateException(f"The external key {key_id} is disabled.")
        return await self._token(use)

    async def _token(self, call: Callable[[], T]) -> T:
        return await self.worker.call(call, self.config.pkcs11.call_timeout_s)

    # -- Encrypt and Decrypt: the body checked, the token call to make ------------------------
    def _sizes(self, name: str, value: bytes | None, limit: int) -> None:
        if value is not None and len(value) > limit:
            raise UnsupportedOperationException(f"{name} of {len(value)} bytes is more than this proxy "
                                                f"accepts ({limit} bytes).")

    def _encrypt(self, document: Mapping[str, Any], key_id: str) -> Callable[[], Response]:
        limits = self.config.limits
        plaintext = _b64(document, "plaintext", required=True)
        assert plaintext is not None
        _algorithm(document)
        aad = _b64(document, "additionalAuthenticatedData") or b""
        integrity = document.get("ciphertextDataIntegrityValueAlgorithm")
        if integrity is not None and integrity != INTEGRITY_ALGORITHM:
            raise ValidationException(f"ciphertextDataIntegrityValueAlgorithm must be {INTEGRITY_ALGORITHM}.")
        self._sizes("plaintext", plaintext, limits.max_plaintext_bytes)
        self._sizes("additionalAuthenticatedData", aad, limits.max_aad_bytes)
        metadata = b""  # this proxy returns no ciphertextMetadata
        prefix = aad + metadata if integrity is not None else None

        def call() -> Response:  # on the token's thread
            sealed = self.keys.encrypt(key_id, plaintext, hsm_aad(aad, metadata), prefix)
            answer = {"ciphertext": _b64text(sealed.ciphertext), "initializationVector": _b64text(sealed.iv),
                      "authenticationTag": _b64text(sealed.tag)}
            if sealed.integrity is not None:
                answer["ciphertextDataIntegrityValue"] = _b64text(sealed.integrity)
            return Response.json(200, answer)

        return call

    def _decrypt(self, document: Mapping[str, Any], key_id: str) -> Callable[[], Response]:
        limits = self.config.limits
        ciphertext = _b64(document, "ciphertext", required=True)
        iv = _b64(document, "initializationVector", required=True)
        tag = _b64(document, "authenticationTag", required=True)
        assert ciphertext is not None and iv is not None and tag is not None
        _algorithm(document)
        aad = _b64(document, "additionalAuthenticatedData") or b""
        metadata = _b64(document, "ciphertextMetadata") or b""
        if len(iv) not in (12, 16):
            raise ValidationException("initializationVector must be 12 or 16 bytes.")
        if len(tag) != 16:
            raise ValidationException("authenticationTag must be 16 bytes.")
        if len(metadata) > MAX_METADATA_BYTES:
            raise ValidationException(f"ciphertextMetadata must be at most {MAX_METADATA_BYTES} bytes.")
        self._sizes("ciphertext", ciphertext, limits.max_plaintext_bytes)
        self._sizes("additionalAuthenticatedData", aad, limits.max_aad_bytes)

        def call() -> Response:  # on the token's thread
            plaintext = self.keys.decrypt(key_id, iv, ciphertext, tag, hsm_aad(aad, metadata))
            return Response.json(200, {"plaintext": _b64text(plaintext)})

        return call

    # -- GetHealthStatus ----------------------------------------------------------------------
    async def _get_health(self, record: dict[str, Any]) -> Response:
        health = self._health
        if health is None or time.monotonic() - health.at > self.config.health.cache_seconds:
            # One deep check at a time, in a task of its own: every request waiting for it is shielded,
            # so a request that is cancelled (its client gone, its time up) leaves the others their answer.
            task = self._health_task
            if task is None:
                task = self._health_task = asyncio.get_running_loop().create_task(self._refresh_health())
                task.add_done_callback(_retrieve)
            health = await asyncio.shield(task)
        record["healthStatus"] = health.status
        if health.error is not None:
            raise type(health.error)(health.error.message)
        assert health.body is not None
        return Response.json(200, health.body)

    async def _refresh_health(self) -> _Health:
        try:
            health = await self._check_health()
            self._health = health
            return health
        finally:
            self._health_task = None

    async def _check_health(self) -> _Health:
        """ACTIVE: the test key encrypts and decrypts in the token. DEGRADED: the token answers, but
        the test key cannot be used (missing, or its flags). UNAVAILABLE: the token cannot be used
        at all; then the answer is an error (InternalException, DependencyTimeoutException), since
        the spec keeps 200 for a proxy that can serve."""
        label = self.config.health.test_key_label
        status, reason = "ACTIVE", ""
        try:
            await self._token(lambda: self.keys.health_check(label))
        except (InternalException, DependencyTimeoutException) as exc:
            log.warning("health check: the HSM is UNAVAILABLE: %s", exc.message)
            return _Health(time.monotonic(), error=type(exc)(f"The HSM is UNAVAILABLE: {exc.message}"),
                           status="UNAVAILABLE")
        except XksError as exc:
            status, reason = "DEGRADED", exc.message
        try:
            token = await self._token(self.keys.token_info)
        except XksError as exc:
            log.warning("health check: the HSM is UNAVAILABLE: %s", exc.message)
            return _Health(time.monotonic(), error=type(exc)(f"The HSM is UNAVAILABLE: {exc.message}"),
                           status="UNAVAILABLE")
        if reason:
            log.warning("health check: the HSM is DEGRADED: the test key %s cannot be used: %s", label, reason)
        body = {
            "xksProxyFleetSize": self.config.health.fleet_size,
            "xksProxyVendor": VENDOR,
            "xksProxyModel": MODEL,
            "ekmVendor": token.manufacturer or "unknown",
            "ekmFleetDetails": [{
                "id": token.serial or token.label,
                "model": f"{token.model} (token {token.label}, hardware {token.hardware_version}, "
                         f"firmware {token.firmware_version})",
                "healthStatus": status,
            }],
        }
        return _Health(time.monotonic(), body=body, status=status)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A health check that failed while nobody waited for it: its exception is not worth a warning."""
    if not task.cancelled():
        task.exception()


def _names_this_server(host: str, names: frozenset[str]) -> bool:
    """Whether a Host header is one of [server] server_names: as sent, or without its port when the
    name is listed without one."""
    host = host.lower()
    if host in names:
        return True
    bare = host[:host.index("]") + 1] if host.startswith("[") and "]" in host else host.rpartition(":")[0]
    return bool(bare) and bare in names


@dataclass
class Reload:
    """What a SIGHUP changed, for its log line."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)


def compare(old: Config, new: Config) -> Reload:
    """Which prefixes a reload adds, removes or changes, and which sections need a restart."""
    out = Reload()
    old_stores = {s.uri_path_prefix: s for s in old.key_stores}
    new_stores = {s.uri_path_prefix: s for s in new.key_stores}
    out.added = sorted(p or "(none)" for p in new_stores.keys() - old_stores.keys())
    out.removed = sorted(p or "(none)" for p in old_stores.keys() - new_stores.keys())

    def fingerprint(store: KeyStoreSettings) -> tuple[Any, ...]:
        creds = tuple((c.access_key_id, c.secret_access_key.reveal()) for c in store.credentials)
        return creds, store.xks_key_id_set, store.disabled_xks_key_ids, store.requests_per_second

    out.changed = sorted(p or "(none)" for p in new_stores.keys() & old_stores.keys()
                         if fingerprint(new_stores[p]) != fingerprint(old_stores[p]))
    for name in ("server", "tls", "pkcs11", "health", "limits"):
        if getattr(old, name) != getattr(new, name):
            out.needs_restart.append(f"[{name}]")
    return out
