"""The audit log's tables: the appender the writer process commits chains with, and the repository
that reads chains and digests, holds intents and answers queries."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import schema as t
from .repos import Changes


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
