"""The root of trust: the key that seals all key material and secrets at rest.

A root key comes from a key file (32 random bytes, created at first start, mode 0600) or from a
passphrase stretched with scrypt and a salt kept in the store. Either way it becomes a
:class:`RootKey` with `seal` and `unseal`; another source (an HSM, an external KMS) only has to
offer the same two methods. Sealed values carry a one-byte format so the scheme can change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import ConfigurationError, InvalidCiphertextException
from ..files import replace_file
from . import aead

ROOT_KEY_BYTES = 32
SEAL_FORMAT_V1 = b"\x01"
CHECK_PLAINTEXT = b"openkms root key check v1"
CHECK_AAD = b"openkms:root-check"
# scrypt cost: ~0.1 s and 32 MiB on a small machine, once per start.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


class RootKey:
    __slots__ = ("_key", "source")

    def __init__(self, key: bytes, source: str) -> None:
        if len(key) != ROOT_KEY_BYTES:
            raise ConfigurationError("root key must be 32 bytes")
        self._key = key
        self.source = source

    def __repr__(self) -> str:
        return f"RootKey(source={self.source!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("the root key cannot be pickled")

    def reveal_for_migration(self) -> bytes:
        """The key itself: only to wrap it for another root key source (roots.migrate, roots.open)."""
        return self._key

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return SEAL_FORMAT_V1 + aead.seal(self._key, plaintext, aad)

    def unseal(self, sealed: bytes, aad: bytes) -> bytes:
        """Raises InvalidCiphertextException on any mismatch (wrong root key, tampered row)."""
        if not sealed or sealed[:1] != SEAL_FORMAT_V1:
            raise InvalidCiphertextException()
        return aead.unseal(self._key, sealed[1:], aad)

    def make_check(self) -> bytes:
        return self.seal(CHECK_PLAINTEXT, CHECK_AAD)

    def verify_check(self, check: bytes) -> bool:
        try:
            return self.unseal(check, CHECK_AAD) == CHECK_PLAINTEXT
        except InvalidCiphertextException:
            return False


def from_passphrase(passphrase: str, salt: bytes) -> RootKey:
    kdf = Scrypt(salt=salt, length=ROOT_KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return RootKey(kdf.derive(passphrase.encode("utf-8")), source="passphrase")


def new_salt() -> bytes:
    return os.urandom(16)


def write_key_file(path: Path, key: bytes) -> None:
    """A root key file: 0600, on disk before it is renamed into place."""
    if len(key) != ROOT_KEY_BYTES:
        raise ConfigurationError("root key must be 32 bytes")
    replace_file(path, key)


def load_key_file(path: Path, create: bool) -> RootKey:
    """Read the root key file; create it (0600, written atomically) only when `create` is set."""
    if not path.exists():
        if not create:
            raise ConfigurationError(
                f"root key file {path} is missing, but the store was sealed with a key file; "
                "restore the file (or start with the store's passphrase)")
        key = os.urandom(ROOT_KEY_BYTES)
        write_key_file(path, key)
        return RootKey(key, source="file")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigurationError(f"root key file {path} is readable by others (mode {mode:o}); chmod 600 it")
    key = path.read_bytes()
    if len(key) != ROOT_KEY_BYTES:
        raise ConfigurationError(f"root key file {path} is not a 32-byte key")
    return RootKey(key, source="file")
