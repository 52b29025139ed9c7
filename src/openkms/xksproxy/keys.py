"""The token's keys as the XKS proxy serves them: AES-256 secret key objects found by CKA_LABEL.

An external key id is a key object's CKA_LABEL. The object must be a token object of class
CKO_SECRET_KEY, type CKK_AES and 32 bytes; its CKA_ENCRYPT and CKA_DECRYPT say what it may do
(GetKeyMetadata's keyUsage), and the token enforces them too. `keys create` makes such objects
with CKA_SENSITIVE and without CKA_EXTRACTABLE, so their material never leaves the token.

Every call goes through keystore/pkcs11.py's TokenSession (one logged-in session per token, every
call under the module's lock, a dead session opened again, a module that lost its token
re-initialised), and every error of the module is translated here into the spec's names: a failed
GCM tag is InvalidCiphertextException, a use the key does not allow InvalidKeyUsageException, a
token that cannot be reached or fails InternalException. No CKR_* code or PKCS#11 exception leaves
this module, and no key material, plaintext or PIN appears in a message.

What a lookup found (the object's handle and its usage flags) is kept for at most a second
(USAGE_TTL_S): SoftHSM spends more time reading four attributes than sealing 32 bytes, and a
second is soon enough for an operator's change to the flags to show. A key removed from the
token fails at once all the same (its handle is no longer valid, and the lookup is made again).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import KeyStoreUnavailable
from ..keystore.pkcs11 import ConnectError, TokenSession, aes_key_template, gcm_failed_tag, p11, reason
from .config import valid_key_id
from .errors import (
    InternalException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    InvalidStateException,
    KeyNotFoundException,
    XksError,
)

log = logging.getLogger("openkms.xksproxy")
T = TypeVar("T")

IV_BYTES = 12  # drawn by the proxy: SoftHSM cannot generate GCM IVs and refuses longer ones
TAG_BYTES = 16
USAGE_TTL_S = 1.0
HEALTH_AAD = b"openkms xks-proxy health check"


@dataclass(frozen=True)
class KeyInfo:
    label: str
    can_encrypt: bool
    can_decrypt: bool
    object_id: str = ""  # CKA_ID in hex, for pkcs11-tool --id

    @property
    def usage(self) -> list[str]:
        """GetKeyMetadata's keyUsage."""
        return [name for name, allowed in (("ENCRYPT", self.can_encrypt), ("DECRYPT", self.can_decrypt)) if allowed]


@dataclass(frozen=True)
class Sealed:
    """What Encrypt answers, and the integrity value when it was asked for."""

    iv: bytes
    ciphertext: bytes
    tag: bytes
    integrity: bytes | None = None  # SHA-256 over aad || ciphertextMetadata || iv || ciphertext || tag


@dataclass(frozen=True)
class TokenInfo:
    """What GetHealthStatus says about the token (CK_TOKEN_INFO)."""

    label: str
    manufacturer: str
    model: str
    serial: str
    hardware_version: str
    firmware_version: str


@dataclass
class _Entry:
    session: Any
    obj: Any
    info: KeyInfo
    found_at: float


class KeyExists(Exception):
    """`keys create` with a label some object already has."""


class NotAnAesKey(KeyNotFoundException):
    """An object has the label, but it is no AES-256 secret key: not an external key."""


def _not_permitted(exc: BaseException) -> bool:
    """CKR_KEY_FUNCTION_NOT_PERMITTED, which python-pkcs11 0.10 does not map to a class of its own."""
    named = getattr(p11().exceptions, "KeyFunctionNotPermitted", None)
    return (named is not None and isinstance(exc, named)) or str(exc).strip().lower().endswith("0x68")


def _version(value: Any) -> str:
    try:
        return ".".join(str(part) for part in value)
    except TypeError:
        return str(value)


class TokenKeys:
    """The AES-256 keys of one token, and the token itself for the health check. Blocking: the
    server calls these from its token worker thread, the CLI directly."""

    def __init__(self, session: TokenSession) -> None:
        self._session = session
        self._cache: dict[str, _Entry] = {}

    def __repr__(self) -> str:
        return f"TokenKeys({self._session!r})"

    # -- running calls ------------------------------------------------------------------------
    def _run(self, call: Callable[[Any], T]) -> T:
        exceptions = p11().exceptions
        try:
            return self._session.run(call)
        except XksError:
            raise
        except KeyStoreUnavailable as exc:
            raise InternalException(exc.message) from None
        except exceptions.PKCS11Error as exc:
            raise InternalException(f"The HSM refused the operation: {reason(exc)}.") from None

    def _find(self, session: Any, label: str) -> _Entry:
        pkcs11 = p11()
        attribute = pkcs11.Attribute
        found = list(itertools.islice(session.get_objects({
            attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY, attribute.LABEL: label, attribute.TOKEN: True}), 2))
        if not found:
            # A token that went away may still answer searches, with nothing (SoftHSM does when
            # its token directory is gone): ask the module whether it still has the token before
            # calling the key missing, so that an outage is not reported as a deleted key.
            if not self._token_present():
                self._session.reset()  # the next call opens the token afresh (re-initialising the module)
                raise InternalException("The HSM token cannot be reached.")
            raise KeyNotFoundException(f"No key labelled {label} in the HSM.")
        if len(found) > 1:
            raise InvalidStateException(f"More than one key in the HSM is labelled {label}; labels must be unique.")
        obj = found[0]
        try:
            values = obj.get_attributes([attribute.KEY_TYPE, attribute.VALUE_LEN, attribute.ENCRYPT,
                                         attribute.DECRYPT, attribute.ID])
        except pkcs11.exceptions.PKCS11Error:  # e.g. no CKA_VALUE_LEN: not an AES key
            values = {}
        if values.get(attribute.KEY_TYPE) != pkcs11.KeyType.AES or values.get(attribute.VALUE_LEN) != 32:
            raise NotAnAesKey(f"The key labelled {label} is not an AES-256 key.")
        info = KeyInfo(label, bool(values[attribute.ENCRYPT]), bool(values[attribute.DECRYPT]),
                       bytes(values.get(attribute.ID) or b"").hex())
        entry = self._cache[label] = _Entry(session, obj, info, time.monotonic())
        return entry

    def _token_present(self) -> bool:
        try:
            self._session.module.token(self._session.token_label)
        except (ConnectError, p11().exceptions.PKCS11Error):
            return False
        return True

    def _entry(self, session: Any, label: str) -> _Entry:
        entry = self._cache.get(label)
        if entry is not None and entry.session is session and time.monotonic() - entry.found_at < USAGE_TTL_S:
            return entry
        return self._find(session, label)

    def _with_key(self, label: str, use: Callable[[_Entry], T]) -> T:
        """`use(entry)` on the key labelled `label`. A handle gone stale (the object was destroyed,
        the token came back) is looked up once more; gone then, the key is not in the token."""
        exceptions = p11().exceptions
        stale = (exceptions.ObjectHandleInvalid, exceptions.KeyHandleInvalid)

        def call(session: Any) -> T:
            try:
                return use(self._entry(session, label))
            except stale:
                self._cache.pop(label, None)
                try:
                    return use(self._find(session, label))
                except stale:
                    raise KeyNotFoundException(f"No key labelled {label} in the HSM.") from None

        return self._run(call)

    # -- the four APIs ------------------------------------------------------------------------
    def describe(self, label: str) -> KeyInfo:
        return self._with_key(label, lambda entry: entry.info)

    def encrypt(self, label: str, plaintext: bytes, hsm_aad: bytes, integrity_prefix: bytes | None) -> Sealed:
        """AES-256-GCM in the token under a fresh 12-byte IV. With `integrity_prefix` (the request's
        AAD and the ciphertextMetadata), also the integrity value, computed over the encrypt output
        first and then checked by decrypting that output once (the spec's Appendix C order)."""
        pkcs11 = p11()

        def seal(entry: _Entry) -> Sealed:
            if not entry.info.can_encrypt:
                raise InvalidKeyUsageException(f"The key {label} does not allow encryption (CKA_ENCRYPT is false).")
            if integrity_prefix is not None and not entry.info.can_decrypt:
                raise InvalidKeyUsageException(
                    f"The key {label} does not allow decryption (CKA_DECRYPT is false), which the integrity "
                    "value needs: the proxy decrypts once to vouch for the ciphertext.")
            iv = os.urandom(IV_BYTES)
            params = pkcs11.mechanisms.GCMParams(iv, hsm_aad, TAG_BYTES * 8)
            try:
                sealed = bytes(entry.obj.encrypt(plaintext, mechanism=pkcs11.Mechanism.AES_GCM, mechanism_param=params))
            except AttributeError:  # python-pkcs11 leaves out .encrypt when CKA_ENCRYPT was false
                self._cache.pop(label, None)
                raise InvalidKeyUsageException(f"The key {label} does not allow encryption.") from None
            except pkcs11.exceptions.PKCS11Error as exc:
                if _not_permitted(exc):
                    self._cache.pop(label, None)
                    raise InvalidKeyUsageException(f"The key {label} does not allow encryption.") from None
                raise
            if len(sealed) != len(plaintext) + TAG_BYTES:
                raise InternalException("The HSM answered a GCM ciphertext of an unexpected length.")
            out = Sealed(iv, sealed[:-TAG_BYTES], sealed[-TAG_BYTES:])
            if integrity_prefix is None:
                return out
            digest = hashlib.sha256(b"".join((integrity_prefix, out.iv, out.ciphertext, out.tag))).digest()
            try:
                back = bytes(entry.obj.decrypt(out.ciphertext + out.tag, mechanism=pkcs11.Mechanism.AES_GCM,
                                               mechanism_param=pkcs11.mechanisms.GCMParams(out.iv, hsm_aad,
                                                                                        TAG_BYTES * 8)))
            except AttributeError:
                self._cache.pop(label, None)
                raise InvalidKeyUsageException(f"The key {label} does not allow decryption.") from None
            except pkcs11.exceptions.PKCS11Error as exc:
                if _not_permitted(exc):
                    self._cache.pop(label, None)
                    raise InvalidKeyUsageException(f"The key {label} does not allow decryption.") from None
                raise InternalException("The ciphertext the HSM produced did not decrypt; nothing was returned.") \
                    from None
            if not hmac.compare_digest(back, plaintext):
                raise InternalException("The ciphertext the HSM produced did not decrypt to the plaintext.")
            return Sealed(out.iv, out.ciphertext, out.tag, digest)

        return self._with_key(label, seal)

    def decrypt(self, label: str, iv: bytes, ciphertext: bytes, tag: bytes, hsm_aad: bytes) -> bytes:
        pkcs11 = p11()
        exceptions = pkcs11.exceptions
        failed_tag = gcm_failed_tag()

        def open_(entry: _Entry) -> bytes:
            if not entry.info.can_decrypt:
                raise InvalidKeyUsageException(f"The key {label} does not allow decryption (CKA_DECRYPT is false).")
            if len(iv) != IV_BYTES:  # the spec allows 16-byte IVs; this proxy never makes them
                raise InvalidCiphertextException("This proxy never made a ciphertext with a 16-byte IV.")
            params = pkcs11.mechanisms.GCMParams(iv, hsm_aad, TAG_BYTES * 8)
            try:
                return bytes(entry.obj.decrypt(ciphertext + tag, mechanism=pkcs11.Mechanism.AES_GCM,
                                               mechanism_param=params))
            except AttributeError:
                self._cache.pop(label, None)
                raise InvalidKeyUsageException(f"The key {label} does not allow decryption.") from None
            except failed_tag:  # the tag did not match (keystore/pkcs11.py: how each token says so)
                raise InvalidCiphertextException() from None
            except exceptions.PKCS11Error as exc:
                if _not_permitted(exc):
                    self._cache.pop(label, None)
                    raise InvalidKeyUsageException(f"The key {label} does not allow decryption.") from None
                raise

        return self._with_key(label, open_)

    def token_info(self) -> TokenInfo:
        def read(session: Any) -> TokenInfo:
            token = session.token
            serial = token.serial
            serial_text = serial.decode(errors="replace") if isinstance(serial, bytes) else str(serial)
            return TokenInfo(str(token.label).strip(), str(token.manufacturer_id).strip(), str(token.model).strip(),
                             serial_text.strip(), _version(token.hardware_version), _version(token.firmware_version))

        return self._run(read)

    def health_check(self, label: str) -> None:
        """One encrypt and one decrypt of random bytes with the health check's own test key."""
        probe = os.urandom(32)
        sealed = self.encrypt(label, probe, HEALTH_AAD, None)
        if not hmac.compare_digest(self.decrypt(label, sealed.iv, sealed.ciphertext, sealed.tag, HEALTH_AAD), probe):
            raise InternalException("The health check's test key did not decrypt what it encrypted.")

    # -- the operator's commands --------------------------------------------------------------
    def create(self, label: str, encrypt: bool = True, decrypt: bool = True) -> KeyInfo:
        """A new AES-256 token object: CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not CKA_EXTRACTABLE,
        CKA_ENCRYPT/CKA_DECRYPT as asked and nothing else (no wrap, unwrap, sign, verify, derive)."""
        if not valid_key_id(label):
            raise ValueError("a label must be 1-128 characters of A-Z, a-z, 0-9, '.', '-', '_' (it is the "
                             "external key id AWS KMS sends)")
        pkcs11 = p11()
        attribute = pkcs11.Attribute

        def make(session: Any) -> KeyInfo:
            if next(iter(session.get_objects({attribute.LABEL: label})), None) is not None:
                raise KeyExists(f"an object labelled {label!r} is already in the token")
            object_id = os.urandom(16)
            session.generate_key(pkcs11.KeyType.AES, 256, label=label, id=object_id, store=True,
                                 template=aes_key_template(encrypt=encrypt, decrypt=decrypt))
            return KeyInfo(label, encrypt, decrypt, object_id.hex())

        self._cache.pop(label, None)
        return self._run(make)

    def ensure(self, label: str) -> bool:
        """Make the key `label` (encrypt and decrypt) unless the token has it; True if it was made."""
        try:
            self.describe(label)
            return False
        except NotAnAesKey:
            raise
        except KeyNotFoundException:
            pass
        self.create(label)
        return True

    def list_keys(self) -> list[KeyInfo]:
        """Every AES-256 token key, in label order."""
        pkcs11 = p11()
        attribute = pkcs11.Attribute

        def read(session: Any) -> list[KeyInfo]:
            out = []
            for obj in session.get_objects({attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                                            attribute.KEY_TYPE: pkcs11.KeyType.AES, attribute.TOKEN: True}):
                try:
                    values = obj.get_attributes([attribute.LABEL, attribute.VALUE_LEN, attribute.ENCRYPT,
                                                 attribute.DECRYPT, attribute.ID])
                except pkcs11.exceptions.PKCS11Error:
                    continue
                if values.get(attribute.VALUE_LEN) == 32:
                    out.append(KeyInfo(str(values.get(attribute.LABEL) or ""), bool(values[attribute.ENCRYPT]),
                                       bool(values[attribute.DECRYPT]), bytes(values.get(attribute.ID) or b"").hex()))
            return sorted(out, key=lambda info: info.label)

        return self._run(read)
