"""Which key store serves a key.

A key lives in the default store (the software store; the memory store in unit tests) unless it
was made in a custom key store: then in that store's PKCS#11 token (pkcs11.py, CustomKeyStoreType
AWS_CLOUDHSM), or double-encrypted with the default store's material and the customer's external
key through its XKS proxy (xks.py, EXTERNAL_KEY_STORE). A backend is one module of this package
and one entry in `BACKENDS`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import cast

from ..cache import TTLCache
from ..crypto.root import RootKey
from ..errors import (
    InvalidCiphertextException,
    KeyStoreUnavailable,
    KMSError,
    KMSInternalException,
    UnsupportedOperationException,
)
from ..lane import Lane
from ..model import ConnectionState, CustomKeyStore, Key, KeySpecInfo, Origin, SecretStr, XksProxyConfig
from ..storage import Changes, Store
from .base import Asymmetric, Importing, KeyStore
from .memory import MemoryKeyStore
from .pkcs11 import DEFAULT_HSM_RATE, ConnectError, Pkcs11KeyStore, TokenSession
from .software import SoftwareKeyStore
from .xks import XksClient, XksEndpoint, XksHealth, XksKeyStore, XksOptions

CLOUDHSM = "AWS_CLOUDHSM"
EXTERNAL = "EXTERNAL_KEY_STORE"

log = logging.getLogger("openkms.keystore")

#: Backends by name: how to build one over a node's store and root key. The contract tests
#: (tests/unit/keystore/test_contract.py) run over every entry.
BACKENDS: dict[str, Callable[[Store, RootKey], KeyStore]] = {
    "software": SoftwareKeyStore,
    "memory": lambda store, root: MemoryKeyStore(),
}


class KeyStores:
    """The default store, and one PKCS#11 store per custom key store, opened on first use.

    A custom key store's row (its connection state shared by every node on the store) is cached for
    `cache_ttl` seconds and dropped when a change to it commits on this node; its PKCS#11 store is
    closed and built again when the row changes (a new password, another cluster, a disconnect).
    """

    def __init__(self, default: KeyStore, store: Store | None = None, root: RootKey | None = None,
                 cache_ttl: float = 5.0, xks: XksOptions | None = None, region: str = "us-east-1",
                 hsm_rate_limit: float = DEFAULT_HSM_RATE) -> None:
        self.default = default
        self.xks_options = xks or XksOptions()
        self.hsm_rate_limit = hsm_rate_limit
        self.region = region
        self._store = store
        self._root = root
        self._stores: dict[str, KeyStore] = {default.name: default}
        # Capabilities are checked once, not on every request.
        self._importing = {n: cast(Importing, s) for n, s in self._stores.items() if isinstance(s, Importing)}
        self._asymmetric = {n: cast(Asymmetric, s) for n, s in self._stores.items() if isinstance(s, Asymmetric)}
        # custom key store id -> (its row, what its PKCS#11 store is built from: cluster and sealed password)
        self._rows: TTLCache[str, tuple[CustomKeyStore, bytes] | None] = TTLCache(cache_ttl)
        self._any: TTLCache[None, bool] = TTLCache(cache_ttl)
        # id -> (the fingerprint it was built from, its store)
        self._custom: dict[str, tuple[bytes, Pkcs11KeyStore | XksKeyStore]] = {}
        self._lock = threading.Lock()
        if store is not None:
            store.on_commit(self._committed)

    def _committed(self, changes: Changes) -> None:
        changed = set(changes.key_stores)
        if changes.everything:
            self._rows.clear()
            with self._lock:
                changed.update(self._custom)  # each is closed, and opened again on its next use
        if changed:
            self._any.clear()
        for cks_id in changed:
            self._rows.pop(cks_id)
            self._drop(cks_id)
        if changes.versions:
            with self._lock:
                opened = [entry[1] for entry in self._custom.values()]
            for store in opened:
                for key_id, version in changes.versions:
                    store.evict(key_id, version)

    def _drop(self, cks_id: str) -> None:
        with self._lock:
            entry = self._custom.pop(cks_id, None)
        if entry is not None:
            entry[1].close()

    def supports(self, spec: KeySpecInfo) -> bool:
        """Whether some store can make keys of this spec."""
        return any(s.supports(spec) for s in self._stores.values())

    def for_new_key(self, spec: KeySpecInfo, origin: Origin) -> KeyStore:
        """The default store for a new key of this spec and origin (custom key stores: for_custom_key_store)."""
        if not self.default.supports(spec):
            raise UnsupportedOperationException(f"KeySpec {spec.name} is not supported by this server.")
        if origin.imports_material and self.default.name not in self._importing:
            raise UnsupportedOperationException(f"Origin {origin.value} is not supported by this server.")
        return self.default

    def for_key(self, key: Key) -> KeyStore:
        if key.custom_key_store_id is None:
            return self.default
        return self.for_custom_key_store(key.custom_key_store_id)

    def importer(self, key: Key) -> Importing:
        store = self._importing.get(self.for_key(key).name)
        if store is None:
            raise UnsupportedOperationException(f"The key store of {key.arn} cannot import key material.")
        return store

    def asymmetric(self, key: Key) -> Asymmetric:
        store = self._asymmetric.get(self.for_key(key).name)
        if store is None:
            raise UnsupportedOperationException(f"The key store of {key.arn} does not support this operation.")
        return store

    # -- custom key stores ------------------------------------------------------------------------
    def any_custom_key_stores(self) -> bool:
        """Whether the store holds any custom key store (cached): if not, no request waits on one."""
        store = self._store
        if store is None:
            return False

        def load() -> bool:
            with store.begin() as tx:
                return tx.key_stores.any()
        return self._any.get(None, load)

    def custom_key_store(self, cks_id: str) -> CustomKeyStore | None:
        """A custom key store's row (cached)."""
        entry = self._row(cks_id)
        return entry[0] if entry is not None else None

    def _row(self, cks_id: str) -> tuple[CustomKeyStore, bytes] | None:
        store = self._need_store()

        def load() -> tuple[CustomKeyStore, bytes] | None:
            with store.begin() as tx:
                row = tx.key_stores.get(cks_id)
                sealed = tx.key_stores.sealed_password(cks_id) or b""
            if row is None:
                return None
            where = row.cluster_id or (f"{row.xks.uri_endpoint}{row.xks.uri_path}\x00{row.xks.access_key_id}"
                                       if row.xks else "")
            return row, hashlib.sha256(where.encode() + b"\x00" + sealed).digest()
        return self._rows.get(cks_id, load)

    def connected(self, cks_id: str) -> bool:
        row = self.custom_key_store(cks_id)
        return row is not None and row.connection_state is ConnectionState.CONNECTED

    def for_custom_key_store(self, cks_id: str) -> Pkcs11KeyStore | XksKeyStore:
        """The store of a connected custom key store; KeyStoreUnavailable if it is not connected."""
        entry = self._row(cks_id)
        if entry is None or entry[0].connection_state is not ConnectionState.CONNECTED:
            raise KeyStoreUnavailable(f"The custom key store {cks_id} is not connected.")
        fingerprint = entry[1]
        with self._lock:
            opened = self._custom.get(cks_id)
        if opened is not None and opened[0] == fingerprint:
            return opened[1]
        # First use, or another node moved the store to another cluster or gave it a new password
        # (seen here once the cached row is older than the TTL): build it anew.
        self._drop(cks_id)
        store: Pkcs11KeyStore | XksKeyStore
        if entry[0].store_type == EXTERNAL:
            store = XksKeyStore(self.default, self.xks_client(cks_id), cks_id)
        else:
            store = Pkcs11KeyStore(self._need_store(), self.token_session(cks_id, fingerprint=fingerprint), cks_id,
                                   self.hsm_rate_limit)
        with self._lock:
            self._custom[cks_id] = (fingerprint, store)
        return store

    def lane(self, cks_id: str) -> Lane | None:
        """The lane of the custom key store's token, if this node has opened its PKCS#11 store;
        None otherwise (the shared pool). Never reads the store: the event loop asks."""
        with self._lock:
            opened = self._custom.get(cks_id)
        return opened[1].lane if opened is not None and isinstance(opened[1], Pkcs11KeyStore) else None

    def external(self, cks_id: str) -> bool:
        """Whether this node has opened the custom key store and it is an external key store (its
        calls wait on the proxy on the event loop: onloop.py). Never reads the store."""
        with self._lock:
            opened = self._custom.get(cks_id)
        return opened is not None and isinstance(opened[1], XksKeyStore)

    def poll_xks_health(self) -> int:
        """Ask every connected external key store's proxy for its health (the scheduler calls this
        periodically, off the event loop); returns how many were asked."""
        with self._need_store().begin() as tx:
            connected = [s.custom_key_store_id for s in tx.key_stores.connected_of_type(EXTERNAL)]
        for cks_id in connected:
            try:
                store = self.for_custom_key_store(cks_id)
            except KeyStoreUnavailable:
                continue
            if isinstance(store, XksKeyStore):
                store.check_health()
        return len(connected)

    def check_backends(self) -> dict[str, str]:
        """Each connected custom key store whose backend does not answer now, with why (for
        /ready): an HSM token that does not answer a search for its keys, an XKS proxy UNAVAILABLE."""
        if self._store is None or not self.any_custom_key_stores():
            return {}
        with self._store.begin() as tx:
            connected = [s.custom_key_store_id for kind in (EXTERNAL, CLOUDHSM)
                         for s in tx.key_stores.connected_of_type(kind)]
        failing: dict[str, str] = {}
        for cks_id in connected:
            try:
                store = self.for_custom_key_store(cks_id)
                if isinstance(store, XksKeyStore):
                    health = store.check_health()
                    if health.status == "UNAVAILABLE":
                        failing[cks_id] = f"the XKS proxy is UNAVAILABLE: {health.detail}"
                else:
                    store.probe()
            except KMSError as exc:
                failing[cks_id] = f"{exc.code}: {exc.message}"
            except Exception as exc:  # a backend's own failure: said, never raised
                failing[cks_id] = type(exc).__name__
        return failing

    def xks_health_statuses(self) -> list[str]:
        """The last known proxy health of each external key store this node has opened."""
        with self._lock:
            opened = [entry[1] for entry in self._custom.values()]
        return [store.health.status for store in opened if isinstance(store, XksKeyStore) and store.health is not None]

    def xks_health(self, cks_id: str) -> XksHealth | None:
        """What this node last learnt of an external key store's proxy health, if anything."""
        with self._lock:
            opened = self._custom.get(cks_id)
        return opened[1].health if opened is not None and isinstance(opened[1], XksKeyStore) else None

    def hsm_store(self, cks_id: str) -> Pkcs11KeyStore:
        """The PKCS#11 store of a connected CloudHSM key store (GenerateRandom from its token)."""
        store = self.for_custom_key_store(cks_id)
        if not isinstance(store, Pkcs11KeyStore):
            raise UnsupportedOperationException(f"Custom key store {cks_id} is not an AWS_CLOUDHSM key store.")
        return store

    def xks_client(self, cks_id: str, xks: XksProxyConfig | None = None, secret: SecretStr | None = None
                   ) -> XksClient:
        """A client of the external key store's proxy, as stored, or with the given configuration
        and secret (checked before an update is saved). Not cached: for_custom_key_store keeps one."""
        if xks is None or secret is None:
            with self._need_store().begin() as tx:
                row = tx.key_stores.get(cks_id)
                sealed = tx.key_stores.sealed_password(cks_id)
            if row is None or row.xks is None or sealed is None:
                raise KeyStoreUnavailable(f"The custom key store {cks_id} has no external key store proxy.")
            xks = xks or row.xks
            secret = secret or self.unseal_password(cks_id, sealed)
        endpoint = XksEndpoint(xks.uri_endpoint, xks.uri_path, xks.access_key_id, secret, self.region)
        try:
            return XksClient(endpoint, self.xks_options)
        except (ValueError, OSError) as exc:  # a CA bundle or client certificate that does not load
            raise KeyStoreUnavailable(f"The external key store proxy cannot be used: {type(exc).__name__}.") \
                from None

    def token_session(self, cks_id: str, password: SecretStr | None = None,
                      fingerprint: bytes | None = None) -> TokenSession:
        """A session on the custom key store's token (not opened yet), with its stored password or `password`."""
        store = self._need_store()
        with store.begin() as tx:
            row = tx.key_stores.get(cks_id)
            cluster = tx.clusters.get(row.cluster_id) if row is not None and row.cluster_id else None
            sealed = tx.key_stores.sealed_password(cks_id)
        if row is None or cluster is None:
            raise KeyStoreUnavailable(f"The custom key store {cks_id} has no HSM cluster.")
        if password is None:
            if sealed is None:
                raise KeyStoreUnavailable(f"The custom key store {cks_id} has no password.")
            password = self.unseal_password(cks_id, sealed)
        return TokenSession(cluster.module_path, cluster.token_label, password,
                            on_lost=lambda exc: self._failed(cks_id, exc, fingerprint))

    def _failed(self, cks_id: str, exc: ConnectError, fingerprint: bytes | None) -> None:
        """A connected store whose token refuses its credentials shows FAILED, with the reason; but
        not when this node's copy is out of date (another node gave the store a new password)."""
        self._rows.pop(cks_id)
        current = self._row(cks_id)
        if current is None or (fingerprint is not None and current[1] != fingerprint):
            self._drop(cks_id)
            return
        log.warning("custom key store %s failed: %s (%s)", cks_id, exc.code, exc.message)
        with self._need_store().begin() as tx:
            tx.key_stores.update(cks_id, only_if=ConnectionState.CONNECTED, connection_state=ConnectionState.FAILED,
                                 connection_error_code=exc.code)

    def seal_password(self, cks_id: str, password: str) -> bytes:
        return self._need_root().seal(password.encode(), _password_aad(cks_id))

    def unseal_password(self, cks_id: str, sealed: bytes) -> SecretStr:
        try:
            return SecretStr(self._need_root().unseal(sealed, _password_aad(cks_id)).decode())
        except InvalidCiphertextException:
            raise KMSInternalException("A key store password failed its integrity check.") from None

    def _need_store(self) -> Store:
        if self._store is None:
            raise UnsupportedOperationException("Custom key stores are not supported by this server.")
        return self._store

    def _need_root(self) -> RootKey:
        if self._root is None:
            raise UnsupportedOperationException("Custom key stores are not supported by this server.")
        return self._root


def _password_aad(cks_id: str) -> bytes:
    """Binds a sealed key store password to its key store."""
    return f"openkms:key-store-password:{cks_id}".encode()
