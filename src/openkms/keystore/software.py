"""The software key store: key material generated here and sealed under the root key in the store.

A version's locator is its material sealed under the root key, bound to the key and version
(`material_aad`), kept in the version's row. Material of a version never changes, so unsealed
versions are cached for the life of the process as ready-to-use handles (a warm key costs no
database read, no unseal and no key parsing); a committed change to a version's row (an import,
deleted material) evicts its handle on this node.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..crypto import asymmetric, blob, wrap
from ..crypto.material import ImportedMaterial, KeyMaterial
from ..crypto.root import RootKey
from ..errors import InvalidCiphertextException, KMSInternalException
from ..model import Key, KeySpecInfo
from ..storage import Changes, Store
from .base import StoredVersion


def material_aad(key_id: str, version: int) -> bytes:
    """Binds a sealed row to its key and version, so rows cannot be swapped in the database."""
    return f"openkms:key-material:{key_id}:{version}".encode()


def import_token_aad(key_id: str) -> bytes:
    """Binds an import token (which carries its expiry) to the key it was issued for."""
    return f"openkms:import-token-expiry:{key_id}".encode()


def wrapping_key_aad(token_id: str) -> bytes:
    """Binds the sealed private half of an import's wrapping key to its token."""
    return f"openkms:import-token:{token_id}".encode()


class SoftwareKeyStore:
    name = "software"
    blocking = False

    def __init__(self, store: Store, root: RootKey) -> None:
        self._store = store
        self._root = root
        # (key id, version) -> KeyMaterial (raw specs) or a pyca private key object
        self._handles: dict[tuple[str, int], Any] = {}
        store.on_commit(self._committed)

    def _committed(self, changes: Changes) -> None:
        if changes.everything:
            self._handles.clear()
        for key_id, version in changes.versions:
            self.evict(key_id, version)

    # -- versions -----------------------------------------------------------------------------
    @staticmethod
    def supports(spec: KeySpecInfo) -> bool:
        return not spec.name.startswith("ML_DSA_") or asymmetric.ML_DSA_SUPPORTED

    def create_version(self, key: Key, version: int) -> StoredVersion:
        """Nothing is cached here: the version only exists once the caller's transaction commits,
        and its first use unseals it from the store."""
        spec = key.spec
        raw = os.urandom(spec.material_bytes) if spec.raw_material else asymmetric.generate(spec.name)
        return StoredVersion(self._root.seal(raw, material_aad(key.key_id, version)),
                             wrap.material_id(key.key_id, raw))

    def destroy(self, key: Key, version: int | None = None) -> None:
        # The sealed material is in the version rows the caller deletes or empties in its own
        # transaction; what is left here is the unsealed copy.
        self.evict(key.key_id, version)

    def evict(self, key_id: str, version: int | None = None) -> None:
        for k in [k for k in list(self._handles) if k[0] == key_id and version in (None, k[1])]:
            self._handles.pop(k, None)  # another thread may have dropped it meanwhile

    def _handle(self, key: Key, version: int) -> Any:
        cached = self._handles.get((key.key_id, version))
        if cached is not None:
            return cached
        with self._store.begin() as tx:
            sealed = tx.versions.get(key.key_id, version)
        if not sealed:
            raise InvalidCiphertextException()
        try:
            raw = self._root.unseal(sealed, material_aad(key.key_id, version))
        except InvalidCiphertextException:
            # The row does not open under our root key: the store was tampered with.
            raise KMSInternalException("Key material failed its integrity check.") from None
        handle = KeyMaterial(raw) if key.spec.raw_material else asymmetric.load(key.key_spec, raw)
        self._handles[(key.key_id, version)] = handle
        return handle

    def _current(self, key: Key) -> Any:
        return self._handle(key, key.current_version)

    # -- BYOK ---------------------------------------------------------------------------------
    def new_wrapping_key(self, token_id: str, wrapping_key_spec: str) -> tuple[bytes, bytes]:
        """(public key DER for the customer, the private key sealed for the store)."""
        private_der, public_der = wrap.new_wrapping_key(wrapping_key_spec)
        return public_der, self._root.seal(private_der, wrapping_key_aad(token_id))

    def new_import_token(self, key_id: str, valid_to: datetime) -> bytes:
        """An import token that carries its own expiry, sealed under the root key for one key: it
        still says it has expired once the store has purged its row (ExpiredImportTokenException)."""
        return self._root.seal(struct.pack(">d", valid_to.timestamp()) + os.urandom(16), import_token_aad(key_id))

    def import_token_expiry(self, key_id: str, token: bytes) -> datetime | None:
        """When a token this store issued for `key_id` expires; None for any other bytes."""
        try:
            opened = self._root.unseal(token, import_token_aad(key_id))
        except InvalidCiphertextException:
            return None
        if len(opened) != 24:
            return None
        return datetime.fromtimestamp(struct.unpack(">d", opened[:8])[0], UTC)

    def unwrap_import(self, key: Key, token_id: str, sealed_private_key: bytes, algorithm: str,
                      wrapped: bytes) -> ImportedMaterial:
        try:
            private_der = self._root.unseal(sealed_private_key, wrapping_key_aad(token_id))
        except InvalidCiphertextException:
            raise KMSInternalException("A wrapping key failed its integrity check.") from None
        raw = wrap.unwrap(private_der, algorithm, wrapped)
        wrap.check_material(key.spec, raw)
        return ImportedMaterial(raw, wrap.material_id(key.key_id, raw))

    def import_version(self, key: Key, version: int, material: ImportedMaterial) -> StoredVersion:
        """Imported material, sealed for the store like generated material."""
        return StoredVersion(self._root.seal(material.reveal(), material_aad(key.key_id, version)),
                             material.material_id)

    # -- symmetric ----------------------------------------------------------------------------
    def encrypt(self, key: Key, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        material = self._current(key).reveal()
        return blob.seal(material, key.key_id, key.current_version, plaintext, context)

    def decrypt(self, key: Key, version: int, ciphertext: bytes, context: Mapping[str, str] | None) -> bytes:
        header = blob.parse_header(ciphertext)
        if header.key_id != key.key_id or header.version != version:
            raise InvalidCiphertextException()
        return blob.open_blob(self._handle(key, version).reveal(), header, ciphertext, context)

    # -- asymmetric and HMAC ------------------------------------------------------------------
    def public_key(self, key: Key) -> bytes:
        return asymmetric.public_key_der(self._current(key))

    def sign(self, key: Key, algorithm: str, message: bytes, message_type: str) -> bytes:
        return asymmetric.sign(self._current(key), algorithm, message, message_type)

    def verify(self, key: Key, algorithm: str, message: bytes, message_type: str, signature: bytes) -> bool:
        return asymmetric.verify(self._current(key), algorithm, message, message_type, signature)

    def rsa_encrypt(self, key: Key, algorithm: str, plaintext: bytes) -> bytes:
        return asymmetric.rsa_encrypt(self._current(key), algorithm, plaintext)

    def rsa_decrypt(self, key: Key, algorithm: str, ciphertext: bytes) -> bytes:
        return asymmetric.rsa_decrypt(self._current(key), algorithm, ciphertext)

    def mac(self, key: Key, algorithm: str, message: bytes) -> bytes:
        return asymmetric.mac(self._current(key).reveal(), algorithm, message)

    def mac_matches(self, key: Key, algorithm: str, message: bytes, tag: bytes) -> bool:
        return asymmetric.mac_matches(self._current(key).reveal(), algorithm, message, tag)

    def derive_shared_secret(self, key: Key, peer_public_der: bytes) -> bytes:
        return asymmetric.ecdh(self._current(key), peer_public_der)
