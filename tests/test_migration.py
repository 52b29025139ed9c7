"""Schema migrations on real stores (SQLite and PostgreSQL): a store of an older version opens and
is brought up to date, keeping what it holds."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from openkms.model import (
    Account,
    ConnectionState,
    CustomKeyStore,
    HsmCluster,
    Key,
    KeyState,
    KeyUsage,
    Origin,
    Principal,
    Secret,
    SecretVersion,
    XksProxyConfig,
)
from openkms.storage import Store
from openkms.storage.schema import SCHEMA_VERSION


def test_v3_store_gets_two_levels_of_administration(store_url: str | None, tmp_path: Path) -> None:
    """Before v4 every administrator managed every account. Upgrading keeps that power for the
    bootstrap administrator (the first administrator made) alone; the others administer their own
    account from then on."""
    url = store_url or f"sqlite:///{tmp_path / 'openkms.db'}"
    store = Store.open(url)
    t0 = datetime.now(UTC)
    with store.begin() as tx:
        for account in ("111111111111", "222222222222"):
            tx.accounts.insert(Account(account, account, t0))
        tx.accounts.insert_principal(Principal("p-app", "111111111111", "app", False, t0 - timedelta(days=2)))
        tx.accounts.insert_principal(Principal("p-boot", "111111111111", "admin", True, t0 - timedelta(days=1)))
        tx.accounts.insert_principal(Principal("p-cust", "222222222222", "admin", True, t0))
        # Back to schema v3: no is_operator column (v4), no custom_key_store_id column (v5).
        tx.conn.execute(text("ALTER TABLE principals DROP COLUMN is_operator"))
        tx.conn.execute(text("ALTER TABLE kms_keys DROP COLUMN custom_key_store_id"))
        tx.conn.execute(text("UPDATE openkms_meta SET value = :v WHERE name = 'schema_version'"), {"v": b"3"})
    store.close()

    store = Store.open(url)
    try:
        with store.begin() as tx:
            levels = {p.name + "@" + p.account_id: p.level for a in ("111111111111", "222222222222")
                      for p in tx.accounts.principals(a)}
            version = tx.meta.get("schema_version")
        assert levels == {"app@111111111111": "user", "admin@111111111111": "operator",
                          "admin@222222222222": "account-admin"}
        assert version == str(SCHEMA_VERSION).encode()
        assert tx_columns(store, "kms_keys") >= {"custom_key_store_id"}
    finally:
        store.close()


def test_v5_clusters_go_to_the_account_of_their_key_store(store_url: str | None, tmp_path: Path) -> None:
    """Before v6 an HSM cluster served any account. Upgrading gives each cluster to the account of
    its key store (the lowest account id if several accounts made one on it); a cluster with no
    store serves no account until the operator registers it again."""
    url = store_url or f"sqlite:///{tmp_path / 'openkms.db'}"
    store = Store.open(url)
    t0 = datetime.now(UTC)
    a, b = "311111111111", "322222222222"
    with store.begin() as tx:
        for account in (a, b):
            tx.accounts.insert(Account(account, account, t0))
        for cluster in ("cluster-shared00000", "cluster-unused00000", "cluster-ofb00000000"):
            tx.clusters.insert(HsmCluster(cluster, "/lib/p11.so", cluster[-8:], "PEM", t0, None))
        for cks, account, cluster in (("cks-1", b, "cluster-shared00000"), ("cks-2", a, "cluster-shared00000"),
                                      ("cks-3", b, "cluster-ofb00000000")):
            tx.key_stores.insert(CustomKeyStore(cks, account, cks, "AWS_CLOUDHSM", cluster,
                                                ConnectionState.DISCONNECTED, None, t0), b"sealed")
        tx.conn.execute(text("ALTER TABLE hsm_clusters DROP COLUMN account_id"))
        tx.conn.execute(text("UPDATE openkms_meta SET value = :v WHERE name = 'schema_version'"), {"v": b"5"})
    store.close()

    store = Store.open(url)
    try:
        with store.begin() as tx:
            owners = {c.cluster_id: c.account_id for c in tx.clusters.all()}
            version = tx.meta.get("schema_version")
            stores = {s.custom_key_store_id for s in tx.key_stores.for_account(b, None, 10)}
        assert owners == {"cluster-shared00000": a, "cluster-unused00000": None, "cluster-ofb00000000": b}
        assert version == str(SCHEMA_VERSION).encode()
        assert stores == {"cks-1", "cks-3"}  # nothing is lost: B's store on A's cluster stays (it cannot connect)
    finally:
        store.close()


def tx_columns(store: Store, table: str) -> set[str]:
    from sqlalchemy import inspect

    return {c["name"] for c in inspect(store.engine).get_columns(table)}


def test_v6_store_takes_external_key_stores(store_url: str | None, tmp_path: Path) -> None:
    """v7: the XKS columns, and kms_keys.origin wide enough for EXTERNAL_KEY_STORE (PostgreSQL keeps
    lengths; before v7 it was VARCHAR(16))."""
    url = store_url or f"sqlite:///{tmp_path / 'openkms.db'}"
    store = Store.open(url)
    with store.begin() as tx:
        tx.accounts.insert(Account("411111111111", "a", datetime.now(UTC)))
        for column in ("xks_uri_endpoint", "xks_uri_path", "xks_connectivity", "xks_access_key_id"):
            tx.conn.execute(text(f"ALTER TABLE custom_key_stores DROP COLUMN {column}"))
        tx.conn.execute(text("ALTER TABLE kms_keys DROP COLUMN xks_key_id"))
        if store.engine.dialect.name == "postgresql":
            tx.conn.execute(text("ALTER TABLE kms_keys ALTER COLUMN origin TYPE VARCHAR(16)"))
        tx.conn.execute(text("UPDATE openkms_meta SET value = :v WHERE name = 'schema_version'"), {"v": b"6"})
    store.close()

    store = Store.open(url)
    try:
        key = Key(key_id=str(uuid.uuid4()), account_id="411111111111", region="us-east-1", description="",
                  key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT, origin=Origin.EXTERNAL_KEY_STORE,
                  state=KeyState.ENABLED, created=datetime.now(UTC), custom_key_store_id="cks-0", xks_key_id="k1")
        xks = XksProxyConfig("https://xks.example.com", "/p/kms/xks/v1", "PUBLIC_ENDPOINT", "A" * 20)
        with store.begin() as tx:
            tx.key_stores.insert(CustomKeyStore("cks-0", "411111111111", "x", "EXTERNAL_KEY_STORE", None,
                                                ConnectionState.DISCONNECTED, None, datetime.now(UTC), xks), b"s")
            tx.keys.insert(key)
        with store.begin() as tx:
            got, row = tx.keys.get(key.key_id), tx.key_stores.get("cks-0")
            version = tx.meta.get("schema_version")
        assert got is not None and (got.origin, got.xks_key_id) == (Origin.EXTERNAL_KEY_STORE, "k1")
        assert row is not None and row.xks == xks
        assert version == str(SCHEMA_VERSION).encode()
    finally:
        store.close()


def test_v7_store_takes_secrets(store_url: str | None, tmp_path: Path) -> None:
    """v8: the secrets tables (new: create_all adds them) and kms_keys.key_manager (AWS managed
    keys), on a store that holds a key from before; that key stays a customer key."""
    url = store_url or f"sqlite:///{tmp_path / 'openkms.db'}"
    store = Store.open(url)
    account = "511111111111"
    now = datetime.now(UTC)
    old = Key(key_id=str(uuid.uuid4()), account_id=account, region="us-east-1", description="",
              key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT, origin=Origin.AWS_KMS,
              state=KeyState.ENABLED, created=now)
    with store.begin() as tx:
        tx.accounts.insert(Account(account, "a", now))
        tx.keys.insert(old)
        for table in ("secret_tags", "secret_stages", "secret_versions", "secrets"):
            tx.conn.execute(text(f"DROP TABLE {table}"))
        tx.conn.execute(text("ALTER TABLE kms_keys DROP COLUMN key_manager"))
        tx.conn.execute(text("UPDATE openkms_meta SET value = :v WHERE name = 'schema_version'"), {"v": b"7"})
    store.close()

    store = Store.open(url)
    try:
        managed = Key(key_id=str(uuid.uuid4()), account_id=account, region="us-east-1", description="",
                      key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT, origin=Origin.AWS_KMS,
                      state=KeyState.ENABLED, created=now, key_manager="AWS")
        secret = Secret("s-1", account, "us-east-1", "prod/db", f"arn:aws:secretsmanager:us-east-1:{account}:secret:"
                        "prod/db-AbCdEf", None, None, now, now)
        with store.begin() as tx:
            tx.keys.insert(managed)
            tx.secrets.insert(secret)
            tx.secrets.add_version(SecretVersion("s-1", "v-1", now, None, "string", managed.arn, b"edk", b"sealed"))
            tx.secrets.set_stage("s-1", "AWSCURRENT", "v-1")
        with store.begin() as tx:
            kept, made = tx.keys.get(old.key_id), tx.keys.get(managed.key_id)
            got = tx.secrets.by_name(account, "prod/db")
            stages = tx.secrets.stages("s-1")
            version = tx.meta.get("schema_version")
        assert kept is not None and kept.key_manager == "CUSTOMER"
        assert made is not None and made.key_manager == "AWS"
        assert got is not None and got.arn == secret.arn
        assert stages == {"AWSCURRENT": "v-1"}
        assert version == str(SCHEMA_VERSION).encode()
    finally:
        store.close()


def test_v8_store_takes_rotation(store_url: str | None, tmp_path: Path) -> None:
    """v9: secrets.rotation_token and rotation_started (the rotation in progress) and the
    rotation_functions table, on a store that holds a secret from before."""
    url = store_url or f"sqlite:///{tmp_path / 'openkms.db'}"
    store = Store.open(url)
    account, now = "611111111111", datetime.now(UTC)
    secret = Secret("s-9", account, "us-east-1", "app/pw", f"arn:aws:secretsmanager:us-east-1:{account}:secret:"
                    "app/pw-QwErTy", None, None, now, now, rotation_enabled=True, next_rotation=now)
    with store.begin() as tx:
        tx.accounts.insert(Account(account, "a", now))
        tx.secrets.insert(secret)
        tx.conn.execute(text("DROP TABLE rotation_functions"))
        tx.conn.execute(text("ALTER TABLE secrets DROP COLUMN rotation_token"))
        tx.conn.execute(text("ALTER TABLE secrets DROP COLUMN rotation_started"))
        tx.conn.execute(text("UPDATE openkms_meta SET value = :v WHERE name = 'schema_version'"), {"v": b"8"})
    store.close()

    store = Store.open(url)
    try:
        with store.begin() as tx:
            assert tx.secrets.begin_rotation("s-9", "ab" * 32, now, now - timedelta(hours=1))
            assert not tx.secrets.begin_rotation("s-9", "cd" * 32, now, now - timedelta(hours=1))
            tx.rotation_functions.insert(account, "rand", "random-password", "{}", b"sealed", now.timestamp())
        with store.begin() as tx:
            assert tx.secrets.rotation_token("s-9") == "ab" * 32
            assert [r.name for r in tx.rotation_functions.for_account(account)] == ["rand"]
            assert tx.secrets.claim_rotation("s-9", now + timedelta(seconds=1), now + timedelta(days=1))
            assert not tx.secrets.claim_rotation("s-9", now + timedelta(seconds=1), now + timedelta(days=1))
            version = tx.meta.get("schema_version")
        assert version == str(SCHEMA_VERSION).encode()
    finally:
        store.close()
