"""Repositories: one per aggregate, bound to one transaction (see store.Tx), and `Changes`, where
they note what a transaction wrote for the caches that subscribe to commits (Store.on_commit).

Times are seconds since the epoch in the store, timezone-aware datetimes in the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, select, update

from ..model import (
    Account,
    Alias,
    ConnectionState,
    CustomKeyStore,
    HsmCluster,
    Key,
    KeyState,
    KeyUsage,
    KeyVersion,
    Origin,
    Principal,
    XksProxyConfig,
)
from . import schema as t


def to_ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def from_ts(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _now_ts(dt: datetime) -> float:
    return dt.timestamp()


def _xks_columns(xks: XksProxyConfig | None) -> dict[str, Any]:
    """The custom_key_stores columns of an external key store's proxy (all NULL for none)."""
    return {"xks_uri_endpoint": xks.uri_endpoint if xks else None, "xks_uri_path": xks.uri_path if xks else None,
            "xks_connectivity": xks.connectivity if xks else None,
            "xks_access_key_id": xks.access_key_id if xks else None}


@dataclass
class Changes:
    """What one transaction wrote, as far as caches of this node care (filled by the repositories)."""

    keys: set[str] = field(default_factory=set)                         # key ids (metadata)
    versions: set[tuple[str, int | None]] = field(default_factory=set)  # (key id, version; None: all)
    aliases: set[tuple[str, str]] = field(default_factory=set)          # (account id, alias name)
    alias_keys: set[str] = field(default_factory=set)                   # key ids whose aliases changed
    tags: set[str] = field(default_factory=set)                         # key ids
    key_stores: set[str] = field(default_factory=set)                   # custom key store ids
    grants: set[str] = field(default_factory=set)                       # key ids
    identities: set[str] = field(default_factory=set)                   # principal ids (identity policies)
    access_keys: set[str] = field(default_factory=set)                  # access key ids
    secrets: set[str] = field(default_factory=set)                      # secret ids (Secrets Manager)
    quotas: set[str] = field(default_factory=set)                       # account ids ("*": all) of quotas
    # Anything may have changed (changes from other nodes were lost): drop every cached entry.
    everything: bool = False

    def __bool__(self) -> bool:
        return self.everything or any((self.keys, self.versions, self.aliases, self.alias_keys, self.tags, self.grants,
                    self.identities, self.access_keys, self.key_stores, self.secrets, self.quotas))


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

    def delete(self, name: str) -> None:
        self.conn.execute(delete(t.meta).where(t.meta.c.name == name))


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
        """Customer keys of the account that are not deleted yet (pending deletion included); AWS
        managed keys (made for a service, deletable by nobody) go with their account."""
        c = t.keys.c
        return int(self.conn.execute(select(func.count()).select_from(t.keys).where(and_(
            c.account_id == account_id, (c.key_manager.is_(None)) | (c.key_manager != "AWS")))).scalar_one())

    def managed_key_ids(self, account_id: str) -> list[str]:
        c = t.keys.c
        return [str(r[0]) for r in self.conn.execute(select(c.key_id).where(and_(
            c.account_id == account_id, c.key_manager == "AWS")))]

    def delete(self, account_id: str) -> list[str]:
        """Delete an account that holds no keys, with its users; returns their access key ids."""
        key_ids: list[str] = []
        for p in self.principals(account_id):
            key_ids += self.delete_principal(p.principal_id)
        self.conn.execute(delete(t.accounts).where(t.accounts.c.account_id == account_id))
        if self.conn.execute(delete(t.request_quotas).where(t.request_quotas.c.account_id == account_id)).rowcount:
            self.changes.quotas.add(account_id)
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
            expiration_model=row.expiration_model, policy=row.policy, custom_key_store_id=row.custom_key_store_id,
            xks_key_id=row.xks_key_id, key_manager=row.key_manager or "CUSTOMER")

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
            custom_key_store_id=key.custom_key_store_id, xks_key_id=key.xks_key_id,
            key_manager=None if key.key_manager == "CUSTOMER" else key.key_manager, **self._mutable(key)))
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


class ClusterRepo:
    """HSM clusters (PKCS#11 tokens) the operators registered."""

    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    @staticmethod
    def _cluster(row: Any) -> HsmCluster:
        return HsmCluster(row.cluster_id, row.module_path, row.token_label, row.trust_anchor,
                          from_ts(row.created), row.account_id)  # type: ignore[arg-type]

    def insert(self, c: HsmCluster) -> None:
        self.conn.execute(insert(t.hsm_clusters).values(
            cluster_id=c.cluster_id, module_path=c.module_path, token_label=c.token_label,
            trust_anchor=c.trust_anchor, created=_now_ts(c.created), account_id=c.account_id))

    def get(self, cluster_id: str) -> HsmCluster | None:
        row = self.conn.execute(select(t.hsm_clusters).where(t.hsm_clusters.c.cluster_id == cluster_id)).first()
        return None if row is None else self._cluster(row)

    def all(self) -> list[HsmCluster]:
        rows = self.conn.execute(select(t.hsm_clusters).order_by(t.hsm_clusters.c.cluster_id))
        return [self._cluster(r) for r in rows]

    def delete(self, cluster_id: str) -> None:
        self.conn.execute(delete(t.hsm_clusters).where(t.hsm_clusters.c.cluster_id == cluster_id))


class KeyStoreRepo:
    """Custom key stores, with their sealed passwords."""

    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    @staticmethod
    def _store(row: Any) -> CustomKeyStore:
        xks = XksProxyConfig(row.xks_uri_endpoint, row.xks_uri_path, row.xks_connectivity, row.xks_access_key_id) \
            if row.xks_uri_endpoint else None
        return CustomKeyStore(row.custom_key_store_id, row.account_id, row.name, row.store_type, row.cluster_id,
                              ConnectionState(row.connection_state), row.connection_error_code,
                              from_ts(row.created), xks)  # type: ignore[arg-type]

    def insert(self, s: CustomKeyStore, sealed_password: bytes | None) -> None:
        self.conn.execute(insert(t.custom_key_stores).values(
            custom_key_store_id=s.custom_key_store_id, account_id=s.account_id, name=s.name,
            store_type=s.store_type, cluster_id=s.cluster_id, sealed_password=sealed_password,
            connection_state=s.connection_state.value, connection_error_code=s.connection_error_code,
            created=_now_ts(s.created), **_xks_columns(s.xks)))
        self.changes.key_stores.add(s.custom_key_store_id)

    def get(self, custom_key_store_id: str, for_update: bool = False) -> CustomKeyStore | None:
        """The store's row; `for_update` locks it for the transaction (CreateKey against a delete)."""
        q = select(t.custom_key_stores).where(t.custom_key_stores.c.custom_key_store_id == custom_key_store_id)
        if for_update:
            q = q.with_for_update()
        row = self.conn.execute(q).first()
        return None if row is None else self._store(row)

    def by_name(self, account_id: str, name: str) -> CustomKeyStore | None:
        row = self.conn.execute(select(t.custom_key_stores).where(and_(
            t.custom_key_stores.c.account_id == account_id, t.custom_key_stores.c.name == name))).first()
        return None if row is None else self._store(row)

    def for_account(self, account_id: str, after: str | None, limit: int) -> list[CustomKeyStore]:
        q = select(t.custom_key_stores).where(t.custom_key_stores.c.account_id == account_id)
        if after is not None:
            q = q.where(t.custom_key_stores.c.custom_key_store_id > after)
        rows = self.conn.execute(q.order_by(t.custom_key_stores.c.custom_key_store_id).limit(limit))
        return [self._store(r) for r in rows]

    def count(self, account_id: str) -> int:
        return int(self.conn.execute(select(func.count()).select_from(t.custom_key_stores).where(
            t.custom_key_stores.c.account_id == account_id)).scalar_one())

    def any(self) -> bool:
        return self.conn.execute(select(t.custom_key_stores.c.custom_key_store_id).limit(1)).first() is not None

    def connected_of_type(self, store_type: str) -> list[CustomKeyStore]:
        rows = self.conn.execute(select(t.custom_key_stores).where(and_(
            t.custom_key_stores.c.store_type == store_type,
            t.custom_key_stores.c.connection_state == ConnectionState.CONNECTED.value)))
        return [self._store(r) for r in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        """(store type, connection state) -> how many stores (for the metrics)."""
        c = t.custom_key_stores.c
        rows = self.conn.execute(select(c.store_type, c.connection_state, func.count())
                                 .group_by(c.store_type, c.connection_state))
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    def on_cluster(self, cluster_id: str) -> list[CustomKeyStore]:
        rows = self.conn.execute(select(t.custom_key_stores).where(t.custom_key_stores.c.cluster_id == cluster_id))
        return [self._store(r) for r in rows]

    def sealed_password(self, custom_key_store_id: str) -> bytes | None:
        row = self.conn.execute(select(t.custom_key_stores.c.sealed_password).where(
            t.custom_key_stores.c.custom_key_store_id == custom_key_store_id)).first()
        return None if row is None or row[0] is None else bytes(row[0])

    def update(self, custom_key_store_id: str, *, only_if: ConnectionState | tuple[ConnectionState, ...] | None = None,
               **values: Any) -> bool:
        """Change columns (name, cluster_id, sealed_password, connection_state, connection_error_code,
        xks: an XksProxyConfig); with `only_if`, only while the store is in that state (or one of
        those): whether it changed."""
        if isinstance(values.get("connection_state"), ConnectionState):
            values["connection_state"] = values["connection_state"].value
        if "xks" in values:
            values.update(_xks_columns(values.pop("xks")))
        q = update(t.custom_key_stores).where(t.custom_key_stores.c.custom_key_store_id == custom_key_store_id)
        if only_if is not None:
            states = (only_if,) if isinstance(only_if, ConnectionState) else only_if
            q = q.where(t.custom_key_stores.c.connection_state.in_([s.value for s in states]))
        changed = self.conn.execute(q.values(**values)).rowcount > 0
        if changed:
            self.changes.key_stores.add(custom_key_store_id)
        return changed

    def delete(self, custom_key_store_id: str) -> None:
        self.conn.execute(delete(t.custom_key_stores).where(
            t.custom_key_stores.c.custom_key_store_id == custom_key_store_id))
        self.changes.key_stores.add(custom_key_store_id)

    def with_xks_uri(self, account_id: str, uri_endpoint: str, uri_path: str) -> list[CustomKeyStore]:
        rows = self.conn.execute(select(t.custom_key_stores).where(and_(
            t.custom_key_stores.c.account_id == account_id, t.custom_key_stores.c.xks_uri_endpoint == uri_endpoint,
            t.custom_key_stores.c.xks_uri_path == uri_path)))
        return [self._store(r) for r in rows]

    def key_with_xks_key_id(self, custom_key_store_id: str, xks_key_id: str) -> str | None:
        """The KMS key of the store that uses this external key, if any."""
        row = self.conn.execute(select(t.keys.c.key_id).where(and_(
            t.keys.c.custom_key_store_id == custom_key_store_id, t.keys.c.xks_key_id == xks_key_id))).first()
        return None if row is None else str(row[0])

    def key_count(self, custom_key_store_id: str) -> int:
        return int(self.conn.execute(select(func.count()).select_from(t.keys).where(
            t.keys.c.custom_key_store_id == custom_key_store_id)).scalar_one())


class QuotaRepo:
    """Request quotas an operator set (quotas.py), by account id or "*" (every account)."""

    def __init__(self, conn: Connection, changes: Changes) -> None:
        self.conn = conn
        self.changes = changes

    def for_account(self, account_id: str) -> dict[str, float]:
        q = t.request_quotas
        rows = self.conn.execute(select(q.c.quota_name, q.c.rate).where(q.c.account_id == account_id))
        return {row.quota_name: float(row.rate) for row in rows}

    def put(self, account_id: str, quota_name: str, rate: float, now: datetime) -> None:
        q = t.request_quotas
        where = and_(q.c.account_id == account_id, q.c.quota_name == quota_name)
        if self.conn.execute(update(q).where(where).values(rate=rate, updated=_now_ts(now))).rowcount == 0:
            self.conn.execute(insert(q).values(account_id=account_id, quota_name=quota_name, rate=rate,
                                               updated=_now_ts(now)))
        self.changes.quotas.add(account_id)

    def delete(self, account_id: str, quota_name: str) -> bool:
        q = t.request_quotas
        gone = self.conn.execute(delete(q).where(and_(q.c.account_id == account_id,
                                                      q.c.quota_name == quota_name))).rowcount > 0
        if gone:
            self.changes.quotas.add(account_id)
        return gone
