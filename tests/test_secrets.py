"""The Secrets Manager API of a real server, end to end: boto3 (and a few `aws secretsmanager` commands)
against `openkms serve` on SQLite and on PostgreSQL, with no mocks.

Covered, as AWS documents its behaviour (/work/shared/REFERENCE.md, README "Secrets"): names, ARNs and
the three ways to name a secret; versions and staging labels; ClientRequestToken idempotency; deletion
with a recovery window, restore and forced deletion; value limits; ListSecrets filters and paging; tags;
responses that carry only the members that have a value; encryption under the AWS managed key or a
customer key, and the kill switch (a disabled key makes its secrets unreadable and unwritable);
resource policies and cross-account reads; GetRandomPassword (with a hypothesis property); malformed and
unauthenticated requests (never a 5xx); secret values that never reach the store, the log or the audit
log in the clear; and the AWS CLI.

Each test makes secrets of its own (unique names), so they share one server per store.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openkms.client.admin import AdminClient
from tests.conftest import ACCOUNT_ID, REGION
from tests.server import ServerProcess

ARN_PREFIX = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT_ID}:secret:"
MARKED = "You can't perform this operation on the secret because it was marked for deletion."
JSON_11 = "application/x-amz-json-1.1"
MAX_VALUE = 65536


# -- helpers ----------------------------------------------------------------------------------------
def unique(prefix: str = "t") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def error_of(fn: Callable[..., Any], **params: Any) -> ClientError:
    with pytest.raises(ClientError) as caught:
        fn(**params)
    return caught.value


def expect_error(code: str, fn: Callable[..., Any], **params: Any) -> str:
    """The call fails with `code` and HTTP 400 (every Secrets Manager client error); its message."""
    err = error_of(fn, **params)
    assert err.response["Error"]["Code"] == code, err.response["Error"]
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 400, err.response["ResponseMetadata"]
    return str(err.response["Error"]["Message"])


def version_ids(sm: Any, secret_id: str, include_deprecated: bool = False) -> dict[str, list[str]]:
    """version id -> its staging labels ([] for a deprecated version), from ListSecretVersionIds."""
    versions = sm.list_secret_version_ids(SecretId=secret_id, IncludeDeprecated=include_deprecated)["Versions"]
    return {v["VersionId"]: sorted(v.get("VersionStages", [])) for v in versions}


def stages(sm: Any, secret_id: str) -> dict[str, list[str]]:
    return {v: sorted(s) for v, s in sm.describe_secret(SecretId=secret_id)["VersionIdsToStages"].items()}


def value_of(sm: Any, secret_id: str, **params: Any) -> str:
    return str(sm.get_secret_value(SecretId=secret_id, **params)["SecretString"])


def listed_names(sm: Any, **params: Any) -> list[str]:
    """Every name ListSecrets gives (following NextToken), in order."""
    names: list[str] = []
    token = None
    while True:
        page = sm.list_secrets(**params, **({"NextToken": token} if token else {}))
        names += [s["Name"] for s in page["SecretList"]]
        token = page.get("NextToken")
        if not token:
            return names


def admin_of(server: ServerProcess) -> AdminClient:
    return AdminClient(server.endpoint, server.access_key_id, server.secret_access_key, REGION)


def policy_doc(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(actions: str | list[str], principal: Any = None, **extra: Any) -> dict[str, Any]:
    statement: dict[str, Any] = {"Effect": "Allow", "Action": actions, "Resource": "*", **extra}
    if principal is not None:
        statement["Principal"] = principal
    return statement


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sm(server: ServerProcess) -> Any:
    """Secrets Manager through boto3; no retries, so that a 5xx is seen as it is."""
    return server.client(service="secretsmanager", retry=False)


@pytest.fixture(scope="module")
def raw_sm(server: ServerProcess) -> Any:
    """Without botocore's parameter validation, to send what the model forbids."""
    return server.client(service="secretsmanager", validate=False, retry=False)


@pytest.fixture(scope="module")
def kms(server: ServerProcess) -> Any:
    return server.client(retry=False)


@dataclass
class Person:
    arn: str
    sm: Any
    kms: Any


def person(server: ServerProcess, admin: AdminClient, account_id: str, name: str, *, is_admin: bool = False,
           policy: str | None = None) -> Person:
    """A user of `account_id` (made through the admin API) with an access key and clients."""
    user = f"{name}-{secrets.token_hex(3)}"
    admin.call("CreateUser", AccountId=account_id, UserName=user, Admin=is_admin or None)
    if policy:
        admin.call("PutUserPolicy", AccountId=account_id, UserName=user, PolicyName="p", PolicyDocument=policy)
    key = admin.call("CreateAccessKey", AccountId=account_id, UserName=user)["AccessKey"]
    return Person(f"arn:aws:iam::{account_id}:user/{user}",
                  server.client(key["AccessKeyId"], key["SecretAccessKey"], service="secretsmanager", retry=False),
                  server.client(key["AccessKeyId"], key["SecretAccessKey"], retry=False))


@dataclass
class OtherAccount:
    account_id: str
    admin: Person   # the account's administrator
    reader: Person  # identity policy: secretsmanager:* and kms:Decrypt
    kms_only: Person  # identity policy: kms:* and nothing of Secrets Manager


@pytest.fixture(scope="module")
def account_b(server: ServerProcess) -> OtherAccount:
    admin = admin_of(server)
    account_id = str(secrets.randbelow(9 * 10**11) + 10**11)
    admin.call("CreateAccount", Name="secrets-b", AccountId=account_id)
    return OtherAccount(
        account_id,
        person(server, admin, account_id, "b-admin", is_admin=True),
        person(server, admin, account_id, "b-reader", policy=policy_doc(
            allow("secretsmanager:*"), allow(["kms:Decrypt", "kms:DescribeKey"]))),
        person(server, admin, account_id, "b-kms", policy=policy_doc(allow("kms:*"))))


# -- 1. names and ARNs ------------------------------------------------------------------------------
def test_create_string_and_binary_and_read_by_name_arn_and_partial_arn(sm: Any) -> None:
    name = unique("app")
    made = sm.create_secret(Name=name, SecretString="string value")
    assert made["Name"] == name
    assert re.fullmatch(re.escape(ARN_PREFIX + name) + r"-[A-Za-z0-9]{6}", made["ARN"]), made["ARN"]
    uuid.UUID(made["VersionId"])
    partial = ARN_PREFIX + name
    for secret_id in (name, made["ARN"], partial):
        got = sm.get_secret_value(SecretId=secret_id)
        assert (got["ARN"], got["Name"], got["VersionId"]) == (made["ARN"], name, made["VersionId"]), secret_id
        assert got["SecretString"] == "string value" and "SecretBinary" not in got, secret_id
        assert got["VersionStages"] == ["AWSCURRENT"], secret_id
        assert sm.describe_secret(SecretId=secret_id)["ARN"] == made["ARN"], secret_id
    # An ARN whose suffix is wrong, or cut short, names no secret.
    expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId=partial + "-AbCdEf")
    expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId=made["ARN"][:-2])

    blob = bytes(range(256)) + b"\x00\xff"
    binary = sm.create_secret(Name=name + "-bin", SecretBinary=blob)
    assert binary["ARN"].startswith(ARN_PREFIX + name + "-bin-") and binary["ARN"] != made["ARN"]
    got = sm.get_secret_value(SecretId=binary["ARN"])
    assert got["SecretBinary"] == blob and "SecretString" not in got


def test_a_recreated_name_gets_a_new_arn_suffix(sm: Any) -> None:
    name = unique("again")
    first = sm.create_secret(Name=name, SecretString="first")
    sm.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
    second = sm.create_secret(Name=name, SecretString="second")
    assert second["ARN"] != first["ARN"]
    assert second["ARN"][:-6] == first["ARN"][:-6] == ARN_PREFIX + name + "-"
    # The old ARN never names the new secret; the name and the partial ARN do.
    expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId=first["ARN"])
    assert value_of(sm, name) == value_of(sm, ARN_PREFIX + name) == value_of(sm, second["ARN"]) == "second"


# -- 2. versions and staging labels -----------------------------------------------------------------
def test_put_secret_value_moves_awscurrent_and_awsprevious(sm: Any) -> None:
    name = unique("versions")
    v1 = sm.create_secret(Name=name, SecretString="one")["VersionId"]
    put = sm.put_secret_value(SecretId=name, SecretString="two")
    v2 = put["VersionId"]
    assert v2 != v1 and put["VersionStages"] == ["AWSCURRENT"] and put["Name"] == name
    assert stages(sm, name) == {v1: ["AWSPREVIOUS"], v2: ["AWSCURRENT"]}
    assert value_of(sm, name) == "two"
    assert value_of(sm, name, VersionStage="AWSPREVIOUS") == "one"
    assert value_of(sm, name, VersionId=v1) == "one"
    got = sm.get_secret_value(SecretId=name, VersionId=v1)
    assert got["VersionId"] == v1 and got["VersionStages"] == ["AWSPREVIOUS"]

    v3 = sm.put_secret_value(SecretId=name, SecretString="three")["VersionId"]
    assert stages(sm, name) == {v2: ["AWSPREVIOUS"], v3: ["AWSCURRENT"]}
    # v1 lost its last label: deprecated, listed only with IncludeDeprecated, still readable by id.
    assert version_ids(sm, name) == {v2: ["AWSPREVIOUS"], v3: ["AWSCURRENT"]}
    assert version_ids(sm, name, include_deprecated=True) == {v1: [], v2: ["AWSPREVIOUS"], v3: ["AWSCURRENT"]}
    assert value_of(sm, name, VersionId=v1) == "one"
    assert value_of(sm, name, VersionStage="AWSPREVIOUS") == "two"
    expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId=name, VersionId=str(uuid.uuid4()))
    expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId=name, VersionStage="NO-SUCH-LABEL")


def test_update_secret_version_stage(sm: Any) -> None:
    name = unique("labels")
    v1 = sm.create_secret(Name=name, SecretString="one")["VersionId"]
    v2 = sm.put_secret_value(SecretId=name, SecretString="two")["VersionId"]
    # AWSCURRENT is on v2: moving it needs RemoveFromVersionId naming v2.
    message = expect_error("InvalidParameterException", sm.update_secret_version_stage, SecretId=name,
                           VersionStage="AWSCURRENT", MoveToVersionId=v1)
    assert v2 in message and "RemoveFromVersionId" in message
    expect_error("InvalidParameterException", sm.update_secret_version_stage, SecretId=name,
                 VersionStage="AWSCURRENT", MoveToVersionId=v1, RemoveFromVersionId=v1)
    assert stages(sm, name) == {v1: ["AWSPREVIOUS"], v2: ["AWSCURRENT"]}
    sm.update_secret_version_stage(SecretId=name, VersionStage="AWSCURRENT", MoveToVersionId=v1,
                                   RemoveFromVersionId=v2)
    assert stages(sm, name) == {v1: ["AWSCURRENT"], v2: ["AWSPREVIOUS"]}  # AWSPREVIOUS followed
    assert value_of(sm, name) == "one"
    # AWSCURRENT cannot just be taken off.
    expect_error("InvalidParameterException", sm.update_secret_version_stage, SecretId=name,
                 VersionStage="AWSCURRENT", RemoveFromVersionId=v1)
    expect_error("ResourceNotFoundException", sm.update_secret_version_stage, SecretId=name,
                 VersionStage="blue", MoveToVersionId=str(uuid.uuid4()))

    # A custom label: on a version, moved (RemoveFromVersionId needed), removed.
    sm.update_secret_version_stage(SecretId=name, VersionStage="blue", MoveToVersionId=v2)
    assert stages(sm, name) == {v1: ["AWSCURRENT"], v2: ["AWSPREVIOUS", "blue"]}
    assert value_of(sm, name, VersionStage="blue") == "two"
    expect_error("InvalidParameterException", sm.update_secret_version_stage, SecretId=name,
                 VersionStage="blue", MoveToVersionId=v1)
    sm.update_secret_version_stage(SecretId=name, VersionStage="blue", MoveToVersionId=v1, RemoveFromVersionId=v2)
    assert stages(sm, name) == {v1: ["AWSCURRENT", "blue"], v2: ["AWSPREVIOUS"]}
    sm.update_secret_version_stage(SecretId=name, VersionStage="blue", RemoveFromVersionId=v1)
    assert stages(sm, name) == {v1: ["AWSCURRENT"], v2: ["AWSPREVIOUS"]}
    expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId=name, VersionStage="blue")

    # AWSPENDING through PutSecretValue: AWSCURRENT stays where it is.
    pending = sm.put_secret_value(SecretId=name, SecretString="next", VersionStages=["AWSPENDING"])
    assert pending["VersionStages"] == ["AWSPENDING"]
    v3 = pending["VersionId"]
    assert stages(sm, name) == {v1: ["AWSCURRENT"], v2: ["AWSPREVIOUS"], v3: ["AWSPENDING"]}
    assert value_of(sm, name) == "one"
    assert value_of(sm, name, VersionStage="AWSPENDING") == "next"
    # Promoting the pending version: AWSCURRENT moves, AWSPREVIOUS follows it.
    sm.update_secret_version_stage(SecretId=name, VersionStage="AWSCURRENT", MoveToVersionId=v3,
                                   RemoveFromVersionId=v1)
    assert stages(sm, name) == {v1: ["AWSPREVIOUS"], v3: ["AWSCURRENT", "AWSPENDING"]}
    assert version_ids(sm, name, include_deprecated=True)[v2] == []


# -- 3. ClientRequestToken --------------------------------------------------------------------------
def test_client_request_token_is_idempotent(sm: Any) -> None:
    name = unique("token")
    token = str(uuid.uuid4())
    made = sm.create_secret(Name=name, SecretString="v0", ClientRequestToken=token)
    assert made["VersionId"] == token
    # The same CreateSecret again (a retry) answers the same secret; another value does not.
    again = sm.create_secret(Name=name, SecretString="v0", ClientRequestToken=token)
    assert (again["ARN"], again["VersionId"]) == (made["ARN"], token)
    expect_error("ResourceExistsException", sm.create_secret, Name=name, SecretString="v0-other",
                 ClientRequestToken=token)

    put_token = str(uuid.uuid4())
    first = sm.put_secret_value(SecretId=name, SecretString="v1", ClientRequestToken=put_token)
    assert first["VersionId"] == put_token
    before = version_ids(sm, name, include_deprecated=True)
    second = sm.put_secret_value(SecretId=name, SecretString="v1", ClientRequestToken=put_token)
    assert second["VersionId"] == put_token and second["VersionStages"] == ["AWSCURRENT"]
    assert version_ids(sm, name, include_deprecated=True) == before  # no new version, no label moved
    assert len(before) == 2
    expect_error("ResourceExistsException", sm.put_secret_value, SecretId=name, SecretString="v1-changed",
                 ClientRequestToken=put_token)
    expect_error("ResourceExistsException", sm.put_secret_value, SecretId=name, SecretBinary=b"v1",
                 ClientRequestToken=put_token)
    assert version_ids(sm, name, include_deprecated=True) == before
    assert value_of(sm, name) == "v1"
    assert value_of(sm, name, VersionStage="AWSPREVIOUS") == "v0"


# -- 4. deletion ------------------------------------------------------------------------------------
def test_recovery_window_must_be_7_to_30_days(sm: Any) -> None:
    name = unique("window")
    sm.create_secret(Name=name, SecretString="keep")
    for days in (0, 6, 31, 365):
        message = expect_error("InvalidParameterException", sm.delete_secret, SecretId=name,
                               RecoveryWindowInDays=days)
        assert "7" in message and "30" in message
    expect_error("InvalidParameterException", sm.delete_secret, SecretId=name, RecoveryWindowInDays=7,
                 ForceDeleteWithoutRecovery=True)
    assert value_of(sm, name) == "keep"
    assert "DeletedDate" not in sm.describe_secret(SecretId=name)
    seven = sm.delete_secret(SecretId=name, RecoveryWindowInDays=7)["DeletionDate"]
    assert abs(seven - (datetime.now(UTC) + timedelta(days=7))) < timedelta(minutes=5)


def test_a_secret_marked_for_deletion(sm: Any) -> None:
    name = unique("marked")
    made = sm.create_secret(Name=name, SecretString="soon gone", Description="to delete")
    other = unique("marked-neighbour")
    sm.create_secret(Name=other)
    deleted = sm.delete_secret(SecretId=name)
    assert (deleted["ARN"], deleted["Name"]) == (made["ARN"], name)
    assert abs(deleted["DeletionDate"] - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=5)

    refused: list[tuple[Callable[..., Any], dict[str, Any]]] = [
        (sm.get_secret_value, {}), (sm.put_secret_value, {"SecretString": "new"}),
        (sm.update_secret, {"Description": "changed"}), (sm.tag_resource, {"Tags": [{"Key": "k", "Value": "v"}]}),
        (sm.untag_resource, {"TagKeys": ["k"]}), (sm.list_secret_version_ids, {}),
        (sm.update_secret_version_stage, {"VersionStage": "blue", "MoveToVersionId": made["VersionId"]}),
        (sm.put_resource_policy, {"ResourcePolicy": policy_doc(allow(
            "secretsmanager:GetSecretValue", {"AWS": f"arn:aws:iam::{ACCOUNT_ID}:root"}))}),
        (sm.delete_secret, {"RecoveryWindowInDays": 7})]
    for fn, params in refused:
        for secret_id in (name, made["ARN"]):
            assert expect_error("InvalidRequestException", fn, SecretId=secret_id, **params) == MARKED, fn
    message = expect_error("InvalidRequestException", sm.create_secret, Name=name, SecretString="x")
    assert "scheduled for deletion" in message

    described = sm.describe_secret(SecretId=name)
    assert described["DeletedDate"] == deleted["DeletionDate"]
    assert described["Description"] == "to delete"  # nothing above changed it
    assert name not in listed_names(sm, Filters=[{"Key": "name", "Values": [name]}])
    assert other in listed_names(sm, Filters=[{"Key": "name", "Values": [other]}])
    assert name in listed_names(sm, IncludePlannedDeletion=True, Filters=[{"Key": "name", "Values": [name]}])
    assert name not in listed_names(sm)
    assert name in listed_names(sm, IncludePlannedDeletion=True)

    restored = sm.restore_secret(SecretId=name)
    assert (restored["ARN"], restored["Name"]) == (made["ARN"], name)
    assert "DeletedDate" not in sm.describe_secret(SecretId=name)
    assert value_of(sm, name) == "soon gone"
    assert name in listed_names(sm, Filters=[{"Key": "name", "Values": [name]}])
    sm.put_secret_value(SecretId=name, SecretString="back")
    assert value_of(sm, name) == "back"


def test_force_delete_without_recovery(sm: Any) -> None:
    name = unique("force")
    made = sm.create_secret(Name=name, SecretString="bye")
    answer = sm.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
    assert (answer["ARN"], answer["Name"]) == (made["ARN"], name)
    assert abs(answer["DeletionDate"] - datetime.now(UTC)) < timedelta(minutes=5)
    for secret_id in (name, made["ARN"]):
        expect_error("ResourceNotFoundException", sm.describe_secret, SecretId=secret_id)
        expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId=secret_id)
        expect_error("ResourceNotFoundException", sm.restore_secret, SecretId=secret_id)
    assert name not in listed_names(sm, IncludePlannedDeletion=True, Filters=[{"Key": "name", "Values": [name]}])
    # A secret already marked for deletion can be deleted at once too.
    marked = unique("force-marked")
    sm.create_secret(Name=marked, SecretString="x")
    sm.delete_secret(SecretId=marked, RecoveryWindowInDays=7)
    sm.delete_secret(SecretId=marked, ForceDeleteWithoutRecovery=True)
    expect_error("ResourceNotFoundException", sm.describe_secret, SecretId=marked)


# -- 5. values --------------------------------------------------------------------------------------
def test_value_size_limits(sm: Any, raw_sm: Any) -> None:
    name = unique("size")
    sm.create_secret(Name=name, SecretString="s" * MAX_VALUE)
    assert value_of(sm, name) == "s" * MAX_VALUE
    sm.put_secret_value(SecretId=name, SecretBinary=b"\x01" * MAX_VALUE)
    assert sm.get_secret_value(SecretId=name)["SecretBinary"] == b"\x01" * MAX_VALUE
    multibyte = "\u00e9" * (MAX_VALUE // 2)  # 65,536 bytes of UTF-8
    sm.put_secret_value(SecretId=name, SecretString=multibyte)
    assert value_of(sm, name) == multibyte
    versions = version_ids(sm, name, include_deprecated=True)

    # One byte more: a 400 with AWS's validation error (the model's length), never the value itself.
    too_big = "s" * (MAX_VALUE + 1)
    never_made = unique("size-new")
    for fn, params in ((raw_sm.put_secret_value, {"SecretId": name, "SecretString": too_big}),
                       (raw_sm.put_secret_value, {"SecretId": name, "SecretBinary": b"\x01" * (MAX_VALUE + 1)}),
                       (raw_sm.create_secret, {"Name": never_made, "SecretString": too_big}),
                       (raw_sm.update_secret, {"SecretId": name, "SecretString": too_big})):
        message = expect_error("ValidationException", fn, **params)
        assert "65536" in message and "sss" not in message
    # 32,769 characters but 65,538 bytes: within the model's length, over the byte limit.
    message = expect_error("InvalidParameterException", sm.put_secret_value, SecretId=name,
                           SecretString=multibyte + "\u00e9")
    assert "65536" in message and "\u00e9" not in message
    assert version_ids(sm, name, include_deprecated=True) == versions
    assert value_of(sm, name) == multibyte
    expect_error("ResourceNotFoundException", sm.describe_secret, SecretId=never_made)


def test_secret_string_and_secret_binary_are_exclusive(sm: Any) -> None:
    name = unique("both")
    v1 = sm.create_secret(Name=name, SecretString="only")["VersionId"]
    for fn, params in ((sm.create_secret, {"Name": name + "-new"}), (sm.put_secret_value, {"SecretId": name}),
                       (sm.update_secret, {"SecretId": name})):
        message = expect_error("InvalidParameterException", fn, SecretString="s", SecretBinary=b"b", **params)
        assert "both" in message, fn
    message = expect_error("InvalidRequestException", sm.put_secret_value, SecretId=name)
    assert "SecretString" in message and "SecretBinary" in message
    assert version_ids(sm, name, include_deprecated=True) == {v1: ["AWSCURRENT"]}
    assert value_of(sm, name) == "only"
    expect_error("ResourceNotFoundException", sm.describe_secret, SecretId=name + "-new")
    # A secret may be made with no value at all: it has no version to read.
    empty = unique("no-value")
    made = sm.create_secret(Name=empty)
    assert "VersionId" not in made
    assert version_ids(sm, empty, include_deprecated=True) == {}
    expect_error("ResourceNotFoundException", sm.get_secret_value, SecretId=empty)


# -- 6. listing and tags ----------------------------------------------------------------------------
def test_list_secrets_filters(sm: Any) -> None:
    prefix = unique("filters")
    alpha, beta, gamma = f"{prefix}/alpha", f"{prefix}/beta", f"{prefix}/gamma"
    sm.create_secret(Name=alpha, Description="Primary Database", Tags=[{"Key": "env", "Value": "prod"}])
    sm.create_secret(Name=beta, Description="backup database",
                     Tags=[{"Key": "env", "Value": "dev"}, {"Key": "team", "Value": "payments"}])
    sm.create_secret(Name=gamma)
    mine = {"Key": "name", "Values": [prefix]}

    def found(*filters: dict[str, Any]) -> list[str]:
        return sorted(listed_names(sm, Filters=[mine, *filters]))

    assert found() == [alpha, beta, gamma]
    assert found({"Key": "name", "Values": [f"{prefix}/al", f"{prefix}/ga"]}) == [alpha, gamma]
    assert found({"Key": "name", "Values": [f"{prefix}/ALPHA"]}) == []  # names: case-sensitive prefixes
    assert found({"Key": "name", "Values": [f"!{prefix}/al"]}) == [beta, gamma]
    assert found({"Key": "description", "Values": ["primary"]}) == [alpha]  # not case-sensitive
    assert found({"Key": "description", "Values": ["database"]}) == []  # a prefix, not a substring
    assert found({"Key": "description", "Values": ["!backup"]}) == [alpha, gamma]
    assert found({"Key": "tag-key", "Values": ["team"]}) == [beta]
    assert found({"Key": "tag-key", "Values": ["env"]}) == [alpha, beta]
    assert found({"Key": "tag-key", "Values": ["!team"]}) == [alpha, gamma]
    assert found({"Key": "tag-value", "Values": ["prod"]}) == [alpha]
    assert found({"Key": "tag-value", "Values": ["pay"]}) == [beta]
    assert found({"Key": "tag-value", "Values": ["!prod"]}) == [beta, gamma]
    assert found({"Key": "all", "Values": ["BACKUP"]}) == [beta]  # any attribute, not case-sensitive
    assert found({"Key": "all", "Values": ["payments"]}) == [beta]
    assert found({"Key": "all", "Values": ["prod"]}) == [alpha]
    assert found({"Key": "all", "Values": ["!prod"]}) == [beta, gamma]
    assert found({"Key": "tag-key", "Values": ["env"]}, {"Key": "tag-value", "Values": ["dev"]}) == [beta]
    entry = sm.list_secrets(Filters=[{"Key": "name", "Values": [beta]}])["SecretList"][0]
    assert entry["Description"] == "backup database" and entry["Name"] == beta
    assert sorted((t["Key"], t["Value"]) for t in entry["Tags"]) == [("env", "dev"), ("team", "payments")]
    expect_error("ValidationException", sm.list_secrets, Filters=[{"Key": "colour", "Values": ["red"]}])


def test_list_secrets_pages_cover_every_secret_once(sm: Any) -> None:
    prefix = unique("pages")
    made = [sm.create_secret(Name=f"{prefix}/{i}")["Name"] for i in range(5)]
    mine = [{"Key": "name", "Values": [prefix]}]
    pages = []
    token = None
    while True:
        page = sm.list_secrets(Filters=mine, MaxResults=2, **({"NextToken": token} if token else {}))
        pages.append([s["Name"] for s in page["SecretList"]])
        token = page.get("NextToken")
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(n for p in pages for n in p) == sorted(made)
    # The whole account, in pages of 3, is the same as in pages of 100: every secret exactly once.
    paged = listed_names(sm, MaxResults=3)
    assert len(paged) == len(set(paged))
    assert sorted(paged) == sorted(listed_names(sm, MaxResults=100))
    assert set(made) <= set(paged)
    by_paginator = [s["Name"] for p in sm.get_paginator("list_secrets").paginate(
        Filters=mine, PaginationConfig={"PageSize": 2}) for s in p["SecretList"]]
    assert sorted(by_paginator) == sorted(made)
    expect_error("InvalidNextTokenException", sm.list_secrets, NextToken="bm90IGEgdG9rZW4")


def test_tags(sm: Any) -> None:
    name = unique("tags")
    sm.create_secret(Name=name, SecretString="x", Tags=[{"Key": "env", "Value": "prod"}])

    def tags() -> list[tuple[str, str]]:
        return sorted((t["Key"], t["Value"]) for t in sm.describe_secret(SecretId=name).get("Tags", []))

    assert tags() == [("env", "prod")]
    sm.tag_resource(SecretId=name, Tags=[{"Key": "team", "Value": "db"}, {"Key": "env", "Value": "staging"}])
    assert tags() == [("env", "staging"), ("team", "db")]
    sm.untag_resource(SecretId=name, TagKeys=["env", "not-there"])
    assert tags() == [("team", "db")]
    message = expect_error("InvalidParameterException", sm.tag_resource, SecretId=name,
                           Tags=[{"Key": "aws:owner", "Value": "me"}])
    assert "aws:" in message
    assert tags() == [("team", "db")]
    sm.untag_resource(SecretId=name, TagKeys=["team"])
    assert "Tags" not in sm.describe_secret(SecretId=name)
    expect_error("ResourceNotFoundException", sm.tag_resource, SecretId=unique("no-such"),
                 Tags=[{"Key": "a", "Value": "b"}])


# -- 7. only the members that have a value -----------------------------------------------------------
class Wire:
    """The raw JSON bodies a client received, captured by a botocore event hook."""

    def __init__(self, client: Any) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.request_ids: list[str] = []
        client.meta.events.register("after-call", self._seen)

    def _seen(self, http_response: Any, **_: Any) -> None:
        self.bodies.append(json.loads(http_response.content or b"{}"))
        self.request_ids.append(http_response.headers.get("x-amzn-requestid", ""))

    @property
    def last(self) -> dict[str, Any]:
        return self.bodies[-1]


def no_nulls(value: Any, path: str = "") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert v is not None, f"{path}.{k} is null"
            no_nulls(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            no_nulls(v, f"{path}[{i}]")


def test_responses_carry_only_members_with_a_value(server: ServerProcess, kms: Any) -> None:
    client = server.client(service="secretsmanager", retry=False)
    wire = Wire(client)

    def call(operation: str, **params: Any) -> dict[str, Any]:
        parsed = getattr(client, operation)(**params)
        raw = wire.last
        no_nulls(raw, operation)
        meta = parsed["ResponseMetadata"]
        assert meta["HTTPStatusCode"] == 200 and meta["RequestId"] == wire.request_ids[-1]
        uuid.UUID(meta["RequestId"])
        assert set(parsed) - {"ResponseMetadata"} == set(raw), operation  # ResponseMetadata is botocore's
        return raw

    name = unique("members")
    assert set(call("create_secret", Name=name)) == {"ARN", "Name"}
    assert set(call("describe_secret", SecretId=name)) == {"ARN", "Name", "LastChangedDate", "CreatedDate",
                                                           "VersionIdsToStages"}
    assert set(call("put_secret_value", SecretId=name, SecretString="v")) == {"ARN", "Name", "VersionId",
                                                                               "VersionStages"}
    fresh = call("describe_secret", SecretId=name)
    assert set(fresh) == {"ARN", "Name", "LastChangedDate", "CreatedDate", "VersionIdsToStages"}
    for absent in ("Description", "KmsKeyId", "RotationEnabled", "RotationLambdaARN", "RotationRules",
                   "DeletedDate", "Tags", "LastAccessedDate", "LastRotatedDate", "NextRotationDate"):
        assert absent not in fresh, absent
    entry = next(e for e in call("list_secret_version_ids", SecretId=name)["Versions"])
    assert set(entry) == {"VersionId", "VersionStages", "CreatedDate", "KmsKeyIds"}  # not read yet
    assert set(call("get_secret_value", SecretId=name)) == {"ARN", "Name", "VersionId", "SecretString",
                                                            "VersionStages", "CreatedDate"}
    assert set(call("create_secret", Name=name + "-bin", SecretBinary=b"\x00")) == {"ARN", "Name", "VersionId"}
    assert "SecretString" not in call("get_secret_value", SecretId=name + "-bin")
    assert set(call("get_resource_policy", SecretId=name)) == {"ARN", "Name"}

    # Once they have values, they are there.
    key = kms.create_key(Description="members")["KeyMetadata"]["Arn"]
    call("update_secret", SecretId=name, Description="now described", KmsKeyId=key)
    call("tag_resource", SecretId=name, Tags=[{"Key": "k", "Value": "v"}])
    described = call("describe_secret", SecretId=name)
    assert set(described) == {"ARN", "Name", "LastChangedDate", "CreatedDate", "VersionIdsToStages",
                              "Description", "KmsKeyId", "Tags", "LastAccessedDate"}
    assert "RotationEnabled" not in described and "DeletedDate" not in described
    call("put_secret_value", SecretId=name, SecretString="v2")
    call("put_secret_value", SecretId=name, SecretString="v3")
    deprecated = [v for v in call("list_secret_version_ids", SecretId=name, IncludeDeprecated=True)["Versions"]
                  if "VersionStages" not in v]
    assert len(deprecated) == 1 and "LastAccessedDate" in deprecated[0]  # the first version, read above
    listed = call("list_secrets", Filters=[{"Key": "name", "Values": [name]}])["SecretList"]
    assert {e["Name"] for e in listed} == {name, name + "-bin"}
    plain = next(e for e in listed if e["Name"] == name + "-bin")
    assert not {"Description", "KmsKeyId", "Tags", "DeletedDate", "RotationEnabled"} & set(plain)
    assert set(call("delete_secret", SecretId=name, RecoveryWindowInDays=7)) == {"ARN", "Name", "DeletionDate"}
    assert "DeletedDate" in call("describe_secret", SecretId=name)
    assert set(call("get_random_password", PasswordLength=8)) == {"RandomPassword"}
    assert call("tag_resource", SecretId=name + "-bin", Tags=[{"Key": "a", "Value": "b"}]) == {}

    # An error is {"__type", "message"} with a request id, and a 400.
    err = error_of(client.describe_secret, SecretId=unique("nothing"))
    assert wire.last["__type"] == "ResourceNotFoundException" and wire.last["message"]
    assert err.response["ResponseMetadata"]["RequestId"] == wire.request_ids[-1]
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 400


# -- 8. encryption ----------------------------------------------------------------------------------
def test_a_disabled_customer_key_is_a_kill_switch(sm: Any, kms: Any) -> None:
    key = kms.create_key(Description="kill switch")["KeyMetadata"]["Arn"]
    name = unique("killswitch")
    sm.create_secret(Name=name, SecretString="guarded", KmsKeyId=key)
    assert sm.describe_secret(SecretId=name)["KmsKeyId"] == key
    assert all(v["KmsKeyIds"] == [key] for v in sm.list_secret_version_ids(SecretId=name)["Versions"])
    assert value_of(sm, name) == "guarded"
    kms.disable_key(KeyId=key)
    try:
        assert "decrypt" in expect_error("DecryptionFailure", sm.get_secret_value, SecretId=name)
        assert "encrypt" in expect_error("EncryptionFailure", sm.put_secret_value, SecretId=name, SecretString="n")
        expect_error("EncryptionFailure", sm.update_secret, SecretId=name, SecretString="n")
        expect_error("EncryptionFailure", sm.create_secret, Name=name + "-2", SecretString="n", KmsKeyId=key)
        assert sm.describe_secret(SecretId=name)["Name"] == name  # metadata needs no key
        assert len(version_ids(sm, name, include_deprecated=True)) == 1  # nothing was written
    finally:
        kms.enable_key(KeyId=key)
    assert value_of(sm, name) == "guarded"
    sm.put_secret_value(SecretId=name, SecretString="again")
    assert value_of(sm, name) == "again"
    expect_error("ResourceNotFoundException", sm.describe_secret, SecretId=name + "-2")


def test_an_asymmetric_key_cannot_protect_a_secret(sm: Any, kms: Any) -> None:
    rsa = kms.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"]
    ecc = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    name = unique("asymmetric")
    for key in (rsa, ecc):
        expect_error("EncryptionFailure", sm.create_secret, Name=name, SecretString="x", KmsKeyId=key)
        expect_error("ResourceNotFoundException", sm.describe_secret, SecretId=name)  # not made
    symmetric = kms.create_key()["KeyMetadata"]["Arn"]
    sm.create_secret(Name=name, SecretString="kept", KmsKeyId=symmetric, Description="before")
    before = version_ids(sm, name, include_deprecated=True)
    expect_error("EncryptionFailure", sm.update_secret, SecretId=name, KmsKeyId=rsa)
    expect_error("EncryptionFailure", sm.update_secret, SecretId=name, KmsKeyId=ecc, SecretString="new",
                 Description="after")
    # A refused update changes nothing: not the key, not the description, no new version.
    described = sm.describe_secret(SecretId=name)
    assert (described["KmsKeyId"], described["Description"]) == (symmetric, "before")
    assert version_ids(sm, name, include_deprecated=True) == before
    assert value_of(sm, name) == "kept"
    sm.put_secret_value(SecretId=name, SecretString="still works")
    assert [v["KmsKeyIds"] for v in sm.list_secret_version_ids(SecretId=name)["Versions"]] == [[symmetric]] * 2


def test_the_aws_managed_key_is_made_on_first_use(server: ServerProcess, sm: Any, kms: Any) -> None:
    # A fresh account has no aws/secretsmanager key until its first secret needs one.
    admin = admin_of(server)
    account = str(secrets.randbelow(9 * 10**11) + 10**11)
    admin.call("CreateAccount", Name="secrets-managed-key", AccountId=account)
    boss = person(server, admin, account, "boss", is_admin=True)

    def managed_aliases(client: Any) -> list[dict[str, Any]]:
        return [a for a in client.list_aliases()["Aliases"] if a["AliasName"] == "alias/aws/secretsmanager"]

    assert managed_aliases(boss.kms) == []
    boss.sm.create_secret(Name=unique("no-value"))  # no value: no key needed yet
    assert managed_aliases(boss.kms) == []
    name = unique("managed")
    boss.sm.create_secret(Name=name, SecretString="under the managed key")
    aliases = managed_aliases(boss.kms)
    assert len(aliases) == 1 and aliases[0]["AliasArn"] == f"arn:aws:kms:{REGION}:{account}:alias/aws/secretsmanager"
    md = boss.kms.describe_key(KeyId="alias/aws/secretsmanager")["KeyMetadata"]
    assert md["KeyManager"] == "AWS" and md["KeyState"] == "Enabled" and md["AWSAccountId"] == account
    assert md["KeySpec"] == "SYMMETRIC_DEFAULT" and md["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert "KmsKeyId" not in boss.sm.describe_secret(SecretId=name)
    assert [v["KmsKeyIds"] for v in boss.sm.list_secret_version_ids(SecretId=name)["Versions"]] == [[md["Arn"]]]
    assert value_of(boss.sm, name) == "under the managed key"
    # The same key for the account's next secret; usable through Secrets Manager only.
    other = unique("managed-2")
    boss.sm.create_secret(Name=other, SecretString="x")
    assert [v["KmsKeyIds"] for v in boss.sm.list_secret_version_ids(SecretId=other)["Versions"]] == [[md["Arn"]]]
    assert len(managed_aliases(boss.kms)) == 1
    for fn, params in ((boss.kms.encrypt, {"Plaintext": b"direct"}), (boss.kms.disable_key, {}),
                       (boss.kms.generate_data_key, {"KeySpec": "AES_256"})):
        assert error_of(fn, KeyId=md["Arn"], **params).response["Error"]["Code"] == "AccessDeniedException", fn
    # And in the server's own account, once any secret was made without a key.
    sm.create_secret(Name=unique("managed-main"), SecretString="x")
    assert len(managed_aliases(kms)) == 1
    assert kms.describe_key(KeyId="alias/aws/secretsmanager")["KeyMetadata"]["KeyManager"] == "AWS"


def test_changing_the_kms_key_reencrypts_the_labelled_versions(sm: Any, kms: Any) -> None:
    old = kms.create_key(Description="old")["KeyMetadata"]["Arn"]
    new = kms.create_key(Description="new")["KeyMetadata"]["Arn"]
    name = unique("rekey")
    sm.create_secret(Name=name, SecretString="first", KmsKeyId=old)
    sm.put_secret_value(SecretId=name, SecretString="second")
    sm.update_secret(SecretId=name, KmsKeyId=new)
    assert sm.describe_secret(SecretId=name)["KmsKeyId"] == new
    assert [v["KmsKeyIds"] for v in sm.list_secret_version_ids(SecretId=name)["Versions"]] == [[new], [new]]
    kms.disable_key(KeyId=old)
    try:
        assert value_of(sm, name) == "second"
        assert value_of(sm, name, VersionStage="AWSPREVIOUS") == "first"
        sm.put_secret_value(SecretId=name, SecretString="third")
        assert value_of(sm, name) == "third"
    finally:
        kms.enable_key(KeyId=old)
    # The new key is the one that matters now.
    kms.disable_key(KeyId=new)
    try:
        expect_error("DecryptionFailure", sm.get_secret_value, SecretId=name)
    finally:
        kms.enable_key(KeyId=new)


def test_a_key_change_that_fails_leaves_the_secret_as_it_was(sm: Any, kms: Any) -> None:
    """Re-encryption under the new key needs the old one: with the old key disabled, UpdateSecret
    fails and neither KmsKeyId nor any version changes; done again later, it does re-encrypt."""
    old = kms.create_key(Description="old")["KeyMetadata"]["Arn"]
    new = kms.create_key(Description="new")["KeyMetadata"]["Arn"]
    name = unique("rekey-fails")
    sm.create_secret(Name=name, SecretString="value", KmsKeyId=old)
    kms.disable_key(KeyId=old)
    try:
        expect_error("DecryptionFailure", sm.update_secret, SecretId=name, KmsKeyId=new)
        assert sm.describe_secret(SecretId=name)["KmsKeyId"] == old
    finally:
        kms.enable_key(KeyId=old)
    assert [v["KmsKeyIds"] for v in sm.list_secret_version_ids(SecretId=name)["Versions"]] == [[old]]
    sm.update_secret(SecretId=name, KmsKeyId=new)
    assert [v["KmsKeyIds"] for v in sm.list_secret_version_ids(SecretId=name)["Versions"]] == [[new]]
    kms.disable_key(KeyId=old)
    try:
        assert value_of(sm, name) == "value"
    finally:
        kms.enable_key(KeyId=old)


# -- 9. resource policies ---------------------------------------------------------------------------
def test_resource_policy_put_get_delete_validate(sm: Any) -> None:
    name = unique("policy")
    made = sm.create_secret(Name=name, SecretString="x")
    policy = policy_doc(allow("secretsmanager:GetSecretValue", {"AWS": f"arn:aws:iam::{ACCOUNT_ID}:root"}))
    assert "ResourcePolicy" not in sm.get_resource_policy(SecretId=name)
    assert sm.list_resource_policies(SecretId=name)["ResourcePolicies"] == []
    put = sm.put_resource_policy(SecretId=name, ResourcePolicy=policy)
    assert (put["ARN"], put["Name"]) == (made["ARN"], name)
    got = sm.get_resource_policy(SecretId=made["ARN"])
    assert json.loads(got["ResourcePolicy"]) == json.loads(policy) and got["Name"] == name
    assert sm.list_resource_policies(SecretId=name)["ResourcePolicies"] == [{"PolicyName": "default"}]
    deleted = sm.delete_resource_policy(SecretId=name)
    assert deleted["ARN"] == made["ARN"]
    assert "ResourcePolicy" not in sm.get_resource_policy(SecretId=name)

    ok = sm.validate_resource_policy(SecretId=name, ResourcePolicy=policy)
    assert ok["PolicyValidationPassed"] is True and ok["ValidationErrors"] == []
    assert sm.validate_resource_policy(ResourcePolicy=policy)["PolicyValidationPassed"] is True
    for bad in ("{not json", json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Perhaps"}]})):
        answer = sm.validate_resource_policy(ResourcePolicy=bad)
        assert answer["PolicyValidationPassed"] is False and answer["ValidationErrors"], bad
        assert all(e["ErrorMessage"] for e in answer["ValidationErrors"])
        expect_error("MalformedPolicyDocumentException", sm.put_resource_policy, SecretId=name, ResourcePolicy=bad)
    assert "ResourcePolicy" not in sm.get_resource_policy(SecretId=name)


def test_block_public_policy(sm: Any) -> None:
    name = unique("public")
    sm.create_secret(Name=name, SecretString="x")
    public = policy_doc(allow("secretsmanager:GetSecretValue", "*"))
    also_public = policy_doc(allow("secretsmanager:*", {"AWS": "*"}))
    for policy in (public, also_public):
        message = expect_error("PublicPolicyException", sm.put_resource_policy, SecretId=name,
                               ResourcePolicy=policy, BlockPublicPolicy=True)
        assert "broad access" in message
    assert "ResourcePolicy" not in sm.get_resource_policy(SecretId=name)
    # Narrowed by a condition, it is not public; without BlockPublicPolicy, AWS accepts a public one.
    narrowed = policy_doc(allow("secretsmanager:GetSecretValue", "*",
                                Condition={"StringEquals": {"aws:PrincipalAccount": ACCOUNT_ID}}))
    sm.put_resource_policy(SecretId=name, ResourcePolicy=narrowed, BlockPublicPolicy=True)
    assert json.loads(sm.get_resource_policy(SecretId=name)["ResourcePolicy"]) == json.loads(narrowed)
    sm.put_resource_policy(SecretId=name, ResourcePolicy=public)
    assert json.loads(sm.get_resource_policy(SecretId=name)["ResourcePolicy"]) == json.loads(public)


def test_another_account_reads_a_secret_only_when_every_policy_allows(sm: Any, kms: Any,
                                                                     account_b: OtherAccount) -> None:
    b = account_b.account_id
    shared_key = kms.create_key(Policy=policy_doc(
        allow("kms:*", {"AWS": f"arn:aws:iam::{ACCOUNT_ID}:root"}),
        allow(["kms:Decrypt", "kms:DescribeKey"], {"AWS": f"arn:aws:iam::{b}:root"})))["KeyMetadata"]["Arn"]
    share = policy_doc(allow(["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
                             {"AWS": f"arn:aws:iam::{b}:root"}))

    def code(fn: Callable[..., Any], **params: Any) -> str | None:
        try:
            fn(**params)
        except ClientError as exc:
            return str(exc.response["Error"]["Code"])
        return None

    # Resource policy, B's identity policy and the key policy all allow: B reads, by ARN.
    name = unique("shared")
    arn = sm.create_secret(Name=name, SecretString="for B", KmsKeyId=shared_key)["ARN"]
    assert code(account_b.reader.sm.get_secret_value, SecretId=arn) == "AccessDeniedException"  # no policy yet
    sm.put_resource_policy(SecretId=arn, ResourcePolicy=share)
    assert value_of(account_b.reader.sm, arn) == "for B"
    assert account_b.reader.sm.describe_secret(SecretId=arn)["Name"] == name
    # What the resource policy does not grant stays refused.
    assert code(account_b.reader.sm.put_secret_value, SecretId=arn, SecretString="B's") == "AccessDeniedException"
    assert code(account_b.reader.sm.list_secret_version_ids, SecretId=arn) == "AccessDeniedException"
    assert value_of(sm, name) == "for B"
    # B's identity policy must allow too.
    assert code(account_b.kms_only.sm.get_secret_value, SecretId=arn) == "AccessDeniedException"
    assert code(account_b.kms_only.sm.describe_secret, SecretId=arn) == "AccessDeniedException"
    # By name, B looks in its own account.
    assert code(account_b.reader.sm.get_secret_value, SecretId=name) == "ResourceNotFoundException"
    # Without the resource policy, B is refused again.
    sm.delete_resource_policy(SecretId=arn)
    assert code(account_b.reader.sm.get_secret_value, SecretId=arn) == "AccessDeniedException"
    assert code(account_b.reader.sm.describe_secret, SecretId=arn) == "AccessDeniedException"

    # The key's policy must let B decrypt: under a key of A's only, B may describe, not read.
    own_key = kms.create_key(Description="A only")["KeyMetadata"]["Arn"]
    private = sm.create_secret(Name=unique("shared-own-key"), SecretString="not for B", KmsKeyId=own_key)["ARN"]
    sm.put_resource_policy(SecretId=private, ResourcePolicy=share)
    assert account_b.reader.sm.describe_secret(SecretId=private)["ARN"] == private
    message = expect_error("AccessDeniedException", account_b.reader.sm.get_secret_value, SecretId=private)
    assert message == "Access to KMS is not allowed" and "not for B" not in message


# -- 10. GetRandomPassword --------------------------------------------------------------------------
LOWER, UPPER, DIGITS, PUNCTUATION = (string.ascii_lowercase, string.ascii_uppercase, string.digits,
                                     string.punctuation)
CLASSES = {"ExcludeLowercase": LOWER, "ExcludeUppercase": UPPER, "ExcludeNumbers": DIGITS,
           "ExcludePunctuation": PUNCTUATION}


def test_get_random_password_options(sm: Any) -> None:
    default = sm.get_random_password()["RandomPassword"]
    assert len(default) == 32
    for chars in CLASSES.values():  # every class, since RequireEachIncludedType is the default
        assert set(default) & set(chars), chars
    assert " " not in default
    assert len(sm.get_random_password(PasswordLength=4096)["RandomPassword"]) == 4096
    digits = sm.get_random_password(PasswordLength=64, ExcludeLowercase=True, ExcludeUppercase=True,
                                    ExcludePunctuation=True)["RandomPassword"]
    assert len(digits) == 64 and set(digits) <= set(DIGITS)
    no_vowels = sm.get_random_password(PasswordLength=200, ExcludeCharacters="aeiouAEIOU")["RandomPassword"]
    assert not set(no_vowels) & set("aeiouAEIOU")
    spaced = sm.get_random_password(PasswordLength=100, IncludeSpace=True)["RandomPassword"]
    assert " " in spaced
    one = sm.get_random_password(PasswordLength=1, RequireEachIncludedType=False)["RandomPassword"]
    assert len(one) == 1
    expect_error("InvalidParameterException", sm.get_random_password, PasswordLength=3)  # 4 classes required
    expect_error("InvalidParameterException", sm.get_random_password, ExcludeLowercase=True, ExcludeUppercase=True,
                 ExcludeNumbers=True, ExcludePunctuation=True)
    expect_error("InvalidParameterException", sm.get_random_password, ExcludeCharacters=LOWER + UPPER + DIGITS,
                 ExcludePunctuation=True)
    expect_error("ValidationException", sm.get_random_password, PasswordLength=4097)


@st.composite
def password_requests(draw: st.DrawFn) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for flag in (*CLASSES, "IncludeSpace", "RequireEachIncludedType"):
        choice = draw(st.sampled_from([None, True, False]))
        if choice is not None:
            params[flag] = choice
    params["PasswordLength"] = draw(st.integers(1, 6) | st.integers(1, 200))
    excluded = draw(st.lists(st.sampled_from([LOWER, UPPER, DIGITS, PUNCTUATION, " "]), max_size=3)
                    | st.lists(st.text(alphabet=LOWER + UPPER + DIGITS + PUNCTUATION + " \u00e9", max_size=20),
                               max_size=1))
    if "".join(excluded):
        params["ExcludeCharacters"] = "".join(excluded)
    return params


def expected_pools(params: dict[str, Any]) -> list[str]:
    """The character classes a password of these options draws from (after exclusions)."""
    pools = [chars for flag, chars in CLASSES.items() if not params.get(flag)]
    if params.get("IncludeSpace"):
        pools.append(" ")
    excluded = set(params.get("ExcludeCharacters", ""))
    return [p for p in ("".join(c for c in pool if c not in excluded) for pool in pools) if p]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=password_requests())
def test_random_passwords_honour_their_options(sm: Any, params: dict[str, Any]) -> None:
    pools = expected_pools(params)
    require = params.get("RequireEachIncludedType", True)
    length = params["PasswordLength"]
    if not pools or (require and length < len(pools)):
        expect_error("InvalidParameterException", sm.get_random_password, **params)
        return
    password = sm.get_random_password(**params)["RandomPassword"]
    assert len(password) == length
    assert set(password) <= set("".join(pools))
    assert not set(password) & set(params.get("ExcludeCharacters", ""))
    if require:
        for pool in pools:
            assert set(password) & set(pool), (pool, password)


# -- 11. malformed and unauthenticated requests ------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def code(self) -> str:
        return str(json.loads(self.body).get("__type"))


def raw_request(server: ServerProcess, target: str | None, body: bytes, *, service: str = "secretsmanager",
                access_key_id: str | None = None, secret: str | None = None, signed: bool = True) -> Reply:
    """A POST signed with botocore's SigV4 signer, sent with http.client: exactly these bytes."""
    headers = {"Content-Type": JSON_11, **({"X-Amz-Target": target} if target else {})}
    if signed:
        request = AWSRequest(method="POST", url=server.endpoint + "/", data=body, headers=headers)
        SigV4Auth(Credentials(access_key_id or server.access_key_id, secret or server.secret_access_key),
                  service, REGION).add_auth(request)
        headers = dict(request.headers.items())
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def test_malformed_and_unauthenticated_requests_are_4xx(server: ServerProcess, sm: Any) -> None:
    name = unique("raw")
    sm.create_secret(Name=name, SecretString="raw value")
    good = json.dumps({"SecretId": name}).encode()
    assert raw_request(server, "secretsmanager.GetSecretValue", good).status == 200
    cases = {
        "bad signature": (raw_request(server, "secretsmanager.GetSecretValue", good, secret="wrong" * 8),
                          "InvalidSignatureException"),
        "unknown access key": (raw_request(server, "secretsmanager.GetSecretValue", good,
                                           access_key_id="AKIA" + "0" * 16, secret="x" * 40),
                               "UnrecognizedClientException"),
        "signed for kms": (raw_request(server, "secretsmanager.GetSecretValue", good, service="kms"),
                           "InvalidSignatureException"),
        "unsigned": (raw_request(server, "secretsmanager.GetSecretValue", good, signed=False), None),
        "unknown operation": (raw_request(server, "secretsmanager.Nope", b"{}"), "UnknownOperationException"),
        "not JSON": (raw_request(server, "secretsmanager.GetSecretValue", b"{SecretId: nope"),
                     "SerializationException"),
        "not an object": (raw_request(server, "secretsmanager.GetSecretValue", b'["SecretId"]'),
                          "SerializationException"),
        "wrong type": (raw_request(server, "secretsmanager.GetSecretValue", b'{"SecretId": 42}'),
                       "SerializationException"),
        "missing member": (raw_request(server, "secretsmanager.GetSecretValue", b"{}"), "ValidationException"),
        "bad base64": (raw_request(server, "secretsmanager.PutSecretValue", json.dumps(
            {"SecretId": name, "SecretBinary": "!!!", "ClientRequestToken": str(uuid.uuid4())}).encode()),
            "SerializationException"),
        "no ClientRequestToken": (raw_request(server, "secretsmanager.PutSecretValue", json.dumps(
            {"SecretId": name, "SecretString": "v"}).encode()), "InvalidRequestException"),
    }
    for case, (reply, code) in cases.items():
        assert 400 <= reply.status < 500, (case, reply.status, reply.body[:300])
        assert reply.headers.get("content-type") == JSON_11, case
        uuid.UUID(reply.headers["x-amzn-requestid"])
        body = json.loads(reply.body)
        assert isinstance(body.get("__type"), str) and body["__type"] and isinstance(body.get("message"), str), case
        if code is not None:
            assert (reply.status, reply.code) == (400, code), (case, reply.status, reply.body[:300])
        assert b"raw value" not in reply.body, case
    assert b"ClientRequestToken value" in cases["no ClientRequestToken"][0].body
    assert value_of(sm, name) == "raw value"  # nothing above wrote a version
    # An empty body is an empty request (JSON 1.1), not an error.
    empty = raw_request(server, "secretsmanager.ListSecrets", b"")
    assert empty.status == 200 and "SecretList" in json.loads(empty.body)
    # boto3 sees the same codes.
    wrong = server.client(service="secretsmanager", secret="wrong" * 8, retry=False)
    expect_error("InvalidSignatureException", wrong.get_secret_value, SecretId=name)
    stranger = server.client(access_key_id="AKIA" + "1" * 16, secret="y" * 40, service="secretsmanager",
                             retry=False)
    expect_error("UnrecognizedClientException", stranger.list_secrets)


# -- 12. secret values stay secret -------------------------------------------------------------------
def encodings(value: bytes) -> list[bytes]:
    """The forms a leaked value could take: raw, hex, base64 (standard, URL-safe, unpadded), JSON-escaped."""
    b64 = base64.b64encode(value)
    return [value, value.hex().encode(), value.hex().upper().encode(), b64, base64.urlsafe_b64encode(value),
            b64.rstrip(b"="), json.dumps(value.decode("latin-1"))[1:-1].encode()]


def leaks(haystack: bytes, values: dict[str, bytes]) -> list[str]:
    return [f"{what} as {form[:20]!r}..." for what, value in values.items() for form in encodings(value)
            if form in haystack]


def every_event(admin: AdminClient) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    token = None
    while True:
        page = admin.call("QueryAuditEvents", Limit=1000, NextToken=token)
        events += page["Events"]
        token = page.get("NextToken")
        if not token:
            return events


def keys_in(value: Any) -> set[str]:
    """Every member name at any depth of a JSON value."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys_in(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_in(v)}
    return set()


def files_under(root: Path) -> Iterator[Path]:
    return (p for p in sorted(root.rglob("*")) if p.is_file())


def test_secret_values_never_leave_their_envelope(server: ServerProcess, sm: Any, raw_sm: Any) -> None:
    marker = "s3cr3t-" + uuid.uuid4().hex
    values = {
        "create": (marker + "-create").encode(), "put": (marker + "-put").encode(),
        "update": (marker + "-update").encode(), "binary": b"\x00\x01" + (marker + "-binary").encode(),
        "refused": (marker + "-refused").encode(), "json": json.dumps({"password": marker + "-json"}).encode(),
    }
    name = unique("leak")
    calls = []
    calls.append(sm.create_secret(Name=name, SecretString=values["create"].decode()))
    token = str(uuid.uuid4())
    calls.append(sm.put_secret_value(SecretId=name, SecretString=values["put"].decode(), ClientRequestToken=token))
    calls.append(sm.update_secret(SecretId=name, SecretString=values["update"].decode()))
    calls.append(sm.put_secret_value(SecretId=name, SecretString=values["json"].decode()))
    calls.append(sm.create_secret(Name=name + "-bin", SecretBinary=values["binary"]))
    calls.append(sm.get_secret_value(SecretId=name))
    calls.append(sm.get_secret_value(SecretId=name, VersionId=token))
    calls.append(sm.get_secret_value(SecretId=name + "-bin"))
    calls.append(sm.batch_get_secret_value(SecretIdList=[name, name + "-bin"]))
    assert calls[-1]["SecretValues"][0]["SecretString"] == values["json"].decode()
    # Failed calls that carried a value must not echo it either.
    errors = [
        error_of(sm.put_secret_value, SecretId=name, SecretString=values["refused"].decode(),
                 ClientRequestToken=token),  # ResourceExistsException
        error_of(raw_sm.put_secret_value, SecretId=name,
                 SecretString=values["refused"].decode() * (MAX_VALUE // len(values["refused"]) + 1)),
        error_of(sm.put_secret_value, SecretId=name, SecretString=values["refused"].decode(), SecretBinary=b"b"),
        error_of(sm.put_secret_value, SecretId=unique("leak-none"), SecretString=values["refused"].decode()),
        error_of(sm.create_secret, Name=name, SecretString=values["refused"].decode()),
    ]
    for err in errors:
        assert marker not in str(err.response), err.response

    # The store: every file of the data directory (SQLite: the database and its WAL), or pg_dump.
    store = b"".join(p.read_bytes() for p in files_under(server.data_dir))
    if server.storage_url is not None:
        store += subprocess.run(["pg_dump", "--dbname", server.storage_url], capture_output=True, timeout=60,
                                check=True).stdout
    assert name.encode() in store, "the search reads the wrong bytes"  # the name is stored in the clear
    assert leaks(store, values) == [] and marker.encode() not in store

    log = server.output().encode()
    assert b"openkms serving" in log, "the search reads the wrong log"
    assert leaks(log, values) == [] and marker.encode() not in log

    events = every_event(admin_of(server))
    mine = [e for e in events if e["requestID"] in {c["ResponseMetadata"]["RequestId"] for c in calls}
            | {e.response["ResponseMetadata"]["RequestId"] for e in errors}]
    assert len(mine) == len(calls) + len(errors)
    audit = json.dumps(events).encode()
    assert name.encode() in audit
    assert leaks(audit, values) == [] and marker.encode() not in audit
    for event in mine:
        assert event["eventSource"] == "secretsmanager.amazonaws.com", event
        for part in ("requestParameters", "responseElements"):
            assert not {"SecretString", "SecretBinary"} & keys_in(event.get(part)), event


def test_secrets_calls_are_audited(server: ServerProcess, sm: Any) -> None:
    name = unique("audited")
    made = sm.create_secret(Name=name, SecretString="x")
    read = sm.get_secret_value(SecretId=name)
    refused = error_of(sm.get_secret_value, SecretId=unique("audited-none"))
    wanted = {made["ResponseMetadata"]["RequestId"]: ("CreateSecret", None, False),
              read["ResponseMetadata"]["RequestId"]: ("GetSecretValue", None, True),
              refused.response["ResponseMetadata"]["RequestId"]: ("GetSecretValue", "ResourceNotFoundException", True)}
    events = {e["requestID"]: e for e in every_event(admin_of(server)) if e["requestID"] in wanted}
    assert set(events) == set(wanted)
    for request_id, (operation, error, read_only) in wanted.items():
        event = events[request_id]
        assert event["eventSource"] == "secretsmanager.amazonaws.com"
        assert (event["eventName"], event.get("errorCode"), event["readOnly"]) == (operation, error, read_only)
        assert event["userIdentity"]["accountId"] == ACCOUNT_ID and event["awsRegion"] == REGION
    assert events[made["ResponseMetadata"]["RequestId"]]["requestParameters"]["Name"] == name
    assert events[read["ResponseMetadata"]["RequestId"]]["responseElements"]["ARN"] == made["ARN"]


# -- 13. the AWS CLI --------------------------------------------------------------------------------
def find_aws_cli() -> str:
    here = Path(sys.executable).parent / "aws"
    found = str(here) if here.is_file() and os.access(here, os.X_OK) else shutil.which("aws")
    assert found, "the AWS CLI (`aws`, awscli) is not installed in the venv"
    return found


def test_the_aws_cli(server: ServerProcess, sm: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty),
                "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true", "AWS_PAGER": "",
                "AWS_ACCESS_KEY_ID": server.access_key_id, "AWS_SECRET_ACCESS_KEY": server.secret_access_key})
    cli = find_aws_cli()

    def aws(*args: str) -> str:
        proc = subprocess.run([cli, "--endpoint-url", server.endpoint, "secretsmanager", *args], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, f"aws secretsmanager {' '.join(args)}: {proc.returncode}\n{proc.stderr}"
        return proc.stdout

    prefix = unique("cli")
    name = f"{prefix}/db"
    first = '{"username":"app","password":"p1"}'
    second = '{"username":"app","password":"new"}'
    made = json.loads(aws("create-secret", "--name", name, "--secret-string", first, "--output", "json"))
    assert made["Name"] == name and made["ARN"].startswith(ARN_PREFIX + name + "-")
    assert aws("get-secret-value", "--secret-id", name, "--query", "SecretString", "--output", "text") == first + "\n"
    put = json.loads(aws("put-secret-value", "--secret-id", name, "--secret-string", second, "--output", "json"))
    assert put["VersionStages"] == ["AWSCURRENT"] and put["VersionId"] != made["VersionId"]
    previous = aws("get-secret-value", "--secret-id", name, "--version-stage", "AWSPREVIOUS", "--output", "json")
    assert json.loads(previous)["SecretString"] == first
    assert value_of(sm, name) == second
    listed = json.loads(aws("list-secrets", "--filters", f"Key=name,Values={prefix}/", "--output", "json"))
    assert [s["Name"] for s in listed["SecretList"]] == [name]
    assert listed["SecretList"][0]["SecretVersionsToStages"] == {put["VersionId"]: ["AWSCURRENT"],
                                                                 made["VersionId"]: ["AWSPREVIOUS"]}
    deleted = json.loads(aws("delete-secret", "--secret-id", name, "--recovery-window-in-days", "7", "--output",
                             "json"))
    assert sm.describe_secret(SecretId=name)["DeletedDate"].timestamp() == pytest.approx(
        float(deleted["DeletionDate"]), abs=1)
