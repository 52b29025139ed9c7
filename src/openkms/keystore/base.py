"""The KeyStore interface: where a key's material lives and where cryptography with it runs.

The service never holds key material. It asks a key store to make a version, keeps what the store
hands back (an opaque locator and the material's id) in the version's row, and asks the store to
encrypt and decrypt with it. A backend is one module of this package plus its registration in
`registry.py`; `tests/unit/keystore/test_contract.py` runs the same contract over every backend:

- `create_version(key, version)` makes fresh material inside the store and returns a
  `StoredVersion`: the `locator` the caller saves with the version row in the same transaction
  that creates the version (for the software store the material sealed under the root key, for
  an HSM a handle of its object), and the `material_id`. Material never comes out.
- `encrypt(key, plaintext, context)` seals under the key's current version; the result names its
  key and version. `decrypt(key, version, ciphertext, context)` opens what `encrypt` made.
- `destroy(key, version=None)`: the material is gone for good; decrypting with it can never
  succeed again. (The software store's material lives in the rows the caller deletes or empties in
  its own transaction; an HSM deletes its object.) `evict` only drops cached handles.
- `supports(spec)`: the key specs the store can make. `blocking`: calls leave the process (an
  HSM, a proxy across the network), so the API runs them off the event loop.
- Errors: InvalidCiphertextException (the ciphertext or context is not what was sealed) or
  KeyStoreUnavailable (the backend cannot answer now, or has no such material). Each backend
  translates its own errors at the point where it calls out; nothing else escapes, but for
  KMSInternalException when the software store finds a sealed row that fails its integrity check
  (the database was tampered with).

Optional capabilities, as their own protocols: `Importing` (BYOK: wrapping keys, unwrapping
customer material into the store) and `Asymmetric` (signing, MACs, RSA encryption, ECDH).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import NamedTuple, Protocol, runtime_checkable

from ..crypto.material import ImportedMaterial
from ..model import Key, KeySpecInfo


class StoredVersion(NamedTuple):
    """What a store hands back for a new version: saved with the version row, opaque to the caller."""

    locator: bytes
    material_id: str

    def __repr__(self) -> str:
        return f"StoredVersion(<{len(self.locator)}-byte locator>, material_id={self.material_id!r})"


@runtime_checkable
class KeyStore(Protocol):
    name: str
    blocking: bool

    def supports(self, spec: KeySpecInfo) -> bool: ...

    def create_version(self, key: Key, version: int) -> StoredVersion: ...

    def encrypt(self, key: Key, plaintext: bytes, context: Mapping[str, str] | None) -> bytes: ...

    def decrypt(self, key: Key, version: int, ciphertext: bytes, context: Mapping[str, str] | None) -> bytes: ...

    def destroy(self, key: Key, version: int | None = None) -> None: ...

    def evict(self, key_id: str, version: int | None = None) -> None: ...


@runtime_checkable
class Importing(Protocol):
    """BYOK: the store makes the wrapping key, and unwraps the customer's material into itself."""

    def new_wrapping_key(self, token_id: str, wrapping_key_spec: str) -> tuple[bytes, bytes]:
        """(the public key DER for the customer, the private half sealed for the token's row)."""
        ...

    def new_import_token(self, key_id: str, valid_to: datetime) -> bytes: ...

    def import_token_expiry(self, key_id: str, token: bytes) -> datetime | None: ...

    def unwrap_import(self, key: Key, token_id: str, sealed_private_key: bytes, algorithm: str,
                      wrapped: bytes) -> ImportedMaterial:
        """The customer's material, checked against the key's spec (IncorrectKeyMaterialException)."""
        ...

    def import_version(self, key: Key, version: int, material: ImportedMaterial) -> StoredVersion: ...


@runtime_checkable
class Asymmetric(Protocol):
    """Signing, MACs, RSA encryption and key agreement with the key's current version."""

    def public_key(self, key: Key) -> bytes: ...

    def sign(self, key: Key, algorithm: str, message: bytes, message_type: str) -> bytes: ...

    def verify(self, key: Key, algorithm: str, message: bytes, message_type: str, signature: bytes) -> bool: ...

    def rsa_encrypt(self, key: Key, algorithm: str, plaintext: bytes) -> bytes: ...

    def rsa_decrypt(self, key: Key, algorithm: str, ciphertext: bytes) -> bytes: ...

    def mac(self, key: Key, algorithm: str, message: bytes) -> bytes: ...

    def mac_matches(self, key: Key, algorithm: str, message: bytes, tag: bytes) -> bool: ...

    def derive_shared_secret(self, key: Key, peer_public_der: bytes) -> bytes: ...
