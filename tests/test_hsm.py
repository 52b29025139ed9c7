"""HSM key stores end to end: PKCS#11 tokens (SoftHSM2) registered by the operator as HSM clusters,
tenants' custom key stores (AWS's CloudHSM key store API) on them, and KMS keys whose material is
made, used and destroyed in the token.

Everything runs against real processes: `openkms serve` (the module-scoped `server`, on SQLite and
on PostgreSQL, and dedicated servers where a test needs its own settings), `openkms admin`, boto3,
the AWS CLI, the AWS Encryption SDK, and SoftHSM2 / OpenSC's pkcs11-tool, which look into the
token from outside the server: that the key really is a non-extractable object there, and what
happens when the token changes behind the server's back (an object deleted, the PIN changed, the
token gone and back).

Each test makes its own tokens, clusters and tenant accounts, so the tests do not depend on each
other (an account may have at most ten key stores).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import SoftHsm, bootstrap_env, run_sql
from tests.hsm_helpers import (
    CONTEXT,
    PIN,
    Cluster,
    HsmWorld,
    Tenant,
    describe_store,
    error_code,
    fails,
    hsm_key,
    key_state,
    leaks,
    query,
    running,
    two_nodes_on,
    wait_until,
)
from tests.server import ServerProcess
from tests.test_admin import AdminCli, write_credentials
from tests.test_awscli import AWS_CLI, AwsCli

CLUSTER_ID = re.compile(r"cluster-[2-7a-z]{11}")
INVALID_STATE = "KMSInvalidStateException"
STORE_STATE = "CustomKeyStoreInvalidStateException"
NOT_FOUND = "CustomKeyStoreNotFoundException"


@pytest.fixture(scope="module")
def world(server: ServerProcess, softhsm: SoftHsm, tmp_path_factory: pytest.TempPathFactory) -> HsmWorld:
    return HsmWorld(server, softhsm, tmp_path_factory.mktemp("hsm"))


@pytest.fixture
def tenant(world: HsmWorld) -> Tenant:
    return world.tenant()


# -- the operator's HSM clusters ------------------------------------------------------------------

def test_operator_manages_hsm_clusters_with_the_cli(world: HsmWorld, tenant: Tenant, tmp_path: Path) -> None:
    cli = AdminCli(world.server, [])
    label, token_dir = world.new_token()
    anchor = f"file://{world.anchor_file}"
    created = cli("create-hsm-cluster", "--pkcs11-module", world.softhsm.module, "--token-label", label,
                  "--trust-anchor-certificate", anchor, "--account-id", tenant.account_id)
    assert set(created) == {"ClusterId"} and CLUSTER_ID.fullmatch(created["ClusterId"]), created
    cluster_id = created["ClusterId"]
    described = cli("describe-hsm-cluster", "--cluster-id", cluster_id)["Cluster"]
    assert described["ClusterId"] == cluster_id
    assert described["TokenLabel"] == label and described["Pkcs11Module"] == world.softhsm.module
    assert described["TrustAnchorCertificate"] == world.anchor
    assert described["CustomKeyStoreIds"] == [] and described["AccountId"] == tenant.account_id
    assert cluster_id in {c["ClusterId"] for c in cli("list-hsm-clusters")["Clusters"]}
    # The same token under another path to the module is the same token; an unknown account is refused.
    link = tmp_path / "libsofthsm2-link.so"
    link.symlink_to(world.softhsm.module)
    cli.fails("AlreadyExistsException", "create-hsm-cluster", "--pkcs11-module", str(link), "--token-label", label,
              "--trust-anchor-certificate", anchor, "--account-id", tenant.account_id)
    cli.fails("NotFoundException", "create-hsm-cluster", "--pkcs11-module", world.softhsm.module, "--token-label",
              world.new_token()[0], "--trust-anchor-certificate", anchor, "--account-id", "999999999999")

    # What cannot be used is refused up front, with a message that says why.
    missing = tmp_path / "no-such-module.so"
    stderr = cli.fails("ValidationException", "create-hsm-cluster", "--pkcs11-module", str(missing),
                       "--token-label", label, "--trust-anchor-certificate", anchor, "--account-id", tenant.account_id)
    assert str(missing) in stderr
    stderr = cli.fails("ValidationException", "create-hsm-cluster", "--pkcs11-module", world.softhsm.module,
                       "--token-label", "no-such-token", "--trust-anchor-certificate", anchor,
                       "--account-id", tenant.account_id)
    assert "no-such-token" in stderr
    (tmp_path / "not-a-cert.txt").write_text("just some text\n")
    refused = []
    for bad in (tmp_path / "not-a-cert.txt", world.anchor_file.parent / "ca.key"):  # text; a PEM private key
        fresh, _ = world.new_token()  # a token that could be registered: only the certificate is wrong
        refused.append(fresh)
        stderr = cli.fails("ValidationException", "create-hsm-cluster", "--pkcs11-module", world.softhsm.module,
                           "--token-label", fresh, "--trust-anchor-certificate", f"file://{bad}",
                           "--account-id", tenant.account_id)
        assert "certificate" in stderr.lower()
    listed = cli("list-hsm-clusters")["Clusters"]
    assert [c["ClusterId"] for c in listed if c["TokenLabel"] in (label, *refused)] == [cluster_id]
    assert all(c["Pkcs11Module"] != str(missing) for c in listed)

    # A cluster in use by a key store cannot be deleted; once the store is gone it can.
    store = world.key_store(tenant.kms, Cluster(cluster_id, label, PIN, token_dir), connect=False)
    assert cli("describe-hsm-cluster", "--cluster-id", cluster_id)["Cluster"]["CustomKeyStoreIds"] == [store.cks_id]
    cli.fails("CloudHsmClusterInUseException", "delete-hsm-cluster", "--cluster-id", cluster_id)
    tenant.kms.delete_custom_key_store(CustomKeyStoreId=store.cks_id)
    assert cli("delete-hsm-cluster", "--cluster-id", cluster_id) == {}
    cli.fails("CloudHsmClusterNotFoundException", "describe-hsm-cluster", "--cluster-id", cluster_id)
    cli.fails("CloudHsmClusterNotFoundException", "delete-hsm-cluster", "--cluster-id", cluster_id)
    assert cluster_id not in {c["ClusterId"] for c in cli("list-hsm-clusters")["Clusters"]}
    fails("CloudHsmClusterNotFoundException", tenant.kms.create_custom_key_store, CustomKeyStoreName="gone",
          CloudHsmClusterId=cluster_id, TrustAnchorCertificate=world.anchor, KeyStorePassword=PIN)


def test_only_operators_manage_hsm_clusters(world: HsmWorld, tenant: Tenant, tmp_path: Path) -> None:
    cli = AdminCli(world.server, [])
    cluster = world.cluster(tenant.kms)
    account_admin = world.tenant(admin=True)
    label, _ = world.new_token()
    for who in (tenant, account_admin):
        creds = write_credentials(tmp_path / f"creds-{who.account_id}", who.access_key_id, who.secret)
        cli.fails("AccessDeniedException", "create-hsm-cluster", "--pkcs11-module", world.softhsm.module,
                  "--token-label", label, "--trust-anchor-certificate", f"file://{world.anchor_file}",
                  "--account-id", who.account_id, credentials=creds)
        cli.fails("AccessDeniedException", "list-hsm-clusters", credentials=creds)
        cli.fails("AccessDeniedException", "describe-hsm-cluster", "--cluster-id", cluster.cluster_id,
                  credentials=creds)
        cli.fails("AccessDeniedException", "delete-hsm-cluster", "--cluster-id", cluster.cluster_id,
                  credentials=creds)
    clusters = cli("list-hsm-clusters")["Clusters"]
    assert label not in {c["TokenLabel"] for c in clusters}
    assert cluster.cluster_id in {c["ClusterId"] for c in clusters}


# -- creating and describing key stores ---------------------------------------------------------------

def test_create_custom_key_store_checks(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    first, second = world.cluster(kms), world.cluster(kms)

    def create(name: str, cluster_id: str, anchor: str = world.anchor, password: str = PIN) -> Any:
        return kms.create_custom_key_store(CustomKeyStoreName=name, CloudHsmClusterId=cluster_id,
                                           TrustAnchorCertificate=anchor, KeyStorePassword=password)

    fails("IncorrectTrustAnchorException", create, name="wrong-ca", cluster_id=first.cluster_id,
          anchor=world.other_anchor)
    fails("CloudHsmClusterNotFoundException", create, name="no-cluster", cluster_id="cluster-aaaaaaaaaaa")
    store = create("payments", first.cluster_id)["CustomKeyStoreId"]
    assert re.fullmatch(r"cks-[0-9a-f]{17}", store), store
    fails("CustomKeyStoreNameInUseException", create, name="payments", cluster_id=second.cluster_id)
    fails("CloudHsmClusterInUseException", create, name="payments-2", cluster_id=first.cluster_id)

    # The password is the token user's PIN: 7 to 32 characters (checked by the server, not only boto3).
    raw = world.server.client(tenant.access_key_id, tenant.secret, validate=False, retry=False)
    for password in ("x" * 6, "x" * 33):
        fails("ValidationException", raw.create_custom_key_store, CustomKeyStoreName="bad-pin",
              CloudHsmClusterId=second.cluster_id, TrustAnchorCertificate=world.anchor, KeyStorePassword=password)
    listed = kms.describe_custom_key_stores()["CustomKeyStores"]
    assert {s["CustomKeyStoreName"]: s["CustomKeyStoreId"] for s in listed} == {"payments": store}

    # Names are per account: another account may use the same name, on a cluster of its own. A
    # cluster registered for one account does not exist for any other (not even unused, and with
    # the right certificate and PIN): no tenant can log in to another's token.
    other = world.tenant()
    for cluster in (first, second):
        fails("CloudHsmClusterNotFoundException", other.kms.create_custom_key_store, CustomKeyStoreName="payments",
              CloudHsmClusterId=cluster.cluster_id, TrustAnchorCertificate=world.anchor, KeyStorePassword=PIN)
    theirs = other.kms.create_custom_key_store(CustomKeyStoreName="payments",
                                               CloudHsmClusterId=world.cluster(other.kms).cluster_id,
                                               TrustAnchorCertificate=world.anchor, KeyStorePassword=PIN)
    assert theirs["CustomKeyStoreId"] != store
    theirs_id = theirs["CustomKeyStoreId"]
    fails("CloudHsmClusterNotFoundException", other.kms.update_custom_key_store, CustomKeyStoreId=theirs_id,
          CloudHsmClusterId=second.cluster_id)


def test_at_most_ten_key_stores_per_account(world: HsmWorld, tenant: Tenant) -> None:
    for i in range(10):
        world.key_store(tenant.kms, connect=False, name=f"store-{i}")
    cluster = world.cluster(tenant.kms)
    fails("LimitExceededException", tenant.kms.create_custom_key_store, CustomKeyStoreName="eleventh",
          CloudHsmClusterId=cluster.cluster_id, TrustAnchorCertificate=world.anchor, KeyStorePassword=PIN)
    assert len(tenant.kms.describe_custom_key_stores()["CustomKeyStores"]) == 10
    # Another account is not limited by this one's stores.
    world.key_store(world.tenant().kms, connect=False)


def test_describe_custom_key_stores(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    secret = "pin-" + secrets.token_hex(6)
    cluster = world.cluster(kms, pin=secret)
    store = world.key_store(kms, cluster, connect=False)
    by_id = kms.describe_custom_key_stores(CustomKeyStoreId=store.cks_id)
    [entry] = by_id["CustomKeyStores"]
    assert entry["CustomKeyStoreId"] == store.cks_id and entry["CustomKeyStoreName"] == store.name
    assert entry["CustomKeyStoreType"] == "AWS_CLOUDHSM"
    assert entry["CloudHsmClusterId"] == cluster.cluster_id
    assert entry["TrustAnchorCertificate"] == world.anchor
    assert entry["ConnectionState"] == "DISCONNECTED" and "ConnectionErrorCode" not in entry
    assert "CreationDate" in entry
    assert "KeyStorePassword" not in entry

    by_name = kms.describe_custom_key_stores(CustomKeyStoreName=store.name)["CustomKeyStores"]
    assert by_name == [entry]
    other = world.key_store(kms, connect=True)
    listed = {s["CustomKeyStoreId"]: s for s in kms.describe_custom_key_stores()["CustomKeyStores"]}
    assert set(listed) == {store.cks_id, other.cks_id}
    assert listed[other.cks_id]["ConnectionState"] == "CONNECTED" and "ConnectionErrorCode" not in listed[other.cks_id]
    for response in (by_id, kms.describe_custom_key_stores()):
        assert secret not in json.dumps(response, default=str)

    fails(NOT_FOUND, kms.describe_custom_key_stores, CustomKeyStoreId="cks-0123456789abcdef0")
    fails(NOT_FOUND, kms.describe_custom_key_stores, CustomKeyStoreName="no such store")


def test_other_accounts_cannot_see_or_use_a_key_store(world: HsmWorld, tenant: Tenant) -> None:
    store = world.key_store(tenant.kms)
    mine = hsm_key(tenant.kms, store)
    stranger = world.tenant().kms
    cks = store.cks_id
    fails(NOT_FOUND, stranger.describe_custom_key_stores, CustomKeyStoreId=cks)
    fails(NOT_FOUND, stranger.describe_custom_key_stores, CustomKeyStoreName=store.name)
    assert stranger.describe_custom_key_stores()["CustomKeyStores"] == []
    fails(NOT_FOUND, stranger.disconnect_custom_key_store, CustomKeyStoreId=cks)
    fails(NOT_FOUND, stranger.connect_custom_key_store, CustomKeyStoreId=cks)
    fails(NOT_FOUND, stranger.update_custom_key_store, CustomKeyStoreId=cks, NewCustomKeyStoreName="taken over")
    fails(NOT_FOUND, stranger.delete_custom_key_store, CustomKeyStoreId=cks)
    fails(NOT_FOUND, stranger.create_key, Origin="AWS_CLOUDHSM", CustomKeyStoreId=cks)
    fails(NOT_FOUND, stranger.generate_random, NumberOfBytes=32, CustomKeyStoreId=cks)
    # Nothing of that touched the owner's store: still connected, same name, one key.
    entry = describe_store(tenant.kms, cks)
    assert entry["ConnectionState"] == "CONNECTED" and entry["CustomKeyStoreName"] == store.name
    assert [o.label for o in world.objects(store.cluster)] == [mine["Arn"]]


# -- connection states, updates, deletion --------------------------------------------------------------

def test_connect_and_disconnect(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    store = world.key_store(kms, connect=False)
    fails(STORE_STATE, kms.disconnect_custom_key_store, CustomKeyStoreId=store.cks_id)
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    assert describe_store(kms, store.cks_id)["ConnectionState"] == "CONNECTED"
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)  # connecting a connected store: no error
    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    entry = describe_store(kms, store.cks_id)
    assert entry["ConnectionState"] == "DISCONNECTED" and "ConnectionErrorCode" not in entry
    fails(STORE_STATE, kms.disconnect_custom_key_store, CustomKeyStoreId=store.cks_id)

    # A wrong password: the login is tried at once; the call succeeds and the store shows why it failed.
    wrong = world.key_store(kms, world.cluster(kms, pin="the-real-pin"), password="not-the-pin", connect=False)
    kms.connect_custom_key_store(CustomKeyStoreId=wrong.cks_id)
    entry = describe_store(kms, wrong.cks_id)
    assert (entry["ConnectionState"], entry.get("ConnectionErrorCode")) == ("FAILED", "INVALID_CREDENTIALS")
    fails(STORE_STATE, kms.connect_custom_key_store, CustomKeyStoreId=wrong.cks_id)
    fails(STORE_STATE, kms.create_key, Origin="AWS_CLOUDHSM", CustomKeyStoreId=wrong.cks_id)
    kms.disconnect_custom_key_store(CustomKeyStoreId=wrong.cks_id)
    entry = describe_store(kms, wrong.cks_id)
    assert entry["ConnectionState"] == "DISCONNECTED" and "ConnectionErrorCode" not in entry


def test_update_custom_key_store(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    home, sibling, unrelated = world.cluster(kms), world.cluster(kms), world.cluster(kms, anchor=world.other_anchor)
    store = world.key_store(kms, home)
    taken = world.key_store(kms, connect=False)
    cks = store.cks_id

    # The password and the cluster change only while DISCONNECTED (the name also while CONNECTED).
    for change in ({"KeyStorePassword": "another-pin"}, {"CloudHsmClusterId": sibling.cluster_id},
                   {"NewCustomKeyStoreName": "renamed", "KeyStorePassword": "another-pin"}):
        fails(STORE_STATE, kms.update_custom_key_store, CustomKeyStoreId=cks, **change)
    assert describe_store(kms, cks)["CustomKeyStoreName"] == store.name
    kms.update_custom_key_store(CustomKeyStoreId=cks, NewCustomKeyStoreName="connected-rename")
    assert describe_store(kms, cks)["CustomKeyStoreName"] == "connected-rename"
    kms.disconnect_custom_key_store(CustomKeyStoreId=cks)

    kms.update_custom_key_store(CustomKeyStoreId=cks, NewCustomKeyStoreName="renamed")
    assert describe_store(kms, cks)["CustomKeyStoreName"] == "renamed"
    assert kms.describe_custom_key_stores(CustomKeyStoreName="renamed")["CustomKeyStores"][0]["CustomKeyStoreId"] == cks
    fails(NOT_FOUND, kms.describe_custom_key_stores, CustomKeyStoreName=store.name)
    fails("CustomKeyStoreNameInUseException", kms.update_custom_key_store, CustomKeyStoreId=cks,
          NewCustomKeyStoreName=taken.name)

    # Another cluster: only one with the same trust anchor (a copy of the same cluster, for AWS).
    fails("CloudHsmClusterNotRelatedException", kms.update_custom_key_store, CustomKeyStoreId=cks,
          CloudHsmClusterId=unrelated.cluster_id)
    fails("CloudHsmClusterNotFoundException", kms.update_custom_key_store, CustomKeyStoreId=cks,
          CloudHsmClusterId="cluster-aaaaaaaaaaa")
    assert describe_store(kms, cks)["CloudHsmClusterId"] == home.cluster_id
    kms.update_custom_key_store(CustomKeyStoreId=cks, CloudHsmClusterId=sibling.cluster_id)
    assert describe_store(kms, cks)["CloudHsmClusterId"] == sibling.cluster_id
    kms.connect_custom_key_store(CustomKeyStoreId=cks)
    assert describe_store(kms, cks)["ConnectionState"] == "CONNECTED"
    key = hsm_key(kms, store)
    assert key["CloudHsmClusterId"] == sibling.cluster_id
    assert [o.label for o in world.objects(sibling)] == [key["Arn"]]  # made in the new cluster's token
    assert world.objects(home) == []

    # A new password is the one the next connection logs in with.
    kms.disconnect_custom_key_store(CustomKeyStoreId=cks)
    kms.update_custom_key_store(CustomKeyStoreId=cks, KeyStorePassword="not-the-pin")
    kms.connect_custom_key_store(CustomKeyStoreId=cks)
    assert describe_store(kms, cks).get("ConnectionErrorCode") == "INVALID_CREDENTIALS"


def test_delete_custom_key_store(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    store = world.key_store(kms)
    hsm_key(kms, store)
    fails(STORE_STATE, kms.delete_custom_key_store, CustomKeyStoreId=store.cks_id)
    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    fails("CustomKeyStoreHasCMKsException", kms.delete_custom_key_store, CustomKeyStoreId=store.cks_id)
    assert describe_store(kms, store.cks_id)["CustomKeyStoreName"] == store.name

    failed = world.key_store(kms, password="not-the-pin")
    assert describe_store(kms, failed.cks_id)["ConnectionState"] == "FAILED"
    fails(STORE_STATE, kms.delete_custom_key_store, CustomKeyStoreId=failed.cks_id)

    empty = world.key_store(kms, connect=False)
    kms.delete_custom_key_store(CustomKeyStoreId=empty.cks_id)
    fails(NOT_FOUND, kms.describe_custom_key_stores, CustomKeyStoreId=empty.cks_id)
    fails(NOT_FOUND, kms.connect_custom_key_store, CustomKeyStoreId=empty.cks_id)
    # Its cluster and its name are free again in this account.
    again = world.key_store(kms, empty.cluster, name=empty.name, connect=False)
    assert again.cks_id != empty.cks_id


# -- keys in the token ----------------------------------------------------------------------------------

def test_hsm_key_is_a_non_extractable_object_in_the_token(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    store = world.key_store(kms)
    md = hsm_key(kms, store)
    assert md["Origin"] == "AWS_CLOUDHSM" and md["CustomKeyStoreId"] == store.cks_id
    assert md["CloudHsmClusterId"] == store.cluster.cluster_id
    assert md["KeySpec"] == "SYMMETRIC_DEFAULT" and md["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert md["KeyState"] == "Enabled"
    described = kms.describe_key(KeyId=md["KeyId"])["KeyMetadata"]
    assert (described["Origin"], described["CustomKeyStoreId"], described["CloudHsmClusterId"]) == \
        ("AWS_CLOUDHSM", store.cks_id, store.cluster.cluster_id)

    [obj] = world.objects(store.cluster)
    assert obj.header == "Secret Key Object; AES length 32"
    assert obj.label == md["Arn"]
    assert obj.fields["Usage"] == "encrypt, decrypt"
    assert obj.fields["Access"] == "sensitive, always sensitive, never extractable, local"
    assert re.fullmatch(r"[0-9a-f]{32}", obj.id), obj.id  # a 16-byte CKA_ID
    read = world.softhsm.tool(store.cluster.label, PIN, "--read-object", "--type", "secrkey", "--id", obj.id)
    assert read.returncode != 0 and read.stdout == "", (read.stdout, read.stderr)

    # A second key is a second object; a normal key is not in the token at all.
    second = hsm_key(kms, store)
    kms.create_key(Description="software key")
    assert sorted(o.label for o in world.objects(store.cluster)) == sorted([md["Arn"], second["Arn"]])


def test_create_key_in_a_key_store_rules(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    store = world.key_store(kms)
    for spec, usage in (("RSA_2048", "ENCRYPT_DECRYPT"), ("ECC_NIST_P256", "SIGN_VERIFY"),
                        ("HMAC_256", "GENERATE_VERIFY_MAC")):
        fails("UnsupportedOperationException", kms.create_key, Origin="AWS_CLOUDHSM",
              CustomKeyStoreId=store.cks_id, KeySpec=spec, KeyUsage=usage)
    assert world.objects(store.cluster) == []
    fails(NOT_FOUND, kms.create_key, Origin="AWS_CLOUDHSM", CustomKeyStoreId="cks-0123456789abcdef0")
    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    fails(STORE_STATE, kms.create_key, Origin="AWS_CLOUDHSM", CustomKeyStoreId=store.cks_id)
    assert world.objects(store.cluster) == []
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    md = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store.cks_id, KeySpec="SYMMETRIC_DEFAULT",
                        KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
    assert [o.label for o in world.objects(store.cluster)] == [md["Arn"]]


def test_cryptography_with_hsm_keys(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    store = world.key_store(kms)
    key, other = hsm_key(kms, store), hsm_key(kms, store)
    normal = kms.create_key(Description="software key")["KeyMetadata"]
    plaintext = os.urandom(100)

    out = kms.encrypt(KeyId=key["KeyId"], Plaintext=plaintext, EncryptionContext=CONTEXT)
    assert out["KeyId"] == key["Arn"]
    blob = out["CiphertextBlob"]
    assert plaintext not in blob
    back = kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)
    assert (back["Plaintext"], back["KeyId"]) == (plaintext, key["Arn"])
    fails("InvalidCiphertextException", kms.decrypt, CiphertextBlob=blob)
    fails("InvalidCiphertextException", kms.decrypt, CiphertextBlob=blob, EncryptionContext={"tenant": "t2"})
    for at in (len(blob) - 1, len(blob) - 16 - len(plaintext) // 2):  # the GCM tag; the sealed data
        tampered = bytearray(blob)
        tampered[at] ^= 0x01
        fails("InvalidCiphertextException", kms.decrypt, CiphertextBlob=bytes(tampered), EncryptionContext=CONTEXT)
    fails("IncorrectKeyException", kms.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT,
          KeyId=other["KeyId"])

    data_key = kms.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256", EncryptionContext=CONTEXT)
    assert len(data_key["Plaintext"]) == 32 and data_key["KeyId"] == key["Arn"]
    assert kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext=CONTEXT)["Plaintext"] == \
        data_key["Plaintext"]
    sealed_only = kms.generate_data_key_without_plaintext(KeyId=key["Arn"], NumberOfBytes=48)
    assert "Plaintext" not in sealed_only and sealed_only["KeyId"] == key["Arn"]
    assert len(kms.decrypt(CiphertextBlob=sealed_only["CiphertextBlob"])["Plaintext"]) == 48

    # ReEncrypt from the HSM key to a normal key and back, and between two HSM keys.
    to_normal = kms.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=CONTEXT,
                               DestinationKeyId=normal["KeyId"], DestinationEncryptionContext={"b": "2"})
    assert (to_normal["SourceKeyId"], to_normal["KeyId"]) == (key["Arn"], normal["Arn"])
    assert kms.decrypt(CiphertextBlob=to_normal["CiphertextBlob"], EncryptionContext={"b": "2"})["Plaintext"] == \
        plaintext
    to_hsm = kms.re_encrypt(CiphertextBlob=to_normal["CiphertextBlob"], SourceEncryptionContext={"b": "2"},
                            DestinationKeyId=other["Arn"])
    assert (to_hsm["SourceKeyId"], to_hsm["KeyId"]) == (normal["Arn"], other["Arn"])
    back = kms.decrypt(CiphertextBlob=to_hsm["CiphertextBlob"])
    assert (back["Plaintext"], back["KeyId"]) == (plaintext, other["Arn"])
    between = kms.re_encrypt(CiphertextBlob=to_hsm["CiphertextBlob"], DestinationKeyId=key["KeyId"])
    assert kms.decrypt(CiphertextBlob=between["CiphertextBlob"])["KeyId"] == key["Arn"]

    # Random bytes from the token.
    one = kms.generate_random(NumberOfBytes=32, CustomKeyStoreId=store.cks_id)["Plaintext"]
    two = kms.generate_random(NumberOfBytes=32, CustomKeyStoreId=store.cks_id)["Plaintext"]
    assert len(one) == len(two) == 32 and one != two
    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    fails(STORE_STATE, kms.generate_random, NumberOfBytes=32, CustomKeyStoreId=store.cks_id)


def test_what_aws_refuses_for_custom_key_store_keys(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    store = world.key_store(kms)
    key = hsm_key(kms, store)["KeyId"]
    unsupported = "UnsupportedOperationException"
    fails(unsupported, kms.enable_key_rotation, KeyId=key)
    fails(unsupported, kms.rotate_key_on_demand, KeyId=key)
    fails(unsupported, kms.generate_data_key_pair, KeyId=key, KeyPairSpec="ECC_NIST_P256")
    fails(unsupported, kms.generate_data_key_pair_without_plaintext, KeyId=key, KeyPairSpec="RSA_2048")
    fails(unsupported, kms.get_parameters_for_import, KeyId=key, WrappingAlgorithm="RSAES_OAEP_SHA_256",
          WrappingKeySpec="RSA_2048")
    assert kms.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"] is False
    assert len(world.objects(store.cluster)) == 1  # no second version was made


# -- clients: the AWS CLI and the AWS Encryption SDK ----------------------------------------------------

@pytest.mark.skipif(AWS_CLI is None, reason="the AWS CLI is not installed")
def test_aws_cli_with_an_hsm_key(world: HsmWorld, tenant: Tenant, tmp_path: Path) -> None:
    store = world.key_store(tenant.kms)
    aws = AwsCli(world.server, tmp_path)
    aws.env = dict(aws.base_env, AWS_ACCESS_KEY_ID=tenant.access_key_id, AWS_SECRET_ACCESS_KEY=tenant.secret)
    assert aws.text("describe-custom-key-stores", "--custom-key-store-id", store.cks_id,
                    "--query", "CustomKeyStores[0].ConnectionState") == "CONNECTED"
    md = aws.json("create-key", "--origin", "AWS_CLOUDHSM", "--custom-key-store-id", store.cks_id)["KeyMetadata"]
    assert md["Origin"] == "AWS_CLOUDHSM" and md["CustomKeyStoreId"] == store.cks_id
    assert [o.label for o in world.objects(store.cluster)] == [md["Arn"]]

    plaintext = bytes(range(256)) + os.urandom(700)
    (tmp_path / "plain.bin").write_bytes(plaintext)
    enc = aws.json("encrypt", "--key-id", md["KeyId"], "--plaintext", "fileb://plain.bin",
                   "--encryption-context", "tenant=t1,purpose=cli")
    assert enc["KeyId"] == md["Arn"]
    (tmp_path / "cipher.bin").write_bytes(base64.b64decode(enc["CiphertextBlob"]))
    proc = aws.shell("base64 -d > decrypted.bin", "decrypt", "--ciphertext-blob", "fileb://cipher.bin",
                     "--encryption-context", "tenant=t1,purpose=cli", "--query", "Plaintext", "--output", "text")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "decrypted.bin").read_bytes() == plaintext

    tenant.kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    failed = aws.run("decrypt", "--ciphertext-blob", "fileb://cipher.bin", "--encryption-context",
                     "tenant=t1,purpose=cli", check=False)
    assert failed.returncode != 0 and INVALID_STATE in failed.stderr and failed.stdout == ""


def test_encryption_sdk_with_an_hsm_key(world: HsmWorld, tenant: Tenant) -> None:
    esdk_module = pytest.importorskip("aws_encryption_sdk")
    pytest.importorskip("aws_cryptographic_material_providers")
    from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
    from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
    from aws_cryptographic_material_providers.mpl.models import CreateAwsKmsKeyringInput
    from aws_cryptographic_material_providers.smithygenerated.aws_cryptography_materialproviders.errors import (
        ServiceError,
    )
    from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError

    store = world.key_store(tenant.kms)
    arn = hsm_key(tenant.kms, store)["Arn"]
    esdk = esdk_module.EncryptionSDKClient(
        commitment_policy=esdk_module.CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    keyring = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig()).create_aws_kms_keyring(
        input=CreateAwsKmsKeyringInput(kms_key_id=arn, kms_client=tenant.kms))
    data = os.urandom(50 * 1024)
    ciphertext, header = esdk.encrypt(source=data, keyring=keyring, encryption_context=CONTEXT)
    assert data not in ciphertext
    [edk] = header.encrypted_data_keys
    assert edk.key_provider.key_info == arn.encode()
    plaintext, _ = esdk.decrypt(source=ciphertext, keyring=keyring)
    assert plaintext == data

    tenant.kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    with pytest.raises((AWSEncryptionSDKClientError, ServiceError)):  # the keyring's Decrypt was refused
        esdk.decrypt(source=ciphertext, keyring=keyring)
    tenant.kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    plaintext, _ = esdk.decrypt(source=ciphertext, keyring=keyring)
    assert plaintext == data


# -- the kill switch and a token that changes behind the server's back ----------------------------------

def _refused_everywhere(kms: Any, key: dict[str, Any], blob: bytes, normal: dict[str, Any],
                        normal_blob: bytes) -> None:
    """Every cryptographic use of `key` fails with KMSInvalidStateException."""
    fails(INVALID_STATE, kms.encrypt, KeyId=key["KeyId"], Plaintext=b"x")
    fails(INVALID_STATE, kms.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT)
    fails(INVALID_STATE, kms.generate_data_key, KeyId=key["KeyId"], KeySpec="AES_256")
    fails(INVALID_STATE, kms.generate_data_key_without_plaintext, KeyId=key["KeyId"], KeySpec="AES_256")
    fails(INVALID_STATE, kms.re_encrypt, CiphertextBlob=blob, SourceEncryptionContext=CONTEXT,
          DestinationKeyId=normal["KeyId"])
    fails(INVALID_STATE, kms.re_encrypt, CiphertextBlob=normal_blob, DestinationKeyId=key["KeyId"])


def test_disconnect_is_a_kill_switch(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    store = world.key_store(kms)
    keys = [hsm_key(kms, store), hsm_key(kms, store)]
    normal = kms.create_key(Description="software key")["KeyMetadata"]
    normal_blob = kms.encrypt(KeyId=normal["KeyId"], Plaintext=b"normal")["CiphertextBlob"]
    blobs = [kms.encrypt(KeyId=k["KeyId"], Plaintext=b"secret %d" % i, EncryptionContext=CONTEXT)["CiphertextBlob"]
             for i, k in enumerate(keys)]

    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    for key, blob in zip(keys, blobs, strict=True):
        _refused_everywhere(kms, key, blob, normal, normal_blob)
        assert key_state(kms, key["KeyId"]) == "Unavailable"
    fails(STORE_STATE, kms.generate_random, NumberOfBytes=32, CustomKeyStoreId=store.cks_id)
    assert kms.decrypt(CiphertextBlob=normal_blob)["Plaintext"] == b"normal"  # other keys are untouched
    assert key_state(kms, normal["KeyId"]) == "Enabled"

    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    for i, (key, blob) in enumerate(zip(keys, blobs, strict=True)):
        assert key_state(kms, key["KeyId"]) == "Enabled"
        assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)["Plaintext"] == b"secret %d" % i
        kms.encrypt(KeyId=key["KeyId"], Plaintext=b"again")


def test_key_object_deleted_from_the_token(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    store = world.key_store(kms)
    doomed, kept = hsm_key(kms, store), hsm_key(kms, store)
    doomed_blob = kms.encrypt(KeyId=doomed["KeyId"], Plaintext=b"doomed", EncryptionContext=CONTEXT)["CiphertextBlob"]
    kept_blob = kms.encrypt(KeyId=kept["KeyId"], Plaintext=b"kept")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=doomed_blob, EncryptionContext=CONTEXT)["Plaintext"] == b"doomed"  # cached

    obj = world.object_of(store.cluster, doomed["Arn"])
    deleted = world.softhsm.tool(store.cluster.label, PIN, "--delete-object", "--type", "secrkey", "--id", obj.id)
    assert deleted.returncode == 0, deleted.stderr
    assert [o.label for o in world.objects(store.cluster)] == [kept["Arn"]]

    fails(INVALID_STATE, kms.decrypt, CiphertextBlob=doomed_blob, EncryptionContext=CONTEXT)
    fails(INVALID_STATE, kms.encrypt, KeyId=doomed["KeyId"], Plaintext=b"x")
    assert kms.decrypt(CiphertextBlob=kept_blob)["Plaintext"] == b"kept"
    assert kms.decrypt(CiphertextBlob=kms.encrypt(KeyId=kept["KeyId"], Plaintext=b"new")["CiphertextBlob"])[
        "Plaintext"] == b"new"


def test_pin_changed_outside_the_server(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    store = world.key_store(kms)
    key = hsm_key(kms, store)
    normal = kms.create_key()["KeyMetadata"]
    normal_blob = kms.encrypt(KeyId=normal["KeyId"], Plaintext=b"normal")["CiphertextBlob"]
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"before", EncryptionContext=CONTEXT)["CiphertextBlob"]
    new_pin = "changed-" + secrets.token_hex(4)
    changed = world.softhsm.tool(store.cluster.label, PIN, "--change-pin", "--new-pin", new_pin)
    assert changed.returncode == 0, changed.stderr

    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    entry = describe_store(kms, store.cks_id)
    assert (entry["ConnectionState"], entry.get("ConnectionErrorCode")) == ("FAILED", "INVALID_CREDENTIALS")
    _refused_everywhere(kms, key, blob, normal, normal_blob)
    assert key_state(kms, key["KeyId"]) == "Unavailable"
    fails(STORE_STATE, kms.generate_random, NumberOfBytes=32, CustomKeyStoreId=store.cks_id)
    fails(STORE_STATE, kms.update_custom_key_store, CustomKeyStoreId=store.cks_id, KeyStorePassword=new_pin)

    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    kms.update_custom_key_store(CustomKeyStoreId=store.cks_id, KeyStorePassword=new_pin)
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    entry = describe_store(kms, store.cks_id)
    assert entry["ConnectionState"] == "CONNECTED" and "ConnectionErrorCode" not in entry
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)["Plaintext"] == b"before"
    kms.encrypt(KeyId=key["KeyId"], Plaintext=b"after")


def test_token_goes_away_and_comes_back(world: HsmWorld, tenant: Tenant, tmp_path: Path) -> None:
    kms = tenant.kms
    store, bystander = world.key_store(kms), world.key_store(kms)
    key, other = hsm_key(kms, store), hsm_key(kms, bystander)
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"portable", EncryptionContext=CONTEXT)["CiphertextBlob"]
    other_blob = kms.encrypt(KeyId=other["KeyId"], Plaintext=b"bystander", EncryptionContext=CONTEXT)["CiphertextBlob"]
    pid = world.server.proc.pid if world.server.proc else None

    away = tmp_path / "away"
    shutil.move(str(store.cluster.token_dir), str(away))
    try:
        fails(INVALID_STATE, kms.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT)
        fails(INVALID_STATE, kms.encrypt, KeyId=key["KeyId"], Plaintext=b"x")
        fails(INVALID_STATE, kms.generate_data_key, KeyId=key["KeyId"], KeySpec="AES_256")
        # Another store's token is not affected.
        assert kms.decrypt(CiphertextBlob=other_blob, EncryptionContext=CONTEXT)["Plaintext"] == b"bystander"
        assert describe_store(kms, store.cks_id)["ConnectionState"] == "CONNECTED"
    finally:
        shutil.move(str(away), str(store.cluster.token_dir))

    # Back: both stores serve again, without a restart and without a reconnect (a token that was
    # away is looked for again within 5 s: RETRY_AFTER).
    for what, sealed in (("the store whose token came back", blob), ("the other store", other_blob)):
        try:
            wait_until(lambda s=sealed: error_code(kms.decrypt, CiphertextBlob=s, EncryptionContext=CONTEXT) is None,
                       8, interval=0.25)
        except AssertionError:
            raise AssertionError(f"after the token came back, Decrypt through {what} still fails") from None
    kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert describe_store(kms, store.cks_id)["ConnectionState"] == "CONNECTED"
    assert world.server.proc is not None and world.server.proc.pid == pid  # no restart


def test_other_clusters_and_connections_leave_a_connected_store_alone(world: HsmWorld, tenant: Tenant) -> None:
    """What other tenants and the operator do with the same PKCS#11 module (register a token,
    connect a store, fail to log in) does not break a store that is connected and in use."""
    kms = tenant.kms
    store = world.key_store(kms)
    keys = [hsm_key(kms, store), hsm_key(kms, store)]
    blobs = [kms.encrypt(KeyId=k["KeyId"], Plaintext=b"in use", EncryptionContext=CONTEXT)["CiphertextBlob"]
             for k in keys]
    neighbour = world.tenant().kms
    neighbours_store = world.key_store(neighbour, connect=False)
    events = {
        "the operator registered a new cluster": lambda: world.cluster(neighbour),
        "another account connected a store": lambda: world.key_store(neighbour),
        "another account failed to connect a store": lambda: world.key_store(neighbour, password="not-the-pin"),
        "another account connected a store again": lambda: (
            neighbour.connect_custom_key_store(CustomKeyStoreId=neighbours_store.cks_id),
            neighbour.disconnect_custom_key_store(CustomKeyStoreId=neighbours_store.cks_id)),
    }
    for event, do in events.items():
        do()
        for key, blob in zip(keys, blobs, strict=True):
            code = error_code(kms.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT)
            assert code is None, f"after {event}: Decrypt with {key['Arn']} failed with {code}"
            code = error_code(kms.encrypt, KeyId=key["KeyId"], Plaintext=b"x")
            assert code is None, f"after {event}: Encrypt with {key['Arn']} failed with {code}"
    assert describe_store(kms, store.cks_id)["ConnectionState"] == "CONNECTED"


# -- secrets ---------------------------------------------------------------------------------------------

def test_pins_stay_out_of_logs_files_and_the_store(world: HsmWorld, tenant: Tenant) -> None:
    kms = tenant.kms
    first, second, wrong = ("pin-" + secrets.token_hex(8) for _ in range(3))
    store = world.key_store(kms, world.cluster(kms, pin=first))
    key = hsm_key(kms, store)
    kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    # A new PIN, set in the token and then in the store; and a store with a wrong one.
    assert world.softhsm.tool(store.cluster.label, first, "--change-pin", "--new-pin", second).returncode == 0
    store.cluster.pin = second
    kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    kms.update_custom_key_store(CustomKeyStoreId=store.cks_id, KeyStorePassword=second)
    kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    failed = world.key_store(kms, password=wrong)
    assert describe_store(kms, failed.cks_id)["ConnectionState"] == "FAILED"

    pins = [first, second, wrong]
    server = world.server
    assert leaks(server.output().encode(), pins) == []
    files = [p for p in server.data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "openkms.db" for p in files) or server.storage_url
    for path in files:
        assert leaks(path.read_bytes(), pins) == [], path
    if server.storage_url:
        dump = subprocess.run(["pg_dump", server.storage_url], capture_output=True, check=True, timeout=60).stdout
        assert b"custom_key_stores" in dump
        assert leaks(dump, pins) == []

    # The key's only row in the store is the CKA_ID of its object in the token.
    rows = query(server.data_dir, server.storage_url,
                 "SELECT sealed_material FROM key_versions WHERE key_id = ?", key["KeyId"])
    obj = world.object_of(store.cluster, key["Arn"])
    assert [bytes(r[0]) for r in rows] == [bytes.fromhex(obj.id)]
    assert len(bytes.fromhex(obj.id)) == 16


# -- dedicated servers: the request quota, the deletion scheduler, two nodes ------------------------

def test_each_hsm_key_store_has_a_request_quota(softhsm: SoftHsm, tmp_path: Path) -> None:
    """AWS's custom key store request quota (1,800/s for each CloudHSM key store; here 5/s through
    OPENKMS_HSM_RATE_LIMIT): the cryptographic calls of a store's keys and GenerateRandom on it count;
    past it ThrottlingException, and nothing else is held back: another store, a default-store key."""
    server = ServerProcess(tmp_path / "data", env=dict(bootstrap_env(), OPENKMS_HSM_RATE_LIMIT="5"))
    with running(server):
        world = HsmWorld(server, softhsm, tmp_path)
        kms = server.client(retry=False)  # boto3 retries a throttled call by default: not here
        store, other = world.key_store(kms), world.key_store(kms)
        key, other_key = hsm_key(kms, store), hsm_key(kms, other)
        normal = kms.create_key()["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"counted", EncryptionContext=CONTEXT)["CiphertextBlob"]
        time.sleep(1.2)  # the bucket full again: 5 calls

        calls = [lambda: kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x"),
                 lambda: kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT),
                 lambda: kms.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256"),
                 lambda: kms.generate_random(NumberOfBytes=16, CustomKeyStoreId=store.cks_id)]
        started = time.monotonic()
        outcomes = [error_code(calls[i % 4]) for i in range(16)]
        took = time.monotonic() - started
        served = outcomes.count(None)
        assert set(outcomes) == {None, "ThrottlingException"}, outcomes
        assert 5 <= served <= 5 + int(took * 5) + 1, (outcomes, took)
        assert outcomes[:5] == [None] * 5, outcomes
        message = fails("ThrottlingException", kms.encrypt, KeyId=key["KeyId"], Plaintext=b"x")
        assert "quota" in message and "5/s" in message, message
        # Another store's keys and the default store are not held back.
        assert kms.encrypt(KeyId=other_key["KeyId"], Plaintext=b"x")["KeyId"] == other_key["Arn"]
        assert kms.encrypt(KeyId=normal, Plaintext=b"x")["KeyId"].endswith(normal)
        # Management calls on the store's keys do not count.
        assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
        time.sleep(0.5)  # refilled: two or more calls a half-second
        assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)["Plaintext"] == b"counted"

        # A secret sealed under the store's key: Secrets Manager's ThrottlingException (which the
        # SDKs retry), not a DecryptionFailure.
        sm = server.client(service="secretsmanager", retry=False)
        time.sleep(1.2)
        sm.create_secret(Name="throttled", SecretString="s", KmsKeyId=key["Arn"])
        reads = [error_code(sm.get_secret_value, SecretId="throttled") for _ in range(12)]
        assert set(reads) == {None, "ThrottlingException"}, reads



def test_scheduled_deletion_destroys_the_token_object(softhsm: SoftHsm, store_url: str | None,
                                                      tmp_path: Path) -> None:
    env = dict(bootstrap_env(), OPENKMS_SCHEDULER_INTERVAL="0.5", OPENKMS_CACHE_TTL="0.5")
    server = ServerProcess(tmp_path / "data", storage_url=store_url, env=env)
    with running(server):
        world = HsmWorld(server, softhsm, tmp_path)
        kms = server.client()
        store = world.key_store(kms)
        doomed, kept = hsm_key(kms, store), hsm_key(kms, store)
        out = kms.schedule_key_deletion(KeyId=doomed["KeyId"], PendingWindowInDays=7)
        assert out["KeyState"] == "PendingDeletion"
        time.sleep(1.5)  # three runs of the scheduler: the waiting period has not ended
        assert key_state(kms, doomed["KeyId"]) == "PendingDeletion"
        assert len(world.objects(store.cluster)) == 2
        kms.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
        fails("CustomKeyStoreHasCMKsException", kms.delete_custom_key_store, CustomKeyStoreId=store.cks_id)
        kms.connect_custom_key_store(CustomKeyStoreId=store.cks_id)

        run_sql(server.data_dir, store_url, ("UPDATE kms_keys SET deletion_date = ? WHERE key_id = ?",
                                             (time.time() - 60, doomed["KeyId"])))
        wait_until(lambda: error_code(kms.describe_key, KeyId=doomed["KeyId"]) == "NotFoundException", 15)
        assert [o.label for o in world.objects(store.cluster)] == [kept["Arn"]]
        kms.encrypt(KeyId=kept["KeyId"], Plaintext=b"still here")


@pytest.fixture
def two_nodes(softhsm: SoftHsm, pg_url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with two_nodes_on(pg_url, tmp_path, {"OPENKMS_CACHE_TTL": "0.5"}) as nodes:
        yield nodes


def test_two_nodes_share_a_key_store(softhsm: SoftHsm, two_nodes: tuple[ServerProcess, ServerProcess],
                                     tmp_path: Path) -> None:
    a, b = two_nodes
    world = HsmWorld(a, softhsm, tmp_path)
    kms_a = a.client(retry=False)
    kms_b = b.client(a.access_key_id, a.secret_access_key, retry=False)
    store = world.key_store(kms_a)
    key = hsm_key(kms_a, store)
    blob = kms_a.encrypt(KeyId=key["KeyId"], Plaintext=b"shared", EncryptionContext=CONTEXT)["CiphertextBlob"]

    def b_serves() -> bool:
        return error_code(kms_b.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT) is None

    def b_refuses() -> bool:
        return error_code(kms_b.encrypt, KeyId=key["KeyId"], Plaintext=b"x") == INVALID_STATE

    # Node B opens the token itself; keys it makes are usable through A.
    wait_until(b_serves, 3)
    assert kms_b.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)["Plaintext"] == b"shared"
    made_on_b = hsm_key(kms_b, store)
    blob_b = kms_b.encrypt(KeyId=made_on_b["KeyId"], Plaintext=b"from b")["CiphertextBlob"]
    assert kms_a.decrypt(CiphertextBlob=blob_b)["Plaintext"] == b"from b"
    assert sorted(o.label for o in world.objects(store.cluster)) == sorted([key["Arn"], made_on_b["Arn"]])

    # A disconnect through A: B refuses within the cache TTL (0.5 s; 0.5 s more for the polling).
    kms_a.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    took = wait_until(b_refuses, 3)
    assert took <= 1.0, f"node B still served {took:.2f} s after the disconnect"
    fails(INVALID_STATE, kms_b.decrypt, CiphertextBlob=blob, EncryptionContext=CONTEXT)
    assert key_state(kms_b, key["KeyId"]) == "Unavailable"
    assert describe_store(kms_b, store.cks_id)["ConnectionState"] == "DISCONNECTED"

    # Connected again through A: B serves again within the TTL.
    kms_a.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    took = wait_until(b_serves, 3)
    assert took <= 1.0, f"node B still refused {took:.2f} s after the connect"
    assert key_state(kms_b, key["KeyId"]) == "Enabled"


def test_two_nodes_follow_a_move_to_another_cluster(softhsm: SoftHsm, two_nodes: tuple[ServerProcess, ServerProcess],
                                                    tmp_path: Path) -> None:
    a, b = two_nodes
    world = HsmWorld(a, softhsm, tmp_path)
    kms_a = a.client(retry=False)
    kms_b = b.client(a.access_key_id, a.secret_access_key, retry=False)
    home, sibling = world.cluster(kms_a), world.cluster(kms_a)
    store = world.key_store(kms_a, home)
    old = hsm_key(kms_a, store)
    wait_until(lambda: error_code(kms_b.encrypt, KeyId=old["KeyId"], Plaintext=b"x") is None, 3)  # B uses `home`

    # Through A: the store moves to the sibling cluster (same trust anchor, same PIN).
    kms_a.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    wait_until(lambda: error_code(kms_b.encrypt, KeyId=old["KeyId"], Plaintext=b"x") == INVALID_STATE, 3)
    kms_a.update_custom_key_store(CustomKeyStoreId=store.cks_id, CloudHsmClusterId=sibling.cluster_id)
    kms_a.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    moved = hsm_key(kms_a, store)
    assert [o.label for o in world.objects(sibling)] == [moved["Arn"]]
    time.sleep(1.0)  # twice the cache TTL

    # B must use the sibling's token now: the new key works there, and B's new keys are made there.
    try:
        kms_b.encrypt(KeyId=moved["KeyId"], Plaintext=b"x")
    except ClientError as exc:
        pytest.fail(f"node B cannot use a key of the moved store: {exc.response['Error']}")
    made_on_b = hsm_key(kms_b, store)
    assert made_on_b["CloudHsmClusterId"] == sibling.cluster_id
    assert sorted(o.label for o in world.objects(sibling)) == sorted([moved["Arn"], made_on_b["Arn"]])
    assert [o.label for o in world.objects(home)] == [old["Arn"]]


def test_two_nodes_follow_a_new_password(softhsm: SoftHsm, two_nodes: tuple[ServerProcess, ServerProcess],
                                         tmp_path: Path) -> None:
    a, b = two_nodes
    world = HsmWorld(a, softhsm, tmp_path)
    kms_a = a.client(retry=False)
    kms_b = b.client(a.access_key_id, a.secret_access_key, retry=False)
    store = world.key_store(kms_a)
    key = hsm_key(kms_a, store)
    wait_until(lambda: error_code(kms_b.encrypt, KeyId=key["KeyId"], Plaintext=b"x") is None, 3)

    # The token's PIN changes; the store is given the new one through A.
    new_pin = "rotated-" + secrets.token_hex(4)
    assert world.softhsm.tool(store.cluster.label, PIN, "--change-pin", "--new-pin", new_pin).returncode == 0
    kms_a.disconnect_custom_key_store(CustomKeyStoreId=store.cks_id)
    kms_a.update_custom_key_store(CustomKeyStoreId=store.cks_id, KeyStorePassword=new_pin)
    kms_a.connect_custom_key_store(CustomKeyStoreId=store.cks_id)
    assert describe_store(kms_a, store.cks_id)["ConnectionState"] == "CONNECTED"
    time.sleep(1.0)  # twice the cache TTL: B has seen the change
    kms_b.encrypt(KeyId=key["KeyId"], Plaintext=b"x")

    # B logs in to the token afresh (another store connects through B, which re-opens the module's
    # sessions): it must log in with the new PIN, and the store stays CONNECTED for everyone.
    world.key_store(kms_b)
    code = error_code(kms_b.encrypt, KeyId=key["KeyId"], Plaintext=b"x")
    entry = describe_store(kms_a, store.cks_id)
    assert (entry["ConnectionState"], entry.get("ConnectionErrorCode")) == ("CONNECTED", None), \
        f"node B's Encrypt: {code}; the store: {entry['ConnectionState']} {entry.get('ConnectionErrorCode')}"
    assert code is None
    kms_a.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
