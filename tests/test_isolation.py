"""Isolation regressions: no widening through grants, account administrators confined to their account.

Each test drives a real server: the grant tests with boto3, the administrator tests through the
`openkms admin` command line, as a customer's administrator in the README's SaaS example would.
Every refusal must also be in the audit log, as AccessDeniedException.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from openkms.client.admin import AdminClient
from tests.server import REGION, ServerProcess
from tests.test_admin import ADMIN_ACCOUNT, AdminCli, random_account_id, write_credentials


def code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


@pytest.fixture(scope="module")
def operator(server: ServerProcess) -> AdminClient:
    return AdminClient(server.endpoint, server.access_key_id, server.secret_access_key, REGION)


@dataclass
class User:
    account_id: str
    name: str
    access_key_id: str
    secret: str
    kms: Any

    @property
    def arn(self) -> str:
        return f"arn:aws:iam::{self.account_id}:user/{self.name}"


@pytest.fixture(scope="module")
def make_user(server: ServerProcess, operator: AdminClient) -> Callable[..., User]:
    def make(account_id: str, name: str, *, admin: bool = False, policy: str | None = None) -> User:
        operator.call("CreateUser", AccountId=account_id, UserName=name, Admin=admin or None)
        if policy:
            operator.call("PutUserPolicy", AccountId=account_id, UserName=name, PolicyName="p", PolicyDocument=policy)
        key = operator.call("CreateAccessKey", AccountId=account_id, UserName=name)["AccessKey"]
        return User(account_id, name, key["AccessKeyId"], key["SecretAccessKey"],
                    server.client(key["AccessKeyId"], key["SecretAccessKey"]))
    return make


def new_account(operator: AdminClient, name: str) -> str:
    account_id = random_account_id()
    operator.call("CreateAccount", Name=name, AccountId=account_id)
    return account_id


def denials(operator: AdminClient, principal_arn: str, event_name: str) -> list[dict[str, Any]]:
    return list(operator.call("QueryAuditEvents", PrincipalArn=principal_arn, EventName=event_name,
                              ErrorCode="AccessDeniedException", Limit=100)["Events"])


# -- grants made from grants ------------------------------------------------------------------------

def test_a_grant_cannot_widen_itself(server: ServerProcess, operator: AdminClient,
                                     make_user: Callable[..., User]) -> None:
    account = new_account(operator, "grants")
    owner = make_user(account, "owner", admin=True)
    holder = make_user(account, "holder")     # no identity policy: only what grants give it
    other = make_user(account, "other")
    key = owner.kms.create_key()["KeyMetadata"]
    context = {"tenant": "t1"}
    secret_ct = owner.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"t2 secret",
                                  EncryptionContext={"tenant": "t2"})["CiphertextBlob"]
    # The holder may create grants, and decrypt, only under exactly {"tenant": "t1"}.
    parent = owner.kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=holder.arn,
                                    Operations=["CreateGrant", "Decrypt"],
                                    Constraints={"EncryptionContextEquals": context})
    tokens = [parent["GrantToken"]]

    def child(**kwargs: Any) -> dict[str, Any]:
        return holder.kms.create_grant(KeyId=key["Arn"], GranteePrincipal=kwargs.pop("grantee", holder.arn),
                                       GrantTokens=tokens, **kwargs)  # type: ignore[no-any-return]

    wider = [
        {"Operations": ["Decrypt"]},                                                    # no constraint
        {"Operations": ["Encrypt", "Decrypt"], "Constraints": {"EncryptionContextEquals": context}},  # more ops
        {"Operations": ["Decrypt"], "Constraints": {"EncryptionContextSubset": context}},  # weaker constraint
        {"Operations": ["Decrypt"], "Constraints": {"EncryptionContextEquals": {"tenant": "t2"}}},  # other context
        {"Operations": ["ReEncryptFrom"], "Constraints": {"EncryptionContextEquals": context}},
        {"Operations": ["Decrypt", "RetireGrant"], "Constraints": {"EncryptionContextEquals": context}},
    ]
    for request in wider:
        with pytest.raises(ClientError) as e:
            child(**request)
        assert code(e) == "AccessDeniedException", request
        assert "kms:CreateGrant" in str(e.value) and holder.arn in str(e.value)
    # Nothing was created: the grants on the key are the parent alone, and t2 stays out of reach.
    assert [g["GrantId"] for g in owner.kms.list_grants(KeyId=key["KeyId"])["Grants"]] == [parent["GrantId"]]
    with pytest.raises(ClientError) as e:
        holder.kms.decrypt(CiphertextBlob=secret_ct, EncryptionContext={"tenant": "t2"}, GrantTokens=tokens)
    assert code(e) == "AccessDeniedException"

    # As narrow or narrower is allowed, also for another grantee, and so on down the chain.
    same = child(Operations=["Decrypt", "CreateGrant"], Constraints={"EncryptionContextEquals": context},
                 grantee=other.arn)
    with pytest.raises(ClientError) as e:
        other.kms.create_grant(KeyId=key["Arn"], GranteePrincipal=other.arn, Operations=["Decrypt"],
                               GrantTokens=[same["GrantToken"]])
    assert code(e) == "AccessDeniedException"
    other.kms.create_grant(KeyId=key["Arn"], GranteePrincipal=other.arn, Operations=["Decrypt"],
                           Constraints={"EncryptionContextEquals": context}, GrantTokens=[same["GrantToken"]])
    ct = owner.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"t1 data", EncryptionContext=context)["CiphertextBlob"]
    assert other.kms.decrypt(CiphertextBlob=ct, EncryptionContext=context)["Plaintext"] == b"t1 data"

    # A subset parent admits a child that adds pairs, or turns it into an equals constraint.
    subset_parent = owner.kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=other.arn,
                                           Operations=["CreateGrant", "Encrypt"],
                                           Constraints={"EncryptionContextSubset": {"dept": "it"}})
    for constraints in ({"EncryptionContextSubset": {"dept": "it", "team": "a"}},
                        {"EncryptionContextEquals": {"dept": "it"}}):
        other.kms.create_grant(KeyId=key["Arn"], GranteePrincipal=holder.arn, Operations=["Encrypt"],
                               Constraints=constraints, GrantTokens=[subset_parent["GrantToken"]])
    with pytest.raises(ClientError) as e:
        other.kms.create_grant(KeyId=key["Arn"], GranteePrincipal=holder.arn, Operations=["Encrypt"],
                               Constraints={"EncryptionContextSubset": {"team": "a"}},
                               GrantTokens=[subset_parent["GrantToken"]])
    assert code(e) == "AccessDeniedException"

    # A grant of CreateGrant alone lets its holder make no grant for anything else.
    bare = owner.kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=other.arn, Operations=["CreateGrant"])
    with pytest.raises(ClientError) as e:
        other.kms.create_grant(KeyId=key["Arn"], GranteePrincipal=other.arn, Operations=["Decrypt"],
                               GrantTokens=[bare["GrantToken"]])
    assert code(e) == "AccessDeniedException"

    # The key policy is not limited so: the key's account may grant anything.
    owner.kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=other.arn, Operations=["Encrypt", "Decrypt"])

    # Every refusal is in the audit log.
    assert len(denials(operator, holder.arn, "CreateGrant")) == len(wider)
    assert len(denials(operator, other.arn, "CreateGrant")) == 3


def test_a_grant_to_an_account_limits_what_its_users_may_grant(server: ServerProcess, operator: AdminClient,
                                                                make_user: Callable[..., User]) -> None:
    owner_account, partner_account = new_account(operator, "grant-owner"), new_account(operator, "grant-partner")
    owner = make_user(owner_account, "owner", admin=True)
    key = owner.kms.create_key()["KeyMetadata"]
    may_grant = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["kms:CreateGrant", "kms:Decrypt"], "Resource": key["Arn"]}]})
    partner = make_user(partner_account, "app", policy=may_grant)
    owner.kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=f"arn:aws:iam::{partner_account}:root",
                           Operations=["CreateGrant", "Decrypt"],
                           Constraints={"EncryptionContextSubset": {"tenant": "p"}})
    # The partner's identity policy allows CreateGrant, but the permission comes from the grant.
    with pytest.raises(ClientError) as e:
        partner.kms.create_grant(KeyId=key["Arn"], GranteePrincipal=partner.arn, Operations=["Decrypt"])
    assert code(e) == "AccessDeniedException"
    partner.kms.create_grant(KeyId=key["Arn"], GranteePrincipal=partner.arn, Operations=["Decrypt"],
                             Constraints={"EncryptionContextSubset": {"tenant": "p"}})


# -- account administrators stay in their account ----------------------------------------------------

@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> AdminCli:
    return AdminCli(server, [server.secret_access_key])


def cli_user(admin: AdminCli, tmp_path: Path, account_id: str, name: str, *flags: str) -> Path:
    """A user made by the operator, and a credentials file for it."""
    admin("create-user", "--account-id", account_id, "--user-name", name, *flags)
    key = admin("create-access-key", "--account-id", account_id, "--user-name", name)["AccessKey"]
    return write_credentials(tmp_path / f"{account_id}-{name}", key["AccessKeyId"], key["SecretAccessKey"])


def test_an_account_administrator_administers_only_its_own_account(
        server: ServerProcess, admin: AdminCli, operator: AdminClient, tmp_path: Path) -> None:
    # The README's SaaS example: the operator makes the customer's and the vendor's accounts.
    customer, vendor = random_account_id(), random_account_id()
    admin("create-account", "--name", "customer", "--account-id", customer)
    admin("create-account", "--name", "vendor", "--account-id", vendor)
    vendor_app = cli_user(admin, tmp_path, vendor, "app")
    vendor_key = admin("list-access-keys", "--account-id", vendor, "--user-name", "app")["AccessKeys"][0]
    ops = admin("list-access-keys", "--account-id", ADMIN_ACCOUNT, "--user-name", "admin")["AccessKeys"][0]
    boss = cli_user(admin, tmp_path, customer, "boss", "--admin")

    def refused(*args: str) -> str:
        return admin.fails("AccessDeniedException", *args, credentials=boss)

    me = admin.run("get-user", credentials=boss)
    assert me.returncode == 0, me.stderr
    assert json.loads(me.stdout)["User"]["Level"] == "account-admin"
    # Another account, in every way the admin API offers.
    refused("create-user", "--account-id", vendor, "--user-name", "mole")
    refused("create-user", "--account-id", vendor, "--user-name", "mole", "--admin")
    refused("list-users", "--account-id", vendor)
    refused("get-user", "--account-id", vendor, "--user-name", "app")
    refused("delete-user", "--account-id", vendor, "--user-name", "app")
    refused("create-access-key", "--account-id", vendor, "--user-name", "app")
    refused("list-access-keys", "--account-id", vendor, "--user-name", "app")
    refused("update-access-key", "--access-key-id", vendor_key["AccessKeyId"], "--status", "Inactive")
    refused("delete-access-key", "--access-key-id", vendor_key["AccessKeyId"])
    refused("put-user-policy", "--account-id", vendor, "--user-name", "app", "--policy-name", "p",
            "--policy-document", '{"Version": "2012-10-17", "Statement": []}')
    refused("list-user-policies", "--account-id", vendor, "--user-name", "app")
    # The operator and its account, and what only an operator may do.
    refused("create-access-key", "--account-id", ADMIN_ACCOUNT, "--user-name", "admin")
    refused("update-access-key", "--access-key-id", ops["AccessKeyId"], "--status", "Inactive")
    refused("create-user", "--account-id", ADMIN_ACCOUNT, "--user-name", "mole", "--admin")
    refused("create-user", "--account-id", customer, "--user-name", "mole", "--operator")
    refused("create-account", "--name", "mine")
    refused("delete-account", "--account-id", vendor)
    # Another account's audit records.
    proc = run_audit(server, boss, "query", "--account-id", vendor)
    assert proc.returncode != 0 and "AccessDeniedException" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_audit(server, boss, "query", "--account-id", customer)
    assert proc.returncode == 0, proc.stderr
    # It sees only its own account.
    proc = admin.run("list-accounts", credentials=boss)
    assert proc.returncode == 0, proc.stderr
    assert [a["AccountId"] for a in json.loads(proc.stdout)["Accounts"]] == [customer]
    # Nothing was made or changed: the vendor's app still works, the vendor has one user.
    assert [u["UserName"] for u in admin("list-users", "--account-id", vendor)["Users"]] == ["app"]
    vendor_keys = admin("list-access-keys", "--account-id", vendor, "--user-name", "app")["AccessKeys"]
    assert [k["Status"] for k in vendor_keys] == ["Active"]
    assert admin("list-access-keys", "--account-id", ADMIN_ACCOUNT, "--user-name", "admin")["AccessKeys"] == [ops]
    assert "mine" not in {a["Name"] for a in admin("list-accounts")["Accounts"]}
    assert admin.run("list-accounts", credentials=vendor_app).returncode != 0  # a plain user: no admin API

    # Within its own account it acts as the account's root: users, administrators, policies, keys.
    def ok(*args: str) -> Any:
        proc = admin.run(*args, credentials=boss)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        return json.loads(proc.stdout)

    assert ok("create-user", "--account-id", customer, "--user-name", "app")["User"]["Level"] == "user"
    assert ok("create-user", "--account-id", customer, "--user-name", "deputy", "--admin")["User"]["Level"] == \
        "account-admin"
    ok("put-user-policy", "--account-id", customer, "--user-name", "app", "--policy-name", "kms",
       "--policy-document", '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", '
       '"Resource": "*"}]}')
    key = ok("create-access-key", "--account-id", customer, "--user-name", "app")["AccessKey"]
    app = server.client(key["AccessKeyId"], key["SecretAccessKey"])
    assert app.create_key()["KeyMetadata"]["AWSAccountId"] == customer
    assert {u["UserName"]: u["Level"] for u in ok("list-users", "--account-id", customer)["Users"]} == {
        "app": "user", "boss": "account-admin", "deputy": "account-admin"}
    ok("update-access-key", "--access-key-id", key["AccessKeyId"], "--status", "Inactive")
    with pytest.raises(ClientError) as e:
        app.list_keys()
    assert code(e) == "UnrecognizedClientException"
    ok("delete-user", "--account-id", customer, "--user-name", "deputy")
    admin.fails("DeleteConflictException", "delete-user", "--account-id", customer, "--user-name", "boss",
                credentials=boss)

    # The operator sees each refusal in the audit log, with the admin API as its source.
    boss_arn = f"arn:aws:iam::{customer}:user/boss"
    refusals = operator.call("QueryAuditEvents", PrincipalArn=boss_arn, ErrorCode="AccessDeniedException",
                             Limit=1000)["Events"]
    assert len(refusals) >= 17
    assert {e["eventSource"] for e in refusals} >= {"openkms.admin"}
    assert {"CreateUser", "CreateAccessKey", "UpdateAccessKey", "DeleteAccount", "QueryAuditEvents"} <= {
        e["eventName"] for e in refusals}


def run_audit(server: ServerProcess, credentials: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPENKMS_"))}
    return subprocess.run([sys.executable, "-m", "openkms.cli.main", "audit", command, "--endpoint-url",
                           server.endpoint, "--credentials-file", str(credentials), *args],
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def test_operators_levels_and_deleting_accounts(server: ServerProcess, admin: AdminCli, tmp_path: Path) -> None:
    me = admin("get-user")["User"]
    assert (me["AccountId"], me["UserName"], me["Level"], me["Operator"]) == (ADMIN_ACCOUNT, "admin", "operator", True)
    # An operator may make another operator, in any account, and it manages every account.
    other = admin("create-account", "--name", "ops-team", "--account-id", random_account_id())["Account"]["AccountId"]
    second = cli_user(admin, tmp_path, other, "ops", "--operator")
    proc = admin.run("list-accounts", credentials=second)
    assert proc.returncode == 0 and ADMIN_ACCOUNT in proc.stdout
    assert admin("get-user", "--account-id", other, "--user-name", "ops")["User"]["Level"] == "operator"

    # DeleteAccount: refused while the account holds keys not yet deleted (pending deletion too).
    doomed = admin("create-account", "--name", "doomed", "--account-id", random_account_id())["Account"]["AccountId"]
    admin("create-user", "--account-id", doomed, "--user-name", "boss", "--admin")
    key = admin("create-access-key", "--account-id", doomed, "--user-name", "boss")["AccessKey"]
    kms = server.client(key["AccessKeyId"], key["SecretAccessKey"])
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    admin.fails("DeleteConflictException", "delete-account", "--account-id", doomed)
    kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    admin.fails("DeleteConflictException", "delete-account", "--account-id", doomed)
    admin.fails("DeleteConflictException", "delete-account", "--account-id", ADMIN_ACCOUNT)  # its own
    admin.fails("NotFoundException", "delete-account", "--account-id", "000000000001")

    empty = admin("create-account", "--name", "empty", "--account-id", random_account_id())["Account"]["AccountId"]
    user_creds = cli_user(admin, tmp_path, empty, "boss", "--admin")
    user_key = admin("list-access-keys", "--account-id", empty, "--user-name", "boss")["AccessKeys"][0]["AccessKeyId"]
    assert admin("delete-account", "--account-id", empty) == {}
    assert empty not in {a["AccountId"] for a in admin("list-accounts")["Accounts"]}
    admin.fails("NotFoundException", "list-users", "--account-id", empty)
    # Its users' keys stopped working at once.
    assert admin.run("get-user", credentials=user_creds).returncode != 0
    admin.fails("NotFoundException", "delete-access-key", "--access-key-id", user_key)
