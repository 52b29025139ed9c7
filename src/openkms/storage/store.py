"""Database access: one Store per process, one short transaction per unit of work.

    store = Store.open(url)
    with store.begin() as tx:          # commits on success, rolls back on any exception
        tx.keys.insert(key)
        tx.versions.insert(key.key_id, 1, sealed)

SQLite runs in WAL mode with synchronous=FULL, so an acknowledged write survives a crash.
PostgreSQL is reached through psycopg 3. Database errors are translated at this boundary.

`before_commit` lets a caller add to every transaction that wrote something, in the same
transaction: the API layer records there the intent of a call that changes state, so that the
change and its intent commit together (`AuditRepo.insert_pending`).

Caches subscribe to what commits (`Store.on_commit`): the repositories note in `tx.changes` which
keys, versions, aliases, tags, grants, identity policies and access keys a transaction wrote, and
once it has committed every subscriber hears of it, so that no code path that changes something can
forget to invalidate a cached copy of it on this node. On PostgreSQL the same changes reach the
other nodes' listeners at once (notify.py: sent inside the transaction, heard once it commits), for a
serving node that calls `listen_to_other_nodes()`.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, insert, inspect, select, text, update
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, SQLAlchemyError

from ..errors import (
    AlreadyExistsException,
    ConfigurationError,
    DependencyTimeoutException,
    KMSInternalException,
    ValidationException,
)
from . import notify
from . import schema as t
from .audit import AuditAppender, AuditRepo
from .repos import (
    AccountRepo,
    AliasRepo,
    Changes,
    ClusterRepo,
    GrantRepo,
    ImportTokenRepo,
    KeyRepo,
    KeyStoreRepo,
    MetaRepo,
    PolicyRepo,
    QuotaRepo,
    TagRepo,
    VersionRepo,
)
from .secrets import RotationFunctionRepo, SecretRepo

# Called with the Tx of each transaction that wrote, just before it commits; set per request.
before_commit: ContextVar[Callable[[Tx], None] | None] = ContextVar("openkms_before_commit", default=None)
_WROTE = "openkms_wrote"
_WRITES = ("INSERT", "UPDATE", "DELETE", "insert", "update", "delete")


def _note_write(conn: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
    if before_commit.get() is not None and statement.lstrip().startswith(_WRITES):
        conn.info[_WROTE] = True


def normalize_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+) ")


def _migrate(conn: Connection, existing: bool) -> None:
    """Record the schema version of a new store; bring an older store up to this version."""
    row = conn.execute(select(t.meta.c.value).where(t.meta.c.name == "schema_version")).first()
    if row is None:
        version = 1 if existing else t.SCHEMA_VERSION
        conn.execute(insert(t.meta).values(name="schema_version", value=str(version).encode()))
    else:
        version = int(bytes(row[0]).decode())
    if version > t.SCHEMA_VERSION:
        raise ConfigurationError(
            f"the store has schema version {version}, newer than this openkms ({t.SCHEMA_VERSION}): upgrade openkms")
    for target in range(version + 1, t.SCHEMA_VERSION + 1):
        for statement in t.MIGRATIONS.get(target, []):
            dialect, _, only = statement.partition(": ")
            if only and dialect in ("postgresql", "sqlite"):
                if conn.dialect.name != dialect:
                    continue
                statement = only
            added = _ADD_COLUMN.match(statement)
            if added is not None and added.group(2) in {c["name"] for c in inspect(conn).get_columns(added.group(1))}:
                continue  # a table newer than the store's version: create_all made it with the column
            conn.execute(text(statement))
        conn.execute(update(t.meta).where(t.meta.c.name == "schema_version").values(value=str(target).encode()))


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._listeners: list[Callable[[Changes], None]] = []
        self._sender = notify.origin()
        self._shared = engine.dialect.name == "postgresql"  # other nodes may share it
        self.change_listener: notify.ChangeListener | None = None

    def listen_to_other_nodes(self) -> None:
        """Hear what other nodes commit (PostgreSQL; a SQLite store has one server)."""
        if self._shared and self.change_listener is None:
            self.change_listener = notify.ChangeListener(self.engine, self._sender, self._deliver)

    def _deliver(self, changes: Changes) -> None:
        for listener in self._listeners:
            listener(changes)

    def on_commit(self, listener: Callable[[Changes], None]) -> None:
        """Call `listener(changes)` after every transaction of this store that committed changes."""
        self._listeners.append(listener)

    @classmethod
    def open(cls, url: str, prepare: bool = True) -> Store:
        """`prepare`: create missing tables and migrate (False: a process that only appends to a
        store its server has prepared)."""
        url = normalize_url(url)
        try:
            if url.startswith("sqlite"):
                engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

                @event.listens_for(engine, "connect")
                def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
                    cur = dbapi_conn.cursor()
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA synchronous=FULL")
                    cur.execute("PRAGMA foreign_keys=ON")
                    cur.close()
            elif url.startswith("postgresql"):
                engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
            else:
                raise ConfigurationError(f"unsupported storage URL scheme: {url.split(':', 1)[0]}")
            event.listen(engine, "before_cursor_execute", _note_write)
            if prepare:
                existing = inspect(engine).has_table(t.keys.name)
                t.metadata.create_all(engine)
                with engine.begin() as conn:
                    _migrate(conn, existing)
        except SQLAlchemyError as exc:
            raise ConfigurationError(
                f"cannot open the store: {type(exc).__name__}: {exc.args[0] if exc.args else ''}") from None
        return cls(engine)

    def close(self) -> None:
        if self.change_listener is not None:
            self.change_listener.close()
        self.engine.dispose()

    def audit_appender(self) -> AuditAppender:
        return AuditAppender(self.engine)

    @contextmanager
    def begin(self) -> Iterator[Tx]:
        try:
            with self.engine.begin() as conn:
                conn.info[_WROTE] = False
                tx = Tx(conn)
                yield tx
                hook = before_commit.get()
                if hook is not None and conn.info[_WROTE]:
                    hook(tx)
                if self._shared and tx.changes:
                    notify.publish(conn, self._sender, tx.changes)
        except IntegrityError as exc:
            raise _integrity_error(exc) from None
        except DataError:
            # PostgreSQL cannot hold some values SQLite takes (a NUL character in text, say).
            raise ValidationException("The request holds a value the store cannot keep "
                                      "(for example a NUL character).") from None
        except OperationalError:
            raise DependencyTimeoutException("The key store is not available right now; try again.") from None
        if tx.changes:
            self._deliver(tx.changes)


def _integrity_error(exc: IntegrityError) -> Exception:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == "23505" or "UNIQUE constraint failed" in str(orig):
        return AlreadyExistsException("The resource already exists.")
    return KMSInternalException("The store refused a write.")


class Tx:
    """Repositories bound to one transaction, and what it changed (`changes`)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.changes = changes = Changes()
        self.meta = MetaRepo(conn, changes)
        self.accounts = AccountRepo(conn, changes)
        self.keys = KeyRepo(conn, changes)
        self.versions = VersionRepo(conn, changes)
        self.import_tokens = ImportTokenRepo(conn, changes)
        self.audit = AuditRepo(conn, changes)
        self.policies = PolicyRepo(conn, changes)
        self.grants = GrantRepo(conn, changes)
        self.aliases = AliasRepo(conn, changes)
        self.tags = TagRepo(conn, changes)
        self.clusters = ClusterRepo(conn, changes)
        self.key_stores = KeyStoreRepo(conn, changes)
        self.secrets = SecretRepo(conn, changes)
        self.rotation_functions = RotationFunctionRepo(conn, changes)
        self.quotas = QuotaRepo(conn, changes)
