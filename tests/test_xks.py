"""External key stores (CustomKeyStoreType EXTERNAL_KEY_STORE) end to end, as AWS KMS defines them.

Real processes only: `openkms serve` (the module-scoped `xks_server`, on SQLite and on PostgreSQL,
and two servers of their own: one with a client certificate for mTLS, one trusting another CA),
`openkms xks-proxy` over TLS with a test CA made by openssl (one proxy, and one that requires a client
certificate), SoftHSM2 tokens whose keys are made with the proxy's own CLI and changed behind its
back with OpenSC's pkcs11-tool, and boto3, the AWS CLI and the AWS Encryption SDK as clients.

Covered: the key store's life (create, describe, update, connect, disconnect, delete) with AWS's
error for each refusal; CreateKey with an XksKeyId and what AWS refuses for such keys; every
symmetric operation through an external key; double encryption (neither openkms nor the proxy can
decrypt alone); the requestMetadata the proxy sees; the kill switches (proxy stopped, key deleted
from the token, credential dropped, store disconnected), each failing at once and coming back; a
slow proxy that fails fast and holds up nothing else; mTLS; tenants' isolation; and the credential's
secret staying out of logs, audit records and the store.

Each test makes its own tenant account and key stores, so the tests do not depend on each other;
tests that change the shared proxy (its file, its process, its token) put it back before they end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from openkms.client.admin import AdminClient
from openkms.crypto import blob as blob_format
from tests.conftest import SoftHsm, bootstrap_env, drop_pg_database, new_pg_database, trust_anchor
from tests.hsm_helpers import (
    KMS_ALL_POLICY,
    Tenant,
    describe_store,
    error_code,
    fails,
    key_state,
    leaks,
    wait_until,
)
from tests.server import REGION, ServerProcess
from tests.test_awscli import AWS_CLI, AwsCli
from tests.xks_proxy_helpers import (
    PIN,
    Pki,
    ProxyProcess,
    Store,
    XksClient,
    access_key_id,
    b64,
    cli,
    free_port,
    proxy_toml,
    secret_access_key,
    unb64,
)

API = "/kms/xks/v1"
MAIN = "/main"  # the prefix most key stores use (every test has an account of its own)
ROTATING = "/rotating"  # the prefix whose credentials tests drop and put back
EXTERNAL = "EXTERNAL_KEY_STORE"
ENC_ONLY = "enc-only"
DOOMED = "doomed"  # the token key one test deletes (and puts back)
MAIN_KEYS = ["xks-health", "k1", "k2", DOOMED]  # besides ENC_ONLY
CONTEXT = {"tenant": "xks", "purpose": "double-encryption"}
INVALID_STATE = "KMSInvalidStateException"
INVALID_CIPHERTEXT = "InvalidCiphertextException"
STORE_STATE = "CustomKeyStoreInvalidStateException"
NOT_FOUND = "CustomKeyStoreNotFoundException"
UNSUPPORTED = "UnsupportedOperationException"
UNREACHABLE = "XksProxyUriUnreachableException"
# Every credential secret this module hands to a server, right or wrong: none may ever show up in
# a server's log, audit records or store.
SECRETS: list[str] = []


# -- tokens, proxies and servers --------------------------------------------------------------------

@dataclass
class Token:
    label: str
    directory: Path  # the token's own directory in the session's SoftHSM token dir


def make_token(softhsm: SoftHsm, workdir: Path, keys: list[str], encrypt_only: list[str]) -> Token:
    """A fresh token with AES keys made by `openkms xks-proxy keys create`, as an operator would."""
    before = set(os.listdir(softhsm.tokens))
    label = softhsm.init_token(pin=PIN)
    added = set(os.listdir(softhsm.tokens)) - before
    assert len(added) == 1, f"expected one new token directory, got {added}"
    config = workdir / f"keys-{label}.toml"
    config.write_text(proxy_toml(port=1, token_label=label, stores=[Store.new("/keys")]))
    for name in [*keys, *encrypt_only]:
        done = cli("keys", "create", "--config", str(config), "--label", name,
                   *(["--encrypt-only"] if name in encrypt_only else []))
        assert done.returncode == 0, done.stderr
    return Token(label, softhsm.tokens / added.pop())


@dataclass
class Proxy:
    """One `openkms xks-proxy` process over TLS, its file, and its key stores by prefix."""

    process: ProxyProcess
    token: Token
    pki: Pki
    stores: dict[str, Store]
    mtls: bool = False
    client_ca: Path | None = None  # with mtls: another CA than the Pki's for client certificates

    @property
    def endpoint(self) -> str:
        return f"https://localhost:{self.process.port}"

    def write(self) -> None:
        text = proxy_toml(port=self.process.port, token_label=self.token.label, stores=list(self.stores.values()),
                          pki=self.pki, mtls=self.mtls)
        if self.client_ca is not None:
            wanted = f'client_ca = "{self.pki.ca}"'
            assert wanted in text
            text = text.replace(wanted, f'client_ca = "{self.client_ca}"')
        self.process.config.write_text(text)

    def reload(self) -> None:
        """The file written again, then SIGHUP (waits until the proxy says it reloaded)."""
        self.write()
        self.process.sighup()

    def restart(self) -> None:
        self.write()
        self.process.stop()
        self.process.start()

    @contextlib.contextmanager
    def without_credential(self, prefix: str, index: int) -> Iterator[None]:
        """The proxy forgets one credential of a prefix (SIGHUP) until the block ends."""
        store = self.stores[prefix]
        dropped = store.credentials.pop(index)
        self.reload()
        try:
            yield
        finally:
            store.credentials.insert(index, dropped)
            self.reload()

    def client(self, prefix: str, credential: int = 0) -> XksClient:
        """The proxy's own API, signed with one of the prefix's credentials (not through openkms)."""
        akid, secret = self.stores[prefix].credentials[credential]
        return XksClient(f"https://localhost:{self.process.port}", prefix, akid, secret, self.pki.client_context())


def start_proxy(softhsm: SoftHsm, pki: Pki, workdir: Path, stores: dict[str, Store], keys: list[str],
                encrypt_only: list[str], mtls: bool = False) -> Proxy:
    token = make_token(softhsm, workdir, keys, encrypt_only)
    for store in stores.values():
        SECRETS.extend(secret for _, secret in store.credentials)
    proxy = Proxy(ProxyProcess(workdir / "xks-proxy.toml", free_port(), tls=True), token, pki, stores, mtls)
    proxy.write()
    proxy.process.start()
    return proxy


def xks_env(pki: Pki, **extra: str) -> dict[str, str]:
    """A server's settings: a bootstrapped operator, and the test CA for proxies' certificates."""
    return bootstrap_env() | {"OPENKMS_XKS_CA_BUNDLE": str(pki.ca)} | extra


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("xks-pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA, which signed neither the proxies' nor the servers' certificates."""
    return Pki(tmp_path_factory.mktemp("xks-other-pki"))


@pytest.fixture(scope="module")
def proxy(softhsm: SoftHsm, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    stores = {MAIN: Store.new(MAIN, 2), ROTATING: Store.new(ROTATING, 2)}
    started = start_proxy(softhsm, pki, tmp_path_factory.mktemp("xks-proxy"), stores, MAIN_KEYS, [ENC_ONLY])
    yield started
    started.process.stop()


@pytest.fixture(scope="module")
def mtls_proxy(softhsm: SoftHsm, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A proxy whose [tls] wants a client certificate of the test CA naming CLIENT_NAME."""
    started = start_proxy(softhsm, pki, tmp_path_factory.mktemp("xks-mtls-proxy"), {MAIN: Store.new(MAIN, 1)},
                          ["xks-health", "k1"], [], mtls=True)
    yield started
    started.process.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def xks_server(request: pytest.FixtureRequest, pki: Pki,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main server (no client certificate, http:// endpoints refused), on both stores."""
    storage_url = None
    if request.param == "postgres":
        storage_url = new_pg_database(request.getfixturevalue("pg_admin"), request.getfixturevalue("pg_dsn"))
    server = ServerProcess(tmp_path_factory.mktemp("xks-data"), storage_url=storage_url, env=xks_env(pki))
    server.start()
    yield server
    server.stop()
    if storage_url:
        drop_pg_database(request.getfixturevalue("pg_admin"), storage_url)


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that presents the test CA's good client certificate to proxies."""
    cert, key = pki.client
    server = ServerProcess(tmp_path_factory.mktemp("xks-mtls-data"), env=xks_env(
        pki, OPENKMS_XKS_CLIENT_CERT=str(cert), OPENKMS_XKS_CLIENT_KEY=str(key)))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def other_ca_server(other_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose CA bundle is another CA: it cannot trust the proxies' certificates."""
    server = ServerProcess(tmp_path_factory.mktemp("xks-other-ca-data"), env=xks_env(other_pki))
    server.start()
    yield server
    server.stop()


# -- tenants, key stores and keys --------------------------------------------------------------------

def operator_of(server: ServerProcess) -> AdminClient:
    return AdminClient(server.endpoint, server.access_key_id, server.secret_access_key, REGION)


def new_tenant(server: ServerProcess) -> Tenant:
    """A new account with one user allowed kms:*, as an operator makes it with the admin API."""
    account_id = str(secrets.randbelow(9 * 10**11) + 10**11)
    op = operator_of(server)
    op.call("CreateAccount", Name=f"xks-{account_id}", AccountId=account_id)
    op.call("CreateUser", AccountId=account_id, UserName="app")
    op.call("PutUserPolicy", AccountId=account_id, UserName="app", PolicyName="kms-all",
            PolicyDocument=KMS_ALL_POLICY)
    key = op.call("CreateAccessKey", AccountId=account_id, UserName="app")["AccessKey"]
    return Tenant(account_id, "app", key["AccessKeyId"], key["SecretAccessKey"],
                  server.client(key["AccessKeyId"], key["SecretAccessKey"], retry=False))


def guarded_client(server: ServerProcess, tenant: Tenant) -> Any:
    """A tenant's client that gives up on a call after 10 s: a guard against a hang, not a timing test."""
    return boto3.client("kms", endpoint_url=server.endpoint, region_name=REGION,
                        aws_access_key_id=tenant.access_key_id, aws_secret_access_key=tenant.secret,
                        config=Config(retries={"total_max_attempts": 1}, connect_timeout=5,
                                      read_timeout=10))


def caller_arn(server: ServerProcess, tenant: Tenant) -> str:
    sts = boto3.client("sts", endpoint_url=server.endpoint, region_name=REGION,
                       aws_access_key_id=tenant.access_key_id, aws_secret_access_key=tenant.secret)
    return str(sts.get_caller_identity()["Arn"])


@dataclass
class XksStore:
    cks_id: str
    name: str
    prefix: str
    access_key_id: str


def store_params(proxy: Proxy, prefix: str = MAIN, credential: int = 0, *, name: str | None = None,
                 endpoint: str | None = None, uri_path: str | None = None, secret: str | None = None,
                 akid: str | None = None, connectivity: str = "PUBLIC_ENDPOINT") -> dict[str, Any]:
    """CreateCustomKeyStore's members for a store of `proxy`'s prefix (any of them overridden)."""
    own_akid, own_secret = proxy.stores[prefix].credentials[credential]
    return {"CustomKeyStoreName": name or "xks-" + secrets.token_hex(4), "CustomKeyStoreType": EXTERNAL,
            "XksProxyUriEndpoint": endpoint or proxy.endpoint, "XksProxyUriPath": uri_path or prefix + API,
            "XksProxyConnectivity": connectivity,
            "XksProxyAuthenticationCredential": {"AccessKeyId": akid or own_akid,
                                                 "RawSecretAccessKey": secret or own_secret}}


def create_store(kms: Any, proxy: Proxy, prefix: str = MAIN, credential: int = 0, *, connect: bool = True,
                 name: str | None = None, endpoint: str | None = None) -> XksStore:
    params = store_params(proxy, prefix, credential, name=name, endpoint=endpoint)
    cks_id = kms.create_custom_key_store(**params)["CustomKeyStoreId"]
    if connect:
        kms.connect_custom_key_store(CustomKeyStoreId=cks_id)
        entry = describe_store(kms, cks_id)
        assert entry["ConnectionState"] == "CONNECTED", entry
    return XksStore(cks_id, params["CustomKeyStoreName"], prefix,
                    params["XksProxyAuthenticationCredential"]["AccessKeyId"])


def xks_key(kms: Any, store: XksStore, xks_key_id: str = "k1") -> dict[str, Any]:
    return kms.create_key(Origin=EXTERNAL, CustomKeyStoreId=store.cks_id,  # type: ignore[no-any-return]
                          XksKeyId=xks_key_id, Description=f"external key {xks_key_id}")["KeyMetadata"]


def new_secret() -> str:
    secret = secret_access_key()
    SECRETS.append(secret)
    return secret


@dataclass
class World:
    server: ServerProcess
    proxy: Proxy

    def tenant(self) -> Tenant:
        return new_tenant(self.server)


@pytest.fixture(scope="module")
def world(xks_server: ServerProcess, proxy: Proxy) -> World:
    return World(xks_server, proxy)


# -- what the proxy logged ---------------------------------------------------------------------------

def proxy_records(proxy: Proxy) -> list[dict[str, Any]]:
    """The proxy's per-request log records (JSON after the logger's prefix), requestMetadata merged in."""
    records = []
    for line in proxy.process.output().splitlines():
        at = line.find("{")
        if at < 0:
            continue
        try:
            doc = json.loads(line[at:])
        except ValueError:
            continue
        if isinstance(doc, dict):
            nested = doc.get("requestMetadata")
            records.append({**doc, **(nested if isinstance(nested, dict) else {})})
    return records


def proxy_record(proxy: Proxy, request_id: str) -> dict[str, Any]:
    """The one record of the proxy's log whose kmsRequestId is `request_id`."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [r for r in proxy_records(proxy) if r.get("kmsRequestId") == request_id]
        return bool(found)
    try:
        wait_until(logged, 5)
    except AssertionError:
        raise AssertionError(f"the proxy logged no request with kmsRequestId {request_id}:\n"
                             f"{proxy.process.output()[-2000:]}") from None
    assert len(found) == 1, found
    return found[0]


# -- shared checks ---------------------------------------------------------------------------------------

def refused_everywhere(kms: Any, key: dict[str, Any], blob: bytes, normal: dict[str, Any],
                       normal_blob: bytes) -> list[str]:
    """Every cryptographic use of `key` fails with KMSInvalidStateException; returns the messages."""
    return [
        fails(INVALID_STATE, kms.encrypt, KeyId=key["KeyId"], Plaintext=b"x"),
        fails(INVALID_STATE, kms.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT),
        fails(INVALID_STATE, kms.generate_data_key, KeyId=key["KeyId"], KeySpec="AES_256"),
        fails(INVALID_STATE, kms.generate_data_key_without_plaintext, KeyId=key["KeyId"], KeySpec="AES_256"),
        fails(INVALID_STATE, kms.re_encrypt, CiphertextBlob=blob, SourceEncryptionContext=CONTEXT,
              DestinationKeyId=normal["KeyId"]),
        fails(INVALID_STATE, kms.re_encrypt, CiphertextBlob=normal_blob, DestinationKeyId=key["KeyId"]),
    ]


def serves(kms: Any, key: dict[str, Any], blob: bytes, plaintext: bytes) -> None:
    """The key decrypts what it sealed before, and seals and opens anew."""
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)["Plaintext"] == plaintext
    fresh = os.urandom(24)
    sealed = kms.encrypt(KeyId=key["KeyId"], Plaintext=fresh, EncryptionContext=CONTEXT)["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=sealed, EncryptionContext=CONTEXT)["Plaintext"] == fresh


@dataclass
class KillSwitchCase:
    kms: Any
    store: XksStore
    key: dict[str, Any]
    blob: bytes
    plaintext: bytes
    normal: dict[str, Any]
    normal_blob: bytes

    def refused(self) -> list[str]:
        messages = refused_everywhere(self.kms, self.key, self.blob, self.normal, self.normal_blob)
        # Only this key is cut off: a default-store key is untouched.
        assert self.kms.decrypt(CiphertextBlob=self.normal_blob)["Plaintext"] == b"normal"
        return messages

    def serves(self) -> None:
        serves(self.kms, self.key, self.blob, self.plaintext)


def kill_switch_case(kms: Any, proxy: Proxy, prefix: str = MAIN, xks_key_id: str = "k1") -> KillSwitchCase:
    store = create_store(kms, proxy, prefix)
    key = xks_key(kms, store, xks_key_id)
    normal = kms.create_key(Description="default-store key")["KeyMetadata"]
    plaintext = os.urandom(40)
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=plaintext, EncryptionContext=CONTEXT)["CiphertextBlob"]
    normal_blob = kms.encrypt(KeyId=normal["KeyId"], Plaintext=b"normal")["CiphertextBlob"]
    case = KillSwitchCase(kms, store, key, blob, plaintext, normal, normal_blob)
    case.serves()
    return case


# == 1. the key store's life ==========================================================================

def test_create_and_describe_an_external_key_store(world: World) -> None:
    kms, proxy = world.tenant().kms, world.proxy
    akid, secret = proxy.stores[MAIN].credentials[0]

    def create(**overrides: Any) -> Any:
        params = store_params(proxy, **{k: v for k, v in overrides.items() if k != "extra"})
        return kms.create_custom_key_store(**params, **overrides.get("extra", {}))

    # Each refusal is the one AWS gives, and nothing is saved.
    fails("XksProxyIncorrectAuthenticationCredentialException", create, secret=new_secret())
    fails("XksProxyIncorrectAuthenticationCredentialException", create, akid=access_key_id())
    fails("XksProxyInvalidConfigurationException", create, uri_path="/not/served" + API)
    fails(UNREACHABLE, create, endpoint=f"https://localhost:{free_port()}")
    fails("ValidationException", create, endpoint=f"http://localhost:{proxy.process.port}")
    fails(UNSUPPORTED, create, connectivity="VPC_ENDPOINT_SERVICE", extra={
        "XksProxyVpcEndpointServiceName": "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0"})
    assert kms.describe_custom_key_stores()["CustomKeyStores"] == []

    cks = create(name="primary")["CustomKeyStoreId"]
    assert re.fullmatch(r"cks-[0-9a-f]{17}", cks), cks
    fails("XksProxyUriInUseException", create, name="same-proxy-again")
    fails("CustomKeyStoreNameInUseException", create, name="primary", uri_path=ROTATING + API,
          akid=proxy.stores[ROTATING].credentials[0][0], secret=proxy.stores[ROTATING].credentials[0][1])

    by_id = kms.describe_custom_key_stores(CustomKeyStoreId=cks)
    [entry] = by_id["CustomKeyStores"]
    assert (entry["CustomKeyStoreId"], entry["CustomKeyStoreName"], entry["CustomKeyStoreType"]) == \
        (cks, "primary", EXTERNAL)
    assert entry["ConnectionState"] == "DISCONNECTED" and "ConnectionErrorCode" not in entry
    assert "CreationDate" in entry
    assert "CloudHsmClusterId" not in entry and "TrustAnchorCertificate" not in entry
    assert entry["XksProxyConfiguration"] == {"Connectivity": "PUBLIC_ENDPOINT", "AccessKeyId": akid,
                                              "UriEndpoint": proxy.endpoint, "UriPath": MAIN + API}
    by_name = kms.describe_custom_key_stores(CustomKeyStoreName="primary")
    assert by_name["CustomKeyStores"] == [entry]
    kms.connect_custom_key_store(CustomKeyStoreId=cks)
    listed = kms.describe_custom_key_stores()
    assert [(s["CustomKeyStoreId"], s["ConnectionState"]) for s in listed["CustomKeyStores"]] == [(cks, "CONNECTED")]
    assert listed["CustomKeyStores"][0]["XksProxyConfiguration"] == entry["XksProxyConfiguration"]
    for response in (by_id, by_name, listed):
        text = json.dumps(response, default=str)
        assert secret not in text and "RawSecretAccessKey" not in text

    # The endpoint and path are unique per account: another account may use them.
    other = world.tenant().kms
    theirs = other.create_custom_key_store(**store_params(proxy, name="primary"))["CustomKeyStoreId"]
    assert theirs != cks


def test_a_ca_bundle_that_does_not_sign_the_proxy_certificate(other_ca_server: ServerProcess, proxy: Proxy) -> None:
    kms = new_tenant(other_ca_server).kms
    fails(UNREACHABLE, kms.create_custom_key_store, **store_params(proxy))
    assert kms.describe_custom_key_stores()["CustomKeyStores"] == []


def test_update_an_external_key_store(world: World) -> None:
    kms, proxy = world.tenant().kms, world.proxy
    rotating = proxy.stores[ROTATING]
    (first_id, _), (second_id, second_secret) = rotating.credentials
    store = create_store(kms, proxy, ROTATING)
    cks = store.cks_id
    key = xks_key(kms, store)
    plaintext = os.urandom(32)
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=plaintext, EncryptionContext=CONTEXT)["CiphertextBlob"]

    def config() -> dict[str, str]:
        return describe_store(kms, cks)["XksProxyConfiguration"]  # type: ignore[no-any-return]

    # While CONNECTED: the name may change...
    kms.update_custom_key_store(CustomKeyStoreId=cks, NewCustomKeyStoreName="renamed")
    entry = describe_store(kms, cks)
    assert (entry["CustomKeyStoreName"], entry["ConnectionState"]) == ("renamed", "CONNECTED")
    # ... the endpoint may not.
    fails(STORE_STATE, kms.update_custom_key_store, CustomKeyStoreId=cks,
          XksProxyUriEndpoint=f"https://127.0.0.1:{proxy.process.port}")
    assert config()["UriEndpoint"] == proxy.endpoint
    # A wrong credential or path is refused (the proxy is asked first) and changes nothing.
    fails("XksProxyIncorrectAuthenticationCredentialException", kms.update_custom_key_store, CustomKeyStoreId=cks,
          XksProxyAuthenticationCredential={"AccessKeyId": second_id, "RawSecretAccessKey": new_secret()})
    fails("XksProxyInvalidConfigurationException", kms.update_custom_key_store, CustomKeyStoreId=cks,
          XksProxyUriPath="/elsewhere" + API)
    assert config() == {"Connectivity": "PUBLIC_ENDPOINT", "AccessKeyId": first_id, "UriEndpoint": proxy.endpoint,
                        "UriPath": ROTATING + API}
    serves(kms, key, blob, plaintext)

    # A new credential while CONNECTED: taken, and the one used from then on (the proxy forgets the
    # old one, and the key still serves).
    kms.update_custom_key_store(CustomKeyStoreId=cks, XksProxyAuthenticationCredential={
        "AccessKeyId": second_id, "RawSecretAccessKey": second_secret})
    assert config()["AccessKeyId"] == second_id
    with proxy.without_credential(ROTATING, 0):
        serves(kms, key, blob, plaintext)

    # The endpoint changes once the store is disconnected (here: the same proxy by its IP address).
    kms.disconnect_custom_key_store(CustomKeyStoreId=cks)
    kms.update_custom_key_store(CustomKeyStoreId=cks, XksProxyUriEndpoint=f"https://127.0.0.1:{proxy.process.port}")
    assert config()["UriEndpoint"] == f"https://127.0.0.1:{proxy.process.port}"
    kms.connect_custom_key_store(CustomKeyStoreId=cks)
    assert describe_store(kms, cks)["ConnectionState"] == "CONNECTED"
    serves(kms, key, blob, plaintext)


def test_cloudhsm_members_do_not_apply_to_an_external_key_store(world: World, softhsm: SoftHsm,
                                                                 tmp_path: Path) -> None:
    """KeyStorePassword and CloudHsmClusterId are AWS_CLOUDHSM members: an external key store refuses
    them (connected or not) and keeps its proxy credential and its keys."""
    tenant, proxy = world.tenant(), world.proxy
    kms = tenant.kms
    store = create_store(kms, proxy)
    key = xks_key(kms, store)
    plaintext = os.urandom(32)
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=plaintext, EncryptionContext=CONTEXT)["CiphertextBlob"]
    before = describe_store(kms, store.cks_id)
    # A cluster the operator registered for this very account, so that only the store type is wrong.
    cluster_id = operator_of(world.server).call(
        "CreateHsmCluster", Pkcs11Module=softhsm.module, TokenLabel=softhsm.init_token(),
        TrustAnchorCertificate=trust_anchor(tmp_path), AccountId=tenant.account_id)["ClusterId"]
    for connected in (True, False):
        outcomes = {member: error_code(kms.update_custom_key_store, CustomKeyStoreId=store.cks_id, **{member: value})
                    for member, value in (("KeyStorePassword", "a-cloudhsm-password"),
                                          ("CloudHsmClusterId", cluster_id))}
        assert outcomes == {"KeyStorePassword": "ValidationException", "CloudHsmClusterId": "ValidationException"}, \
            f"connected={connected}: {outcomes}"
        entry = describe_store(kms, store.cks_id)
        assert entry["XksProxyConfiguration"] == before["XksProxyConfiguration"]
        assert "CloudHsmClusterId" not in entry
        if connected:
            serves(kms, key, blob, plaintext)  # still the proxy's credential
            kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    entry = describe_store(kms, store.cks_id)
    assert entry["ConnectionState"] == "CONNECTED" and "ConnectionErrorCode" not in entry
    serves(kms, key, blob, plaintext)


def test_connect_with_a_credential_the_proxy_dropped(world: World) -> None:
    kms, proxy = world.tenant().kms, world.proxy
    store = create_store(kms, proxy, ROTATING, connect=False)
    with proxy.without_credential(ROTATING, 0):
        kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
        entry = describe_store(kms, store.cks_id)
        assert (entry["ConnectionState"], entry.get("ConnectionErrorCode")) == ("FAILED", "INVALID_CREDENTIALS")
        # FAILED: AWS wants a disconnect before the next connect, and makes no key there.
        fails(STORE_STATE, kms.connect_custom_key_store, CustomKeyStoreId=store.cks_id)
        fails(STORE_STATE, kms.create_key, Origin=EXTERNAL, CustomKeyStoreId=store.cks_id, XksKeyId="k1")
        fails(STORE_STATE, kms.delete_custom_key_store, CustomKeyStoreId=store.cks_id)
    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    entry = describe_store(kms, store.cks_id)
    assert entry["ConnectionState"] == "DISCONNECTED" and "ConnectionErrorCode" not in entry
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    entry = describe_store(kms, store.cks_id)
    assert entry["ConnectionState"] == "CONNECTED" and "ConnectionErrorCode" not in entry
    key = xks_key(kms, store)
    assert kms.decrypt(CiphertextBlob=kms.encrypt(KeyId=key["KeyId"], Plaintext=b"ok")["CiphertextBlob"])[
        "Plaintext"] == b"ok"


def test_connect_disconnect_and_delete(world: World) -> None:
    kms, proxy = world.tenant().kms, world.proxy
    store = create_store(kms, proxy, connect=False)
    fails(STORE_STATE, kms.disconnect_custom_key_store, CustomKeyStoreId=store.cks_id)
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)  # connecting a connected store: no error
    assert describe_store(kms, store.cks_id)["ConnectionState"] == "CONNECTED"
    key = xks_key(kms, store)

    second = xks_key(kms, store, "k2")
    fails(STORE_STATE, kms.delete_custom_key_store, CustomKeyStoreId=store.cks_id)  # connected
    kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    # A key of a disconnected store (Unavailable) can still be scheduled for deletion.
    assert key_state(kms, second["KeyId"]) == "Unavailable"
    kms.schedule_key_deletion(KeyId=second["KeyId"], PendingWindowInDays=7)
    assert key_state(kms, second["KeyId"]) == "PendingDeletion"
    fails(STORE_STATE, kms.disconnect_custom_key_store, CustomKeyStoreId=store.cks_id)
    # A key pending deletion is still a key of the store.
    fails("CustomKeyStoreHasCMKsException", kms.delete_custom_key_store, CustomKeyStoreId=store.cks_id)
    assert describe_store(kms, store.cks_id)["CustomKeyStoreName"] == store.name

    empty = create_store(kms, proxy, ROTATING)
    fails(STORE_STATE, kms.delete_custom_key_store, CustomKeyStoreId=empty.cks_id)
    kms.disconnect_custom_key_store(CustomKeyStoreId=empty.cks_id)
    kms.delete_custom_key_store(CustomKeyStoreId=empty.cks_id)
    fails(NOT_FOUND, kms.describe_custom_key_stores, CustomKeyStoreId=empty.cks_id)
    fails(NOT_FOUND, kms.connect_custom_key_store, CustomKeyStoreId=empty.cks_id)
    # Its name, endpoint and path are free again.
    again = create_store(kms, proxy, ROTATING, name=empty.name, connect=False)
    assert again.cks_id != empty.cks_id


# == 2. keys in an external key store =================================================================

def test_create_key_in_an_external_key_store(world: World) -> None:
    kms, proxy = world.tenant().kms, world.proxy
    store = create_store(kms, proxy, connect=False)
    cks = store.cks_id
    fails(STORE_STATE, kms.create_key, Origin=EXTERNAL, CustomKeyStoreId=cks, XksKeyId="k1")
    kms.connect_custom_key_store(CustomKeyStoreId=cks)

    fails("XksKeyNotFoundException", kms.create_key, Origin=EXTERNAL, CustomKeyStoreId=cks, XksKeyId="no-such-key")
    fails("XksKeyInvalidConfigurationException", kms.create_key, Origin=EXTERNAL, CustomKeyStoreId=cks,
          XksKeyId=ENC_ONLY)
    fails("ValidationException", kms.create_key, XksKeyId="k1")  # without the origin
    fails("ValidationException", kms.create_key, Origin="AWS_KMS", XksKeyId="k1")
    fails("ValidationException", kms.create_key, Origin=EXTERNAL, CustomKeyStoreId=cks)  # without XksKeyId
    fails(NOT_FOUND, kms.create_key, Origin=EXTERNAL, CustomKeyStoreId="cks-0123456789abcdef0", XksKeyId="k1")
    fails(UNSUPPORTED, kms.create_key, Origin=EXTERNAL, CustomKeyStoreId=cks, XksKeyId="k1", KeySpec="RSA_2048",
          KeyUsage="ENCRYPT_DECRYPT")

    md = xks_key(kms, store)
    assert (md["Origin"], md["CustomKeyStoreId"], md["XksKeyConfiguration"]) == (EXTERNAL, cks, {"Id": "k1"})
    assert (md["KeySpec"], md["KeyUsage"], md["KeyState"]) == ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", "Enabled")
    assert "CloudHsmClusterId" not in md
    described = kms.describe_key(KeyId=md["KeyId"])["KeyMetadata"]
    assert (described["Origin"], described["CustomKeyStoreId"], described["XksKeyConfiguration"]) == \
        (EXTERNAL, cks, {"Id": "k1"})
    fails("XksKeyAlreadyInUseException", kms.create_key, Origin=EXTERNAL, CustomKeyStoreId=cks, XksKeyId="k1")
    second = xks_key(kms, store, "k2")
    mine = {k["KeyId"] for k in kms.list_keys()["Keys"]}
    assert mine == {md["KeyId"], second["KeyId"]}  # no key was left behind by the refusals

    # What AWS does not allow for keys in an external key store.
    key = md["KeyId"]
    fails(UNSUPPORTED, kms.enable_key_rotation, KeyId=key)
    fails(UNSUPPORTED, kms.rotate_key_on_demand, KeyId=key)
    fails(UNSUPPORTED, kms.generate_data_key_pair, KeyId=key, KeyPairSpec="ECC_NIST_P256")
    fails(UNSUPPORTED, kms.generate_data_key_pair_without_plaintext, KeyId=key, KeyPairSpec="RSA_2048")
    fails(UNSUPPORTED, kms.get_parameters_for_import, KeyId=key, WrappingAlgorithm="RSAES_OAEP_SHA_256",
          WrappingKeySpec="RSA_2048")
    fails(UNSUPPORTED, kms.generate_random, NumberOfBytes=32, CustomKeyStoreId=cks)
    assert kms.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"] is False

    # Unavailable while the store is disconnected, Enabled again once it is connected.
    kms.disconnect_custom_key_store(CustomKeyStoreId=cks)
    assert key_state(kms, key) == "Unavailable"
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["XksKeyConfiguration"] == {"Id": "k1"}
    kms.connect_custom_key_store(CustomKeyStoreId=cks)
    assert key_state(kms, key) == "Enabled"


# == 3. cryptography through an external key ============================================================

def test_cryptography_with_an_external_key(world: World) -> None:
    kms, proxy = world.tenant().kms, world.proxy
    store = create_store(kms, proxy)
    key, other = xks_key(kms, store, "k1"), xks_key(kms, store, "k2")
    normal = kms.create_key(Description="default-store key")["KeyMetadata"]
    plaintext = os.urandom(100)

    out = kms.encrypt(KeyId=key["KeyId"], Plaintext=plaintext, EncryptionContext=CONTEXT)
    assert (out["KeyId"], out["EncryptionAlgorithm"]) == (key["Arn"], "SYMMETRIC_DEFAULT")
    blob = out["CiphertextBlob"]
    assert plaintext not in blob
    back = kms.decrypt(CiphertextBlob=blob, EncryptionContext=dict(reversed(CONTEXT.items())))
    assert (back["Plaintext"], back["KeyId"]) == (plaintext, key["Arn"])
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT, KeyId=key["Arn"])["Plaintext"] == plaintext
    fails(INVALID_CIPHERTEXT, kms.decrypt, CiphertextBlob=blob)
    fails(INVALID_CIPHERTEXT, kms.decrypt, CiphertextBlob=blob, EncryptionContext={**CONTEXT, "purpose": "other"})
    fails(INVALID_CIPHERTEXT, kms.decrypt, CiphertextBlob=blob, EncryptionContext={**CONTEXT, "extra": "1"})
    fails("IncorrectKeyException", kms.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT, KeyId=other["KeyId"])
    largest = os.urandom(4096)  # Encrypt's limit
    sealed = kms.encrypt(KeyId=key["KeyId"], Plaintext=largest, EncryptionContext=CONTEXT)["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=sealed, EncryptionContext=CONTEXT)["Plaintext"] == largest
    # Flipped bytes anywhere (the header, the proxy's IV, tag and ciphertext), and cut blobs.
    candidates = [blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1:] for i in range(0, len(blob), 3)]
    candidates += [blob[:-1], blob[:40], blob + b"\x00"]
    for bad in candidates:
        code = error_code(kms.decrypt, CiphertextBlob=bad, EncryptionContext=CONTEXT)
        assert code == INVALID_CIPHERTEXT, f"{code} for {bad.hex()} (the good blob: {blob.hex()})"

    data_key = kms.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256", EncryptionContext=CONTEXT)
    assert len(data_key["Plaintext"]) == 32 and data_key["KeyId"] == key["Arn"]
    assert data_key["Plaintext"] not in data_key["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext=CONTEXT)["Plaintext"] == \
        data_key["Plaintext"]
    fails(INVALID_CIPHERTEXT, kms.decrypt, CiphertextBlob=data_key["CiphertextBlob"])
    small = kms.generate_data_key(KeyId=key["Arn"], KeySpec="AES_128")
    assert kms.decrypt(CiphertextBlob=small["CiphertextBlob"])["Plaintext"] == small["Plaintext"]
    assert len(small["Plaintext"]) == 16
    sealed_only = kms.generate_data_key_without_plaintext(KeyId=key["Arn"], NumberOfBytes=48,
                                                          EncryptionContext={"use": "later"})
    assert "Plaintext" not in sealed_only and sealed_only["KeyId"] == key["Arn"]
    assert len(kms.decrypt(CiphertextBlob=sealed_only["CiphertextBlob"],
                           EncryptionContext={"use": "later"})["Plaintext"]) == 48

    # ReEncrypt to a default-store key and back to an external key, and between external keys.
    to_normal = kms.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=CONTEXT,
                               DestinationKeyId=normal["KeyId"], DestinationEncryptionContext={"b": "2"})
    assert (to_normal["SourceKeyId"], to_normal["KeyId"]) == (key["Arn"], normal["Arn"])
    assert kms.decrypt(CiphertextBlob=to_normal["CiphertextBlob"], EncryptionContext={"b": "2"})["Plaintext"] == \
        plaintext
    to_external = kms.re_encrypt(CiphertextBlob=to_normal["CiphertextBlob"], SourceEncryptionContext={"b": "2"},
                                 DestinationKeyId=other["Arn"], DestinationEncryptionContext=CONTEXT)
    assert (to_external["SourceKeyId"], to_external["KeyId"]) == (normal["Arn"], other["Arn"])
    fails(INVALID_CIPHERTEXT, kms.decrypt, CiphertextBlob=to_external["CiphertextBlob"])
    back = kms.decrypt(CiphertextBlob=to_external["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert (back["Plaintext"], back["KeyId"]) == (plaintext, other["Arn"])
    between = kms.re_encrypt(CiphertextBlob=to_external["CiphertextBlob"], SourceEncryptionContext=CONTEXT,
                             DestinationKeyId=key["KeyId"])
    back = kms.decrypt(CiphertextBlob=between["CiphertextBlob"])
    assert (back["Plaintext"], back["KeyId"]) == (plaintext, key["Arn"])
    fails(INVALID_CIPHERTEXT, kms.re_encrypt, CiphertextBlob=blob, SourceEncryptionContext={"wrong": "context"},
          DestinationKeyId=normal["KeyId"])


@pytest.mark.skipif(AWS_CLI is None, reason="the AWS CLI is not installed")
def test_aws_cli_with_an_external_key_store(world: World, tmp_path: Path) -> None:
    tenant, proxy = world.tenant(), world.proxy
    aws = AwsCli(world.server, tmp_path)
    # AWS CLI v1 fetches a parameter that begins with https:// unless told not to (an endpoint is one).
    config = tmp_path / "aws-config"
    config.write_text("[default]\ncli_follow_urlparam = false\n")
    aws.env = dict(aws.base_env, AWS_ACCESS_KEY_ID=tenant.access_key_id, AWS_SECRET_ACCESS_KEY=tenant.secret,
                   AWS_CONFIG_FILE=str(config))
    params = store_params(proxy, name="cli-store")
    credential = tmp_path / "credential.json"  # the secret in a file, not on the command line
    credential.write_text(json.dumps(params["XksProxyAuthenticationCredential"]))
    created = aws.json("create-custom-key-store", "--custom-key-store-name", "cli-store",
                       "--custom-key-store-type", EXTERNAL, "--xks-proxy-uri-endpoint", proxy.endpoint,
                       "--xks-proxy-uri-path", MAIN + API, "--xks-proxy-connectivity", "PUBLIC_ENDPOINT",
                       "--xks-proxy-authentication-credential", f"file://{credential}")
    cks = created["CustomKeyStoreId"]
    aws.run("connect-custom-key-store", "--custom-key-store-id", cks)
    entry = describe_store(tenant.kms, cks)
    assert entry["ConnectionState"] == "CONNECTED" and entry["XksProxyConfiguration"]["UriPath"] == MAIN + API
    md = aws.json("create-key", "--origin", EXTERNAL, "--custom-key-store-id", cks, "--xks-key-id", "k1")[
        "KeyMetadata"]
    assert (md["Origin"], md["CustomKeyStoreId"], md["XksKeyConfiguration"]) == (EXTERNAL, cks, {"Id": "k1"})

    plaintext = bytes(range(256)) + os.urandom(700)
    (tmp_path / "plain.bin").write_bytes(plaintext)
    enc = aws.json("encrypt", "--key-id", md["KeyId"], "--plaintext", "fileb://plain.bin",
                   "--encryption-context", "tenant=xks,purpose=cli")
    assert enc["KeyId"] == md["Arn"]
    (tmp_path / "cipher.bin").write_bytes(base64.b64decode(enc["CiphertextBlob"]))
    proc = aws.shell("base64 -d > decrypted.bin", "decrypt", "--ciphertext-blob", "fileb://cipher.bin",
                     "--encryption-context", "tenant=xks,purpose=cli", "--query", "Plaintext", "--output", "text")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "decrypted.bin").read_bytes() == plaintext
    wrong = aws.run("decrypt", "--ciphertext-blob", "fileb://cipher.bin", "--encryption-context",
                    "tenant=xks,purpose=other", check=False)
    assert wrong.returncode != 0 and INVALID_CIPHERTEXT in wrong.stderr and wrong.stdout == ""

    tenant.kms.disconnect_custom_key_store(CustomKeyStoreId=cks)
    failed = aws.run("decrypt", "--ciphertext-blob", "fileb://cipher.bin", "--encryption-context",
                     "tenant=xks,purpose=cli", check=False)
    assert failed.returncode != 0 and INVALID_STATE in failed.stderr and failed.stdout == ""


def test_encryption_sdk_with_an_external_key(world: World) -> None:
    esdk_module = pytest.importorskip("aws_encryption_sdk")
    pytest.importorskip("aws_cryptographic_material_providers")
    from aws_cryptographic_material_providers.mpl import (  # type: ignore[import-untyped]
        AwsCryptographicMaterialProviders,
    )
    from aws_cryptographic_material_providers.mpl.config import (  # type: ignore[import-untyped]
        MaterialProvidersConfig,
    )
    from aws_cryptographic_material_providers.mpl.models import (  # type: ignore[import-untyped]
        CreateAwsKmsKeyringInput,
    )
    from aws_cryptographic_material_providers.smithygenerated.aws_cryptography_materialproviders.errors import (  # type: ignore[import-untyped]
        ServiceError,
    )
    from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError  # type: ignore[import-untyped]

    kms = world.tenant().kms
    store = create_store(kms, world.proxy)
    arn = xks_key(kms, store)["Arn"]
    esdk = esdk_module.EncryptionSDKClient(
        commitment_policy=esdk_module.CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    keyring = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig()).create_aws_kms_keyring(
        input=CreateAwsKmsKeyringInput(kms_key_id=arn, kms_client=kms))
    data = os.urandom(50 * 1024)
    ciphertext, header = esdk.encrypt(source=data, keyring=keyring, encryption_context=CONTEXT)
    assert data not in ciphertext
    [edk] = header.encrypted_data_keys
    assert edk.key_provider.key_info == arn.encode()
    assert edk.encrypted_data_key[0] == blob_format.FORMAT_V3  # the data key is double-encrypted
    plaintext, decrypted_header = esdk.decrypt(source=ciphertext, keyring=keyring)
    assert plaintext == data
    assert all(decrypted_header.encryption_context.get(k) == v for k, v in CONTEXT.items())

    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    with pytest.raises((AWSEncryptionSDKClientError, ServiceError)):  # the keyring's Decrypt was refused
        esdk.decrypt(source=ciphertext, keyring=keyring)
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    plaintext, _ = esdk.decrypt(source=ciphertext, keyring=keyring)
    assert plaintext == data


# == 4. double encryption ===================================================================================

def test_double_encryption_needs_both_openkms_and_the_proxy(world: World) -> None:
    kms, proxy = world.tenant().kms, world.proxy
    store = create_store(kms, proxy)
    key = xks_key(kms, store)
    plaintext = b"double-encrypted " + os.urandom(48)
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=plaintext, EncryptionContext=CONTEXT)["CiphertextBlob"]
    assert blob[0] == blob_format.FORMAT_V3 and blob[1:17] == uuid.UUID(key["KeyId"]).bytes

    # The proxy alone (its own API, with the store's credential): what the external key opens is
    # openkms's inner format-1 blob, sealed under the key's own material; not the plaintext.
    parts = blob_format.unpack_v3(blob)
    sealed = {"ciphertext": b64(parts.ciphertext), "initializationVector": b64(parts.iv),
              "authenticationTag": b64(parts.tag)}
    if parts.metadata:
        sealed["ciphertextMetadata"] = b64(parts.metadata)
    header = blob[:blob_format.HEADER_V3_BYTES]
    client = proxy.client(MAIN)
    try:
        answer = client.decrypt("k1", sealed, aad=blob_format.xks_aad(header, CONTEXT))
        assert answer.status == 200, answer.body
        inner = unb64(answer.json["plaintext"])
        # The AAD binds the encryption context: with another one the external key opens nothing.
        other = client.decrypt("k1", sealed, aad=blob_format.xks_aad(header, {"tenant": "someone-else"}))
        assert (other.status, other.error) == (400, INVALID_CIPHERTEXT), other.body
    finally:
        client.close()
    assert inner[0] == blob_format.FORMAT_V1 and inner[1:17] == uuid.UUID(key["KeyId"]).bytes
    assert inner[17:21] == blob[17:21]  # the same key version
    assert len(inner) == blob_format.HEADER_BYTES + len(plaintext) + 16
    assert plaintext not in inner
    # Nor does openkms open the inner blob without the proxy's layer.
    fails(INVALID_CIPHERTEXT, kms.decrypt, CiphertextBlob=inner, EncryptionContext=CONTEXT)

    # openkms alone: with the proxy stopped, the same blob cannot be decrypted.
    proxy.process.stop()
    try:
        fails(INVALID_STATE, kms.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT)
    finally:
        proxy.process.start()
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)["Plaintext"] == plaintext


# == 5. requestMetadata ========================================================================================

def test_the_proxy_sees_who_asks_what_with_which_key(world: World) -> None:
    tenant, proxy = world.tenant(), world.proxy
    kms = tenant.kms
    principal = caller_arn(world.server, tenant)
    store = create_store(kms, proxy, connect=False)
    connected = kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    record = proxy_record(proxy, connected["ResponseMetadata"]["RequestId"])
    assert record["kmsOperation"] == "ConnectCustomKeyStore"
    created = kms.create_key(Origin=EXTERNAL, CustomKeyStoreId=store.cks_id, XksKeyId="k1")
    key = created["KeyMetadata"]
    record = proxy_record(proxy, created["ResponseMetadata"]["RequestId"])
    assert (record["kmsOperation"], record["awsPrincipalArn"]) == ("CreateKey", principal)
    normal = kms.create_key()["KeyMetadata"]

    marker = b"XKS-PLAINTEXT-" + secrets.token_hex(12).encode()
    out = kms.encrypt(KeyId=key["KeyId"], Plaintext=marker, EncryptionContext=CONTEXT)
    request_id = out["ResponseMetadata"]["RequestId"]
    assert out["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"] == request_id
    record = proxy_record(proxy, request_id)
    assert (record["kmsOperation"], record["awsPrincipalArn"], record["kmsKeyArn"]) == \
        ("Encrypt", principal, key["Arn"])
    blob = out["CiphertextBlob"]
    data_keys: list[bytes] = []
    calls: dict[str, Callable[[], Any]] = {
        "Decrypt": lambda: kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT),
        "GenerateDataKey": lambda: kms.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256"),
        "GenerateDataKeyWithoutPlaintext": lambda: kms.generate_data_key_without_plaintext(KeyId=key["KeyId"],
                                                                                           KeySpec="AES_256"),
        "ReEncrypt": lambda: kms.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=CONTEXT,
                                            DestinationKeyId=normal["KeyId"]),
    }
    for operation, call in calls.items():
        response = call()
        if "Plaintext" in response:
            data_keys.append(response["Plaintext"])
        record = proxy_record(proxy, response["ResponseMetadata"]["RequestId"])
        assert (record["kmsOperation"], record["awsPrincipalArn"], record["kmsKeyArn"]) == \
            (operation, principal, key["Arn"]), record
    # Never the plaintext, in any encoding.
    log = proxy.process.output().encode()
    assert leaks(log, [marker.decode()]) == []
    for data_key in data_keys:
        assert data_key not in log and base64.b64encode(data_key) not in log


# == 6. kill switches ==========================================================================================

def test_kill_switch_stop_the_proxy(world: World) -> None:
    case = kill_switch_case(world.tenant().kms, world.proxy)
    idle = create_store(case.kms, world.proxy, ROTATING, connect=False)
    world.proxy.process.stop()
    try:
        case.refused()
        # As AWS: the store stays CONNECTED and the key Enabled; only cryptography fails.
        assert describe_store(case.kms, case.store.cks_id)["ConnectionState"] == "CONNECTED"
        assert key_state(case.kms, case.key["KeyId"]) == "Enabled"
        # A store that connects now fails, and says why.
        case.kms.connect_custom_key_store(CustomKeyStoreId=idle.cks_id)
        entry = describe_store(case.kms, idle.cks_id)
        assert (entry["ConnectionState"], entry.get("ConnectionErrorCode")) == ("FAILED", "XKS_PROXY_NOT_REACHABLE")
    finally:
        world.proxy.process.start()
    case.serves()
    case.kms.disconnect_custom_key_store(CustomKeyStoreId=idle.cks_id)
    case.kms.connect_custom_key_store(CustomKeyStoreId=idle.cks_id)
    assert describe_store(case.kms, idle.cks_id)["ConnectionState"] == "CONNECTED"


def test_kill_switch_delete_the_key_from_the_token(world: World, softhsm: SoftHsm, tmp_path: Path) -> None:
    proxy = world.proxy
    case = kill_switch_case(world.tenant().kms, proxy, xks_key_id=DOOMED)
    kept = xks_key(case.kms, case.store, "k1")
    kept_blob = case.kms.encrypt(KeyId=kept["KeyId"], Plaintext=b"kept", EncryptionContext=CONTEXT)["CiphertextBlob"]
    backup = tmp_path / "token-backup"
    shutil.copytree(proxy.token.directory, backup)
    try:
        deleted = softhsm.tool(proxy.token.label, PIN, "--delete-object", "--type", "secrkey", "--label", DOOMED)
        assert deleted.returncode == 0, deleted.stderr
        case.refused()
        # The token's other keys still serve.
        serves(case.kms, kept, kept_blob, b"kept")
    finally:
        proxy.process.stop()
        shutil.rmtree(proxy.token.directory)
        shutil.copytree(backup, proxy.token.directory)
        proxy.process.start()
    case.serves()
    serves(case.kms, kept, kept_blob, b"kept")


def test_kill_switch_drop_the_credential_from_the_proxy(world: World) -> None:
    case = kill_switch_case(world.tenant().kms, world.proxy, ROTATING)
    with world.proxy.without_credential(ROTATING, 0):
        messages = case.refused()
        assert all(re.search(r"authenticat|credential", m, re.IGNORECASE) for m in messages), messages
        assert describe_store(case.kms, case.store.cks_id)["ConnectionState"] == "CONNECTED"
    case.serves()


def test_kill_switch_disconnect_the_store(world: World) -> None:
    case = kill_switch_case(world.tenant().kms, world.proxy)
    case.kms.disconnect_custom_key_store(CustomKeyStoreId=case.store.cks_id)
    case.refused()
    assert key_state(case.kms, case.key["KeyId"]) == "Unavailable"
    assert key_state(case.kms, case.normal["KeyId"]) == "Enabled"
    case.kms.connect_custom_key_store(CustomKeyStoreId=case.store.cks_id)
    assert key_state(case.kms, case.key["KeyId"]) == "Enabled"
    case.serves()


def test_kill_switch_disable_the_external_key_in_the_proxy(world: World) -> None:
    proxy = world.proxy
    case = kill_switch_case(world.tenant().kms, proxy, ROTATING)
    rotating = proxy.stores[ROTATING]
    rotating.disabled = ["k1", "k2"]
    try:
        proxy.reload()
        case.refused()
        assert key_state(case.kms, case.key["KeyId"]) == "Enabled"  # as AWS: only cryptography fails
        # A disabled external key is not one a new KMS key can use.
        fails("XksKeyInvalidConfigurationException", case.kms.create_key, Origin=EXTERNAL,
              CustomKeyStoreId=case.store.cks_id, XksKeyId="k2")
    finally:
        rotating.disabled = []
        proxy.reload()
    case.serves()
    xks_key(case.kms, case.store, "k2")


# == 7. a slow proxy ==============================================================================================

class SlowRelay:
    """A TCP relay on a loopback port in front of a proxy; while `delay` is set, each chunk of the
    proxy's replies waits that long before it is passed on (TLS goes through untouched)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            downstream.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [downstream, upstream]
            threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if replies and self.delay:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()


def test_a_slow_proxy_fails_fast_and_holds_up_nothing_else(world: World) -> None:
    tenant, proxy = world.tenant(), world.proxy
    kms = tenant.kms
    relay = SlowRelay(proxy.process.port)
    try:
        store = create_store(kms, proxy, endpoint=f"https://localhost:{relay.port}")
        key = xks_key(kms, store)
        normal = kms.create_key(Description="default-store key")["KeyMetadata"]
        plaintext = os.urandom(32)
        blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=plaintext, EncryptionContext=CONTEXT)["CiphertextBlob"]
        normal_blob = kms.encrypt(KeyId=normal["KeyId"], Plaintext=b"normal")["CiphertextBlob"]
        idle = create_store(kms, proxy, ROTATING, connect=False, endpoint=f"https://localhost:{relay.port}")

        relay.delay = 0.6  # well past the 250 ms AWS gives a proxy (OPENKMS_XKS_TIMEOUT_MS's default)
        guarded = guarded_client(world.server, tenant)
        message = fails(INVALID_STATE, guarded.encrypt, KeyId=key["KeyId"], Plaintext=b"slow")
        assert re.search(r"250 ?ms|time[ds]? ?out", message, re.IGNORECASE), message
        fails(INVALID_STATE, guarded.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT)
        # Connecting and creating through the slow proxy time out too, with AWS's codes.
        guarded.connect_custom_key_store(CustomKeyStoreId=idle.cks_id)
        entry = describe_store(kms, idle.cks_id)
        assert (entry["ConnectionState"], entry.get("ConnectionErrorCode")) == ("FAILED", "XKS_PROXY_TIMED_OUT")
        newcomer = guarded_client(world.server, world.tenant())
        fails(UNREACHABLE, newcomer.create_custom_key_store,
              **store_params(proxy, endpoint=f"https://localhost:{relay.port}"))
        assert newcomer.describe_custom_key_stores()["CustomKeyStores"] == []

        # Several slow calls at once; meanwhile a default-store key keeps serving.
        outcomes: list[str | None] = []

        def slow_calls() -> None:
            client = guarded_client(world.server, tenant)
            for _ in range(3):
                try:
                    outcomes.append(error_code(client.encrypt, KeyId=key["KeyId"], Plaintext=b"slow"))
                except Exception as exc:  # a hang guard that fired, a connection lost
                    outcomes.append(type(exc).__name__)
        threads = [threading.Thread(target=slow_calls) for _ in range(6)]
        for thread in threads:
            thread.start()
        served = 0
        while any(t.is_alive() for t in threads) or served < 5:
            assert guarded.decrypt(CiphertextBlob=normal_blob)["Plaintext"] == b"normal"
            sealed = guarded.encrypt(KeyId=normal["KeyId"], Plaintext=b"meanwhile")["CiphertextBlob"]
            assert guarded.decrypt(CiphertextBlob=sealed)["Plaintext"] == b"meanwhile"
            served += 1
        for thread in threads:
            thread.join(10)
        assert outcomes == [INVALID_STATE] * 18
        assert describe_store(kms, store.cks_id)["ConnectionState"] == "CONNECTED"

        # Fast again: the late answers to the slow calls are never taken for the new calls' answers.
        relay.delay = 0.0
        for _ in range(5):
            serves(kms, key, blob, plaintext)
    finally:
        relay.close()


# == 8. mTLS ======================================================================================================

def test_mtls_proxy_accepts_a_server_with_the_client_certificate(mtls_server: ServerProcess, mtls_proxy: Proxy,
                                                                 other_pki: Pki) -> None:
    kms = new_tenant(mtls_server).kms
    store = create_store(kms, mtls_proxy)
    key = xks_key(kms, store)
    plaintext = os.urandom(32)
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=plaintext, EncryptionContext=CONTEXT)["CiphertextBlob"]
    serves(kms, key, blob, plaintext)

    # The proxy now wants client certificates of another CA: cryptography fails, and a new
    # connection fails with AWS's code for a TLS failure.
    mtls_proxy.client_ca = other_pki.ca
    try:
        mtls_proxy.restart()
        fails(INVALID_STATE, kms.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT)
        kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
        kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
        entry = describe_store(kms, store.cks_id)
        assert (entry["ConnectionState"], entry.get("ConnectionErrorCode")) == \
            ("FAILED", "XKS_PROXY_INVALID_TLS_CONFIGURATION")
    finally:
        mtls_proxy.client_ca = None
        mtls_proxy.restart()
    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    assert describe_store(kms, store.cks_id)["ConnectionState"] == "CONNECTED"
    serves(kms, key, blob, plaintext)


def test_mtls_proxy_refuses_a_server_without_a_client_certificate(world: World, mtls_proxy: Proxy) -> None:
    kms = world.tenant().kms
    refusals = mtls_proxy.process.output().count("refused a TLS client")
    fails(UNREACHABLE, kms.create_custom_key_store, **store_params(mtls_proxy))
    assert kms.describe_custom_key_stores()["CustomKeyStores"] == []
    # It was the TLS handshake that failed (the proxy says so), not the credential or the path.
    wait_until(lambda: mtls_proxy.process.output().count("refused a TLS client") > refusals, 5)


# == 9. tenants ===================================================================================================

def test_other_accounts_cannot_see_or_use_an_external_key_store(world: World) -> None:
    owner, proxy = world.tenant(), world.proxy
    store = create_store(owner.kms, proxy)
    key = xks_key(owner.kms, store)
    blob = owner.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"mine", EncryptionContext=CONTEXT)["CiphertextBlob"]
    stranger = world.tenant().kms
    cks = store.cks_id
    fails(NOT_FOUND, stranger.describe_custom_key_stores, CustomKeyStoreId=cks)
    fails(NOT_FOUND, stranger.describe_custom_key_stores, CustomKeyStoreName=store.name)
    assert stranger.describe_custom_key_stores()["CustomKeyStores"] == []
    fails(NOT_FOUND, stranger.connect_custom_key_store, CustomKeyStoreId=cks)
    fails(NOT_FOUND, stranger.disconnect_custom_key_store, CustomKeyStoreId=cks)
    fails(NOT_FOUND, stranger.update_custom_key_store, CustomKeyStoreId=cks, NewCustomKeyStoreName="taken over")
    fails(NOT_FOUND, stranger.update_custom_key_store, CustomKeyStoreId=cks,
          XksProxyAuthenticationCredential=store_params(proxy)["XksProxyAuthenticationCredential"])
    fails(NOT_FOUND, stranger.delete_custom_key_store, CustomKeyStoreId=cks)
    fails(NOT_FOUND, stranger.create_key, Origin=EXTERNAL, CustomKeyStoreId=cks, XksKeyId="k2")
    fails(NOT_FOUND, stranger.generate_random, NumberOfBytes=32, CustomKeyStoreId=cks)
    # Its keys: denied by ARN, unknown by bare id; the proxy is not even asked.
    attempts = [
        fails_with_id("AccessDeniedException", stranger.encrypt, KeyId=key["Arn"], Plaintext=b"x"),
        fails_with_id("AccessDeniedException", stranger.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT),
        fails_with_id("AccessDeniedException", stranger.generate_data_key, KeyId=key["Arn"], KeySpec="AES_256"),
        fails_with_id("NotFoundException", stranger.encrypt, KeyId=key["KeyId"], Plaintext=b"x"),
    ]
    # Nothing of that touched the owner's store.
    entry = describe_store(owner.kms, cks)
    assert (entry["CustomKeyStoreName"], entry["ConnectionState"]) == (store.name, "CONNECTED")
    assert entry["XksProxyConfiguration"]["AccessKeyId"] == store.access_key_id
    out = owner.kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)
    assert out["Plaintext"] == b"mine"
    proxy_record(proxy, out["ResponseMetadata"]["RequestId"])  # logged after every attempt above
    asked = {r.get("kmsRequestId") for r in proxy_records(proxy)}
    assert [a for a in attempts if a in asked] == []


def fails_with_id(code: str, call: Any, **params: Any) -> str:
    """Like `fails`; returns the refused call's request id."""
    with pytest.raises(ClientError) as info:
        call(**params)
    error = info.value.response["Error"]
    assert error["Code"] == code, f"expected {code}, got {error}"
    return str(info.value.response["ResponseMetadata"]["RequestId"])


# == the credential's secret ========================================================================================

def audit_events(server: ServerProcess, **filters: Any) -> list[dict[str, Any]]:
    operator = operator_of(server)
    events: list[dict[str, Any]] = []
    token = None
    while True:
        page = operator.call("QueryAuditEvents", Limit=1000, NextToken=token, **filters)
        events += page["Events"]
        token = page.get("NextToken")
        if not token:
            return events


def test_the_secret_stays_out_of_logs_audit_records_and_the_store(world: World) -> None:
    tenant, proxy = world.tenant(), world.proxy
    kms = tenant.kms
    (_, first), (second_id, second) = proxy.stores[ROTATING].credentials
    wrong = new_secret()
    fails("XksProxyIncorrectAuthenticationCredentialException", kms.create_custom_key_store,
          **store_params(proxy, ROTATING, secret=wrong))
    store = create_store(kms, proxy, ROTATING)
    fails("XksProxyIncorrectAuthenticationCredentialException", kms.update_custom_key_store,
          CustomKeyStoreId=store.cks_id,
          XksProxyAuthenticationCredential={"AccessKeyId": second_id, "RawSecretAccessKey": wrong})
    kms.update_custom_key_store(CustomKeyStoreId=store.cks_id, XksProxyAuthenticationCredential={
        "AccessKeyId": second_id, "RawSecretAccessKey": second})
    xks_key(kms, store)

    # The audit records of those calls exist (failed ones too), and hold no secret.
    def recorded() -> list[dict[str, Any]]:
        return audit_events(world.server, AccountId=tenant.account_id)

    wanted = {("CreateCustomKeyStore", "XksProxyIncorrectAuthenticationCredentialException"),
              ("CreateCustomKeyStore", None), ("UpdateCustomKeyStore", None),
              ("UpdateCustomKeyStore", "XksProxyIncorrectAuthenticationCredentialException")}
    wait_until(lambda: wanted <= {(e["eventName"], e.get("errorCode")) for e in recorded()}, 10, interval=0.2)
    everything = json.dumps(audit_events(world.server), default=str).encode()
    assert first.encode() not in everything and second.encode() not in everything
    assert leaks(everything, SECRETS) == []

    # Nor the server's log, its files, or (on PostgreSQL) its database.
    server = world.server
    assert leaks(server.output().encode(), SECRETS) == []
    for path in (p for p in server.data_dir.rglob("*") if p.is_file()):
        assert leaks(path.read_bytes(), SECRETS) == [], path
    if server.storage_url:
        dump = subprocess.run(["pg_dump", server.storage_url], capture_output=True, check=True, timeout=60).stdout
        assert b"custom_key_stores" in dump
        assert leaks(dump, SECRETS) == []
