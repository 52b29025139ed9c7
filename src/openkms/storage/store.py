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
forget to invalidate a cached copy of it on this node.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, SQLAlchemyError

from ..errors import (
    AlreadyExistsException,
    ConfigurationError,
    DependencyTimeoutException,
    KMSInternalException,
    ValidationException,
)
from ..model import Account, Alias, Key, KeyState, KeyUsage, KeyVersion, Origin, Principal
from . import schema as t

# Called with the Tx of each transaction that wrote, just before it commits; set per request.
before_commit: ContextVar[Callable[[Tx], None] | None] = ContextVar("openkms_before_commit", default=None)
_WROTE = "openkms_wrote"
_WRITES = ("INSERT", "UPDATE", "DELETE", "insert", "update", "delete")


def _note_write(conn: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
    if before_commit.get() is not None and statement.lstrip().startswith(_WRITES):
        conn.info[_WROTE] = True


def to_ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def from_ts(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _now_ts(dt: datetime) -> float:
    return dt.timestamp()


def normalize_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


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
            conn.execute(text(statement))
        conn.execute(update(t.meta).where(t.meta.c.name == "schema_version").values(value=str(target).encode()))


@dataclass
class Changes:
    """What one transaction wrote, as far as caches of this node care (filled by the repositories)."""

    keys: set[str] = field(default_factory=set)                         # key ids (metadata)
    versions: set[tuple[str, int | None]] = field(default_factory=set)  # (key id, version; None: all)
    aliases: set[tuple[str, str]] = field(default_factory=set)          # (account id, alias name)
    alias_keys: set[str] = field(default_factory=set)                   # key ids whose aliases changed
    tags: set[str] = field(default_factory=set)                         # key ids
    grants: set[str] = field(default_factory=set)                       # key ids
    identities: set[str] = field(default_factory=set)                   # principal ids (identity policies)
    access_keys: set[str] = field(default_factory=set)                  # access key ids

    def __bool__(self) -> bool:
        return any((self.keys, self.versions, self.aliases, self.alias_keys, self.tags, self.grants,
                    self.identities, self.access_keys))


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._listeners: list[Callable[[Changes], None]] = []

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
        except IntegrityError as exc:
            raise _integrity_error(exc) from None
        except DataError:
            # PostgreSQL cannot hold some values SQLite takes (a NUL character in text, say).
            raise ValidationException("The request holds a value the store cannot keep "
                                      "(for example a NUL character).") from None
        except OperationalError:
            raise DependencyTimeoutException("The key store is not available right now; try again.") from None
        if tx.changes:
            for listener in self._listeners:
                listener(tx.changes)


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


class MetaRepo:
    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    def get(self, name: str) -> bytes | None:
        row = self.conn.execute(select(t.meta.c.value).where(t.meta.c.name == name)).first()
        return None if row is None else bytes(row[0])

    def put(self, name: str, value: bytes) -> None:
        if self.get(name) is None:
            self.conn.execute(insert(t.meta).values(name=name, value=value))
        else:
            self.conn.execute(update(t.meta).where(t.meta.c.name == name).values(value=value))


class AccountRepo:
    """Accounts, their principals and access keys."""

    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    def count(self) -> int:
        return int(self.conn.execute(select(func.count()).select_from(t.accounts)).scalar_one())

    def insert(self, account: Account) -> None:
        self.conn.execute(insert(t.accounts).values(
            account_id=account.account_id, name=account.name, created=_now_ts(account.created)))

    def get(self, account_id: str) -> Account | None:
        row = self.conn.execute(select(t.accounts).where(t.accounts.c.account_id == account_id)).first()
        return None if row is None else Account(row.account_id, row.name, from_ts(row.created))  # type: ignore[arg-type]

    def all(self) -> list[Account]:
        rows = self.conn.execute(select(t.accounts).order_by(t.accounts.c.account_id))
        return [Account(r.account_id, r.name, from_ts(r.created)) for r in rows]  # type: ignore[arg-type]

    def insert_principal(self, p: Principal) -> None:
        self.conn.execute(insert(t.principals).values(
            principal_id=p.principal_id, account_id=p.account_id, name=p.name,
            is_admin=p.is_admin, is_operator=p.is_operator, created=_now_ts(p.created)))

    @staticmethod
    def _principal(row: Any) -> Principal:
        return Principal(row.principal_id, row.account_id, row.name, bool(row.is_admin),
                         from_ts(row.created), bool(row.is_operator))  # type: ignore[arg-type]

    def principal(self, principal_id: str) -> Principal | None:
        row = self.conn.execute(select(t.principals).where(t.principals.c.principal_id == principal_id)).first()
        return None if row is None else self._principal(row)

    def principal_by_name(self, account_id: str, name: str) -> Principal | None:
        row = self.conn.execute(select(t.principals).where(and_(
            t.principals.c.account_id == account_id, t.principals.c.name == name))).first()
        return None if row is None else self._principal(row)

    def principals(self, account_id: str) -> list[Principal]:
        rows = self.conn.execute(select(t.principals).where(t.principals.c.account_id == account_id)
                                 .order_by(t.principals.c.name))
        return [self._principal(r) for r in rows]

    def insert_access_key(self, access_key_id: str, principal_id: str, sealed_secret: bytes,
                          created: datetime) -> None:
        self.conn.execute(insert(t.access_keys).values(
            access_key_id=access_key_id, principal_id=principal_id, status="Active",
            sealed_secret=sealed_secret, created=_now_ts(created)))
        self.changes.access_keys.add(access_key_id)

    def access_key_row(self, access_key_id: str) -> Any:
        return self.conn.execute(select(t.access_keys).where(t.access_keys.c.access_key_id == access_key_id)).first()

    def access_keys(self, principal_id: str) -> list[Any]:
        return list(self.conn.execute(select(t.access_keys).where(t.access_keys.c.principal_id == principal_id)
                                      .order_by(t.access_keys.c.created)))

    def set_access_key_status(self, access_key_id: str, status: str) -> bool:
        res = self.conn.execute(update(t.access_keys).where(t.access_keys.c.access_key_id == access_key_id)
                                .values(status=status))
        self.changes.access_keys.add(access_key_id)
        return res.rowcount > 0

    def delete_access_key(self, access_key_id: str) -> bool:
        res = self.conn.execute(delete(t.access_keys).where(t.access_keys.c.access_key_id == access_key_id))
        self.changes.access_keys.add(access_key_id)
        return res.rowcount > 0

    def delete_principal(self, principal_id: str) -> list[str]:
        """Delete a user with its access keys and identity policies; returns the access key ids."""
        key_ids = [r.access_key_id for r in self.access_keys(principal_id)]
        self.conn.execute(delete(t.access_keys).where(t.access_keys.c.principal_id == principal_id))
        self.conn.execute(delete(t.principal_policies).where(t.principal_policies.c.principal_id == principal_id))
        self.conn.execute(delete(t.principals).where(t.principals.c.principal_id == principal_id))
        self.changes.access_keys.update(key_ids)
        self.changes.identities.add(principal_id)
        return key_ids

    def key_count(self, account_id: str) -> int:
        """Keys of the account that are not deleted yet (pending deletion included)."""
        return int(self.conn.execute(select(func.count()).select_from(t.keys)
                                     .where(t.keys.c.account_id == account_id)).scalar_one())

    def delete(self, account_id: str) -> list[str]:
        """Delete an account that holds no keys, with its users; returns their access key ids."""
        key_ids: list[str] = []
        for p in self.principals(account_id):
            key_ids += self.delete_principal(p.principal_id)
        self.conn.execute(delete(t.accounts).where(t.accounts.c.account_id == account_id))
        return key_ids


class KeyRepo:
    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    @staticmethod
    def _key(row: Any) -> Key:
        return Key(
            key_id=row.key_id, account_id=row.account_id, region=row.region, description=row.description,
            key_spec=row.key_spec, key_usage=KeyUsage(row.key_usage), origin=Origin(row.origin),
            state=KeyState(row.state), created=from_ts(row.created),  # type: ignore[arg-type]
            deletion_date=from_ts(row.deletion_date), pending_window_days=row.pending_window_days,
            current_version=row.current_version, rotation_period_days=row.rotation_period_days,
            next_rotation=from_ts(row.next_rotation), valid_to=from_ts(row.valid_to),
            expiration_model=row.expiration_model, policy=row.policy)

    @staticmethod
    def _mutable(key: Key) -> dict[str, Any]:
        return dict(description=key.description, state=key.state.value, deletion_date=to_ts(key.deletion_date),
                    pending_window_days=key.pending_window_days, current_version=key.current_version,
                    rotation_period_days=key.rotation_period_days, next_rotation=to_ts(key.next_rotation),
                    valid_to=to_ts(key.valid_to), expiration_model=key.expiration_model, policy=key.policy)

    def insert(self, key: Key) -> None:
        self.conn.execute(insert(t.keys).values(
            key_id=key.key_id, account_id=key.account_id, region=key.region, key_spec=key.key_spec,
            key_usage=key.key_usage.value, origin=key.origin.value, created=_now_ts(key.created),
            **self._mutable(key)))
        self.changes.keys.add(key.key_id)

    def get(self, key_id: str, for_update: bool = False) -> Key | None:
        q = select(t.keys).where(t.keys.c.key_id == key_id)
        if for_update:
            q = q.with_for_update()
        row = self.conn.execute(q).first()
        return None if row is None else self._key(row)

    def update(self, key: Key) -> None:
        self.conn.execute(update(t.keys).where(t.keys.c.key_id == key.key_id).values(**self._mutable(key)))
        self.changes.keys.add(key.key_id)

    def any_region(self) -> str | None:
        row = self.conn.execute(select(t.keys.c.region).limit(1)).first()
        return None if row is None else str(row[0])

    def list_ids(self, account_id: str, after: str | None, limit: int) -> list[Key]:
        q = select(t.keys).where(t.keys.c.account_id == account_id)
        if after is not None:
            q = q.where(t.keys.c.key_id > after)
        rows = self.conn.execute(q.order_by(t.keys.c.key_id).limit(limit))
        return [self._key(r) for r in rows]

    def due_for_deletion(self, now: datetime, limit: int = 100) -> list[str]:
        rows = self.conn.execute(select(t.keys.c.key_id).where(and_(
            t.keys.c.state == KeyState.PENDING_DELETION.value, t.keys.c.deletion_date <= _now_ts(now)))
            .limit(limit))
        return [r.key_id for r in rows]

    def due_for_rotation(self, now: datetime, limit: int = 100) -> list[Key]:
        """Keys whose automatic rotation is due, locked for this transaction. Rows another node
        has locked are skipped (PostgreSQL), so each due key is rotated by exactly one node."""
        q = (select(t.keys).where(and_(t.keys.c.next_rotation.is_not(None), t.keys.c.next_rotation <= _now_ts(now)))
             .limit(limit).with_for_update(skip_locked=True))
        return [self._key(r) for r in self.conn.execute(q)]

    def material_expired(self, now: datetime, limit: int = 100) -> list[str]:
        rows = self.conn.execute(select(t.keys.c.key_id).where(and_(
            t.keys.c.valid_to.is_not(None), t.keys.c.valid_to <= _now_ts(now))).limit(limit))
        return [r.key_id for r in rows]

    def delete(self, key_id: str) -> None:
        """The key and everything of it: versions, tags, aliases, grants, import tokens."""
        owner = self.conn.execute(select(t.keys.c.account_id).where(t.keys.c.key_id == key_id)).scalar()
        aliases = self.conn.execute(select(t.aliases.c.name).where(t.aliases.c.target_key_id == key_id))
        self.changes.aliases.update((str(owner), r.name) for r in aliases)
        for kind in (self.changes.keys, self.changes.alias_keys, self.changes.tags, self.changes.grants):
            kind.add(key_id)
        self.changes.versions.add((key_id, None))
        # Children first: SQLite only cascades when foreign_keys is on, PostgreSQL always does.
        self.conn.execute(delete(t.import_tokens).where(t.import_tokens.c.key_id == key_id))
        self.conn.execute(delete(t.grants).where(t.grants.c.key_id == key_id))
        self.conn.execute(delete(t.aliases).where(t.aliases.c.target_key_id == key_id))
        self.conn.execute(delete(t.tags).where(t.tags.c.key_id == key_id))
        self.conn.execute(delete(t.key_versions).where(t.key_versions.c.key_id == key_id))
        self.conn.execute(delete(t.keys).where(t.keys.c.key_id == key_id))


class VersionRepo:
    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    def insert(self, v: KeyVersion, sealed_material: bytes) -> None:
        self.conn.execute(insert(t.key_versions).values(
            key_id=v.key_id, version=v.version, sealed_material=sealed_material, created=_now_ts(v.created),
            material_id=v.material_id, rotation_type=v.rotation_type,
            rotated=to_ts(v.rotated or (v.created if v.rotation_type else None)), import_state=v.import_state,
            valid_to=to_ts(v.valid_to), expiration_model=v.expiration_model, description=v.description))
        self.changes.versions.add((v.key_id, v.version))

    def get(self, key_id: str, version: int) -> bytes | None:
        """The sealed material of a version; None if there is no such version or no material."""
        row = self.conn.execute(select(t.key_versions.c.sealed_material).where(and_(
            t.key_versions.c.key_id == key_id, t.key_versions.c.version == version))).first()
        return bytes(row[0]) or None if row is not None else None

    @staticmethod
    def _version(row: Any) -> KeyVersion:
        return KeyVersion(key_id=row.key_id, version=row.version, created=from_ts(row.created),  # type: ignore[arg-type]
                          material_id=row.material_id, has_material=bool(row.sealed_material),
                          rotation_type=row.rotation_type, rotated=from_ts(row.rotated),
                          import_state=row.import_state,
                          valid_to=from_ts(row.valid_to), expiration_model=row.expiration_model,
                          description=row.description)

    def for_key(self, key_id: str) -> list[KeyVersion]:
        rows = self.conn.execute(select(t.key_versions).where(t.key_versions.c.key_id == key_id)
                                 .order_by(t.key_versions.c.version))
        return [self._version(r) for r in rows]

    def set_material(self, key_id: str, version: int, sealed_material: bytes, import_state: str | None,
                     valid_to: datetime | None, expiration_model: str | None) -> None:
        self.conn.execute(update(t.key_versions).where(and_(
            t.key_versions.c.key_id == key_id, t.key_versions.c.version == version)).values(
            sealed_material=sealed_material, import_state=import_state, valid_to=to_ts(valid_to),
            expiration_model=expiration_model))
        self.changes.versions.add((key_id, version))

    def set_rotation(self, key_id: str, version: int, rotation_type: str, when: datetime) -> None:
        self.conn.execute(update(t.key_versions).where(and_(
            t.key_versions.c.key_id == key_id, t.key_versions.c.version == version)).values(
            rotation_type=rotation_type, rotated=_now_ts(when)))
        self.changes.versions.add((key_id, version))

    def drop_material(self, key_id: str, version: int | None = None) -> None:
        """Forget imported material (all versions, or one); the rows remain as PENDING_IMPORT."""
        q = update(t.key_versions).where(t.key_versions.c.key_id == key_id)
        if version is not None:
            q = q.where(t.key_versions.c.version == version)
        self.conn.execute(q.values(sealed_material=b"", import_state="PENDING_IMPORT", valid_to=None))
        self.changes.versions.add((key_id, version))


class ImportTokenRepo:
    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    def insert(self, token_id: str, key_id: str, algorithm: str, spec: str, sealed_private_key: bytes,
               valid_to: datetime) -> None:
        self.conn.execute(insert(t.import_tokens).values(
            token_id=token_id, key_id=key_id, wrapping_algorithm=algorithm, wrapping_key_spec=spec,
            sealed_private_key=sealed_private_key, valid_to=_now_ts(valid_to)))

    def get(self, token_id: str) -> Any:
        return self.conn.execute(select(t.import_tokens).where(t.import_tokens.c.token_id == token_id)).first()

    def delete_expired(self, now: datetime) -> None:
        self.conn.execute(delete(t.import_tokens).where(t.import_tokens.c.valid_to <= _now_ts(now)))


class AliasRepo:
    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    @staticmethod
    def _alias(row: Any) -> Alias:
        return Alias(row.account_id, row.name, row.target_key_id, from_ts(row.created),  # type: ignore[arg-type]
                     from_ts(row.updated))  # type: ignore[arg-type]

    def get(self, account_id: str, name: str) -> Alias | None:
        row = self.conn.execute(select(t.aliases).where(and_(
            t.aliases.c.account_id == account_id, t.aliases.c.name == name))).first()
        return None if row is None else self._alias(row)

    def insert(self, alias: Alias) -> None:
        self.conn.execute(insert(t.aliases).values(
            account_id=alias.account_id, name=alias.name, target_key_id=alias.target_key_id,
            created=_now_ts(alias.created), updated=_now_ts(alias.updated)))
        self._changed(alias.account_id, alias.name, alias.target_key_id)

    def _changed(self, account_id: str, name: str, *key_ids: str) -> None:
        self.changes.aliases.add((account_id, name))
        self.changes.alias_keys.update(key_ids)

    def retarget(self, account_id: str, name: str, key_id: str, now: datetime) -> None:
        old = self.get(account_id, name)
        self.conn.execute(update(t.aliases).where(and_(
            t.aliases.c.account_id == account_id, t.aliases.c.name == name))
            .values(target_key_id=key_id, updated=_now_ts(now)))
        self._changed(account_id, name, key_id, *([old.target_key_id] if old else []))

    def delete(self, account_id: str, name: str) -> None:
        old = self.get(account_id, name)
        self.conn.execute(delete(t.aliases).where(and_(
            t.aliases.c.account_id == account_id, t.aliases.c.name == name)))
        self._changed(account_id, name, *([old.target_key_id] if old else []))

    def for_account(self, account_id: str, key_id: str | None, after: str | None, limit: int) -> list[Alias]:
        q = select(t.aliases).where(t.aliases.c.account_id == account_id)
        if key_id is not None:
            q = q.where(t.aliases.c.target_key_id == key_id)
        if after is not None:
            q = q.where(t.aliases.c.name > after)
        return [self._alias(r) for r in self.conn.execute(q.order_by(t.aliases.c.name).limit(limit))]

    def names_for_key(self, key_id: str) -> list[str]:
        rows = self.conn.execute(select(t.aliases.c.name).where(t.aliases.c.target_key_id == key_id))
        return [r.name for r in rows]


class TagRepo:
    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    def for_key(self, key_id: str) -> list[tuple[str, str]]:
        rows = self.conn.execute(select(t.tags.c.tag_key, t.tags.c.tag_value)
                                 .where(t.tags.c.key_id == key_id).order_by(t.tags.c.tag_key))
        return [(r.tag_key, r.tag_value) for r in rows]

    def put(self, key_id: str, tag_key: str, tag_value: str) -> None:
        self.conn.execute(delete(t.tags).where(and_(t.tags.c.key_id == key_id, t.tags.c.tag_key == tag_key)))
        self.conn.execute(insert(t.tags).values(key_id=key_id, tag_key=tag_key, tag_value=tag_value))
        self.changes.tags.add(key_id)

    def remove(self, key_id: str, tag_key: str) -> None:
        self.conn.execute(delete(t.tags).where(and_(t.tags.c.key_id == key_id, t.tags.c.tag_key == tag_key)))
        self.changes.tags.add(key_id)


class AuditAppender:
    """The audit writer process's own driver connection: each batch of records is one multi-row
    INSERT and a COMMIT, with no SQLAlchemy in between (its per-row parameter handling and
    transaction bookkeeping cost more than the insert). Rows are sequences in COLUMNS order."""

    COLUMNS = ("node_id", "seq", "event_time", "event_id", "event_name", "caller_account", "owner_account",
               "principal_arn", "key_id", "error_code", "record", "hash")
    ROWS_PER_STATEMENT = 256  # 256 x 12 parameters: well under SQLite's and PostgreSQL's limits

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Any = None
        self._mark = mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._group = f"({', '.join([mark] * len(self.COLUMNS))})"
        self._head = f"INSERT INTO {t.audit_events.name} ({', '.join(self.COLUMNS)}) VALUES "
        self._sql: dict[int, str] = {}

    def append(self, rows: list[tuple[Any, ...]], node_id: str, pending: list[str]) -> None:
        """Write `rows` in one transaction, deleting the node's `pending` intents (by event id)
        in the same one; raise (having rolled back) if that fails."""
        if self._conn is None:
            self._conn = self._engine.raw_connection()
        dbapi = self._conn.dbapi_connection
        try:
            cursor = dbapi.cursor()
            try:
                for start in range(0, len(rows), self.ROWS_PER_STATEMENT):
                    chunk = rows[start:start + self.ROWS_PER_STATEMENT]
                    sql = self._sql.get(len(chunk))
                    if sql is None:
                        sql = self._sql[len(chunk)] = self._head + ", ".join([self._group] * len(chunk))
                    cursor.execute(sql, [value for row in chunk for value in row])
                for start in range(0, len(pending), self.ROWS_PER_STATEMENT):
                    ids = pending[start:start + self.ROWS_PER_STATEMENT]
                    cursor.execute(f"DELETE FROM {t.audit_pending.name} WHERE node_id = {self._mark} "
                                   f"AND event_id IN ({', '.join([self._mark] * len(ids))})", [node_id, *ids])
            finally:
                cursor.close()
            dbapi.commit()
        except BaseException:
            self.close(broken=True)
            raise

    def close(self, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if broken:
                conn.invalidate()  # rolls back and drops it, in case the connection itself failed
            else:
                conn.close()
        except Exception:  # closing a failed connection may fail again; it is gone either way
            pass


class AuditRepo:
    """Append-only access to the audit chain: insert, read, query. No update, no delete of records
    (other than `archive_up_to`, which the retention task calls after writing them to a file)."""

    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    def head(self, node_id: str) -> tuple[int, str] | None:
        row = self.conn.execute(select(t.audit_events.c.seq, t.audit_events.c.hash)
                                .where(t.audit_events.c.node_id == node_id)
                                .order_by(t.audit_events.c.seq.desc()).limit(1)).first()
        return None if row is None else (int(row.seq), str(row.hash))

    def insert_pending(self, node_id: str, event_id: str, event: str) -> None:
        self.conn.execute(insert(t.audit_pending).values(node_id=node_id, event_id=event_id,
                                                         created=time.time(), event=event))

    def pending(self, node_id: str, before: float, limit: int) -> list[tuple[str, float, str]]:
        """(event_id, created, event) of the node's oldest `limit` intents written before
        `before`, the latest of each call, oldest call first."""
        rows = self.conn.execute(select(t.audit_pending.c.event_id, t.audit_pending.c.created,
                                        t.audit_pending.c.event)
                                 .where(t.audit_pending.c.node_id == node_id, t.audit_pending.c.created < before)
                                 .order_by(t.audit_pending.c.id).limit(limit)).all()
        latest = {str(r.event_id): (str(r.event_id), float(r.created), str(r.event)) for r in rows}
        return sorted(latest.values(), key=lambda intent: intent[1])

    def digest_head(self, node_id: str) -> Any:
        return self.conn.execute(select(t.audit_digests).where(t.audit_digests.c.node_id == node_id)
                                 .order_by(t.audit_digests.c.digest_seq.desc()).limit(1)).first()

    def insert_digest(self, row: dict[str, Any]) -> None:
        self.conn.execute(insert(t.audit_digests).values(**row))

    def nodes(self) -> list[str]:
        ids = {r[0] for r in self.conn.execute(select(t.audit_events.c.node_id).distinct())}
        ids |= {r[0] for r in self.conn.execute(select(t.audit_digests.c.node_id).distinct())}
        return sorted(ids)

    def chain(self, node_id: str, after_seq: int = 0, limit: int = 10_000) -> list[Any]:
        return list(self.conn.execute(select(t.audit_events).where(and_(
            t.audit_events.c.node_id == node_id, t.audit_events.c.seq > after_seq))
            .order_by(t.audit_events.c.seq).limit(limit)))

    def digests(self, node_id: str) -> list[Any]:
        return list(self.conn.execute(select(t.audit_digests).where(t.audit_digests.c.node_id == node_id)
                                      .order_by(t.audit_digests.c.digest_seq)))

    def query(self, *, start: float | None, end: float | None, account: str | None, principal: str | None,
              key_id: str | None, event_name: str | None, error_code: str | None,
              after: tuple[float, str, int] | None, limit: int) -> list[Any]:
        c = t.audit_events.c
        conds = []
        if start is not None:
            conds.append(c.event_time >= start)
        if end is not None:
            conds.append(c.event_time < end)
        if account is not None:
            conds.append((c.caller_account == account) | (c.owner_account == account))
        if principal is not None:
            conds.append(c.principal_arn == principal)
        if key_id is not None:
            conds.append(c.key_id == key_id)
        if event_name is not None:
            conds.append(c.event_name == event_name)
        if error_code is not None:
            conds.append(c.error_code == error_code)
        if after is not None:
            t0, node, seq = after
            conds.append((c.event_time > t0) | ((c.event_time == t0) & (
                (c.node_id > node) | ((c.node_id == node) & (c.seq > seq)))))
        q = select(t.audit_events)
        if conds:
            q = q.where(and_(*conds))
        return list(self.conn.execute(q.order_by(c.event_time, c.node_id, c.seq).limit(limit)))

    def archive_up_to(self, node_id: str, seq: int) -> None:
        self.conn.execute(delete(t.audit_events).where(and_(
            t.audit_events.c.node_id == node_id, t.audit_events.c.seq <= seq)))

    def oldest_before(self, node_id: str, cutoff: float) -> int | None:
        row = self.conn.execute(select(func.max(t.audit_events.c.seq)).where(and_(
            t.audit_events.c.node_id == node_id, t.audit_events.c.event_time < cutoff))).first()
        return None if row is None or row[0] is None else int(row[0])

    def put_last_usage(self, rows: list[dict[str, Any]]) -> None:
        """Upsert: nodes flush concurrently, and of two uses of one key the later one wins."""
        if not rows:
            return
        dialect_insert = pg_insert if self.conn.dialect.name == "postgresql" else sqlite_insert
        q = dialect_insert(t.key_last_usage)
        self.conn.execute(q.on_conflict_do_update(
            index_elements=[t.key_last_usage.c.key_id],
            set_={c: q.excluded[c] for c in ("operation", "used_at", "event_id", "request_id")},
            where=q.excluded.used_at > t.key_last_usage.c.used_at), rows)

    def last_usage(self, key_id: str) -> Any:
        return self.conn.execute(select(t.key_last_usage).where(t.key_last_usage.c.key_id == key_id)).first()


class PolicyRepo:
    """Identity policies attached to users."""

    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    def for_principal(self, principal_id: str) -> list[tuple[str, str]]:
        rows = self.conn.execute(select(t.principal_policies.c.policy_name, t.principal_policies.c.document)
                                 .where(t.principal_policies.c.principal_id == principal_id)
                                 .order_by(t.principal_policies.c.policy_name))
        return [(r.policy_name, r.document) for r in rows]

    def put(self, principal_id: str, name: str, document: str) -> None:
        self.delete(principal_id, name)
        self.conn.execute(insert(t.principal_policies).values(principal_id=principal_id, policy_name=name,
                                                              document=document))

    def delete(self, principal_id: str, name: str) -> bool:
        res = self.conn.execute(delete(t.principal_policies).where(and_(
            t.principal_policies.c.principal_id == principal_id, t.principal_policies.c.policy_name == name)))
        self.changes.identities.add(principal_id)
        return res.rowcount > 0


class GrantRepo:
    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    def insert(self, row: dict[str, Any]) -> None:
        self.conn.execute(insert(t.grants).values(**row))
        self.changes.grants.add(row["key_id"])

    def for_key(self, key_id: str) -> list[Any]:
        return list(self.conn.execute(select(t.grants).where(t.grants.c.key_id == key_id)
                                      .order_by(t.grants.c.created, t.grants.c.grant_id)))

    def by_token_hash(self, token_hash: str) -> Any:
        return self.conn.execute(select(t.grants).where(t.grants.c.token_hash == token_hash)).first()

    def get(self, grant_id: str) -> Any:
        return self.conn.execute(select(t.grants).where(t.grants.c.grant_id == grant_id)).first()

    def by_name(self, key_id: str, name: str) -> list[Any]:
        return list(self.conn.execute(select(t.grants).where(and_(t.grants.c.key_id == key_id,
                                                                  t.grants.c.name == name))))

    def retirable_by(self, principal: str, after: str | None, limit: int) -> list[Any]:
        q = select(t.grants).where(t.grants.c.retiring_principal == principal)
        if after is not None:
            q = q.where(t.grants.c.grant_id > after)
        return list(self.conn.execute(q.order_by(t.grants.c.grant_id).limit(limit)))

    def delete(self, grant_id: str, key_id: str) -> bool:
        self.changes.grants.add(key_id)
        return self.conn.execute(delete(t.grants).where(t.grants.c.grant_id == grant_id)).rowcount > 0
