"""Which key store serves a key.

Every key lives in the default store today (the software store; the memory store in unit tests).
Custom key stores (origins AWS_CLOUDHSM and EXTERNAL_KEY_STORE) register here: a backend is one
module of this package and one entry in `BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from ..crypto.root import RootKey
from ..errors import UnsupportedOperationException
from ..model import Key, KeySpecInfo, Origin
from ..storage import Store
from .base import Asymmetric, Importing, KeyStore
from .memory import MemoryKeyStore
from .software import SoftwareKeyStore

#: Backends by name: how to build one over a node's store and root key. The contract tests
#: (tests/unit/keystore/test_contract.py) run over every entry.
BACKENDS: dict[str, Callable[[Store, RootKey], KeyStore]] = {
    "software": SoftwareKeyStore,
    "memory": lambda store, root: MemoryKeyStore(),
}


class KeyStores:
    def __init__(self, default: KeyStore) -> None:
        self.default = default
        self._stores: dict[str, KeyStore] = {default.name: default}
        # Capabilities are checked once, not on every request.
        self._importing = {n: cast(Importing, s) for n, s in self._stores.items() if isinstance(s, Importing)}
        self._asymmetric = {n: cast(Asymmetric, s) for n, s in self._stores.items() if isinstance(s, Asymmetric)}

    @property
    def any_blocking(self) -> bool:
        """Whether some store leaves the process on its calls (then key operations run off the loop)."""
        return any(s.blocking for s in self._stores.values())

    def supports(self, spec: KeySpecInfo) -> bool:
        """Whether some store can make keys of this spec."""
        return any(s.supports(spec) for s in self._stores.values())

    def for_new_key(self, spec: KeySpecInfo, origin: Origin) -> KeyStore:
        """The store a new key of this spec and origin goes to."""
        if not self.default.supports(spec):
            raise UnsupportedOperationException(f"KeySpec {spec.name} is not supported by this server.")
        if origin.imports_material and self.default.name not in self._importing:
            raise UnsupportedOperationException(f"Origin {origin.value} is not supported by this server.")
        return self.default

    def for_key(self, key: Key) -> KeyStore:
        return self.default

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
