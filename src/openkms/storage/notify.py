"""What one node commits, heard at once by every other node on the same PostgreSQL store.

A transaction that changed something a cache holds (`Changes`) sends, inside itself, a
`pg_notify('openkms_changes', ...)` naming what changed; PostgreSQL delivers notifications only
when, and as soon as, their transaction commits, so no node hears of a change that rolled back,
and none hears of it before it is visible. Every serving node keeps one connection that LISTENs
(`ChangeListener`, one daemon thread) and hands what it hears to the same commit listeners its own
transactions feed, so a DisableKey, a revoked grant or a disabled access key on one node takes
effect on the others within milliseconds, not after OPENKMS_CACHE_TTL.

The TTL stays as the backstop: a notification is lost only while the listening connection is
down, and when it comes back the node drops everything it cached (`Changes.everything`), since
it cannot know what it missed.

A payload is at most 8,000 bytes (PostgreSQL's limit): a transaction that changed more sends
several. Each names the Store that sent it, so a node does not handle its own changes twice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Connection, Engine, text

from .repos import Changes

CHANNEL = "openkms_changes"
APPLICATION_NAME = "openkms change listener"  # how pg_stat_activity shows the listening connection
MAX_PAYLOAD = 7_900  # PostgreSQL refuses a payload of 8,000 bytes or more
_PAIRS = frozenset({"versions", "aliases"})  # fields whose items are tuples
_FIELDS = ("keys", "versions", "aliases", "alias_keys", "tags", "key_stores", "grants", "identities",
           "access_keys", "secrets", "quotas")

log = logging.getLogger("openkms.notify")


def origin() -> str:
    """A new sender id: one per Store, so a node knows its own notifications."""
    return os.urandom(8).hex()


def payloads(sender: str, changes: Changes) -> Iterator[str]:
    """`changes` as JSON payloads of at most MAX_PAYLOAD bytes each."""
    empty = len(_payload(sender, []))
    parts: list[str] = []
    size = empty
    for name in _FIELDS:
        for item in sorted(getattr(changes, name), key=repr):
            part = json.dumps([name, list(item) if name in _PAIRS else item], separators=(",", ":"))
            if parts and size + len(part.encode()) + 1 > MAX_PAYLOAD:
                yield _payload(sender, parts)
                parts, size = [], empty
            parts.append(part)
            size += len(part.encode()) + 1
    if parts:
        yield _payload(sender, parts)


def _payload(sender: str, parts: list[str]) -> str:
    return f'{{"o":{json.dumps(sender)},"c":[{",".join(parts)}]}}'


def parse(payload: str) -> tuple[str, Changes]:
    """(the sender, what it changed); ValueError for a payload that is not ours."""
    try:
        doc = json.loads(payload)
        sender = doc["o"]
        changes = Changes()
        for name, item in doc["c"]:
            if name not in _FIELDS:
                continue  # a newer node's field: nothing here caches it
            if name == "versions":
                changes.versions.add((str(item[0]), None if item[1] is None else int(item[1])))
            elif name == "aliases":
                changes.aliases.add((str(item[0]), str(item[1])))
            else:
                getattr(changes, name).add(str(item))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"not a change notification: {type(exc).__name__}") from None
    if not isinstance(sender, str):
        raise ValueError("not a change notification: no sender")
    return sender, changes


def publish(conn: Connection, sender: str, changes: Changes) -> None:
    """Send `changes` inside the transaction of `conn` (delivered when it commits)."""
    for payload in payloads(sender, changes):
        conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload})


class ChangeListener:
    """One connection LISTENing on CHANNEL, on a daemon thread, for as long as the node serves."""

    RETRY_SECONDS = 1.0

    def __init__(self, engine: Engine, sender: str, deliver: Callable[[Changes], None]) -> None:
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._sender = sender
        self._deliver = deliver
        self._stop = threading.Event()
        self.listening = threading.Event()  # set while the connection listens (for /ready and tests)
        self.heard = 0
        self._conn: Any = None
        self._thread = threading.Thread(target=self._run, name="openkms-change-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psycopg

        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=5,
                                     application_name=APPLICATION_NAME) as conn:
                    self._conn = conn
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    if not first:
                        # Whatever was sent while no connection listened is lost: forget all.
                        log.warning("listening for other nodes' changes again; dropping every cached entry")
                        self._deliver(Changes(everything=True))
                    first = False
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._heard(note.payload)
            except Exception as exc:
                if self._stop.is_set():
                    break
                first = False
                log.warning("not listening for other nodes' changes (%s); retrying in %.0f s; cached "
                            "entries expire within OPENKMS_CACHE_TTL meanwhile", type(exc).__name__,
                            self.RETRY_SECONDS)
            finally:
                self.listening.clear()
                self._conn = None
            self._stop.wait(self.RETRY_SECONDS)

    def _heard(self, payload: str) -> None:
        try:
            sender, changes = parse(payload)
        except ValueError as exc:
            log.warning("ignored a notification on %s: %s", CHANNEL, exc)
            return
        if sender == self._sender or not changes:
            return
        self.heard += 1
        try:
            self._deliver(changes)
        except Exception:
            log.exception("a cache failed to take a change notification")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3.0)
