"""The software key store: key material generated here and sealed under the root key in the store.

Material of a key version never changes, so unsealed versions are cached for the life of the
process (evicted when a key is deleted): a warm key costs no database read and no unseal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..crypto import blob
from ..crypto.material import KeyMaterial
from ..crypto.root import RootKey
from ..errors import InvalidCiphertextException, KMSInternalException
from ..storage import Store


def material_aad(key_id: str, version: int) -> bytes:
    """Binds a sealed row to its key and version, so rows cannot be swapped in the database."""
    return f"openkms:key-material:{key_id}:{version}".encode()


class SoftwareKeyStore:
    name = "software"

    def __init__(self, store: Store, root: RootKey) -> None:
        self._store = store
        self._root = root
        self._cache: dict[tuple[str, int], KeyMaterial] = {}

    def new_material(self, key_id: str, version: int, nbytes: int) -> bytes:
        """Fresh random material for a key version, returned sealed for the store."""
        material = KeyMaterial(os.urandom(nbytes))
        self._cache[(key_id, version)] = material
        return self._root.seal(material.reveal(), material_aad(key_id, version))

    def _material(self, key_id: str, version: int) -> KeyMaterial:
        cached = self._cache.get((key_id, version))
        if cached is not None:
            return cached
        with self._store.begin() as tx:
            sealed = tx.versions.get(key_id, version)
        if sealed is None:
            raise InvalidCiphertextException()
        try:
            material = KeyMaterial(self._root.unseal(sealed, material_aad(key_id, version)))
        except InvalidCiphertextException:
            # The row does not open under our root key: the store was tampered with.
            raise KMSInternalException("Key material failed its integrity check.") from None
        self._cache[(key_id, version)] = material
        return material

    def forget(self, key_id: str) -> None:
        for k in [k for k in self._cache if k[0] == key_id]:
            del self._cache[k]

    def encrypt(self, key_id: str, version: int, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        return blob.seal(self._material(key_id, version).reveal(), key_id, version, plaintext, context)

    def decrypt(self, header: blob.BlobHeader, data: bytes, context: Mapping[str, str] | None) -> bytes:
        return blob.open_blob(self._material(header.key_id, header.version).reveal(), header, data, context)
