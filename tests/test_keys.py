"""The symmetric KMS operations through boto3 against a real server (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import ACCOUNT_ID, REGION


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return str(excinfo.value.response["Error"]["Code"])


def arn(key_id: str) -> str:
    return f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:key/{key_id}"


# -- CreateKey / DescribeKey ----------------------------------------------------------------------

def test_create_key_metadata(kms: Any) -> None:
    md = kms.create_key(Description="payroll", Tags=[{"TagKey": "team", "TagValue": "hr"}])["KeyMetadata"]
    assert md["AWSAccountId"] == ACCOUNT_ID
    assert md["Arn"] == arn(md["KeyId"])
    assert md["Description"] == "payroll"
    assert md["KeyState"] == "Enabled" and md["Enabled"] is True
    assert md["KeySpec"] == "SYMMETRIC_DEFAULT" and md["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert md["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]
    assert md["Origin"] == "AWS_KMS" and md["KeyManager"] == "CUSTOMER"
    assert abs(md["CreationDate"] - datetime.now(UTC)) < timedelta(minutes=1)
    tags = kms.list_resource_tags(KeyId=md["KeyId"])["Tags"]
    assert tags == [{"TagKey": "team", "TagValue": "hr"}]


@pytest.mark.parametrize("params,code", [
    ({"KeyUsage": "SIGN_VERIFY"}, "ValidationException"),
    ({"KeySpec": "SYMMETRIC_DEFAULT", "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT"}, "ValidationException"),
    ({"Tags": [{"TagKey": "aws:reserved", "TagValue": "x"}]}, "TagException"),
    ({"Tags": [{"TagKey": "a", "TagValue": "1"}, {"TagKey": "a", "TagValue": "2"}]}, "TagException"),
])
def test_create_key_rejects(kms: Any, params: dict[str, Any], code: str) -> None:
    with pytest.raises(ClientError) as e:
        kms.create_key(**params)
    assert error_code(e) == code


def test_describe_key_by_every_reference(kms: Any, key_id: str) -> None:
    kms.create_alias(AliasName="alias/describe-me", TargetKeyId=key_id)
    refs = [key_id, arn(key_id), "alias/describe-me", f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:alias/describe-me"]
    for ref in refs:
        assert kms.describe_key(KeyId=ref)["KeyMetadata"]["KeyId"] == key_id


@pytest.mark.parametrize("ref", [
    "00000000-0000-0000-0000-000000000000",
    "alias/does-not-exist",
    "not-a-key-id",
    f"arn:aws:kms:{REGION}:999999999999:key/00000000-0000-0000-0000-000000000000",
])
def test_describe_unknown_key(kms: Any, ref: str) -> None:
    with pytest.raises(ClientError) as e:
        kms.describe_key(KeyId=ref)
    assert error_code(e) == "NotFoundException"


def test_key_of_other_region_is_not_found(kms: Any, key_id: str) -> None:
    with pytest.raises(ClientError) as e:
        kms.describe_key(KeyId=f"arn:aws:kms:eu-west-1:{ACCOUNT_ID}:key/{key_id}")
    assert error_code(e) == "NotFoundException"


def test_list_keys_pagination(kms: Any) -> None:
    created = {kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(5)}
    seen: list[str] = []
    marker = None
    while True:
        page = kms.list_keys(Limit=2, **({"Marker": marker} if marker else {}))
        assert len(page["Keys"]) <= 2
        for k in page["Keys"]:
            assert k["KeyArn"] == arn(k["KeyId"])
        seen += [k["KeyId"] for k in page["Keys"]]
        if not page["Truncated"]:
            assert "NextMarker" not in page
            break
        marker = page["NextMarker"]
    assert created <= set(seen)
    assert len(seen) == len(set(seen))
    everything = [k["KeyId"] for k in kms.get_paginator("list_keys").paginate().build_full_result()["Keys"]]
    assert sorted(everything) == sorted(seen)


def test_list_keys_bad_marker(kms: Any) -> None:
    with pytest.raises(ClientError) as e:
        kms.list_keys(Marker="%%%not-a-marker%%%")
    assert error_code(e) == "InvalidMarkerException"


# -- Encrypt / Decrypt / ReEncrypt ----------------------------------------------------------------

def test_encrypt_decrypt_round_trip(kms: Any, key_id: str) -> None:
    for size in (1, 32, 4096):
        plaintext = os.urandom(size)
        out = kms.encrypt(KeyId=key_id, Plaintext=plaintext, EncryptionContext={"tenant": "t1", "app": "x"})
        assert out["KeyId"] == arn(key_id)
        assert out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
        if size >= 32:  # a short plaintext can occur in random bytes by chance
            assert plaintext not in out["CiphertextBlob"]
        back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"app": "x", "tenant": "t1"})
        assert back["Plaintext"] == plaintext
        assert back["KeyId"] == arn(key_id)
        assert back["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"


def test_ciphertexts_are_randomized(kms: Any, key_id: str) -> None:
    a = kms.encrypt(KeyId=key_id, Plaintext=b"same")["CiphertextBlob"]
    b = kms.encrypt(KeyId=key_id, Plaintext=b"same")["CiphertextBlob"]
    assert a != b


def test_plaintext_limits_enforced_by_server(server: Any, key_id: str) -> None:
    loose = server.client(validate=False)
    for bad in (b"", os.urandom(4097)):
        with pytest.raises(ClientError) as e:
            loose.encrypt(KeyId=key_id, Plaintext=bad)
        assert error_code(e) == "ValidationException"
        assert "plaintext" in e.value.response["Error"]["Message"]


@pytest.mark.parametrize("context", [None, {"tenant": "t2"}, {"tenant": "t1", "extra": "1"}, {"TENANT": "t1"}])
def test_wrong_encryption_context(kms: Any, key_id: str, context: dict[str, str] | None) -> None:
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"secret", EncryptionContext={"tenant": "t1"})["CiphertextBlob"]
    kwargs = {"EncryptionContext": context} if context is not None else {}
    with pytest.raises(ClientError) as e:
        kms.decrypt(CiphertextBlob=ct, **kwargs)
    assert error_code(e) == "InvalidCiphertextException"
    assert "secret" not in str(e.value)


def test_tampered_ciphertexts(kms: Any, key_id: str) -> None:
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"attack at dawn")["CiphertextBlob"]
    candidates = [ct[:-1], ct[:20], ct + b"\x00", bytes([ct[0] ^ 1]) + ct[1:], os.urandom(len(ct))]
    candidates += [ct[:i] + bytes([ct[i] ^ 0x80]) + ct[i + 1:] for i in range(0, len(ct), 5)]
    for bad in candidates:
        with pytest.raises(ClientError) as e:
            kms.decrypt(CiphertextBlob=bad)
        # Flipping a key-id byte names a key that does not exist: also InvalidCiphertext, nothing more.
        assert error_code(e) == "InvalidCiphertextException", bad.hex()
        assert e.value.response["Error"]["Message"] == "The ciphertext is invalid."


def test_decrypt_with_wrong_key_id(kms: Any, key_id: str) -> None:
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(ClientError) as e:
        kms.decrypt(CiphertextBlob=ct, KeyId=other)
    assert error_code(e) == "IncorrectKeyException"
    assert kms.decrypt(CiphertextBlob=ct, KeyId=arn(key_id))["Plaintext"] == b"x"


def test_decrypt_with_alias_key_id(kms: Any, key_id: str) -> None:
    kms.create_alias(AliasName="alias/decrypt-by-alias", TargetKeyId=key_id)
    ct = kms.encrypt(KeyId="alias/decrypt-by-alias", Plaintext=b"y")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=ct, KeyId="alias/decrypt-by-alias")["Plaintext"] == b"y"


def test_re_encrypt(kms: Any, key_id: str) -> None:
    dest = kms.create_key()["KeyMetadata"]["KeyId"]
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"move me", EncryptionContext={"a": "1"})["CiphertextBlob"]
    out = kms.re_encrypt(CiphertextBlob=ct, SourceEncryptionContext={"a": "1"}, DestinationKeyId=dest,
                         DestinationEncryptionContext={"b": "2"})
    assert out["SourceKeyId"] == arn(key_id) and out["KeyId"] == arn(dest)
    assert out["SourceEncryptionAlgorithm"] == out["DestinationEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"b": "2"})
    assert back["Plaintext"] == b"move me" and back["KeyId"] == arn(dest)
    with pytest.raises(ClientError) as e:
        kms.re_encrypt(CiphertextBlob=ct, DestinationKeyId=dest)  # source context missing
    assert error_code(e) == "InvalidCiphertextException"
    with pytest.raises(ClientError) as e:
        kms.re_encrypt(CiphertextBlob=ct, SourceEncryptionContext={"a": "1"}, SourceKeyId=dest,
                       DestinationKeyId=dest)
    assert error_code(e) == "IncorrectKeyException"


# -- data keys and random -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,length", [({"KeySpec": "AES_256"}, 32), ({"KeySpec": "AES_128"}, 16),
                                           ({"NumberOfBytes": 1}, 1), ({"NumberOfBytes": 1024}, 1024)])
def test_generate_data_key(kms: Any, key_id: str, kwargs: dict[str, Any], length: int) -> None:
    out = kms.generate_data_key(KeyId=key_id, EncryptionContext={"purpose": "dk"}, **kwargs)
    assert len(out["Plaintext"]) == length and out["KeyId"] == arn(key_id)
    back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"purpose": "dk"})
    assert back["Plaintext"] == out["Plaintext"]


def test_generate_data_key_without_plaintext(kms: Any, key_id: str) -> None:
    out = kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")
    assert "Plaintext" not in out and out["KeyId"] == arn(key_id)
    assert len(kms.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"]) == 32


@pytest.mark.parametrize("kwargs", [{}, {"KeySpec": "AES_256", "NumberOfBytes": 32}])
def test_generate_data_key_needs_exactly_one_length(kms: Any, key_id: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as e:
        kms.generate_data_key(KeyId=key_id, **kwargs)
    assert error_code(e) == "ValidationException"


def test_generate_random(server: Any, kms: Any) -> None:
    a, b = (kms.generate_random(NumberOfBytes=64)["Plaintext"] for _ in range(2))
    assert len(a) == 64 and a != b
    loose = server.client(validate=False)
    for n in (0, 1025):
        with pytest.raises(ClientError) as e:
            loose.generate_random(NumberOfBytes=n)
        assert error_code(e) == "ValidationException"


def test_dry_run(kms: Any, key_id: str) -> None:
    with pytest.raises(ClientError) as e:
        kms.encrypt(KeyId=key_id, Plaintext=b"x", DryRun=True)
    assert error_code(e) == "DryRunOperationException"


# -- key states -----------------------------------------------------------------------------------

def test_disable_enable(kms: Any, key_id: str) -> None:
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    kms.disable_key(KeyId=key_id)
    md = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert md["KeyState"] == "Disabled" and md["Enabled"] is False
    for call in (lambda: kms.encrypt(KeyId=key_id, Plaintext=b"x"),
                 lambda: kms.decrypt(CiphertextBlob=ct),
                 lambda: kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")):
        with pytest.raises(ClientError) as e:
            call()
        assert error_code(e) == "DisabledException"
    kms.disable_key(KeyId=key_id)  # idempotent
    kms.enable_key(KeyId=key_id)
    assert kms.decrypt(CiphertextBlob=ct)["Plaintext"] == b"x"


def test_schedule_and_cancel_deletion(kms: Any, key_id: str) -> None:
    ct = kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    out = kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    assert out["KeyId"] == arn(key_id) and out["KeyState"] == "PendingDeletion"
    assert out["PendingWindowInDays"] == 7
    assert timedelta(days=6, hours=23) < out["DeletionDate"] - datetime.now(UTC) <= timedelta(days=7)
    md = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert md["KeyState"] == "PendingDeletion" and md["PendingDeletionWindowInDays"] == 7
    assert md["DeletionDate"] == out["DeletionDate"]
    for call in (lambda: kms.encrypt(KeyId=key_id, Plaintext=b"x"),
                 lambda: kms.decrypt(CiphertextBlob=ct),
                 lambda: kms.enable_key(KeyId=key_id),
                 lambda: kms.schedule_key_deletion(KeyId=key_id),
                 lambda: kms.create_alias(AliasName="alias/late", TargetKeyId=key_id)):
        with pytest.raises(ClientError) as e:
            call()
        assert error_code(e) == "KMSInvalidStateException"
    assert kms.cancel_key_deletion(KeyId=key_id)["KeyId"] == arn(key_id)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    kms.enable_key(KeyId=key_id)
    assert kms.decrypt(CiphertextBlob=ct)["Plaintext"] == b"x"
    with pytest.raises(ClientError) as e:
        kms.cancel_key_deletion(KeyId=key_id)
    assert error_code(e) == "KMSInvalidStateException"


def test_schedule_deletion_default_and_window_bounds(kms: Any, key_id: str) -> None:
    for days in (6, 31):
        with pytest.raises(ClientError) as e:
            kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=days)
        assert error_code(e) == "ValidationException"
    assert kms.schedule_key_deletion(KeyId=key_id)["PendingWindowInDays"] == 30


def test_update_description(kms: Any, key_id: str) -> None:
    kms.update_key_description(KeyId=key_id, Description="new words")
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == "new words"


# -- tags -----------------------------------------------------------------------------------------

def test_tags(kms: Any, key_id: str) -> None:
    kms.tag_resource(KeyId=key_id, Tags=[{"TagKey": f"k{i:02}", "TagValue": str(i)} for i in range(5)])
    kms.tag_resource(KeyId=key_id, Tags=[{"TagKey": "k00", "TagValue": "replaced"}])
    kms.untag_resource(KeyId=key_id, TagKeys=["k04", "absent"])
    tags = kms.get_paginator("list_resource_tags").paginate(KeyId=key_id, PaginationConfig={"PageSize": 2})
    everything = tags.build_full_result()["Tags"]
    assert everything == [{"TagKey": "k00", "TagValue": "replaced"}] + [
        {"TagKey": f"k{i:02}", "TagValue": str(i)} for i in range(1, 4)]
    with pytest.raises(ClientError) as e:
        kms.tag_resource(KeyId=key_id, Tags=[{"TagKey": "aws:x", "TagValue": "y"}])
    assert error_code(e) == "TagException"
    with pytest.raises(ClientError) as e:
        kms.tag_resource(KeyId=key_id, Tags=[{"TagKey": f"many{i}", "TagValue": ""} for i in range(47)])
    assert error_code(e) == "LimitExceededException"


# -- aliases --------------------------------------------------------------------------------------

def test_alias_lifecycle(kms: Any, key_id: str) -> None:
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/app/prod", TargetKeyId=key_id)
    with pytest.raises(ClientError) as e:
        kms.create_alias(AliasName="alias/app/prod", TargetKeyId=other)
    assert error_code(e) == "AlreadyExistsException"
    ct = kms.encrypt(KeyId="alias/app/prod", Plaintext=b"v1")["CiphertextBlob"]
    kms.update_alias(AliasName="alias/app/prod", TargetKeyId=other)
    assert kms.describe_key(KeyId="alias/app/prod")["KeyMetadata"]["KeyId"] == other
    assert kms.decrypt(CiphertextBlob=ct)["Plaintext"] == b"v1"  # the blob names its own key
    listed = kms.list_aliases(KeyId=other)["Aliases"]
    assert [a["AliasName"] for a in listed] == ["alias/app/prod"]
    assert listed[0]["AliasArn"] == f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:alias/app/prod"
    assert listed[0]["TargetKeyId"] == other
    kms.delete_alias(AliasName="alias/app/prod")
    with pytest.raises(ClientError) as e:
        kms.describe_key(KeyId="alias/app/prod")
    assert error_code(e) == "NotFoundException"
    with pytest.raises(ClientError) as e:
        kms.delete_alias(AliasName="alias/app/prod")
    assert error_code(e) == "NotFoundException"


@pytest.mark.parametrize("name,code", [
    ("alias/aws/mine", "InvalidAliasNameException"),
    ("alias/aws", "InvalidAliasNameException"),
    ("noprefix", "InvalidAliasNameException"),
    ("alias/has:colon", "InvalidAliasNameException"),
])
def test_bad_alias_names(kms: Any, key_id: str, name: str, code: str) -> None:
    with pytest.raises(ClientError) as e:
        kms.create_alias(AliasName=name, TargetKeyId=key_id)
    assert error_code(e) == code


def test_alias_cannot_target_alias(kms: Any, key_id: str) -> None:
    kms.create_alias(AliasName="alias/first", TargetKeyId=key_id)
    with pytest.raises(ClientError) as e:
        kms.create_alias(AliasName="alias/second", TargetKeyId="alias/first")
    assert error_code(e) == "NotFoundException"


def test_list_aliases_pagination(kms: Any, key_id: str) -> None:
    names = {f"alias/page-{i}" for i in range(5)}
    for name in names:
        kms.create_alias(AliasName=name, TargetKeyId=key_id)
    pages = list(kms.get_paginator("list_aliases").paginate(PaginationConfig={"PageSize": 2}))
    assert all(len(p["Aliases"]) <= 2 for p in pages)
    listed = [a["AliasName"] for p in pages for a in p["Aliases"]]
    assert names <= set(listed) and len(listed) == len(set(listed))
