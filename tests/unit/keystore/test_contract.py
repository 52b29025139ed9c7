"""The KeyStore contract (keystore/base.py), run over every backend in keystore.registry.BACKENDS,
over the PKCS#11 store on a real SoftHSM2 token, and over the external key store through openkms's
own XKS proxy (`openkms xks-proxy`, a real process, in front of a SoftHSM2 token).

Each backend is built over a real SQLite store in tmp_path and a root key, and a version is kept
the way the service keeps it: the StoredVersion's locator goes into the version's row in the
transaction that creates the version; destroying material empties the row first, then calls
`destroy`. A new backend joins this suite by its entry in BACKENDS (or, if it needs a device, in
DEVICE_BACKENDS here).
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openkms.crypto import blob
from openkms.crypto.root import RootKey
from openkms.errors import InvalidCiphertextException, KeyStoreUnavailable, KMSInvalidStateException
from openkms.keystore.base import Importing, KeyStore, StoredVersion
from openkms.keystore.memory import MemoryKeyStore
from openkms.keystore.pkcs11 import Pkcs11KeyStore, TokenSession
from openkms.keystore.registry import BACKENDS
from openkms.model import KEY_SPECS, Account, Key, KeyState, KeyUsage, KeyVersion, Origin, SecretStr
from openkms.storage import Store

ACCOUNT = "111122223333"
GONE = (InvalidCiphertextException, KeyStoreUnavailable)
CONTEXT = {"tenant": "t1", "purpose": "contract"}


class Harness:
    """A backend and a store to keep its versions in, as the service does."""

    def __init__(self, name: str, store: Store, backend: KeyStore, xks_key_id: str | None = None) -> None:
        self.name, self.store, self.ks = name, store, backend
        self.xks_key_id = xks_key_id  # the external key every key of an external key store uses

    def new_key(self, origin: Origin = Origin.AWS_KMS) -> Key:
        key = Key(key_id=str(uuid.uuid4()), account_id=ACCOUNT, region="us-east-1", description="",
                  key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT, origin=origin,
                  state=KeyState.ENABLED, created=datetime.now(UTC), current_version=0,
                  xks_key_id=self.xks_key_id if origin is not Origin.EXTERNAL else None)
        with self.store.begin() as tx:
            tx.keys.insert(key)
        return key

    def add_version(self, key: Key, version: int) -> tuple[Key, StoredVersion]:
        stored = self.ks.create_version(key, version)
        self._keep(key, version, stored)
        return dataclasses.replace(key, current_version=version), stored

    def _keep(self, key: Key, version: int, stored: StoredVersion) -> None:
        with self.store.begin() as tx:
            tx.versions.insert(KeyVersion(key.key_id, version, datetime.now(UTC), stored.material_id, True),
                               stored.locator)

    def destroy(self, key: Key, version: int | None = None) -> None:
        with self.store.begin() as tx:
            tx.versions.drop_material(key.key_id, version)
        self.ks.destroy(key, version)


def _pkcs11(request: pytest.FixtureRequest, store: Store) -> KeyStore:
    hsm = request.getfixturevalue("softhsm")
    label = hsm.init_token(pin="contract-pin")
    return Pkcs11KeyStore(store, TokenSession(hsm.module, label, SecretStr("contract-pin")), "cluster-contract")


XKS_KEY = "contract-key"


@pytest.fixture(scope="module")
def xks_proxy(softhsm: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str, str]]:
    """`openkms xks-proxy` on a loopback port (plain HTTP: loopback only) in front of a fresh token
    with the health check's key and XKS_KEY; yields (endpoint, path prefix, access key id, secret)."""
    from tests.xks_proxy_helpers import PIN, ProxyProcess, Store, cli, free_port, proxy_toml

    label = softhsm.init_token(pin=PIN)  # type: ignore[attr-defined]
    store, port = Store.new("/contract", 2), free_port()
    config = tmp_path_factory.mktemp("xks-contract") / "xks-proxy.toml"
    config.write_text(proxy_toml(port=port, token_label=label, stores=[store]))
    for key in ("xks-health", XKS_KEY):
        done = cli("keys", "create", "--config", str(config), "--label", key)
        assert done.returncode == 0, done.stderr
    process = ProxyProcess(config, port, tls=False).start()
    yield f"http://127.0.0.1:{port}", "/contract/kms/xks/v1", *store.credentials[0]
    process.stop()


def _xks(request: pytest.FixtureRequest, store: Store) -> KeyStore:
    from openkms.keystore.software import SoftwareKeyStore
    from openkms.keystore.xks import XksClient, XksEndpoint, XksKeyStore, XksOptions

    endpoint, path, access_key_id, secret = request.getfixturevalue("xks_proxy")
    client = XksClient(XksEndpoint(endpoint, path, access_key_id, SecretStr(secret), "us-east-1"),
                       XksOptions(allow_http=True, timeout=2.0))
    return XksKeyStore(SoftwareKeyStore(store, RootKey(os.urandom(32), "test")), client, "cks-contract")


#: Backends that need a device: how to build one in a test.
DEVICE_BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Store], KeyStore]] = {"pkcs11": _pkcs11, "xks": _xks}


@pytest.fixture(params=sorted(BACKENDS) + sorted(DEVICE_BACKENDS))
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    with store.begin() as tx:
        tx.accounts.insert(Account(ACCOUNT, "contract", datetime.now(UTC)))
    if request.param in BACKENDS:
        backend = BACKENDS[request.param](store, RootKey(os.urandom(32), "test"))
    else:
        backend = DEVICE_BACKENDS[request.param](request, store)
    yield Harness(request.param, store, backend, XKS_KEY if request.param == "xks" else None)
    store.close()


def test_it_is_a_key_store(harness: Harness) -> None:
    assert isinstance(harness.ks, KeyStore)
    assert isinstance(harness.ks.name, str) and harness.ks.name
    assert isinstance(harness.ks.blocking, bool)
    assert harness.ks.supports(KEY_SPECS["SYMMETRIC_DEFAULT"])


def test_round_trip_names_key_and_version(harness: Harness) -> None:
    key, stored = harness.add_version(harness.new_key(), 1)
    assert re.fullmatch(r"[0-9a-f]{64}", stored.material_id)
    ciphertext = harness.ks.encrypt(key, b"secret", CONTEXT)
    header = blob.parse_header(ciphertext)
    assert (header.key_id, header.version) == (key.key_id, 1)
    assert b"secret" not in ciphertext
    assert harness.ks.decrypt(key, 1, ciphertext, dict(reversed(list(CONTEXT.items())))) == b"secret"


def test_material_never_shows(harness: Harness) -> None:
    _, stored = harness.add_version(harness.new_key(), 1)
    assert stored.locator.hex() not in repr(stored) and repr(stored.locator) not in repr(stored)


def test_wrong_context_or_key_or_version_is_invalid_ciphertext(harness: Harness) -> None:
    key, _ = harness.add_version(harness.new_key(), 1)
    other, _ = harness.add_version(harness.new_key(), 1)
    ciphertext = harness.ks.encrypt(key, b"secret", CONTEXT)
    for context in (None, {}, {"tenant": "t1"}, {**CONTEXT, "extra": "x"}, {"tenant": "T1", "purpose": "contract"}):
        with pytest.raises(InvalidCiphertextException):
            harness.ks.decrypt(key, 1, ciphertext, context)
    with pytest.raises(InvalidCiphertextException):
        harness.ks.decrypt(other, 1, ciphertext, CONTEXT)
    with pytest.raises(InvalidCiphertextException):
        harness.ks.decrypt(key, 2, ciphertext, CONTEXT)


def test_every_flipped_byte_is_invalid_ciphertext(harness: Harness) -> None:
    key, _ = harness.add_version(harness.new_key(), 1)
    ciphertext = harness.ks.encrypt(key, b"0123456789abcdef", CONTEXT)
    for i in range(len(ciphertext)):
        tampered = bytearray(ciphertext)
        tampered[i] ^= 0x80
        with pytest.raises(InvalidCiphertextException):
            harness.ks.decrypt(key, 1, bytes(tampered), CONTEXT)
    for cut in (0, 1, 36, 37, 52, len(ciphertext) - 1):
        with pytest.raises(InvalidCiphertextException):
            harness.ks.decrypt(key, 1, ciphertext[:cut], CONTEXT)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_are_only_ever_invalid_ciphertext(harness: Harness, data: bytes) -> None:
    key = harness.__dict__.setdefault("_key", harness.add_version(harness.new_key(), 1)[0])
    with pytest.raises(InvalidCiphertextException):
        harness.ks.decrypt(key, 1, data, None)


def test_rotation_keeps_old_versions_readable(harness: Harness) -> None:
    key1, first = harness.add_version(harness.new_key(), 1)
    old = harness.ks.encrypt(key1, b"v1 data", None)
    key2, second = harness.add_version(key1, 2)
    assert first.material_id != second.material_id
    new = harness.ks.encrypt(key2, b"v2 data", None)
    assert blob.parse_header(new).version == 2
    assert harness.ks.decrypt(key2, 1, old, None) == b"v1 data"
    assert harness.ks.decrypt(key2, 2, new, None) == b"v2 data"


def test_destroyed_material_never_decrypts_again(harness: Harness) -> None:
    """Gone for good: the ciphertext is not what the store can open, or the store has no such
    material (an HSM without the object); either way, the two errors the contract allows."""
    key1, _ = harness.add_version(harness.new_key(), 1)
    old = harness.ks.encrypt(key1, b"v1 data", None)
    key2, _ = harness.add_version(key1, 2)
    new = harness.ks.encrypt(key2, b"v2 data", None)
    harness.destroy(key2, 1)
    with pytest.raises(GONE):
        harness.ks.decrypt(key2, 1, old, None)
    assert harness.ks.decrypt(key2, 2, new, None) == b"v2 data"
    harness.destroy(key2)
    for version, ciphertext in ((1, old), (2, new)):
        with pytest.raises(GONE):
            harness.ks.decrypt(key2, version, ciphertext, None)
    harness.ks.evict(key2.key_id)  # eviction is no resurrection
    with pytest.raises(GONE):
        harness.ks.decrypt(key2, 2, new, None)


def test_importing_backends_take_customer_material(harness: Harness) -> None:
    if not isinstance(harness.ks, Importing):
        pytest.skip(f"{harness.name} does not import material")
    from openkms.client.byok import wrap_key_material

    key = harness.new_key(Origin.EXTERNAL)
    token = harness.ks.new_import_token(key.key_id, datetime(2030, 1, 1, tzinfo=UTC))
    assert harness.ks.import_token_expiry(key.key_id, token) == datetime(2030, 1, 1, tzinfo=UTC)
    assert harness.ks.import_token_expiry(harness.new_key().key_id, token) is None
    public, sealed_private = harness.ks.new_wrapping_key("token-1", "RSA_2048")
    raw = os.urandom(32)
    material = harness.ks.unwrap_import(key, "token-1", sealed_private, "RSAES_OAEP_SHA_256",
                                        wrap_key_material(public, "RSAES_OAEP_SHA_256", raw))
    assert raw.hex() not in repr(material)
    stored = harness.ks.import_version(key, 1, material)
    assert stored.material_id == material.material_id
    harness._keep(key, 1, stored)
    key = dataclasses.replace(key, current_version=1)
    assert harness.ks.decrypt(key, 1, harness.ks.encrypt(key, b"byok", None), None) == b"byok"
    with pytest.raises(InvalidCiphertextException):  # wrapped for another wrapping key
        harness.ks.unwrap_import(key, "token-1", sealed_private, "RSAES_OAEP_SHA_256", os.urandom(256))


def test_an_unavailable_backend_says_so() -> None:
    store = MemoryKeyStore()
    key = Key(key_id="00000000-0000-0000-0000-000000000001", account_id=ACCOUNT, region="us-east-1",
              description="", key_spec="SYMMETRIC_DEFAULT", key_usage=KeyUsage.ENCRYPT_DECRYPT,
              origin=Origin.AWS_KMS, state=KeyState.ENABLED, created=datetime.now(UTC), current_version=1)
    store.create_version(key, 1)
    ciphertext = store.encrypt(key, b"x", None)
    store.available = False
    for call in (lambda: store.encrypt(key, b"x", None), lambda: store.decrypt(key, 1, ciphertext, None),
                 lambda: store.create_version(key, 2)):
        with pytest.raises(KeyStoreUnavailable) as e:
            call()
        assert isinstance(e.value, KMSInvalidStateException) and e.value.code == "KMSInvalidStateException"
