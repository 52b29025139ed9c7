"""The secrets of the Secrets Manager API: metadata, versions (sealed values), staging labels, tags."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, insert, select, update

from ..model import Secret, SecretVersion
from . import schema as t
from .repos import Changes, from_ts, to_ts

_SECRET_COLUMNS = ("secret_id", "account_id", "region", "name", "arn", "description", "kms_key_id", "created",
                   "last_changed", "last_accessed", "deletion_date", "rotation_lambda_arn", "rotation_rules",
                   "rotation_enabled", "last_rotated", "next_rotation", "policy")
_TIMES = {"created", "last_changed", "last_accessed", "deletion_date", "last_rotated", "next_rotation"}


def _secret(row: Any) -> Secret:
    values = {c: getattr(row, c) for c in _SECRET_COLUMNS}
    for name in _TIMES:
        values[name] = from_ts(values[name])
    values["rotation_enabled"] = bool(values["rotation_enabled"])
    return Secret(**values)


def _version(row: Any) -> SecretVersion:
    edk, sealed = row.encrypted_data_key, row.sealed_value
    return SecretVersion(row.secret_id, row.version_id, from_ts(row.created), from_ts(row.last_accessed),  # type: ignore[arg-type]
                         row.kind, row.key_arn, None if edk is None else bytes(edk),
                         None if sealed is None else bytes(sealed))


def _columns(values: dict[str, Any]) -> dict[str, Any]:
    return {k: to_ts(v) if k in _TIMES and isinstance(v, datetime) else v for k, v in values.items()}


class SecretRepo:
    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    # -- secrets ----------------------------------------------------------------------------------
    def insert(self, s: Secret) -> None:
        self.changes.secrets.add(s.secret_id)
        self.conn.execute(insert(t.secrets).values(**_columns({c: getattr(s, c) for c in _SECRET_COLUMNS})))

    def get(self, secret_id: str, for_update: bool = False) -> Secret | None:
        q = select(t.secrets).where(t.secrets.c.secret_id == secret_id)
        row = self.conn.execute(q.with_for_update() if for_update else q).first()
        return None if row is None else _secret(row)

    def by_name(self, account_id: str, name: str) -> Secret | None:
        row = self.conn.execute(select(t.secrets).where(and_(
            t.secrets.c.account_id == account_id, t.secrets.c.name == name))).first()
        return None if row is None else _secret(row)

    def by_arn(self, arn: str) -> Secret | None:
        row = self.conn.execute(select(t.secrets).where(t.secrets.c.arn == arn)).first()
        return None if row is None else _secret(row)

    def for_account(self, account_id: str) -> list[Secret]:
        rows = self.conn.execute(select(t.secrets).where(t.secrets.c.account_id == account_id)
                                 .order_by(t.secrets.c.created, t.secrets.c.secret_id))
        return [_secret(r) for r in rows]

    def update(self, secret_id: str, **values: Any) -> None:
        self.changes.secrets.add(secret_id)
        self.conn.execute(update(t.secrets).where(t.secrets.c.secret_id == secret_id).values(**_columns(values)))

    def delete(self, secret_id: str) -> None:
        self.changes.secrets.add(secret_id)
        for table in (t.secret_stages, t.secret_tags, t.secret_versions):
            self.conn.execute(delete(table).where(table.c.secret_id == secret_id))
        self.conn.execute(delete(t.secrets).where(t.secrets.c.secret_id == secret_id))

    def due_for_deletion(self, now: datetime) -> list[str]:
        rows = self.conn.execute(select(t.secrets.c.secret_id).where(and_(
            t.secrets.c.deletion_date.is_not(None), t.secrets.c.deletion_date <= now.timestamp())))
        return [str(r[0]) for r in rows]

    def due_for_rotation(self, now: datetime) -> list[str]:
        rows = self.conn.execute(select(t.secrets.c.secret_id).where(and_(
            t.secrets.c.rotation_enabled.is_(True), t.secrets.c.deletion_date.is_(None),
            t.secrets.c.next_rotation.is_not(None), t.secrets.c.next_rotation <= now.timestamp())))
        return [str(r[0]) for r in rows]

    # -- versions ---------------------------------------------------------------------------------
    def add_version(self, v: SecretVersion) -> None:
        self.changes.secrets.add(v.secret_id)
        self.conn.execute(insert(t.secret_versions).values(
            secret_id=v.secret_id, version_id=v.version_id, created=v.created.timestamp(),
            last_accessed=to_ts(v.last_accessed), kind=v.kind, key_arn=v.key_arn,
            encrypted_data_key=v.encrypted_data_key, sealed_value=v.sealed_value))

    def version(self, secret_id: str, version_id: str) -> SecretVersion | None:
        row = self.conn.execute(select(t.secret_versions).where(and_(
            t.secret_versions.c.secret_id == secret_id, t.secret_versions.c.version_id == version_id))).first()
        return None if row is None else _version(row)

    def versions(self, secret_id: str) -> list[SecretVersion]:
        rows = self.conn.execute(select(t.secret_versions).where(t.secret_versions.c.secret_id == secret_id)
                                 .order_by(t.secret_versions.c.created, t.secret_versions.c.version_id))
        return [_version(r) for r in rows]

    def update_version(self, secret_id: str, version_id: str, **values: Any) -> None:
        self.changes.secrets.add(secret_id)
        self.conn.execute(update(t.secret_versions).where(and_(
            t.secret_versions.c.secret_id == secret_id, t.secret_versions.c.version_id == version_id))
            .values(**_columns(values)))

    def delete_version(self, secret_id: str, version_id: str) -> None:
        self.changes.secrets.add(secret_id)
        self.conn.execute(delete(t.secret_versions).where(and_(
            t.secret_versions.c.secret_id == secret_id, t.secret_versions.c.version_id == version_id)))

    # -- staging labels -------------------------------------------------------------------------
    def stages(self, secret_id: str) -> dict[str, str]:
        """stage -> version id."""
        rows = self.conn.execute(select(t.secret_stages.c.stage, t.secret_stages.c.version_id)
                                 .where(t.secret_stages.c.secret_id == secret_id))
        return {str(r[0]): str(r[1]) for r in rows}

    def set_stage(self, secret_id: str, stage: str, version_id: str) -> None:
        self.changes.secrets.add(secret_id)
        self.remove_stage(secret_id, stage)
        self.conn.execute(insert(t.secret_stages).values(secret_id=secret_id, stage=stage, version_id=version_id))

    def remove_stage(self, secret_id: str, stage: str) -> None:
        self.changes.secrets.add(secret_id)
        self.conn.execute(delete(t.secret_stages).where(and_(
            t.secret_stages.c.secret_id == secret_id, t.secret_stages.c.stage == stage)))

    # -- tags -------------------------------------------------------------------------------------
    def tags(self, secret_id: str) -> list[tuple[str, str]]:
        rows = self.conn.execute(select(t.secret_tags.c.tag_key, t.secret_tags.c.tag_value)
                                 .where(t.secret_tags.c.secret_id == secret_id).order_by(t.secret_tags.c.tag_key))
        return [(str(r[0]), str(r[1])) for r in rows]

    def put_tag(self, secret_id: str, key: str, value: str) -> None:
        self.changes.secrets.add(secret_id)
        self.remove_tag(secret_id, key)
        self.conn.execute(insert(t.secret_tags).values(secret_id=secret_id, tag_key=key, tag_value=value))

    def remove_tag(self, secret_id: str, key: str) -> None:
        self.changes.secrets.add(secret_id)
        self.conn.execute(delete(t.secret_tags).where(and_(
            t.secret_tags.c.secret_id == secret_id, t.secret_tags.c.tag_key == key)))

    # -- rotation -----------------------------------------------------------------------------------
    def claim_rotation(self, secret_id: str, now: datetime, following: datetime | None) -> bool:
        """Take a scheduled rotation that is due (next_rotation at or before `now`) by moving
        next_rotation on to `following` (later than now, or None) in one conditional UPDATE: of
        nodes that try at once, exactly one changes the row; the others find it no longer due."""
        self.changes.secrets.add(secret_id)
        res = self.conn.execute(update(t.secrets).where(and_(
            t.secrets.c.secret_id == secret_id, t.secrets.c.rotation_enabled.is_(True),
            t.secrets.c.deletion_date.is_(None), t.secrets.c.next_rotation.is_not(None),
            t.secrets.c.next_rotation <= now.timestamp())).values(next_rotation=to_ts(following)))
        return res.rowcount == 1

    def rotation_token(self, secret_id: str) -> str | None:
        """The SHA-256 (hex) of the RotationToken of the rotation in progress, if any."""
        row = self.conn.execute(select(t.secrets.c.rotation_token).where(t.secrets.c.secret_id == secret_id)).first()
        return None if row is None or row[0] is None else str(row[0])

    def begin_rotation(self, secret_id: str, digest: str, now: datetime, stale_before: datetime) -> bool:
        """Mark a rotation in progress (its RotationToken's digest), unless one is, on any node: one
        that began before `stale_before` counts as abandoned (its node went away). One conditional
        UPDATE, so of two nodes starting at once exactly one succeeds."""
        self.changes.secrets.add(secret_id)
        c = t.secrets.c
        res = self.conn.execute(update(t.secrets).where(and_(
            c.secret_id == secret_id, (c.rotation_token.is_(None)) | (c.rotation_started.is_(None)) |
            (c.rotation_started < stale_before.timestamp()))).values(rotation_token=digest,
                                                                     rotation_started=now.timestamp()))
        return res.rowcount == 1

    def end_rotation(self, secret_id: str, digest: str | None = None) -> None:
        """The rotation in progress is over (that of `digest` only, if given: not a later one)."""
        self.changes.secrets.add(secret_id)
        condition = t.secrets.c.secret_id == secret_id
        if digest is not None:
            condition = and_(condition, t.secrets.c.rotation_token == digest)
        self.conn.execute(update(t.secrets).where(condition).values(rotation_token=None, rotation_started=None))



class RotationFunctionRepo:
    """Rotation functions (secrets/functions.py): rows; the secret parts stay sealed here."""

    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    def insert(self, account_id: str, name: str, kind: str, config: str, sealed: bytes, created: float) -> None:
        self.conn.execute(insert(t.rotation_functions).values(account_id=account_id, name=name, kind=kind,
                                                              config=config, sealed=sealed, created=created))

    def get(self, account_id: str, name: str) -> Any:
        return self.conn.execute(select(t.rotation_functions).where(and_(
            t.rotation_functions.c.account_id == account_id, t.rotation_functions.c.name == name))).first()

    def for_account(self, account_id: str) -> list[Any]:
        return list(self.conn.execute(select(t.rotation_functions).where(
            t.rotation_functions.c.account_id == account_id).order_by(t.rotation_functions.c.name)))

    def delete(self, account_id: str, name: str) -> bool:
        res = self.conn.execute(delete(t.rotation_functions).where(and_(
            t.rotation_functions.c.account_id == account_id, t.rotation_functions.c.name == name)))
        return res.rowcount > 0
