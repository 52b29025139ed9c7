"""The append-only, hash-chained audit log and its group-commit writer.

Each node keeps its own chain. Record n is stored as the canonical JSON (sorted keys)

    {"event": <CloudTrail-shaped event>, "node": <node id>, "prev": <hash of record n-1>, "seq": n}

and its hash is SHA-256 of exactly that text; record 1's "prev" is 64 zeros. Every
`digest_interval` seconds with new records, and on shutdown, the writer signs a digest with the
audit signing key (Ed25519, sealed under the root key like all key material):

    {"created": ..., "digest_seq": d, "node": ..., "prev_digest": <sha256 of digest d-1's body>,
     "record_hash": <hash of the newest record>, "record_seq": <its seq>}

Durability (pipelined group commit): API calls hand their record to `submit` and answer only
when the returned future resolves. The loop turns the records waiting at that moment into one
batch of chained rows (canonical text and hash) and hands the batch to a single writer thread,
which commits it in one transaction (SQLite: WAL with synchronous=FULL; PostgreSQL: a commit)
while the loop goes on serving; records that arrive meanwhile form the next batch. The loop hears
once per batch that it is durable. Only the driver's insert and commit run on the thread (they
release the GIL while the disk works), so the two do not fight over the GIL. If a batch cannot be
written, every call in it fails and the chain resumes from the last durable record: nothing is
answered unaudited.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
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


def canonical(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()


def record_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def index_columns(event: dict[str, Any]) -> tuple[Any, ...]:
    """The copies of an event's fields that queries filter on, in storage column order
    (event_id, event_name, caller_account, owner_account, principal_arn, key_id, error_code).
    The writer stores them and `verify` recomputes them, so editing a column is detected."""
    identity = event.get("userIdentity") or {}
    resources = event.get("resources") or []
    key_arn = resources[0]["ARN"] if resources else None
    return (event["eventID"], event["eventName"], identity.get("accountId"),
            resources[0]["accountId"] if resources else None, identity.get("arn"),
            key_arn.rsplit("/", 1)[1] if key_arn else None, event.get("errorCode"))


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
        # Chain state as the loop builds it (tentative: rows handed to the writer), and as durably
        # written (confirmed: set by the writer thread; digests sign only this).
        self._seq, self._hash = head if head is not None else (0, GENESIS)
        self._confirmed = (self._seq, self._hash)
        self._digest_seq = int(digest.digest_seq) if digest is not None else 0
        self._digest_hash = record_hash(digest.body) if digest is not None else GENESIS
        self._digested_seq = int(digest.record_seq) if digest is not None else 0
        self._last_digest = time.monotonic()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openkms-audit")
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None] | None]] = []
        self._writing = False

    # -- appending ---------------------------------------------------------------------------
    def submit(self, event: dict[str, Any]) -> asyncio.Future[None]:
        """From the event loop: a future that resolves once the record is durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((event, future))
        if not self._writing:
            self._start_batch(loop)
        return future

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, []
        rows = self._rows(batch)
        self._writing = True
        written = self._writer.submit(self._write, rows, (self._seq, self._hash))
        written.add_done_callback(lambda done: loop.call_soon_threadsafe(self._batch_written, loop, batch, done))

    def _batch_written(self, loop: asyncio.AbstractEventLoop, batch: list[Any], done: Future[Any]) -> None:
        self._writing = False
        error = done.exception() or done.result()
        if error is not None:
            self._seq, self._hash = self._confirmed  # the chain resumes after the last durable record
        _settle([f for _, f in batch if f is not None], error)
        if self._pending:  # what arrived meanwhile is the next batch
            self._start_batch(loop)

    def tick(self) -> None:
        """Periodic work (about once a second): store key usage, sign a digest when due."""
        self._writer.submit(self._tick)

    def _tick(self) -> None:
        if self.usage is not None:
            try:
                self.usage.flush()
            except Exception:
                log.exception("could not store key usage; will retry")
        if time.monotonic() - self._last_digest >= self._digest_interval:
            self._write_digest()

    def _rows(self, batch: list[tuple[dict[str, Any], asyncio.Future[None] | None]]) -> list[tuple[Any, ...]]:
        """Chain a batch onto the tentative head (on the loop)."""
        seq, prev = self._seq, self._hash
        rows = []
        now = time.time()
        for event, _ in batch:
            seq += 1
            text = canonical({"event": event, "node": self.node_id, "prev": prev, "seq": seq})
            prev = record_hash(text)
            rows.append((self.node_id, seq, now, *index_columns(event), text, prev))
        self._seq, self._hash = seq, prev
        return rows

    # -- the writer thread ----------------------------------------------------------------------
    def _write(self, rows: list[tuple[Any, ...]], head: tuple[int, str]) -> BaseException | None:
        try:
            with self._store.begin() as tx:
                tx.audit.insert_many(rows)
        except BaseException as exc:  # noqa: BLE001 - every failure fails the calls, never passes them
            log.error("audit batch of %d record(s) could not be written: %s", len(rows), type(exc).__name__)
            return exc
        self._confirmed = head
        return None

    def _write_digest(self) -> None:
        self._last_digest = time.monotonic()
        seq, head_hash = self._confirmed
        if seq == self._digested_seq:
            return
        body = canonical({"created": datetime.now(UTC).isoformat(), "digest_seq": self._digest_seq + 1,
                          "node": self.node_id, "prev_digest": self._digest_hash, "record_hash": head_hash,
                          "record_seq": seq})
        signature = signing.sign(self._signing_key, body.encode())
        try:
            with self._store.begin() as tx:
                tx.audit.insert_digest({"node_id": self.node_id, "digest_seq": self._digest_seq + 1,
                                        "record_seq": seq, "created": time.time(), "body": body,
                                        "signature": signature})
        except Exception:
            log.exception("could not write an audit digest; will retry")
            return
        self._digest_seq += 1
        self._digest_hash = record_hash(body)
        self._digested_seq = seq

    def digest_now(self) -> None:
        """Sign a digest of everything written so far, and return once it is stored."""
        self._writer.submit(self._write_digest).result()

    def close(self) -> None:
        """Write what is pending, store key usage, write a final digest, stop the writer."""
        pending, self._pending = self._pending, []
        if pending:
            self._writer.submit(self._write, self._rows(pending), (self._seq, self._hash))
        if self.usage is not None:
            self._writer.submit(self.usage.flush)
        self._writer.submit(self._write_digest)
        self._writer.shutdown(wait=True)


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(KMSInternalException("The call could not be recorded in the audit log."))
