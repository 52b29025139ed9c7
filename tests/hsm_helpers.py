"""Helpers for the HSM key store tests (tests/test_hsm.py): SoftHSM2 tokens registered as HSM
clusters, tenants' custom key stores on them, what pkcs11-tool sees in a token, and the store's rows.

Everything here drives real processes: the server over HTTP (boto3 and the project's admin
client), SoftHSM2's `softhsm2-util` and OpenSC's `pkcs11-tool` from outside the server.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from openkms.client.admin import AdminClient
from tests.conftest import SoftHsm, trust_anchor
from tests.server import REGION, ServerProcess

PIN = "kmsuser-pin"
KMS_ALL_POLICY = ('{"Version": "2012-10-17", "Statement": '
                  '[{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}')
CONTEXT = {"tenant": "t1", "purpose": "hsm-test"}


# -- errors and waiting ---------------------------------------------------------------------------

def fails(code: str, call: Callable[..., Any], **params: Any) -> str:
    """Calls `call(**params)`, which must fail with the KMS error `code`; returns the message."""
    with pytest.raises(ClientError) as info:
        call(**params)
    error = info.value.response["Error"]
    assert error["Code"] == code, f"expected {code}, got {error}"
    return str(error.get("Message", ""))


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Polls `check` until it is true; returns the seconds it took (AssertionError at the timeout)."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(interval)


def account_of(kms: Any) -> str:
    """The account of a KMS client's credentials (STS GetCallerIdentity on the same endpoint)."""
    import boto3

    creds = kms._request_signer._credentials.get_frozen_credentials()
    sts = boto3.client("sts", endpoint_url=kms.meta.endpoint_url, region_name=kms.meta.region_name,
                       aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key)
    return str(sts.get_caller_identity()["Account"])


def error_code(call: Callable[..., Any], **params: Any) -> str | None:
    """The KMS error code of `call(**params)`, None if it succeeds."""
    try:
        call(**params)
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
    return None


# -- what a token holds, as pkcs11-tool lists it --------------------------------------------------

@dataclass
class TokenObject:
    """One secret-key object of `pkcs11-tool --list-objects --type secrkey`."""

    header: str  # "Secret Key Object; AES length 32"
    fields: dict[str, str]

    @property
    def label(self) -> str:
        return self.fields.get("label", "")

    @property
    def id(self) -> str:
        return self.fields.get("ID", "")


def parse_objects(listing: str) -> list[TokenObject]:
    objects: list[TokenObject] = []
    for line in listing.splitlines():
        if line.startswith("Secret Key Object"):
            objects.append(TokenObject(line.strip(), {}))
        elif objects and line.startswith("  ") and ":" in line:
            name, _, value = line.strip().partition(":")
            objects[-1].fields[name.strip()] = value.strip()
    return objects


# -- secrets in their encoded forms ------------------------------------------------------------------

def encoded_forms(secret: str) -> list[bytes]:
    """The secret as bytes, hex (both cases) and base64 at each of the three alignments it can
    have inside a longer base64 text (only the characters that depend on the secret alone)."""
    raw = secret.encode()
    forms = [raw, raw.hex().encode(), raw.hex().upper().encode()]
    for offset in range(3):
        encoded = base64.b64encode(b"\x00" * offset + raw + b"\x00" * 3)
        first = -(-8 * offset // 6)               # first character made of secret bits only
        last = (8 * (offset + len(raw))) // 6     # one past the last such character
        forms.append(encoded[first:last])
    return forms


def leaks(haystack: bytes, secret_values: list[str]) -> list[str]:
    """Which secrets (in which form) occur in `haystack`."""
    return [f"{s!r} as {form!r}" for s in secret_values for form in encoded_forms(s) if form in haystack]


# -- the store behind a server --------------------------------------------------------------------------

def query(data_dir: Path, store_url: str | None, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Reads the store behind the server's back (tests only); ? placeholders."""
    if store_url is None:
        with contextlib.closing(sqlite3.connect(data_dir / "openkms.db")) as conn:
            return list(conn.execute(sql, params).fetchall())
    import psycopg

    with psycopg.connect(store_url, autocommit=True) as conn:
        return [tuple(row) for row in conn.execute(sql.replace("?", "%s"), params).fetchall()]  # type: ignore[arg-type]


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def two_nodes_on(pg_url: str, tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two serving nodes on one PostgreSQL store: the first bootstraps it, the second has its own
    data dir and a copy of the root key (as an operator sets up a second node), both with `env`."""
    from tests.conftest import bootstrap_env

    a = ServerProcess(tmp_path / "a", storage_url=pg_url, env=dict(bootstrap_env(), **env))
    with running(a):
        (tmp_path / "b").mkdir()
        shutil.copy2(tmp_path / "a" / "root.key", tmp_path / "b" / "root.key")
        b = ServerProcess(tmp_path / "b", storage_url=pg_url, env=dict(env))
        with running(b):
            yield a, b


# -- clusters, tenants and key stores ---------------------------------------------------------------------

@dataclass
class Cluster:
    """A SoftHSM token registered as an HSM cluster."""

    cluster_id: str
    label: str
    pin: str
    token_dir: Path  # the token's own directory in the session's SoftHSM token dir


@dataclass
class Tenant:
    account_id: str
    user_name: str
    access_key_id: str
    secret: str
    kms: Any


@dataclass
class KeyStore:
    cks_id: str
    name: str
    cluster: Cluster
    password: str


@dataclass
class HsmWorld:
    """One server, its operator, the session's SoftHSM and two customer CAs."""

    server: ServerProcess
    softhsm: SoftHsm
    workdir: Path
    anchor: str = field(init=False)  # the customer CA the clusters are registered with (PEM)
    anchor_file: Path = field(init=False)  # ... as a file, for `openkms admin ... file://`
    other_anchor: str = field(init=False)  # another customer's CA

    def __post_init__(self) -> None:
        for name in ("ca", "other-ca"):
            (self.workdir / name).mkdir(exist_ok=True)
        self.anchor = trust_anchor(self.workdir / "ca")
        self.anchor_file = self.workdir / "ca" / "customerCA.crt"
        self.other_anchor = trust_anchor(self.workdir / "other-ca")

    @property
    def operator(self) -> AdminClient:
        return AdminClient(self.server.endpoint, self.server.access_key_id, self.server.secret_access_key, REGION)

    def new_token(self, pin: str = PIN) -> tuple[str, Path]:
        """A fresh token; returns its label and its directory (found by diffing the token dir)."""
        before = set(os.listdir(self.softhsm.tokens))
        label = self.softhsm.init_token(pin=pin)
        added = set(os.listdir(self.softhsm.tokens)) - before
        assert len(added) == 1, f"expected one new token directory, got {added}"
        return label, self.softhsm.tokens / added.pop()

    def cluster(self, owner: Any, pin: str = PIN, anchor: str | None = None) -> Cluster:
        """A fresh token registered as a cluster for `owner` (an account id, or a KMS client of it)."""
        label, token_dir = self.new_token(pin)
        account_id = owner if isinstance(owner, str) else account_of(owner)
        cluster_id = self.operator.call("CreateHsmCluster", Pkcs11Module=self.softhsm.module, TokenLabel=label,
                                        TrustAnchorCertificate=anchor or self.anchor,
                                        AccountId=account_id)["ClusterId"]
        return Cluster(str(cluster_id), label, pin, token_dir)

    def tenant(self, *, admin: bool = False) -> Tenant:
        """A new account with one user allowed kms:* (or an account administrator)."""
        account_id = str(secrets.randbelow(9 * 10**11) + 10**11)
        op = self.operator
        op.call("CreateAccount", Name=f"hsm-{account_id}", AccountId=account_id)
        user = "app"
        op.call("CreateUser", AccountId=account_id, UserName=user, Admin=True if admin else None)
        op.call("PutUserPolicy", AccountId=account_id, UserName=user, PolicyName="kms-all",
                PolicyDocument=KMS_ALL_POLICY)
        key = op.call("CreateAccessKey", AccountId=account_id, UserName=user)["AccessKey"]
        return Tenant(account_id, user, key["AccessKeyId"], key["SecretAccessKey"],
                      self.server.client(key["AccessKeyId"], key["SecretAccessKey"], retry=False))

    def key_store(self, kms: Any, cluster: Cluster | None = None, *, password: str | None = None,
                  connect: bool = True, name: str | None = None) -> KeyStore:
        cluster = cluster or self.cluster(kms)
        name = name or "store-" + secrets.token_hex(4)
        password = password or cluster.pin
        cks_id = kms.create_custom_key_store(CustomKeyStoreName=name, CloudHsmClusterId=cluster.cluster_id,
                                             TrustAnchorCertificate=self.anchor,
                                             KeyStorePassword=password)["CustomKeyStoreId"]
        if connect:
            kms.connect_custom_key_store(CustomKeyStoreId=cks_id)
            expected = "CONNECTED" if password == cluster.pin else "FAILED"
            state = describe_store(kms, cks_id)["ConnectionState"]
            assert state == expected, f"{cks_id} is {state} after connecting, expected {expected}"
        return KeyStore(cks_id, name, cluster, password)

    def objects(self, cluster: Cluster, pin: str | None = None) -> list[TokenObject]:
        proc = self.softhsm.tool(cluster.label, pin or cluster.pin, "--list-objects", "--type", "secrkey")
        assert proc.returncode == 0, f"pkcs11-tool --list-objects failed: {proc.stderr}"
        return parse_objects(proc.stdout)

    def object_of(self, cluster: Cluster, key_arn: str) -> TokenObject:
        found = [o for o in self.objects(cluster) if o.label == key_arn]
        assert len(found) == 1, f"expected one object labelled {key_arn} in {cluster.label}, found {found}"
        return found[0]


def hsm_key(kms: Any, store: KeyStore, description: str = "hsm key") -> dict[str, Any]:
    return kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store.cks_id,  # type: ignore[no-any-return]
                          Description=description)["KeyMetadata"]


def describe_store(kms: Any, cks_id: str) -> dict[str, Any]:
    [entry] = kms.describe_custom_key_stores(CustomKeyStoreId=cks_id)["CustomKeyStores"]
    return entry  # type: ignore[no-any-return]


def key_state(kms: Any, key_id: str) -> str:
    return str(kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"])
