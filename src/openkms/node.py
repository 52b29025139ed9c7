"""The composition root: one openkms node from settings, with everything wired in one place.

`open_node` builds what any use of a store needs: the store, the root key, accounts, access
control, the key stores and the service context (the CLI uses it at start, and tests in-process).
`serving_node` adds what a serving process runs: the usage tracker, the audit log (with its
writer process) and the admin API. The HTTP app, the scheduler and the XKS proxy take a node; none
of them builds parts of it.

Opening a node checks the root key against the store before anything else is written: a wrong
key file or passphrase stops the start with a clear message and changes nothing on disk (a
fresh store is only initialised, and a key file only created, when the store has no root yet).
It then checks that the store serves the configured region (recorded at first start).

A serving process also claims what must not be shared: its data dir (`DataDirLock`, an
exclusive lock held for the life of the process) and, on a shared PostgreSQL store, its node id
(`claim_node_id`, a session advisory lock), so that one audit chain is never written by two
processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .access import AccessControl
from .accounts import Accounts, IssuedKey
from .config import Settings
from .crypto import root as rootkey
from .errors import ConfigurationError
from .files import replace_file
from .keystore.base import KeyStore
from .keystore.registry import KeyStores
from .keystore.software import SoftwareKeyStore
from .keystore.xks import XksOptions
from .roots import open_root
from .service import Context, KeyLookup
from .storage import Store

if TYPE_CHECKING:
    from .api.admin import AdminAPI
    from .audit.log import AuditLog
    from .audit.usage import UsageTracker
    from .quotas import RequestQuotas
    from .secrets.rotation import Rotation

META_REGION = "region"
LOCK_FILE = "serve.lock"


@dataclass
class Node:
    settings: Settings
    store: Store
    root: rootkey.RootKey
    accounts: Accounts
    service: Context
    # What only a serving process has (serving_node):
    usage: UsageTracker | None = None
    audit: AuditLog | None = None
    admin: AdminAPI | None = None
    rotation: Rotation | None = None  # Secrets Manager's rotations
    quotas: RequestQuotas | None = None  # the request quotas of this node

    def close(self) -> None:
        if self.rotation is not None:
            self.rotation.close()
        if self.audit is not None:
            self.audit.close()  # flushes pending records and signs a final digest
        self.store.close()


def _prepare_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise ConfigurationError(f"cannot use data dir {path}: {exc.strerror}") from None


def open_node(settings: Settings, keystore: KeyStore | None = None) -> Node:
    """A node over the configured store. `keystore`: the default key store (the software store
    sealed under the root key unless given, e.g. the memory store in unit tests)."""
    _prepare_data_dir(settings.data_dir)  # holds the root key file and credentials on every store
    store = Store.open(settings.database_url)
    try:
        root = open_root(settings, store)
    except BaseException:
        store.close()
        raise
    try:
        _check_region(settings, store)
    except BaseException:
        store.close()
        raise
    accounts = Accounts(store, root, cache_ttl=settings.cache_ttl)
    access = AccessControl(store, settings.cache_ttl)
    keystores = KeyStores(keystore or SoftwareKeyStore(store, root), store, root, settings.cache_ttl,
                          xks_options(settings), settings.region, hsm_rate_limit=settings.hsm_rate_limit)
    service = Context(store=store, region=settings.region,
                      keys=KeyLookup(store, access, keystores, settings.region, settings.cache_ttl),
                      keystores=keystores, access=access)
    from .secrets.cache import SecretCache  # the service package knows nothing of secrets

    service.secrets_cache = SecretCache(store, settings.cache_ttl)
    return Node(settings, store, root, accounts, service)


def xks_options(settings: Settings) -> XksOptions:
    return XksOptions(ca_bundle=settings.xks_ca_bundle, client_cert=settings.xks_client_cert,
                      client_key=settings.xks_client_key, allow_http=settings.xks_allow_http,
                      timeout=settings.xks_timeout_ms / 1000, rate_limit=settings.xks_rate_limit)


def serving_node(settings: Settings) -> Node:
    """A node that serves: with the usage tracker, the audit log and the admin API."""
    from .api.admin import AdminAPI
    from .audit.log import AuditLog
    from .audit.usage import UsageTracker
    from .quotas import RequestQuotas
    from .secrets.functions import RotationFunctions
    from .secrets.rotation import Rotation

    node = open_node(settings)
    try:
        node.store.listen_to_other_nodes()  # PostgreSQL: other nodes' changes reach the caches at once
        node.usage = node.service.usage = UsageTracker(node.store)
        chain = node_id(settings.data_dir)
        node.audit = AuditLog(node.store, node.root, chain, settings.audit_digest_interval, node.usage,
                              settings.data_dir / "audit-digests" / f"{chain}.jsonl")
        root_token = (settings.root_pkcs11_module, settings.root_pkcs11_token_label or "") \
            if settings.root_pkcs11_module else None
        functions = RotationFunctions(node.store, node.root, settings.region, settings.rotation_allow_http)
        node.quotas = RequestQuotas(node.store, settings.cache_ttl, settings.quotas)
        node.admin = AdminAPI(node.accounts, node.store, node.audit, root_token, functions, node.quotas)
        here = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        here = f"[{here}]" if ":" in here else here
        node.rotation = node.service.secrets_rotation = Rotation(
            node.service, functions, f"http://{here}:{settings.port}", settings.rotation_ca_bundle,
            settings.rotation_networks())
    except BaseException:
        node.close()
        raise
    return node


def _check_region(settings: Settings, store: Store) -> None:
    """The region is part of the store: ARNs name it. It is recorded at first start (a store made
    before it was recorded takes the region of its keys), and a start with another is refused."""
    with store.begin() as tx:
        recorded = tx.meta.get(META_REGION)
        if recorded is None:
            region = tx.keys.any_region() or settings.region
            tx.meta.put(META_REGION, region.encode())
        else:
            region = recorded.decode()
    if region != settings.region:
        raise ConfigurationError(
            f"this store serves region {region}, not {settings.region}: start it with --region {region} "
            "(one store serves one region)")


class DataDirLock:
    """An exclusive lock on a data dir, held while the process (and the workers it forks) lives.

    The lock file names the process that holds it, so a second server can say who is in the way.
    The kernel drops the lock when the process dies, however it dies: a stale file locks nothing.
    """

    def __init__(self, data_dir: Path) -> None:
        _prepare_data_dir(data_dir)
        path = data_dir / LOCK_FILE
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigurationError(f"cannot use data dir {data_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise ConfigurationError(
                    f"data dir {data_dir.resolve()} is in use by another openkms server{who}") from None
            raise ConfigurationError(f"cannot lock data dir {data_dir}: {exc.strerror}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class NodeClaim:
    """On PostgreSQL: this process's hold on its node id, a session advisory lock on a connection
    of its own. A second live node with the same id (a copied data dir) cannot take it."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def release(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()


def claim_node_id(settings: Settings, node: str) -> NodeClaim | None:
    """Claim `node` on a shared PostgreSQL store (None on SQLite, which the data dir lock covers)."""
    if settings.is_embedded:
        return None
    import psycopg

    dsn = settings.storage_url.replace("postgresql+psycopg://", "postgresql://", 1)
    # A signed 64-bit key from the node id; a namespace prefix keeps clear of other users' locks.
    lock_key = int.from_bytes(hashlib.sha256(f"openkms-node:{node}".encode()).digest()[:8], "big", signed=True)
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        held = conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key,)).fetchone()
    except psycopg.Error as exc:
        raise ConfigurationError(f"cannot open the store: {type(exc).__name__}") from None
    if not held or not held[0]:
        conn.close()
        raise ConfigurationError(
            f"another live openkms node on this store has node id {node} (was its data dir copied?): "
            f"delete {settings.data_dir.resolve() / 'node-id'} and start again")
    return NodeClaim(conn)


def write_credentials(path: Path, issued: IssuedKey, region: str) -> None:
    """The admin's key pair in the AWS shared credentials format, mode 0600, written atomically."""
    text = (f"[default]\naws_access_key_id = {issued.access_key_id}\n"
            f"aws_secret_access_key = {issued.secret.reveal()}\nregion = {region}\n")
    replace_file(path, text.encode())


def node_id(data_dir: Path) -> str:
    """This node's id, kept in <data_dir>/node-id: it names the node's audit chain across restarts
    (on disk before it is used: a crash must not leave an empty file that would name a new chain)."""
    path = data_dir / "node-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        value = str(uuid.uuid4())
        replace_file(path, f"{value}\n".encode(), mode=0o644)
        return value
