"""The PKCS#11 key store: keys made in an HSM token, non-extractable, every use inside the token.

One `Pkcs11KeyStore` serves one custom key store: a token of a PKCS#11 module (an HSM "cluster"),
logged in as the token's user with the key store's password. A key version is an AES-256 secret
key object in the token (CKA_TOKEN, CKA_SENSITIVE, not CKA_EXTRACTABLE, CKA_ENCRYPT and CKA_DECRYPT
only; CKA_LABEL the KMS key's ARN, as AWS labels CloudHSM keys); the version's locator is its
CKA_ID. Ciphertexts are format-2 blobs (crypto/blob.py) sealed by the token with CKM_AES_GCM.

Calls into a module are serialised by one lock per module: SoftHSM, as python-pkcs11 initialises
it, and other modules crash or corrupt state under concurrent callers. A caller waits at most
`LOCK_TIMEOUT` seconds for the lock (a hung token makes its own calls fail, not the node hang). Every call leaves the
process's Python code for the module and may wait on hardware, so the store says it blocks and the
API runs its calls off the event loop. Errors are translated here, where the module is called:
a failed GCM tag check is InvalidCiphertextException, anything else KeyStoreUnavailable (a
KMSInvalidStateException to clients); no CKR_* code leaves this module. A session that dies (the
token went away, the module was reset) is opened again on the next call, and a module that cannot
open one any more is re-initialised, so a token that comes back serves again without a restart;
a token that stays away is not looked for again for `RETRY_AFTER` seconds, so that its absence
costs the other tokens of the module nothing.

Requests that use a token run on its own thread (`Module.lane`, openkms/lane.py), not on the
server's shared pool of blocking threads: the calls serialise on the module's lock anyway, and
dozens of threads taking turns at the GIL and that lock cost the node more CPU per request than
the token's cryptography (measured with bench/hsm.py: 64 threads ~280 us of CPU per Encrypt, two
~190 us, against ~130 us for a key of the default store). A token that hangs holds up only its
own lane.

A module is loaded at most once per process (by its real path: two paths to one library are one
module). A process that forks finalises its modules first (`Module.finalize_all`, before the server
starts its worker), and a child that still finds inherited modules initialises them again, as
PKCS#11 requires of a child that uses the library.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

from ..crypto import blob
from ..crypto.aead import TAG_BYTES
from ..crypto.openssl import clear_error_queue
from ..errors import InvalidCiphertextException, KeyStoreUnavailable, ThrottlingException
from ..lane import Lane
from ..model import Key, KeyFamily, KeySpecInfo, SecretStr
from ..ratelimit import TokenBucket
from ..storage import Store
from .base import StoredVersion

log = logging.getLogger("openkms.keystore.pkcs11")
T = TypeVar("T")
LOCK_TIMEOUT = 10.0  # seconds a call waits for its module's lock
RETRY_AFTER = 5.0  # seconds before a token that could not be opened is looked for again
DEFAULT_HSM_RATE = 1800.0  # AWS's custom key store request quota, per HSM key store


class ConnectError(Exception):
    """Why a token could not be opened, as AWS's ConnectionErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def p11() -> Any:
    """The python-pkcs11 package, imported on first use (the server starts without it)."""
    import pkcs11

    return pkcs11


_p11 = p11  # the old name, for modules not yet moved to the public one


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
        # token label -> (monotonic time before which it is not looked for again, why it failed)
        self.away: dict[str, tuple[float, ConnectError]] = {}
        # token label -> digest of the last PIN that logged in to it (kept across re-initialisations)
        self.last_pin: dict[str, bytes] = {}
        # token label -> the thread that runs the requests using the token (made on first use)
        self.lanes: dict[str, Lane] = {}
        self._lanes_lock = threading.Lock()  # not the module's: the event loop must never wait for a token
        try:
            self.lib = _p11().lib(path)
        except Exception as exc:  # python-pkcs11 raises its own error for a library it cannot load
            raise ConnectError("INTERNAL_ERROR", f"cannot load the PKCS#11 module {path}: {_reason(exc)}") from None
        finally:
            clear_error_queue()

    @classmethod
    def load(cls, path: str) -> Module:
        real = os.path.realpath(path)
        with cls._loading:
            module = cls._loaded.get(real)
            if module is None:
                module = cls._loaded[real] = Module(path)
            return module

    @classmethod
    def finalize_all(cls) -> None:
        """Log out of every token and finalise every module (before this process forks a worker
        that will load them itself). Best effort: a module that fails to finalise is dropped anyway."""
        with cls._loading:
            modules, cls._loaded = list(cls._loaded.values()), {}
        for module in modules:
            with module.lock:
                module.sessions.clear()
                for lane in module.lanes.values():
                    lane.close()
                module.lanes.clear()
                with contextlib.suppress(Exception):
                    module.lib.finalize()
                module.generation += 1

    @classmethod
    def _after_fork_in_child(cls) -> None:
        """A child must not use the sessions it inherited: each module starts again."""
        cls._loading = threading.Lock()
        for module in cls._loaded.values():
            module.lock = threading.RLock()
            module.sessions.clear()
            module.away.clear()
            module.lanes.clear()  # their threads did not survive the fork
            module._lanes_lock = threading.Lock()
            module.generation += 1
            with contextlib.suppress(Exception):
                module.lib.reinitialize()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The module's lock, or KeyStoreUnavailable once `LOCK_TIMEOUT` has passed."""
        if not self.lock.acquire(timeout=LOCK_TIMEOUT):
            raise KeyStoreUnavailable("The HSM is not answering: its calls are taking too long.")
        try:
            yield
        finally:
            clear_error_queue()  # what the module left for this thread's TLS (crypto/openssl.py)
            self.lock.release()

    def reinitialize(self) -> None:
        """C_Finalize and C_Initialize: the module meets its tokens as they are now. ConnectError
        if the module cannot be initialised again."""
        with self.lock:
            self.sessions.clear()
            try:
                self.lib.reinitialize()
            except Exception as exc:
                raise ConnectError("INTERNAL_ERROR", f"cannot initialise {self.path}: {_reason(exc)}") from None
            finally:
                self.generation += 1

    def lane(self, label: str) -> Lane:
        """The thread that runs the requests using a token."""
        lane = self.lanes.get(label)
        if lane is None:
            with self._lanes_lock:
                lane = self.lanes.get(label)
                if lane is None:
                    lane = self.lanes[label] = Lane(f"openkms-hsm-{label}")
        return lane

    def token(self, label: str) -> Any:
        exceptions = _p11().exceptions
        try:
            return self.lib.get_token(token_label=label)
        except exceptions.NoSuchToken:
            raise ConnectError("CLUSTER_NOT_FOUND", f"no token labelled {label!r} in {self.path}") from None
        except exceptions.MultipleTokensReturned:
            raise ConnectError("INTERNAL_ERROR", f"more than one token labelled {label!r} in {self.path}") from None
        except exceptions.PKCS11Error as exc:
            raise ConnectError("NETWORK_ERRORS", f"cannot list the tokens of {self.path}: {_reason(exc)}") from None

    def logout(self, label: str) -> None:
        """Close the token's session (which logs the process out of the token)."""
        with self.lock:
            entry = self.sessions.pop(label, None)
            if entry is not None and entry[2] == self.generation:
                with contextlib.suppress(Exception):  # a dead session cannot be closed; nothing to keep
                    entry[0].close()


os.register_at_fork(after_in_child=Module._after_fork_in_child)


def reason(exc: BaseException) -> str:
    """A short reason for a log line or a message: the exception's type, never its arguments' data."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}{': ' + text if text and 'pin' not in text.lower() else ''}"


_reason = reason  # the old name, for modules not yet moved to the public one


def gcm_failed_tag() -> tuple[type[BaseException], ...]:
    """The module's errors that mean a GCM decryption's tag did not match: SoftHSM reports a tag
    mismatch as CKR_GENERAL_ERROR, other tokens as CKR_ENCRYPTED_DATA_INVALID, _LEN_RANGE,
    CKR_FUNCTION_FAILED or CKR_DATA_INVALID/_LEN_RANGE. All mean: not what was sealed."""
    exceptions = p11().exceptions
    return (exceptions.GeneralError, exceptions.EncryptedDataInvalid, exceptions.EncryptedDataLenRange,
            exceptions.FunctionFailed, exceptions.DataInvalid, exceptions.DataLenRange)


def aes_key_template(*, encrypt: bool = True, decrypt: bool = True) -> dict[Any, bool]:
    """The attributes of a token's AES key that never leaves it: a private token object, sensitive,
    never extractable, allowed to encrypt and decrypt as asked and nothing else (no wrap, unwrap,
    sign, verify or derive)."""
    attribute = p11().Attribute
    return {attribute.TOKEN: True, attribute.PRIVATE: True, attribute.SENSITIVE: True,
            attribute.EXTRACTABLE: False, attribute.ENCRYPT: encrypt, attribute.DECRYPT: decrypt,
            attribute.WRAP: False, attribute.UNWRAP: False, attribute.SIGN: False, attribute.VERIFY: False,
            attribute.DERIVE: False}


def check_token(module_path: str, token_label: str) -> None:
    """That the module loads and has the token (for registering a cluster): ConnectError if not. A
    token made since the module was loaded may need the module initialised again to be seen."""
    module = Module.load(module_path)
    with module.locked():
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
        self.module_path = module_path
        self._module: Module | None = None  # loaded on first use, where its errors are handled
        self.token_label = token_label
        self._pin = pin
        self._pin_digest = hmac.new(_PIN_SALT, pin.reveal().encode(), "sha256").digest()
        self._on_lost = on_lost  # told when the token can no longer be opened (the store shows FAILED)

    def __repr__(self) -> str:
        return f"TokenSession({self.module_path!r}, {self.token_label!r})"

    @property
    def module(self) -> Module:
        """The module (ConnectError if it cannot be loaded)."""
        if self._module is None:
            self._module = Module.load(self.module_path)
        return self._module

    @property
    def lane(self) -> Lane | None:
        """The token's lane, once its module is loaded (None before: the first call loads it)."""
        module = self._module
        return module.lane(self.token_label) if module is not None else None

    def _open(self, *, fresh: bool = False) -> Any:
        """Log in with this PIN. A refused PIN is tried a second time only in one case: this
        module last logged in to the token with another PIN, so the token's PIN has changed and the
        module may still hold the old one (SoftHSM reads a token's PIN once, and does not see a
        change made by another process until it is initialised again). Otherwise never: an HSM
        counts failed logins towards locking its user out. `fresh` (ConnectCustomKeyStore) has just
        re-initialised the module. A token that could not be found is not looked for again for
        RETRY_AFTER seconds, unless `fresh`."""
        exceptions = _p11().exceptions
        module = self.module
        away = module.away.get(self.token_label)
        if away is not None and not fresh and time.monotonic() < away[0]:
            raise away[1]
        module.logout(self.token_label)  # a login of another PIN, or a dead session
        for attempt in (1, 2):
            try:
                token = module.token(self.token_label)
                session = token.open(user_pin=self._pin.reveal(), rw=True)
                module.sessions[self.token_label] = (session, self._pin_digest, module.generation)
                module.away.pop(self.token_label, None)
                module.last_pin[self.token_label] = self._pin_digest
                return session
            except exceptions.PinIncorrect:
                before = module.last_pin.get(self.token_label)
                if attempt == 1 and not fresh and before is not None and before != self._pin_digest:
                    module.reinitialize()
                    continue
                raise ConnectError("INVALID_CREDENTIALS", "the key store password is not the token user's PIN") \
                    from None
            except exceptions.PinLocked:
                raise ConnectError("USER_LOCKED_OUT", "the token's user is locked out") from None
            except exceptions.UserPinNotInitialized:
                raise ConnectError("USER_NOT_FOUND", "the token has no user PIN set") from None
            except (ConnectError, exceptions.PKCS11Error) as exc:
                if attempt == 1 and not (isinstance(exc, ConnectError) and exc.code == "INTERNAL_ERROR"):
                    # The module may hold stale state (a token that went away and came back): reset it.
                    log.info("PKCS#11 module %s: re-initialising after %s", module.path, _reason(exc))
                    module.reinitialize()
                    continue
                failure = exc if isinstance(exc, ConnectError) else \
                    ConnectError("NETWORK_ERRORS", f"cannot open the token: {_reason(exc)}")
                module.away[self.token_label] = (time.monotonic() + RETRY_AFTER, failure)
                raise failure from None
        raise AssertionError("unreachable")

    def _session(self) -> Any:
        module = self.module
        entry = module.sessions.get(self.token_label)
        if entry is not None and entry[2] == module.generation and hmac.compare_digest(entry[1], self._pin_digest):
            return entry[0]
        return self._open()

    def check(self) -> None:
        """Log in afresh (ConnectCustomKeyStore): ConnectError with AWS's code if it cannot. The
        module is re-initialised first, so the login meets the token as it is now: a module may
        keep what it read of a token (SoftHSM keeps the user PIN) until it is initialised again.
        Then a round trip of AES-GCM with a session key: a token that replaces the IV it is given
        (some HSMs in FIPS mode do) or lacks the mechanism cannot serve a key store."""
        try:
            with self.module.locked():
                self.module.reinitialize()
                _check_gcm(self._open(fresh=True))
        except KeyStoreUnavailable as exc:
            raise ConnectError("NETWORK_ERRORS", exc.message) from None

    def reset(self) -> None:
        """Drop the token's session: the next call opens a fresh one."""
        with contextlib.suppress(ConnectError):
            self.module.logout(self.token_label)

    def run(self, call: Callable[[Any], T]) -> T:
        """`call(session)` under the module's lock; a dead session is opened again once."""
        exceptions = _p11().exceptions
        dead = (exceptions.SessionHandleInvalid, exceptions.SessionClosed, exceptions.DeviceRemoved,
                exceptions.TokenNotPresent, exceptions.DeviceError, exceptions.UserNotLoggedIn)
        lost: ConnectError | None = None
        failure: KeyStoreUnavailable | None = None
        try:
            module = self.module
        except ConnectError as exc:
            raise KeyStoreUnavailable(f"The HSM cannot be reached: {exc.message}.") from None
        with module.locked():
            for attempt in (1, 2):
                try:
                    session = self._session()
                except ConnectError as exc:
                    # Wrong credentials need the operator (the store shows FAILED, reported below,
                    # once the lock is released); a token that is away is tried again later, and
                    # serves again once it is back.
                    if exc.code in ("INVALID_CREDENTIALS", "USER_LOCKED_OUT", "USER_NOT_FOUND"):
                        lost = exc
                    failure = KeyStoreUnavailable(f"The HSM cannot be reached: {exc.message}.")
                    break
                try:
                    return call(session)
                except dead as exc:
                    module.sessions.pop(self.token_label, None)
                    if attempt == 2:
                        raise KeyStoreUnavailable(f"The HSM cannot be reached: {_reason(exc)}.") from None
        if lost is not None and self._on_lost is not None:
            self._on_lost(lost)
        raise failure or AssertionError("unreachable")


def _check_gcm(session: Any) -> None:
    """Encrypt and decrypt with a session (non-token) AES key and an IV of ours: the ciphertext
    must be the plaintext's length plus the tag, and open again. ConnectError if not."""
    p11 = _p11()
    iv, aad, sample = os.urandom(blob.IV_BYTES), b"openkms gcm check", os.urandom(32)
    try:
        key = session.generate_key(p11.KeyType.AES, 256, store=False, template={
            p11.Attribute.SENSITIVE: True, p11.Attribute.EXTRACTABLE: False})
        params = p11.mechanisms.GCMParams(iv, aad, TAG_BYTES * 8)
        sealed = bytes(key.encrypt(sample, mechanism=p11.Mechanism.AES_GCM, mechanism_param=params))
        opened = bytes(key.decrypt(sealed, mechanism=p11.Mechanism.AES_GCM, mechanism_param=params)) \
            if len(sealed) == len(sample) + TAG_BYTES else b""
    except p11.exceptions.PKCS11Error as exc:
        raise ConnectError("INTERNAL_ERROR", f"the token cannot do AES-GCM: {_reason(exc)}") from None
    if opened != sample:
        raise ConnectError("INTERNAL_ERROR", "the token does not keep the GCM IV it is given (a FIPS mode?)")


def object_id_of(key_id: str, version: int) -> bytes:
    """The CKA_ID of a key version's object: 16 bytes derived from the key id and version, so the
    object is found (and destroyed) without a read of the store."""
    return hashlib.sha256(f"openkms hsm object\x00{key_id}\x00{version}".encode()).digest()[:16]


class Pkcs11KeyStore:
    name = "pkcs11"
    blocking = True

    def __init__(self, store: Store, session: TokenSession, cluster_id: str,
                 rate_limit: float = DEFAULT_HSM_RATE) -> None:
        self._store = store
        self._session = session
        self._cluster_id = cluster_id
        # AWS's custom key store request quota: the cryptographic calls of the store's keys (and
        # GenerateRandom on it), on this node.
        self._limit = TokenBucket(rate_limit)
        # (key id, version) -> (the session it was found in, the token's key object): an object
        # handle is only good in the session (and module generation) that found it.
        self._handles: dict[tuple[str, int], tuple[Any, Any]] = {}

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore({self._cluster_id!r})"

    @staticmethod
    def supports(spec: KeySpecInfo) -> bool:
        return spec.family is KeyFamily.SYMMETRIC

    @property
    def lane(self) -> Lane | None:
        """Where requests that use this store run (its token's lane), None for the shared pool."""
        return self._session.lane

    def close(self) -> None:
        """Forget the key objects (the token's session stays, shared with other stores on it)."""
        self._handles.clear()

    # -- versions -----------------------------------------------------------------------------
    def create_version(self, key: Key, version: int) -> StoredVersion:
        p11 = _p11()
        object_id = object_id_of(key.key_id, version)

        def generate(session: Any) -> Any:
            return session.generate_key(p11.KeyType.AES, 256, label=key.arn, id=object_id, store=True,
                                        template=aes_key_template())

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
        # Called on the thread that committed, while calls on other threads add handles: iterate
        # over a copy of the keys, and tolerate a handle another thread dropped meanwhile.
        for k in [k for k in list(self._handles) if k[0] == key_id and version in (None, k[1])]:
            self._handles.pop(k, None)

    # -- cryptography -------------------------------------------------------------------------
    def _take(self) -> None:
        if not self._limit.take():
            raise ThrottlingException(f"The HSM key store's request rate is above its quota ({self._limit.rate:g}/s).")

    def encrypt(self, key: Key, plaintext: bytes, context: Mapping[str, str] | None) -> bytes:
        self._take()
        p11 = _p11()
        iv = os.urandom(blob.IV_BYTES)  # unique per message; it need not be secret
        header = blob.header_v2(key.key_id, key.current_version, iv)
        params = p11.mechanisms.GCMParams(iv, blob.aad(header, context), TAG_BYTES * 8)

        def seal(session: Any, obj: Any) -> bytes:
            return bytes(obj.encrypt(plaintext, mechanism=p11.Mechanism.AES_GCM, mechanism_param=params))

        sealed = self._with_key(key, key.current_version, seal)
        if len(sealed) != len(plaintext) + TAG_BYTES:
            # The token used an IV of its own (some HSMs in FIPS mode do): what it returned cannot
            # be opened with the IV in the header, so it must not reach the caller.
            raise KeyStoreUnavailable("The HSM did not seal with the GCM IV it was given.")
        return header + sealed

    def decrypt(self, key: Key, version: int, ciphertext: bytes, context: Mapping[str, str] | None) -> bytes:
        header = blob.parse_header(ciphertext)
        if header.format != blob.FORMAT_V2 or header.key_id != key.key_id or header.version != version:
            raise InvalidCiphertextException()
        self._take()
        p11 = _p11()
        params = p11.mechanisms.GCMParams(header.salt, blob.aad(header.raw, context), TAG_BYTES * 8)
        failed_tag = gcm_failed_tag()

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
        self._take()
        return bytes(self._call(lambda session: session.generate_random(nbytes * 8)))

    def probe(self) -> None:
        """That the token is there and answers (for /ready): the module still lists it, and a
        search for a key runs in its session. (GenerateRandom alone can be answered by a module
        whose token has gone.) KeyStoreUnavailable if not."""
        p11 = _p11()
        session = self._session
        try:
            module = session.module
            with module.locked():
                module.token(session.token_label)
        except (ConnectError, p11.exceptions.PKCS11Error):
            # As when a key's object is gone: open afresh, which looks for the token again (and
            # re-initialises a module that may hold a stale view), or says it is away.
            session.reset()

        def search(s: Any) -> None:
            next(iter(s.get_objects({p11.Attribute.CLASS: p11.ObjectClass.SECRET_KEY})), None)

        self._call(search)
