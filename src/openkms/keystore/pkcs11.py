"""The PKCS#11 key store: keys made in an HSM token, non-extractable, every use inside the token.

One `Pkcs11KeyStore` serves one custom key store: a token of a PKCS#11 module (an HSM "cluster"),
logged in as the token's user with the key store's password. A key version is an AES-256 secret
key object in the token (CKA_TOKEN, CKA_SENSITIVE, not CKA_EXTRACTABLE, CKA_ENCRYPT and CKA_DECRYPT
only; CKA_LABEL the KMS key's ARN, as AWS labels CloudHSM keys); the version's locator is its
CKA_ID. Ciphertexts are format-2 blobs (crypto/blob.py) sealed by the token with CKM_AES_GCM.

Calls into a module are serialised by one lock per module: SoftHSM, as python-pkcs11 initialises
it, and other modules crash or corrupt state under concurrent callers. Every call leaves the
process's Python code for the module and may wait on hardware, so the store says it blocks and the
API runs its calls off the event loop. Errors are translated here, where the module is called:
a failed GCM tag check is InvalidCiphertextException, anything else KeyStoreUnavailable (a
KMSInvalidStateException to clients); no CKR_* code leaves this module. A session that dies (the
token went away, the module was reset) is opened again on the next call, and a module that cannot
open one any more is re-initialised, so a token that comes back serves again without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from ..crypto import blob
from ..crypto.aead import TAG_BYTES
from ..errors import InvalidCiphertextException, KeyStoreUnavailable
from ..model import Key, KeyFamily, KeySpecInfo, SecretStr
from ..storage import Store
from .base import StoredVersion

log = logging.getLogger("openkms.keystore.pkcs11")
T = TypeVar("T")


class ConnectError(Exception):
    """Why a token could not be opened, as AWS's ConnectionErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _p11() -> Any:
    import pkcs11

    return pkcs11


class Module:
    """One PKCS#11 library in this process: loaded once, each call made under its lock.

    A token's login is the process's, not a session's (C_Logout on any session logs out all of
    them), so the module keeps one logged-in session per token, shared by every key store on it.
    """

    _loaded: ClassVar[dict[str, Module]] = {}
    _loading: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.generation = 0  # bumped by reinitialize(): sessions of older generations are dead
        # token label -> (session, digest of the PIN it logged in with, generation)
        self.sessions: dict[str, tuple[Any, bytes, int]] = {}
        try:
            self.lib = _p11().lib(path)
        except Exception as exc:  # python-pkcs11 raises its own error for a library it cannot load
            raise ConnectError("INTERNAL_ERROR", f"cannot load the PKCS#11 module {path}: {_reason(exc)}") from None

    @classmethod
    def load(cls, path: str) -> Module:
        with cls._loading:
            module = cls._loaded.get(path)
            if module is None:
                module = cls._loaded[path] = Module(path)
            return module

    def reinitialize(self) -> None:
        with self.lock:
            self.sessions.clear()
            try:
                self.lib.reinitialize()
            finally:
                self.generation += 1

    def token(self, label: str) -> Any:
        exceptions = _p11().exceptions
        try:
            return self.lib.get_token(token_label=label)
        except exceptions.NoSuchToken:
            raise ConnectError("NETWORK_ERRORS", f"no token labelled {label!r} in {self.path}") from None
        except exceptions.MultipleTokensReturned:
            raise ConnectError("INTERNAL_ERROR", f"more than one token labelled {label!r} in {self.path}") from None

    def logout(self, label: str) -> None:
        """Close the token's session (which logs the process out of the token)."""
        with self.lock:
            entry = self.sessions.pop(label, None)
            if entry is not None and entry[2] == self.generation:
                with contextlib.suppress(Exception):  # a dead session cannot be closed; nothing to keep
                    entry[0].close()


def _reason(exc: BaseException) -> str:
    """A short reason for a log line or a message: the exception's type, never its arguments' data."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}{': ' + text if text and 'pin' not in text.lower() else ''}"


def check_token(module_path: str, token_label: str) -> None:
    """That the module loads and has the token (for registering a cluster): ConnectError if not. A
    token made since the module was loaded may need the module initialised again to be seen."""
    module = Module.load(module_path)
    with module.lock:
        try:
            module.token(token_label)
        except ConnectError:
            module.reinitialize()
            module.token(token_label)


_PIN_SALT = os.urandom(16)


class TokenSession:
    """Calls on one token, logged in as its user with one key store's PIN. The module's session for
    the token is opened on first use, and again after it dies or when another PIN logged it in."""

    def __init__(self, module_path: str, token_label: str, pin: SecretStr,
                 on_lost: Callable[[ConnectError], None] | None = None) -> None:
        self.module = Module.load(module_path)
        self.token_label = token_label
        self._pin = pin
        self._pin_digest = hmac.new(_PIN_SALT, pin.reveal().encode(), "sha256").digest()
        self._on_lost = on_lost  # told when the token can no longer be opened (the store shows FAILED)

    def __repr__(self) -> str:
        return f"TokenSession({self.module.path!r}, {self.token_label!r})"

    def _open(self) -> Any:
        exceptions = _p11().exceptions
        self.module.logout(self.token_label)  # a login of another PIN, or a dead session
        for attempt in (1, 2):
            try:
                token = self.module.token(self.token_label)
                session = token.open(user_pin=self._pin.reveal(), rw=True)
                self.module.sessions[self.token_label] = (session, self._pin_digest, self.module.generation)
                return session
            except exceptions.PinIncorrect:
                if attempt == 1:
                    # A module may still hold the PIN it read before the token's PIN changed
                    # (SoftHSM does): meet the token as it is now before calling the PIN wrong.
                    self.module.reinitialize()
                    continue
                raise ConnectError("INVALID_CREDENTIALS", "the key store password is not the token user's PIN") \
                    from None
            except exceptions.PinLocked:
                raise ConnectError("USER_LOCKED_OUT", "the token's user is locked out") from None
            except (ConnectError, exceptions.PKCS11Error) as exc:
                if attempt == 2:
                    if isinstance(exc, ConnectError):
                        raise
                    raise ConnectError("NETWORK_ERRORS", f"cannot open the token: {_reason(exc)}") from None
                # The module may hold stale state (a token that went away and came back): reset it.
                log.info("PKCS#11 module %s: re-initialising after %s", self.module.path, _reason(exc))
                self.module.reinitialize()
        raise AssertionError("unreachable")

    def _session(self) -> Any:
        entry = self.module.sessions.get(self.token_label)
        if entry is not None and entry[2] == self.module.generation and hmac.compare_digest(entry[1], self._pin_digest):
            return entry[0]
        return self._open()

    def check(self) -> None:
        """Log in afresh (ConnectCustomKeyStore): ConnectError with AWS's code if it cannot. The
        module is re-initialised first, so the login meets the token as it is now: a module may
        keep what it read of a token (SoftHSM keeps the user PIN) until it is initialised again."""
        with self.module.lock:
            self.module.reinitialize()
            self._open()

    def reset(self) -> None:
        """Drop the token's session: the next call opens a fresh one."""
        self.module.logout(self.token_label)

    def run(self, call: Callable[[Any], T]) -> T:
        """`call(session)` under the module's lock; a dead session is opened again once."""
        exceptions = _p11().exceptions
        dead = (exceptions.SessionHandleInvalid, exceptions.SessionClosed, exceptions.DeviceRemoved,
                exceptions.TokenNotPresent, exceptions.DeviceError, exceptions.UserNotLoggedIn)
        with self.module.lock:
            for attempt in (1, 2):
                try:
                    session = self._session()
                except ConnectError as exc:
                    # Wrong credentials need the operator (the store shows FAILED); a token that is
                    # away is tried again on the next call, and serves again once it is back.
                    if self._on_lost is not None and exc.code in ("INVALID_CREDENTIALS", "USER_LOCKED_OUT"):
                        self._on_lost(exc)
                    raise KeyStoreUnavailable(f"The HSM cannot be reached: {exc.message}.") from None
                try:
                    return call(session)
                except dead as exc:
                    self.module.sessions.pop(self.token_label, None)
                    if attempt == 2:
                        raise KeyStoreUnavailable(f"The HSM cannot be reached: {_reason(exc)}.") from None
        raise AssertionError("unreachable")


def object_id_of(key_id: str, version: int) -> bytes:
    """The CKA_ID of a key version's object: 16 bytes derived from the key id and version, so the
    object is found (and destroyed) without a read of the store."""
    return hashlib.sha256(f"openkms hsm object\x00{key_id}\x00{version}".encode()).digest()[:16]


class Pkcs11KeyStore:
    name = "pkcs11"
    blocking = True

    def __init__(self, store: Store, session: TokenSession, cluster_id: str) -> None:
        self._store = store
        self._session = session
        self._cluster_id = cluster_id
        # (key id, version) -> (the session it was found in, the token's key object): an object
        # handle is only good in the session (and module generation) that found it.
        self._handles: dict[tuple[str, int], tuple[Any, Any]] = {}

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore({self._cluster_id!r})"

    @staticmethod
    def supports(spec: KeySpecInfo) -> bool:
        return spec.family is KeyFamily.SYMMETRIC

    def close(self) -> None:
        """Forget the key objects (the token's session stays, shared with other stores on it)."""
        self._handles.clear()

    # -- versions -----------------------------------------------------------------------------
    def create_version(self, key: Key, version: int) -> StoredVersion:
        p11 = _p11()
        attribute = p11.Attribute
        object_id = object_id_of(key.key_id, version)

        def generate(session: Any) -> Any:
            return session.generate_key(p11.KeyType.AES, 256, label=key.arn, id=object_id, store=True, template={
                attribute.TOKEN: True, attribute.PRIVATE: True, attribute.SENSITIVE: True,
                attribute.EXTRACTABLE: False, attribute.ENCRYPT: True, attribute.DECRYPT: True,
                attribute.WRAP: False, attribute.UNWRAP: False, attribute.SIGN: False, attribute.VERIFY: False,
                attribute.DERIVE: False})

        self._call(generate)
        material_id = hashlib.sha256(b"openkms hsm key\x00" + self._cluster_id.encode() + b"\x00" + object_id)
        return StoredVersion(object_id, material_id.hexdigest())


    def _key_object(self, session: Any, key: Key, version: int) -> Any:
        cached = self._handles.get((key.key_id, version))
        if cached is not None and cached[0] is session:
            return cached[1]
        p11 = _p11()
        found = session.get_key(object_class=p11.ObjectClass.SECRET_KEY, id=object_id_of(key.key_id, version))
        self._handles[(key.key_id, version)] = (session, found)
        return found

    def _with_key(self, key: Key, version: int, use: Callable[[Any, Any], T]) -> T:
        """`use(session, key object)`. A stale handle or a missing object is tried once more on a
        fresh session (a token that went away and came back invalidates both); missing then, the
        object is gone from the token."""
        exceptions = _p11().exceptions
        gone = (exceptions.NoSuchKey, exceptions.ObjectHandleInvalid, exceptions.KeyHandleInvalid)
        for attempt in (1, 2):
            try:
                return self._call(lambda session: use(session, self._key_object(session, key, version)))
            except gone:
                self._handles.pop((key.key_id, version), None)
                if attempt == 1:
                    self._session.reset()
        raise KeyStoreUnavailable(f"The key material of {key.arn} is not in its HSM.")

    def _call(self, call: Callable[[Any], T]) -> T:
        exceptions = _p11().exceptions
        try:
            return self._session.run(call)
        except (KeyStoreUnavailable, InvalidCiphertextException, exceptions.NoSuchKey,
                exceptions.ObjectHandleInvalid, exceptions.KeyHandleInvalid):
            raise
        except exceptions.PKCS11Error as exc:
            raise KeyStoreUnavailable(f"The HSM refused the operation: {_reason(exc)}.") from None

    def destroy(self, key: Key, version: int | None = None) -> None:
        """Delete the version's objects (all versions: every object labelled with the key's ARN)."""
        p11 = _p11()

        def delete(session: Any) -> None:
            for obj in list(session.get_objects({p11.Attribute.CLASS: p11.ObjectClass.SECRET_KEY,
                                                 p11.Attribute.LABEL: key.arn})):
                if version is None or obj[p11.Attribute.ID] == object_id_of(key.key_id, version):
                    obj.destroy()

        self._call(delete)
        self.evict(key.key_id, version)

    def evict(self, key_id: str, version: int | None = None) -> None:
        for k in [k for k in self._handles if k[0] == key_id and version in (None, k[1])]:
            del self._handles[k]

    # -- cryptography -------------------------------------------------------------------------
    def encrypt(self, key: Key, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        p11 = _p11()
        iv = os.urandom(blob.IV_BYTES)  # unique per message; it need not be secret
        header = blob.header_v2(key.key_id, key.current_version, iv)
        params = p11.mechanisms.GCMParams(iv, blob.aad(header, context), TAG_BYTES * 8)

        def seal(session: Any, obj: Any) -> bytes:
            return bytes(obj.encrypt(plaintext, mechanism=p11.Mechanism.AES_GCM, mechanism_param=params))

        return header + self._with_key(key, key.current_version, seal)

    def decrypt(self, key: Key, version: int, ciphertext: bytes, context: Mapping[str, str] | None) -> bytes:
        header = blob.parse_header(ciphertext)
        if header.format != blob.FORMAT_V2 or header.key_id != key.key_id or header.version != version:
            raise InvalidCiphertextException()
        p11 = _p11()
        params = p11.mechanisms.GCMParams(header.salt, blob.aad(header.raw, context), TAG_BYTES * 8)
        failed_tag = (p11.exceptions.GeneralError, p11.exceptions.EncryptedDataInvalid,
                      p11.exceptions.EncryptedDataLenRange, p11.exceptions.FunctionFailed,
                      p11.exceptions.DataInvalid, p11.exceptions.DataLenRange)

        def open_(session: Any, obj: Any) -> bytes:
            try:
                return bytes(obj.decrypt(ciphertext[len(header.raw):], mechanism=p11.Mechanism.AES_GCM,
                                         mechanism_param=params))
            except failed_tag:
                # SoftHSM reports a GCM tag mismatch as CKR_GENERAL_ERROR; others as
                # CKR_ENCRYPTED_DATA_INVALID or CKR_FUNCTION_FAILED. All mean: not what was sealed.
                raise InvalidCiphertextException() from None

        return self._with_key(key, version, open_)

    def random(self, nbytes: int) -> bytes:
        """Random bytes from the token's generator (GenerateRandom with a CustomKeyStoreId)."""
        return bytes(self._call(lambda session: session.generate_random(nbytes * 8)))
