"""The append-only, hash-chained audit log and its group-commit writer.

Each node keeps its own chain of records (their format: `chain.py`). Every `digest_interval`
seconds with new records, and on shutdown, the server signs a digest with the audit signing key
(Ed25519, sealed under the root key like all key material):

    {"created": ..., "digest_seq": d, "node": ..., "prev_digest": <sha256 of digest d-1's body>,
     "record_hash": <hash of the newest record>, "record_seq": <its seq>}

Durability (group commit in a writer process): an API call hands its event to `submit` and is
answered only once its record is durable. Events go to the writer process (`writer.py`) in
frames over a pipe: those of one loop iteration together, or, when the writer is idle and
FLUSH_AT events are waiting, at once. The writer takes every frame waiting, chains
their events onto the durable head (seq, prev, canonical text, hash: `chain.py`), commits them in
one transaction (SQLite: WAL with synchronous=FULL; PostgreSQL: a commit) while the loop goes on
serving, and answers each batch with the new durable head; the answer resolves the calls' futures
and, for RSGI, sends their responses at once. If the transaction fails, every call in it fails
and the writer's head stays where it was, so the chain has no gap: nothing is answered
unaudited. If the writer dies, every waiting call fails and a new writer is started.

Why not just one frame per loop iteration: under load an iteration serves every request ready,
the whole batch then waits for one commit, and its clients come back together; the loop sat
idle through every commit (28% of the time at 64 connections). Handing an idle writer the first
few events of an iteration, and picking up its answers while the iteration goes on (`submit`
looks every POLL_INTERVAL while batches are in flight), overlaps the commits with serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ..crypto import signing
from ..crypto.root import RootKey
from ..errors import InvalidCiphertextException, KMSInternalException
from ..storage import Store, Tx
from . import writer
from .chain import GENESIS, canonical, record_hash
from .usage import UsageTracker

log = logging.getLogger("openkms.audit")

SIGNING_KEY_META = "audit_signing_key"
PUBLIC_KEY_META = "audit_public_key"
SIGNING_KEY_AAD = b"openkms:audit-signing-key"
Waiter = tuple["asyncio.Future[None]", "Callable[[bool], None] | None"]
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
WRITER_START_TIMEOUT = 60.0
WRITER_STOP_TIMEOUT = 30.0
FLUSH_AT = 8              # events waiting that go to an idle writer at once (bench/pair.py --alternate:
                          # 1-12 all did alike, 0.81-0.86 of unaudited throughput; 8 keeps batches larger)
POLL_INTERVAL = 0.0002    # s between looks for the writer's answers from `submit`


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
                 usage: UsageTracker | None = None, digest_file: Path | None = None) -> None:
        self._store = store
        # Every digest is also appended here, outside the store: someone who can rewrite the
        # database cannot take back what the digests already signed.
        self._digest_file = digest_file
        self.node_id = node_id
        self._signing_key, self.public_key = load_signing_key(store, root)
        self._digest_interval = digest_interval
        self.usage = usage
        with store.begin() as tx:
            digest = tx.audit.digest_head(node_id)
        self._digest_seq = int(digest.digest_seq) if digest is not None else 0
        self._digest_hash = record_hash(digest.body) if digest is not None else GENESIS
        self._digested_seq = int(digest.record_seq) if digest is not None else 0
        self._last_digest = time.monotonic()
        # The chain's durable head as the writer last reported it (digests sign only this).
        self._confirmed = (0, GENESIS)
        self._head_known = False
        self._outbox: list[tuple[float, dict[str, Any]]] = []
        self._outbox_intents: list[str] = []  # event ids of the calls in the outbox that left an intent
        self._outbox_futures: list[Waiter] = []
        self._flush_scheduled = False
        self._polled_at = 0.0
        self._inflight: dict[int, list[Waiter]] = {}
        self._sent_at: dict[int, float] = {}  # batch -> time.monotonic() it went to the writer
        # For the metrics: called with each batch's size when it goes, and its commit's latency.
        self.on_batch: Callable[[int], None] | None = None
        self.on_commit: Callable[[float], None] | None = None
        self._failed_batches = 0  # batches in a row the writer could not commit
        self._batch = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reading: asyncio.AbstractEventLoop | None = None
        self._respawn_after = 0.0
        self._closed = False
        self._spawned = False
        # Digests and key-usage flushes: rare, on a thread of their own.
        self._chores = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openkms-audit")
        self._spawn()

    # -- the writer process -------------------------------------------------------------------
    def _spawn(self) -> None:
        """Start the writer; `_await_ready` takes the chain's durable head from its first answer
        (the writer opens the store meanwhile, while the server goes on starting)."""
        child_in, self._wfd = os.pipe()
        self._rfd, child_out = os.pipe()
        with contextlib.suppress(OSError):  # room for ~800 records in flight; the default will do too
            fcntl.fcntl(self._wfd, F_SETPIPE_SZ, 1 << 20)
        url = self._store.engine.url.render_as_string(hide_password=False)
        # At the first start every intent left in the store is an orphan of an earlier process;
        # later, calls of this process may be between their state change and their record.
        recover_before = time.time() - (writer.RECOVERY_GRACE if self._spawned else 0.0)
        self._spawned = True
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "openkms.audit.writer", self.node_id, repr(recover_before)],
                stdin=child_in, stdout=child_out,
                env=os.environ | {writer.URL_VARIABLE: url}, close_fds=True)
        finally:
            os.close(child_in)
            os.close(child_out)
        self._reader = writer.FrameReader()
        self._ready = False

    def _await_ready(self) -> None:
        if self._ready:
            return
        deadline = time.monotonic() + WRITER_START_TIMEOUT
        frames: list[Any] = []
        while not frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._rfd], [], [], remaining)[0]:
                self._stop_writer(kill=True)
                raise KMSInternalException("The audit writer did not start.")
            data = os.read(self._rfd, 65536)
            if not data:
                self._stop_writer(kill=True)
                raise KMSInternalException("The audit writer could not open the store.")
            frames = self._reader.feed(data)
        os.set_blocking(self._rfd, False)
        for frame in frames:
            self._on_frame(frame)
        self._ready = self._head_known = True

    def _stop_writer(self, kill: bool = False) -> None:
        """Close the pipes and reap the writer; `kill` it first when it has failed (the event loop
        must not wait on a writer that may hang)."""
        self._ready = False
        if self._reading is not None:
            with contextlib.suppress(Exception):  # the loop may be closed already
                self._reading.remove_reader(self._rfd)
            self._reading = None
        for fd in (self._wfd, self._rfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._proc is not None:
            if kill:
                with contextlib.suppress(OSError):
                    self._proc.kill()
            try:
                self._proc.wait(timeout=WRITER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _writer_lost(self) -> None:
        """The writer died or its pipe broke: fail every call waiting on it, start afresh later."""
        log.error("the audit writer stopped; calls fail until it is restarted")
        self._stop_writer(kill=True)
        failed = [f for futures in self._inflight.values() for f in futures] + self._outbox_futures
        self._inflight.clear()
        self._sent_at.clear()
        self._outbox, self._outbox_futures, self._outbox_intents = [], [], []
        _settle(failed, True)
        self._respawn_after = time.monotonic() + 1.0

    def _on_frame(self, frame: list[Any], settle: bool = True) -> None:
        if frame[0] == "ack":  # ["ack", batch, ok, seq, hash]: the durable head after that batch
            self._confirmed = (frame[3], frame[4])
            sent = self._sent_at.pop(frame[1], None)
            if sent is not None and self.on_commit is not None and frame[2]:
                self.on_commit(time.monotonic() - sent)
            self._failed_batches = 0 if frame[2] else self._failed_batches + 1
            futures = self._inflight.pop(frame[1], None)
            if futures is not None and settle:
                _settle(futures, not frame[2])
        elif frame[0] == "head":  # ["head", seq, hash]: the writer's first answer
            self._confirmed = (frame[1], frame[2])

    def problem(self, stuck_after: float = 5.0) -> str | None:
        """Why the audit log cannot take calls now (for /ready), or None: closed, no writer
        running, its last batch not committed, or a batch waiting longer than `stuck_after` s."""
        if self._closed:
            return "the audit log is closed"
        if self._proc is None or self._proc.poll() is not None:
            return "the audit writer is not running"
        if self._failed_batches:
            return "the audit writer could not commit its last batch"
        if self._sent_at and time.monotonic() - min(self._sent_at.values()) > stuck_after:
            return f"an audit batch has waited more than {stuck_after:g} s for its commit"
        return None

    def _on_readable(self) -> None:
        try:
            data = os.read(self._rfd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._writer_lost()
            return
        for frame in self._reader.feed(data):
            self._on_frame(frame)

    # -- appending (on the event loop) ------------------------------------------------------------
    def submit(self, event: dict[str, Any], on_done: Callable[[bool], None] | None = None,
               intent: bool = False) -> asyncio.Future[None]:
        """A future that resolves once the record is durable (fails if it cannot be written).
        `on_done(durable)`, if given, runs the moment that is known, before the future's waiters
        wake (they wake one loop iteration later): a server answers from it without that delay.
        `intent`: the call wrote an intent (`write_intent`), which the record's transaction deletes."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._ready and not self._start_writer():
            _settle([(future, on_done)], True)
            return future
        if self._reading is not loop:
            loop.add_reader(self._rfd, self._on_readable)
            self._reading = loop
        self._outbox.append((time.time(), event))  # the writer chains it: seq, prev, canonical text, hash
        self._outbox_futures.append((future, on_done))
        if intent:
            self._outbox_intents.append(event["eventID"])
        if self._inflight:  # answers that came during this iteration: their calls are answered now
            now = time.monotonic()
            if now - self._polled_at >= POLL_INTERVAL:
                self._polled_at = now
                self._on_readable()
        if not self._inflight and len(self._outbox) >= FLUSH_AT:
            self._flush()  # the writer is idle: it commits these while the loop serves the next requests
            return future
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)  # after the requests ready now: one frame for all of them
        return future

    def write_intent(self, tx: Tx, event: dict[str, Any]) -> None:
        """Store a state-changing call's intent in the transaction `tx` of its change (see writer.py)."""
        tx.audit.insert_pending(self.node_id, event["eventID"], orjson.dumps(event).decode())

    def _start_writer(self) -> bool:
        """Have a writer ready: wait for the one starting, or start a new one after a failure."""
        if self._closed or (self._proc is None and time.monotonic() < self._respawn_after):
            return False
        try:
            if self._proc is None:
                self._spawn()
            self._await_ready()
        except Exception:  # the call fails closed; try again in a second
            log.exception("cannot start the audit writer")
            self._respawn_after = time.monotonic() + 1.0
            return False
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        rows, futures, intents = self._outbox, self._outbox_futures, self._outbox_intents
        if not rows:
            return
        self._outbox, self._outbox_futures, self._outbox_intents = [], [], []
        self._batch += 1
        self._inflight[self._batch] = futures
        self._sent_at[self._batch] = time.monotonic()
        if self.on_batch is not None:
            self.on_batch(len(rows))
        try:
            writer.write_all(self._wfd, writer.encode(["events", self._batch, rows, intents]))
        except OSError:
            self._writer_lost()

    def tick(self) -> None:
        """Periodic work (about once a second): store key usage, sign a digest when due."""
        self._chores.submit(self._tick)

    def _tick(self) -> None:
        if self.usage is not None:
            try:
                self.usage.flush()
            except Exception:
                log.exception("could not store key usage; will retry")
        if time.monotonic() - self._last_digest >= self._digest_interval:
            self._write_digest()

    def _write_digest(self) -> None:
        self._last_digest = time.monotonic()
        if not self._head_known:  # no writer has told the durable head yet
            return
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
        if self._digest_file is not None:
            try:
                export_digest(self._digest_file, self._digest_seq, body, signature)
            except OSError as exc:
                log.error("could not export audit digest %d to %s: %s", self._digest_seq, self._digest_file,
                          exc.strerror)

    def digest_now(self) -> None:
        """Sign a digest of everything written so far, and return once it is stored."""
        self._chores.submit(self._write_digest).result()

    def close(self) -> None:
        """Hand over what is queued, let the writer finish, store key usage, write a final digest."""
        if self._closed:
            return
        self._closed = True
        if self._proc is not None and not self._ready:
            with contextlib.suppress(Exception):  # a writer that never started has nothing to hand over
                self._await_ready()
        if self._proc is not None:
            self._flush()
        if self._proc is not None:
            os.close(self._wfd)  # end of input: the writer commits what it has, answers, and exits
            self._wfd = -1
            os.set_blocking(self._rfd, True)
            while select.select([self._rfd], [], [], WRITER_STOP_TIMEOUT)[0]:
                data = os.read(self._rfd, 65536)
                if not data:
                    break
                for frame in self._reader.feed(data):
                    self._on_frame(frame, settle=False)  # the loop has stopped; nobody awaits these
            self._stop_writer()
        if self.usage is not None:
            self._chores.submit(self.usage.flush)
        self._chores.submit(self._write_digest)
        self._chores.shutdown(wait=True)


def digest_line(digest_seq: int, body: str, signature: bytes) -> str:
    """A digest as a JSON line, as exported and archived."""
    return orjson.dumps({"type": "digest", "digest_seq": digest_seq, "body": body,
                         "signature": base64.b64encode(signature).decode()}).decode() + "\n"


def export_digest(path: Path, digest_seq: int, body: str, signature: bytes) -> None:
    """Append a digest to the node's exported digest file and make it durable."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        writer.write_all(fd, digest_line(digest_seq, body, signature).encode())
        os.fsync(fd)
    finally:
        os.close(fd)




def _settle(waiters: list[Waiter], failed: bool) -> None:
    for future, on_done in waiters:
        if future.done():
            continue
        if on_done is not None:
            try:
                on_done(not failed)
            except Exception:
                log.exception("audit completion callback failed")
        if failed:
            future.set_exception(KMSInternalException("The call could not be recorded in the audit log."))
        else:
            future.set_result(None)
