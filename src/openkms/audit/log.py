"""The append-only, hash-chained audit log and its group-commit writer.

Each node keeps its own chain. Record n is stored as the canonical JSON (sorted keys)

    {"event": <CloudTrail-shaped event>, "node": <node id>, "prev": <hash of record n-1>, "seq": n}

and its hash is SHA-256 of exactly that text; record 1's "prev" is 64 zeros. Every
`digest_interval` seconds with new records, and on shutdown, the writer signs a digest with the
audit signing key (Ed25519, sealed under the root key like all key material):

    {"created": ..., "digest_seq": d, "node": ..., "prev_digest": <sha256 of digest d-1's body>,
     "record_hash": <hash of the newest record>, "record_seq": <its seq>}

Durability: API calls hand their record to `submit` and answer only when the returned future
resolves, which happens after the batch holding the record is committed (SQLite: WAL with
synchronous=FULL; PostgreSQL: commit). One thread writes; requests that arrive while a batch
commits go into the next batch (group commit), so the cost of a commit is shared. If a batch
cannot be written, every call in it fails: nothing is answered unaudited.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

import orjson

from ..crypto import signing
from ..crypto.root import RootKey
from ..errors import InvalidCiphertextException, KMSInternalException
from ..storage import Store
from .usage import UsageTracker

log = logging.getLogger("openkms.audit")

GENESIS = "0" * 64
SIGNING_KEY_META = "audit_signing_key"
PUBLIC_KEY_META = "audit_public_key"
SIGNING_KEY_AAD = b"openkms:audit-signing-key"
MAX_BATCH = 2048


def canonical(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()


def record_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_signing_key(store: Store, root: RootKey) -> tuple[bytes, bytes]:
    """The audit signing key (raw private, DER public), created on first use of a store."""
    with store.begin() as tx:
        sealed, public = tx.meta.get(SIGNING_KEY_META), tx.meta.get(PUBLIC_KEY_META)
        if sealed is None:
            raw, public = signing.new_signing_key()
            tx.meta.put(SIGNING_KEY_META, root.seal(raw, SIGNING_KEY_AAD))
            tx.meta.put(PUBLIC_KEY_META, public)
            return raw, public
    try:
        raw = root.unseal(sealed, SIGNING_KEY_AAD)
    except InvalidCiphertextException:
        raise KMSInternalException("The audit signing key failed its integrity check.") from None
    assert public is not None
    return raw, public


class AuditLog:
    def __init__(self, store: Store, root: RootKey, node_id: str, digest_interval: float = 60.0,
                 usage: UsageTracker | None = None) -> None:
        self._store = store
        self.node_id = node_id
        self._signing_key, self.public_key = load_signing_key(store, root)
        self._digest_interval = digest_interval
        self.usage = usage
        with store.begin() as tx:
            head = tx.audit.head(node_id)
            digest = tx.audit.digest_head(node_id)
        self._seq, self._hash = head if head is not None else (0, GENESIS)
        self._digest_seq = int(digest.digest_seq) if digest is not None else 0
        self._digest_hash = record_hash(digest.body) if digest is not None else GENESIS
        self._digested_seq = int(digest.record_seq) if digest is not None else 0
        self._pending: deque[tuple[dict[str, Any], asyncio.Future[None] | None, threading.Event | None]] = deque()
        self._errors: dict[int, BaseException] = {}
        self._wake = threading.Event()
        self._stop = False
        self._last_digest = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="openkms-audit-writer", daemon=True)
        self._thread.start()

    # -- appending ---------------------------------------------------------------------------
    def submit(self, event: dict[str, Any]) -> asyncio.Future[None]:
        """From the event loop: a future that resolves once the record is durable."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future, None))
        self._wake.set()
        return future

    def append(self, event: dict[str, Any], timeout: float = 30.0) -> None:
        """From any thread: returns once the record is durable, raises if it could not be written."""
        done = threading.Event()
        self._pending.append((event, None, done))
        self._wake.set()
        if not done.wait(timeout):
            raise KMSInternalException("The audit log did not record the call in time.")
        error = self._errors.pop(id(done), None)
        if error is not None:
            raise KMSInternalException("The call could not be recorded in the audit log.")

    # -- the writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=min(1.0, self._digest_interval))
            self._wake.clear()
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), MAX_BATCH))]
                self._commit(batch)
            if self.usage is not None:
                try:
                    self.usage.flush()
                except Exception:
                    log.exception("could not store key usage; will retry")
            if self._stop:
                self._write_digest()
                return
            if time.monotonic() - self._last_digest >= self._digest_interval:
                self._write_digest()

    def _commit(self, batch: list[tuple[dict[str, Any], asyncio.Future[None] | None, threading.Event | None]]) -> None:
        seq, prev = self._seq, self._hash
        rows = []
        for event, _, _ in batch:
            seq += 1
            text = canonical({"event": event, "node": self.node_id, "prev": prev, "seq": seq})
            prev = record_hash(text)
            identity = event.get("userIdentity") or {}
            resources = event.get("resources") or []
            key_arn = resources[0]["ARN"] if resources else None
            rows.append({
                "node_id": self.node_id, "seq": seq, "event_time": time.time(), "event_id": event["eventID"],
                "event_name": event["eventName"], "caller_account": identity.get("accountId"),
                "owner_account": resources[0]["accountId"] if resources else None,
                "principal_arn": identity.get("arn"), "key_id": key_arn.rsplit("/", 1)[1] if key_arn else None,
                "error_code": event.get("errorCode"), "record": text, "hash": prev})
        error: BaseException | None = None
        try:
            with self._store.begin() as tx:
                tx.audit.insert_many(rows)
        except BaseException as exc:
            log.error("audit batch of %d record(s) could not be written: %s", len(rows), type(exc).__name__)
            error = exc
        else:
            self._seq, self._hash = seq, prev
        self._resolve(batch, error)

    def _resolve(self, batch: list[tuple[dict[str, Any], asyncio.Future[None] | None, threading.Event | None]],
                 error: BaseException | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, future, done in batch:
            if future is not None:
                by_loop.setdefault(future.get_loop(), []).append(future)
            if done is not None:
                if error is not None:
                    self._errors[id(done)] = error
                done.set()
        for loop, futures in by_loop.items():
            # One wake-up of the loop per batch, not one per call.
            loop.call_soon_threadsafe(_settle, futures, error)

    def _write_digest(self) -> None:
        self._last_digest = time.monotonic()
        if self._seq == self._digested_seq:
            return
        body = canonical({"created": datetime.now(UTC).isoformat(), "digest_seq": self._digest_seq + 1,
                          "node": self.node_id, "prev_digest": self._digest_hash, "record_hash": self._hash,
                          "record_seq": self._seq})
        signature = signing.sign(self._signing_key, body.encode())
        try:
            with self._store.begin() as tx:
                tx.audit.insert_digest({"node_id": self.node_id, "digest_seq": self._digest_seq + 1,
                                        "record_seq": self._seq, "created": time.time(), "body": body,
                                        "signature": signature})
        except Exception:
            log.exception("could not write an audit digest; will retry")
            return
        self._digest_seq += 1
        self._digest_hash = record_hash(body)
        self._digested_seq = self._seq

    def digest_now(self) -> None:
        """Ask the writer for a digest at its next wake-up (tests and `openkms audit` use this)."""
        self._last_digest = 0.0
        self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is pending, write a final digest, stop the writer."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(KMSInternalException("The call could not be recorded in the audit log."))
