"""The service in-process, over SQLite and the memory key store: what a change does at once on this
node (the caches follow commits), states, rotation and deletion on a moved clock, grants and
aliases. The same behaviour is tested end to end through a server elsewhere; this layer is fast."""

from __future__ import annotations

import json

import pytest

from openkms.errors import (
    AccessDeniedException,
    DisabledException,
    InvalidCiphertextException,
    KMSInvalidStateException,
    NotFoundException,
    UnsupportedOperationException,
)
from openkms.service import run_scheduled_work
from tests.unit.service.conftest import ACCOUNT, Service

KMS_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]})


def test_encrypt_decrypt_round_trip(svc: Service) -> None:
    key = svc.key(Description="orders")
    out = svc("Encrypt", KeyId=key["KeyId"], Plaintext=b"data", EncryptionContext={"t": "1"})
    assert out["KeyId"] == key["Arn"]
    assert svc("Decrypt", CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"t": "1"})["Plaintext"] == b"data"
    with pytest.raises(InvalidCiphertextException):
        svc("Decrypt", CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"t": "2"})


def test_a_change_is_seen_at_once_by_every_cache_of_the_node(svc: Service) -> None:
    key_id = svc.key()["KeyId"]
    svc("Encrypt", KeyId=key_id, Plaintext=b"x")  # warms the key cache
    svc("DisableKey", KeyId=key_id)
    with pytest.raises(DisabledException):
        svc("Encrypt", KeyId=key_id, Plaintext=b"x")
    svc("EnableKey", KeyId=key_id)
    svc("Encrypt", KeyId=key_id, Plaintext=b"x")
    # Aliases: made, moved and deleted, each seen by the next lookup.
    other = svc.key()["KeyId"]
    svc("CreateAlias", AliasName="alias/app", TargetKeyId=key_id)
    assert svc("Encrypt", KeyId="alias/app", Plaintext=b"x")["KeyId"].endswith(key_id)
    svc("UpdateAlias", AliasName="alias/app", TargetKeyId=other)
    assert svc("Encrypt", KeyId="alias/app", Plaintext=b"x")["KeyId"].endswith(other)
    svc("DeleteAlias", AliasName="alias/app")
    with pytest.raises(NotFoundException):
        svc("Encrypt", KeyId="alias/app", Plaintext=b"x")
    # Identity policies and grants: a user is refused, allowed by a grant, refused once it is revoked.
    app = svc.user(ACCOUNT, "app")
    with pytest.raises(AccessDeniedException):
        svc("Encrypt", app, KeyId=key_id, Plaintext=b"x")
    grant = svc("CreateGrant", KeyId=key_id, GranteePrincipal=f"arn:aws:iam::{ACCOUNT}:user/app",
                Operations=["Encrypt"])
    svc("Encrypt", app, KeyId=key_id, Plaintext=b"x")
    svc("RevokeGrant", KeyId=key_id, GrantId=grant["GrantId"])
    with pytest.raises(AccessDeniedException):
        svc("Encrypt", app, KeyId=key_id, Plaintext=b"x")
    svc.node.accounts.put_user_policy(ACCOUNT, "app", "kms", KMS_ALL)
    svc("Encrypt", app, KeyId=key_id, Plaintext=b"x")
    svc.node.accounts.delete_user_policy(ACCOUNT, "app", "kms")
    with pytest.raises(AccessDeniedException):
        svc("Encrypt", app, KeyId=key_id, Plaintext=b"x")
    # Tags that a policy condition reads.
    tagged = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:Encrypt",
                         "Resource": "*", "Condition": {"StringEquals": {"aws:ResourceTag/team": "a"}}}]})
    svc.node.accounts.put_user_policy(ACCOUNT, "app", "tagged", tagged)
    with pytest.raises(AccessDeniedException):
        svc("Encrypt", app, KeyId=key_id, Plaintext=b"x")
    svc("TagResource", KeyId=key_id, Tags=[{"TagKey": "team", "TagValue": "a"}])
    svc("Encrypt", app, KeyId=key_id, Plaintext=b"x")
    svc("UntagResource", KeyId=key_id, TagKeys=["team"])
    with pytest.raises(AccessDeniedException):
        svc("Encrypt", app, KeyId=key_id, Plaintext=b"x")


def test_rotation_on_a_moved_clock(svc: Service) -> None:
    key_id = svc.key()["KeyId"]
    old = svc("Encrypt", KeyId=key_id, Plaintext=b"before")["CiphertextBlob"]
    svc("EnableKeyRotation", KeyId=key_id, RotationPeriodInDays=90)
    assert run_scheduled_work(svc.node.service)["rotated"] == []
    svc.clock.advance(days=91)
    assert run_scheduled_work(svc.node.service)["rotated"] == [key_id]
    rotations = svc("ListKeyRotations", KeyId=key_id)["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["AUTOMATIC"]
    assert svc("Decrypt", CiphertextBlob=old)["Plaintext"] == b"before"
    new = svc("Encrypt", KeyId=key_id, Plaintext=b"after")["CiphertextBlob"]
    assert new[17:21] == (2).to_bytes(4, "big")  # the blob names version 2


def test_scheduled_deletion_destroys_the_material(svc: Service) -> None:
    key = svc.key()
    ct = svc("Encrypt", KeyId=key["KeyId"], Plaintext=b"gone soon")["CiphertextBlob"]
    svc("CreateAlias", AliasName="alias/doomed", TargetKeyId=key["KeyId"])
    svc("ScheduleKeyDeletion", KeyId=key["KeyId"], PendingWindowInDays=7)
    with pytest.raises(KMSInvalidStateException):
        svc("Decrypt", CiphertextBlob=ct)
    svc.clock.advance(days=6)
    assert run_scheduled_work(svc.node.service)["deleted"] == []
    svc.clock.advance(days=2)
    assert run_scheduled_work(svc.node.service)["deleted"] == [key["KeyId"]]
    with pytest.raises(NotFoundException):
        svc("DescribeKey", KeyId=key["KeyId"])
    with pytest.raises(NotFoundException):
        svc("DescribeKey", KeyId="alias/doomed")
    with pytest.raises(InvalidCiphertextException):
        svc("Decrypt", CiphertextBlob=ct)
    # The memory key store no longer holds the material at all.
    store = svc.node.service.keystores.default
    assert not any(k[0] == key["KeyId"] for k in store._material)  # type: ignore[attr-defined]


def test_the_memory_store_offers_symmetric_keys_only(svc: Service) -> None:
    with pytest.raises(UnsupportedOperationException):
        svc.key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    with pytest.raises(UnsupportedOperationException):  # it cannot import
        svc.key(Origin="EXTERNAL")


def test_a_grant_cannot_widen_itself(svc: Service) -> None:
    key_id = svc.key()["KeyId"]
    holder = svc.user(ACCOUNT, "holder")
    arn = f"arn:aws:iam::{ACCOUNT}:user/holder"
    svc("CreateGrant", KeyId=key_id, GranteePrincipal=arn, Operations=["CreateGrant", "Decrypt"],
        Constraints={"EncryptionContextEquals": {"t": "1"}})
    with pytest.raises(AccessDeniedException):
        svc("CreateGrant", holder, KeyId=f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key_id}", GranteePrincipal=arn,
            Operations=["Decrypt"])
    svc("CreateGrant", holder, KeyId=f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key_id}", GranteePrincipal=arn,
        Operations=["Decrypt"], Constraints={"EncryptionContextEquals": {"t": "1"}})
