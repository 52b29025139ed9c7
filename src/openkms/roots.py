"""Where the root key comes from, and moving it from one source to another.

Three sources, chosen at the store's first start and recorded in it with a check value:

- `file`: the root key is `<data-dir>/root.key` (32 random bytes, mode 0600);
- `passphrase`: `OPENKMS_ROOT_PASSPHRASE`, stretched with scrypt and a salt kept in the store. A store
  made with it derives the root key from the passphrase; a store migrated to it keeps its root key
  wrapped under the passphrase's key instead (it cannot change its root key);
- `pkcs11`: a non-extractable AES-256 key in an HSM token (found by its label, or made at the
  first start) wraps the root key, and only that wrapped root key is kept in the store; every start
  unwraps it in the token (as Vault's PKCS#11 auto-unseal does). The token user's PIN comes from
  `OPENKMS_ROOT_PKCS11_PIN` only.

Opening checks the root against the store before anything else is written: a wrong or missing
source stops the start with one clear line and changes nothing. `migrate` (with the server
stopped) re-wraps only the root key for another source, never the key material; the old source
stops opening the store, and a root key file migrated away from is deleted. It re-wraps the same
root key, it does not rotate it: whatever opened the store before (an old passphrase with a
backup's salt, a copy of root.key) still opens its data.

Nothing is recorded that has not been read back first: a wrapped root key is unwrapped again by
the same source and compared with the root key before the store is changed, and the store is
opened again with the new source before an old key file is deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings
from .crypto import root as rootkey
from .errors import ConfigurationError, InvalidCiphertextException, KeyStoreUnavailable, KMSError
from .model import SecretStr
from .storage import Store

META_ROOT_SOURCE = "root_source"
META_ROOT_CHECK = "root_check"
META_ROOT_SALT = "root_salt"
META_ROOT_WRAPPED = "root_wrapped"  # the root key wrapped by its source (pkcs11, migrated passphrase)
WRAP_FORMAT_V1 = b"\x01"
WRAP_AAD = b"openkms root key v1"
SOURCES = ("file", "passphrase", "pkcs11")


@dataclass(frozen=True)
class Pkcs11Root:
    """The token key that wraps the root key."""

    module: str
    token_label: str
    key_label: str
    pin: SecretStr

    @classmethod
    def from_settings(cls, settings: Settings) -> Pkcs11Root | None:
        if not settings.root_pkcs11_module:
            return None
        if not settings.root_pkcs11_token_label:
            raise ConfigurationError("--root-pkcs11-module needs --root-pkcs11-token-label")
        if not settings.root_pkcs11_pin:
            raise ConfigurationError("the root key's token needs its user PIN in OPENKMS_ROOT_PKCS11_PIN")
        return cls(settings.root_pkcs11_module, settings.root_pkcs11_token_label, settings.root_pkcs11_key_label,
                   SecretStr(settings.root_pkcs11_pin))

    def where(self) -> str:
        return f"key {self.key_label!r} of token {self.token_label!r} ({self.module})"

    def _run(self, call: Any, create: bool) -> bytes:
        from .keystore.pkcs11 import ConnectError, TokenSession, _p11

        p11 = _p11()

        def with_key(session: Any) -> bytes:
            try:
                key = session.get_key(object_class=p11.ObjectClass.SECRET_KEY, label=self.key_label)
            except p11.exceptions.NoSuchKey:
                if not create:
                    raise ConfigurationError(f"the root key's token has no {self.where()}") from None
                attribute = p11.Attribute
                key = session.generate_key(p11.KeyType.AES, 256, label=self.key_label, store=True, template={
                    attribute.TOKEN: True, attribute.PRIVATE: True, attribute.SENSITIVE: True,
                    attribute.EXTRACTABLE: False, attribute.ENCRYPT: True, attribute.DECRYPT: True,
                    attribute.WRAP: False, attribute.UNWRAP: False})
            except p11.exceptions.MultipleObjectsReturned:
                raise ConfigurationError(f"more than one {self.where()}") from None
            return bytes(call(p11, key))

        try:
            session = TokenSession(self.module, self.token_label, self.pin)
            return session.run(with_key)
        except (ConnectError, KeyStoreUnavailable) as exc:
            raise ConfigurationError(f"cannot open the root key's token: {getattr(exc, 'message', exc)}") from None
        except p11.exceptions.PKCS11Error as exc:
            raise ConfigurationError(f"the root key's token refused: {type(exc).__name__}") from None
        except (AttributeError, TypeError):
            # python-pkcs11 offers only the calls a key's attributes allow: a key that may not
            # decrypt (CKA_DECRYPT false), or one of another type, has no `decrypt` at all.
            raise ConfigurationError(f"the {self.where()} cannot wrap and unwrap the root key: it must be an "
                                     "AES-256 key allowed to encrypt and decrypt") from None

    def wrap(self, root: bytes) -> bytes:
        iv = os.urandom(12)
        sealed = self._run(lambda p11, key: key.encrypt(root, mechanism=p11.Mechanism.AES_GCM,
                                                        mechanism_param=p11.mechanisms.GCMParams(iv, WRAP_AAD, 128)),
                           create=True)
        if len(sealed) != len(root) + 16:
            # Some HSMs in FIPS mode ignore the IV given and append one of their own to the output.
            raise ConfigurationError(f"the {self.where()} returned {len(sealed)} bytes of AES-GCM output for a "
                                     f"{len(root)}-byte root key, not {len(root) + 16}: the token may choose "
                                     "its own GCM IV (FIPS mode), which openkms cannot use")
        return WRAP_FORMAT_V1 + iv + sealed

    def unwrap(self, wrapped: bytes) -> bytes:
        if wrapped[:1] != WRAP_FORMAT_V1 or len(wrapped) < 1 + 12 + 16:
            raise ConfigurationError("the store's wrapped root key is damaged")
        iv, sealed = wrapped[1:13], wrapped[13:]

        def unwrap(p11: Any, key: Any) -> bytes:
            try:
                return bytes(key.decrypt(sealed, mechanism=p11.Mechanism.AES_GCM,
                                         mechanism_param=p11.mechanisms.GCMParams(iv, WRAP_AAD, 128)))
            except p11.exceptions.PKCS11Error:
                raise ConfigurationError(f"the {self.where()} does not open this store's root key") from None

        return self._run(unwrap, create=False)


def wanted_source(settings: Settings) -> str:
    if settings.root_pkcs11_module:
        return "pkcs11"
    return "passphrase" if settings.root_passphrase else "file"


class _Meta:
    def __init__(self, store: Store) -> None:
        with store.begin() as tx:
            raw = tx.meta.get(META_ROOT_SOURCE)
            self.check = tx.meta.get(META_ROOT_CHECK)
            self.salt = tx.meta.get(META_ROOT_SALT)
            self.wrapped = tx.meta.get(META_ROOT_WRAPPED)
        self.source = raw.decode() if raw is not None else None


def _verified(root: rootkey.RootKey, meta: _Meta, what: str) -> rootkey.RootKey:
    if meta.check is None or not root.verify_check(meta.check):
        if what == "passphrase":
            raise ConfigurationError("wrong root passphrase: it does not open this store")
        raise ConfigurationError(f"wrong root key: {what} does not open this store")
    return root


def _refuse_other(settings: Settings, source: str) -> None:
    wanted = wanted_source(settings)
    if wanted != source:
        hint = {"file": "unset OPENKMS_ROOT_PASSPHRASE and the --root-pkcs11-* settings",
                "passphrase": "set OPENKMS_ROOT_PASSPHRASE (and no --root-pkcs11-* settings)",
                "pkcs11": "set --root-pkcs11-module, --root-pkcs11-token-label and OPENKMS_ROOT_PKCS11_PIN"}[source]
        raise ConfigurationError(f"this store's root key comes from a {source} source, not a {wanted} one: {hint} "
                                 "(or move it with `openkms root migrate`)")


def open_root(settings: Settings, store: Store) -> rootkey.RootKey:
    """The store's root key from the source the store records; a fresh store gets one now."""
    meta = _Meta(store)
    if meta.source is None:
        return _create(settings, store)
    _refuse_other(settings, meta.source)
    if meta.source == "passphrase":
        if meta.salt is None:
            raise ConfigurationError("the store has no passphrase salt; it is damaged")
        derived = rootkey.from_passphrase(settings.root_passphrase, meta.salt)
        if meta.wrapped is None:  # made with the passphrase: it is the root key
            return _verified(derived, meta, "passphrase")
        try:
            raw = derived.unseal(meta.wrapped, WRAP_AAD)
        except InvalidCiphertextException:
            raise ConfigurationError("wrong root passphrase: it does not open this store") from None
        return _verified(rootkey.RootKey(raw, "passphrase"), meta, "passphrase")
    if meta.source == "pkcs11":
        hsm = Pkcs11Root.from_settings(settings)
        assert hsm is not None
        if meta.wrapped is None:
            raise ConfigurationError("the store has no wrapped root key; it is damaged")
        return _verified(rootkey.RootKey(hsm.unwrap(meta.wrapped), "pkcs11"), meta, hsm.where())
    key_file = settings.data_dir / "root.key"
    return _verified(rootkey.load_key_file(key_file, create=False), meta, str(key_file))


def _record(store: Store, source: str, root: rootkey.RootKey, salt: bytes | None, wrapped: bytes | None,
            first: bool) -> None:
    with store.begin() as tx:
        if first and tx.meta.get(META_ROOT_SOURCE) is not None:
            return  # another node recorded its root first; opening will check ours against it
        tx.meta.put(META_ROOT_SOURCE, source.encode())
        tx.meta.put(META_ROOT_CHECK, root.make_check())
        for name, value in ((META_ROOT_SALT, salt), (META_ROOT_WRAPPED, wrapped)):
            if value is None:
                tx.meta.delete(name)
            else:
                tx.meta.put(name, value)


def _create(settings: Settings, store: Store) -> rootkey.RootKey:
    source = wanted_source(settings)
    salt = wrapped = None
    if source == "pkcs11":
        hsm = Pkcs11Root.from_settings(settings)
        assert hsm is not None
        root = rootkey.RootKey(os.urandom(rootkey.ROOT_KEY_BYTES), "pkcs11")
        sealed = wrapped = hsm.wrap(_raw(root))
        _round_trip(_raw(root), lambda: hsm.unwrap(sealed), "the token key")
    elif source == "passphrase":
        salt = rootkey.new_salt()
        root = rootkey.from_passphrase(settings.root_passphrase, salt)
    else:
        root = rootkey.load_key_file(settings.data_dir / "root.key", create=True)
    _record(store, source, root, salt, wrapped, first=True)
    return open_root(settings, store)


def _raw(root: rootkey.RootKey) -> bytes:
    return root.reveal_for_migration()


def _round_trip(raw: bytes, read_back: Callable[[], bytes], source: str) -> None:
    """Refuse, before anything is recorded, a source that does not give back the root key it was
    given (a token key that may encrypt but not decrypt, a token that picks its own GCM IV, ...)."""
    try:
        back = read_back()
    except (ConfigurationError, InvalidCiphertextException) as exc:
        raise ConfigurationError(f"{source} does not give the root key back ({str(exc) or 'it fails to open it'}); "
                                 "nothing was changed") from None
    if not hmac.compare_digest(back, raw):
        raise ConfigurationError(f"{source} gives back another key than the root key; nothing was changed")


def _reason(exc: Exception) -> str:
    if isinstance(exc, KMSError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _only_source(settings: Settings, target: str, new: Settings) -> Settings:
    """`settings` (where the store is) with no root key source but the `target` one `new` describes:
    what `openkms serve` will be given once the migration is done."""
    if target == "pkcs11":
        return dataclasses.replace(settings, root_passphrase="", root_pkcs11_module=new.root_pkcs11_module,
                                   root_pkcs11_token_label=new.root_pkcs11_token_label,
                                   root_pkcs11_key_label=new.root_pkcs11_key_label,
                                   root_pkcs11_pin=new.root_pkcs11_pin)
    return dataclasses.replace(settings, root_passphrase=new.root_passphrase if target == "passphrase" else "",
                               root_pkcs11_module="", root_pkcs11_token_label="", root_pkcs11_pin="")


def migrate(settings: Settings, store: Store, target: str, target_settings: Settings) -> str:
    """Re-wrap the root key for `target` (the server stopped); returns a line saying what was done.
    `settings` opens the store as it is; `target_settings` describes the new source.

    The new source must give the root key back before the store is changed, and must open the
    store after it is changed before an old root key file is deleted. A ConfigurationError says
    what happened; once the store is changed, it starts with "the migration is committed"."""
    if target not in SOURCES:
        raise ConfigurationError(f"no root key source {target!r}: one of {', '.join(SOURCES)}")
    root = open_root(settings, store)
    old = _Meta(store).source
    raw = _raw(root)
    key_file = settings.data_dir / "root.key"
    if target == old and target != "pkcs11":
        raise ConfigurationError(f"the root key already comes from a {target} source")
    salt: bytes | None = None
    wrapped: bytes | None = None
    if target == "pkcs11":
        hsm = Pkcs11Root.from_settings(target_settings)
        if hsm is None:
            raise ConfigurationError("migrating to pkcs11 needs --pkcs11-module, --pkcs11-token-label and "
                                     "OPENKMS_NEW_ROOT_PKCS11_PIN")
        sealed = wrapped = hsm.wrap(raw)
        _round_trip(raw, lambda: hsm.unwrap(sealed), "the new token key")
        done = f"the root key is now wrapped by the {hsm.where()}"
    elif target == "passphrase":
        passphrase = target_settings.root_passphrase
        if not passphrase:
            raise ConfigurationError("migrating to a passphrase needs OPENKMS_NEW_ROOT_PASSPHRASE")
        new_salt = salt = rootkey.new_salt()
        sealed = wrapped = rootkey.from_passphrase(passphrase, new_salt).seal(raw, WRAP_AAD)
        _round_trip(raw, lambda: rootkey.from_passphrase(passphrase, new_salt).unseal(sealed, WRAP_AAD),
                    "the new passphrase")
        done = "the root key is now wrapped under the new passphrase"
    else:
        if key_file.exists():
            raise ConfigurationError(f"{key_file} exists already: move it away first")
        rootkey.write_key_file(key_file, raw)
        try:
            _round_trip(raw, lambda: _raw(rootkey.load_key_file(key_file, create=False)), f"the new {key_file}")
        except ConfigurationError:
            with contextlib.suppress(OSError):
                _shred(key_file)
            raise
        done = f"the root key is now in {key_file} (mode 0600): back it up apart from the store"
    _record(store, target, root, salt, wrapped, first=False)

    # From here on the store holds the new source: say so whatever fails.
    committed = f"the migration is committed ({done})"
    shred = old == "file" and target != "file"
    try:
        reopened = _raw(open_root(_only_source(settings, target, target_settings), store))
        reason = "" if hmac.compare_digest(reopened, raw) else "it opens another root key"
    except (ConfigurationError, KMSError, OSError) as exc:
        reason = _reason(exc)
    if reason:
        left = (f"{key_file} is kept: delete it by hand once `openkms serve` opens the store with the new source"
                if shred else "check the new source before starting the server")
        raise ConfigurationError(f"{committed}, but the store did not open again with the new source ({reason}); "
                                 f"{left}")
    if shred:
        try:
            _shred(key_file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigurationError(f"{committed}, but {key_file} could not be deleted ({_reason(exc)}): "
                                     "delete it by hand") from None
        done += f"; {key_file} is deleted"
    return done


def _shred(path: Path) -> None:
    """Overwrite a key file before unlinking it (on most file systems, that is all one can do)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
