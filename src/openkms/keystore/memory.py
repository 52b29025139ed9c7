"""An in-memory key store, the twin of the software store for unit tests (as httpx ships a mock
transport): symmetric keys only, material in a dict, nothing sealed, nothing persisted.

It keeps the same contract (tests/unit/keystore/test_contract.py runs over both), and a switch
to play a backend that cannot answer (`available = False`: KeyStoreUnavailable), which the
software store never is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..crypto import blob, wrap
from ..errors import InvalidCiphertextException, KeyStoreUnavailable
from ..model import Key, KeyFamily, KeySpecInfo
from .base import StoredVersion


class MemoryKeyStore:
    name = "memory"
    blocking = False

    def __init__(self) -> None:
        self._material: dict[tuple[str, int], bytes] = {}
        self.available = True

    def _up(self) -> None:
        if not self.available:
            raise KeyStoreUnavailable("The memory key store is switched off.")

    @staticmethod
    def supports(spec: KeySpecInfo) -> bool:
        return spec.family is KeyFamily.SYMMETRIC

    def create_version(self, key: Key, version: int) -> StoredVersion:
        self._up()
        raw = os.urandom(32)
        self._material[(key.key_id, version)] = raw
        return StoredVersion(f"memory:{key.key_id}:{version}".encode(), wrap.material_id(key.key_id, raw))

    def encrypt(self, key: Key, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        self._up()
        material = self._material.get((key.key_id, key.current_version))
        if material is None:
            raise InvalidCiphertextException()
        return blob.seal(material, key.key_id, key.current_version, plaintext, context)

    def decrypt(self, key: Key, version: int, ciphertext: bytes, context: Mapping[str, str] | None) -> bytes:
        self._up()
        header = blob.parse_header(ciphertext)
        material = self._material.get((key.key_id, version))
        if material is None or header.key_id != key.key_id or header.version != version:
            raise InvalidCiphertextException()
        return blob.open_blob(material, header, ciphertext, context)

    def destroy(self, key: Key, version: int | None = None) -> None:
        for k in [k for k in self._material if k[0] == key.key_id and version in (None, k[1])]:
            del self._material[k]

    def evict(self, key_id: str, version: int | None = None) -> None:
        pass  # nothing is cached: the dict is the store
