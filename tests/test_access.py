"""Access control end to end: key policies, identity policies, grants and cross-account use (boto3)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.exceptions import ClientError

from openkms.client.admin import AdminClient
from tests.conftest import ACCOUNT_ID
from tests.server import REGION, ServerProcess


def code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def message(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Message"])


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


@dataclass
class User:
    account_id: str
    name: str
    kms: Any

    @property
    def arn(self) -> str:
        return f"arn:aws:iam::{self.account_id}:user/{self.name}"


@dataclass
class Org:
    """An account with an administrator (its root) and a way to add users."""

    account_id: str
    admin: User
    make_user: Callable[[str, str | None], User]


@pytest.fixture(scope="module")
def admin_api(server: ServerProcess) -> AdminClient:
    return AdminClient(server.endpoint, server.access_key_id, server.secret_access_key, REGION)


@pytest.fixture(scope="module")
def org(server: ServerProcess, admin_api: AdminClient) -> Callable[[str], Org]:
    def make(name: str) -> Org:
        account_id = "".join(secrets.choice("0123456789") for _ in range(12))
        admin_api.call("CreateAccount", Name=name, AccountId=account_id)

        def make_user(user: str, identity_policy: str | None = None, admin: bool = False) -> User:
            admin_api.call("CreateUser", AccountId=account_id, UserName=user, Admin=admin)
            if identity_policy:
                admin_api.call("PutUserPolicy", AccountId=account_id, UserName=user, PolicyName="p",
                               PolicyDocument=identity_policy)
            key = admin_api.call("CreateAccessKey", AccountId=account_id, UserName=user)["AccessKey"]
            return User(account_id, user, server.client(key["AccessKeyId"], key["SecretAccessKey"]))

        return Org(account_id, make_user("admin", None, True), make_user)  # type: ignore[arg-type]
    return make


VENDOR_ACTIONS = ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]


def test_saas_vendor_uses_the_customers_key_until_the_customer_says_no(org: Callable[[str], Org]) -> None:
    customer, vendor, outsider = org("customer"), org("saas-vendor"), org("outsider")
    key = customer.admin.kms.create_key(Description="customer data key")["KeyMetadata"]
    key_arn = key["Arn"]
    root_statement = {"Sid": "Enable IAM User Permissions", "Effect": "Allow",
                      "Principal": {"AWS": f"arn:aws:iam::{customer.account_id}:root"}, "Action": "kms:*",
                      "Resource": "*"}
    vendor_statement = {"Sid": "SaaS vendor", "Effect": "Allow",
                        "Principal": {"AWS": f"arn:aws:iam::{vendor.account_id}:root"},
                        "Action": VENDOR_ACTIONS, "Resource": "*"}
    customer.admin.kms.put_key_policy(KeyId=key["KeyId"], PolicyName="default",
                                      Policy=policy(root_statement, vendor_statement))
    app = vendor.make_user("app", policy({"Effect": "Allow", "Action": VENDOR_ACTIONS, "Resource": key_arn}))
    intern = vendor.make_user("intern", None)  # no identity policy
    stranger = outsider.make_user("app", policy({"Effect": "Allow", "Action": "kms:*", "Resource": "*"}))

    # The vendor's application encrypts tenant data under the customer's key, by ARN.
    data_key = app.kms.generate_data_key(KeyId=key_arn, KeySpec="AES_256", EncryptionContext={"tenant": "c1"})
    assert data_key["KeyId"] == key_arn
    assert app.kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext={"tenant": "c1"},
                           KeyId=key_arn)["Plaintext"] == data_key["Plaintext"]
    assert app.kms.describe_key(KeyId=key_arn)["KeyMetadata"]["AWSAccountId"] == customer.account_id
    # Only what the policy lists: no ScheduleKeyDeletion, and the key is not the vendor's to list.
    with pytest.raises(ClientError) as e:
        app.kms.schedule_key_deletion(KeyId=key_arn)
    assert code(e) == "AccessDeniedException"
    assert key["KeyId"] not in [k["KeyId"] for k in vendor.admin.kms.list_keys()["Keys"]]
    # Aliases never resolve across accounts, and a bare key id means a key of one's own account.
    customer.admin.kms.create_alias(AliasName="alias/customer-data", TargetKeyId=key["KeyId"])
    for ref in ("alias/customer-data", f"arn:aws:kms:{REGION}:{customer.account_id}:alias/customer-data",
                key["KeyId"]):
        with pytest.raises(ClientError) as e:
            app.kms.encrypt(KeyId=ref, Plaintext=b"x")
        assert code(e) == "NotFoundException"

    # An outsider is denied, whatever its own identity policy says.
    with pytest.raises(ClientError) as e:
        stranger.kms.encrypt(KeyId=key_arn, Plaintext=b"x")
    assert code(e) == "AccessDeniedException"
    assert "because no resource-based policy allows the kms:Encrypt action" in message(e)
    # A vendor user without the identity policy is denied though the key policy allows its account.
    with pytest.raises(ClientError) as e:
        intern.kms.encrypt(KeyId=key_arn, Plaintext=b"x")
    assert code(e) == "AccessDeniedException"
    assert message(e) == (f"User: {intern.arn} is not authorized to perform: kms:Encrypt on resource: {key_arn} "
                          "because no identity-based policy allows the kms:Encrypt action")

    # The customer removes the vendor's statement: the vendor is denied at once.
    customer.admin.kms.put_key_policy(KeyId=key["KeyId"], PolicyName="default", Policy=policy(root_statement))
    with pytest.raises(ClientError) as e:
        app.kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext={"tenant": "c1"})
    assert code(e) == "AccessDeniedException"
    # Restored, then the key disabled instead: denied again; enabled: the data is readable again.
    customer.admin.kms.put_key_policy(KeyId=key["KeyId"], PolicyName="default",
                                      Policy=policy(root_statement, vendor_statement))
    assert app.kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"],
                           EncryptionContext={"tenant": "c1"})["Plaintext"] == data_key["Plaintext"]
    customer.admin.kms.disable_key(KeyId=key["KeyId"])
    with pytest.raises(ClientError) as e:
        app.kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext={"tenant": "c1"})
    assert code(e) == "DisabledException"
    customer.admin.kms.enable_key(KeyId=key["KeyId"])
    assert app.kms.encrypt(KeyId=key_arn, Plaintext=b"back")["KeyId"] == key_arn


def test_key_administrator_cannot_decrypt(org: Callable[[str], Org]) -> None:
    acme = org("acme")
    key = acme.admin.kms.create_key()["KeyMetadata"]
    ct = acme.admin.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"payroll")["CiphertextBlob"]
    key_admin = acme.make_user("keyadmin", policy({"Effect": "Allow", "Action": ["kms:Describe*", "kms:Put*",
                                                                                 "kms:Enable*", "kms:Disable*",
                                                                                 "kms:Get*", "kms:List*",
                                                                                 "kms:TagResource"],
                                                   "Resource": "*"}))
    key_admin.kms.disable_key(KeyId=key["KeyId"])
    key_admin.kms.enable_key(KeyId=key["KeyId"])
    assert key_admin.kms.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"]
    with pytest.raises(ClientError) as e:
        key_admin.kms.decrypt(CiphertextBlob=ct)
    assert code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:
        key_admin.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert code(e) == "AccessDeniedException"


def test_key_policy_alone_can_allow_a_user(org: Callable[[str], Org]) -> None:
    acme = org("acme-direct")
    user = acme.make_user("direct", None)
    key = acme.admin.kms.create_key(Policy=policy(
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{acme.account_id}:root"}, "Action": "kms:*",
         "Resource": "*"},
        {"Effect": "Allow", "Principal": {"AWS": user.arn}, "Action": "kms:Encrypt", "Resource": "*"}))["KeyMetadata"]
    assert user.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")["KeyId"] == key["Arn"]
    with pytest.raises(ClientError) as e:
        user.kms.decrypt(CiphertextBlob=b"\x01" * 60)
    assert code(e) in ("AccessDeniedException", "InvalidCiphertextException")


def test_encryption_context_conditions_and_explicit_deny(org: Callable[[str], Org]) -> None:
    acme = org("acme-context")
    root = {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{acme.account_id}:root"}, "Action": "kms:*",
            "Resource": "*"}
    user = acme.make_user("tenant-app", None)
    key = acme.admin.kms.create_key(Policy=policy(
        root,
        {"Sid": "Tenant t1 only", "Effect": "Allow", "Principal": {"AWS": user.arn},
         "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*",
         "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": "t1"}}},
        {"Sid": "Never from this address", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt",
         "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:classification": "secret"}}},
    ))["KeyMetadata"]
    ct = user.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"t1 data", EncryptionContext={"tenant": "t1"})
    assert user.kms.decrypt(CiphertextBlob=ct["CiphertextBlob"], EncryptionContext={"tenant": "t1"})["Plaintext"] == \
        b"t1 data"
    for context in ({"tenant": "t2"}, {}):
        with pytest.raises(ClientError) as e:
            user.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x", EncryptionContext=context)
        assert code(e) == "AccessDeniedException"
    # An explicit deny wins over every allow, the account root's too.
    secret = acme.admin.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"s",
                                    EncryptionContext={"classification": "secret"})["CiphertextBlob"]
    with pytest.raises(ClientError) as e:
        acme.admin.kms.decrypt(CiphertextBlob=secret, EncryptionContext={"classification": "secret"})
    assert code(e) == "AccessDeniedException"
    assert "explicit deny in a resource-based policy" in message(e)


def test_key_policy_operations(org: Callable[[str], Org]) -> None:
    acme = org("acme-policy")
    kms = acme.admin.kms
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    default = json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
    assert default["Statement"][0]["Principal"] == {"AWS": f"arn:aws:iam::{acme.account_id}:root"}
    assert default["Statement"][0]["Action"] == "kms:*"
    assert kms.list_key_policies(KeyId=key_id)["PolicyNames"] == ["default"]
    with pytest.raises(ClientError) as e:
        kms.get_key_policy(KeyId=key_id, PolicyName="other")
    assert code(e) == "NotFoundException"
    for bad in ("not json", "{}", json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Maybe"}]})):
        with pytest.raises(ClientError) as e:
            kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=bad)
        assert code(e) == "MalformedPolicyDocumentException"
    # A policy that would lock the caller out is refused unless the safety check is bypassed.
    lockout = policy({"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{acme.account_id}:root"},
                      "Action": "kms:Encrypt", "Resource": "*"})
    with pytest.raises(ClientError) as e:
        kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=lockout)
    assert code(e) == "MalformedPolicyDocumentException"
    with pytest.raises(ClientError) as e:
        kms.create_key(Policy=lockout)
    assert code(e) == "MalformedPolicyDocumentException"
    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=lockout, BypassPolicyLockoutSafetyCheck=True)
    kms.encrypt(KeyId=key_id, Plaintext=b"still allowed")
    with pytest.raises(ClientError) as e:  # the new policy allows nothing else, reading it included
        kms.get_key_policy(KeyId=key_id, PolicyName="default")
    assert code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:  # locked out, as warned
        kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(default))
    assert code(e) == "AccessDeniedException"


def test_grants(org: Callable[[str], Org]) -> None:
    acme = org("acme-grants")
    kms = acme.admin.kms
    key = kms.create_key()["KeyMetadata"]
    worker = acme.make_user("worker", None)
    retirer = acme.make_user("retirer", None)
    ct_ok = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"job", EncryptionContext={"job": "1", "x": "y"})
    ct_other = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"other", EncryptionContext={"job": "2"})
    with pytest.raises(ClientError) as e:  # nothing yet
        worker.kms.decrypt(CiphertextBlob=ct_ok["CiphertextBlob"], EncryptionContext={"job": "1", "x": "y"})
    assert code(e) == "AccessDeniedException"
    grant = kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=worker.arn, Operations=["Decrypt"],
                             RetiringPrincipal=retirer.arn, Constraints={"EncryptionContextSubset": {"job": "1"}},
                             Name="job-1")
    assert len(grant["GrantId"]) == 64
    # The grant token works at once.
    out = worker.kms.decrypt(CiphertextBlob=ct_ok["CiphertextBlob"], EncryptionContext={"job": "1", "x": "y"},
                             GrantTokens=[grant["GrantToken"]])
    assert out["Plaintext"] == b"job"
    # Exactly the granted operation, only under the constraint's context.
    with pytest.raises(ClientError) as e:
        worker.kms.decrypt(CiphertextBlob=ct_other["CiphertextBlob"], EncryptionContext={"job": "2"})
    assert code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:
        worker.kms.encrypt(KeyId=key["Arn"], Plaintext=b"x", EncryptionContext={"job": "1"})
    assert code(e) == "AccessDeniedException"
    # Idempotent by name.
    again = kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=worker.arn, Operations=["Decrypt"],
                             RetiringPrincipal=retirer.arn, Constraints={"EncryptionContextSubset": {"job": "1"}},
                             Name="job-1")
    assert again["GrantId"] == grant["GrantId"]
    listed = kms.list_grants(KeyId=key["KeyId"])["Grants"]
    assert [(g["GrantId"], g["GranteePrincipal"], g["Operations"], g["Name"]) for g in listed] == [
        (grant["GrantId"], worker.arn, ["Decrypt"], "job-1")]
    assert listed[0]["Constraints"] == {"EncryptionContextSubset": {"job": "1"}}
    assert listed[0]["IssuingAccount"] == f"arn:aws:iam::{acme.account_id}:root"
    retirable = kms.list_retirable_grants(RetiringPrincipal=retirer.arn)["Grants"]
    assert [g["GrantId"] for g in retirable] == [grant["GrantId"]]
    # The grantee cannot retire it (RetireGrant is not in the grant); the retiring principal can.
    with pytest.raises(ClientError) as e:
        worker.kms.retire_grant(KeyId=key["Arn"], GrantId=grant["GrantId"])
    assert code(e) == "AccessDeniedException"
    retirer.kms.retire_grant(GrantToken=grant["GrantToken"])
    with pytest.raises(ClientError) as e:
        worker.kms.decrypt(CiphertextBlob=ct_ok["CiphertextBlob"], EncryptionContext={"job": "1", "x": "y"})
    assert code(e) == "AccessDeniedException"
    assert kms.list_grants(KeyId=key["KeyId"])["Grants"] == []
    # Revoke: the key owner takes a grant back.
    second = kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=worker.arn, Operations=["Encrypt"])
    assert worker.kms.encrypt(KeyId=key["Arn"], Plaintext=b"x", GrantTokens=[second["GrantToken"]])["KeyId"] == \
        key["Arn"]
    kms.revoke_grant(KeyId=key["KeyId"], GrantId=second["GrantId"])
    with pytest.raises(ClientError) as e:
        worker.kms.encrypt(KeyId=key["Arn"], Plaintext=b"x", GrantTokens=[second["GrantToken"]])
    assert code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:
        kms.revoke_grant(KeyId=key["KeyId"], GrantId=second["GrantId"])
    assert code(e) == "NotFoundException"


def test_cross_account_grant(org: Callable[[str], Org]) -> None:
    owner, partner = org("grant-owner"), org("grant-partner")
    key = owner.admin.kms.create_key()["KeyMetadata"]
    partner_app = partner.make_user("app", None)
    grant = owner.admin.kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=partner_app.arn,
                                         Operations=["GenerateDataKey", "Decrypt"])
    dk = partner_app.kms.generate_data_key(KeyId=key["Arn"], KeySpec="AES_256", GrantTokens=[grant["GrantToken"]])
    assert partner_app.kms.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
    owner.admin.kms.revoke_grant(KeyId=key["KeyId"], GrantId=grant["GrantId"])
    with pytest.raises(ClientError) as e:
        partner_app.kms.decrypt(CiphertextBlob=dk["CiphertextBlob"])
    assert code(e) == "AccessDeniedException"


def test_identity_policy_needed_in_own_account(org: Callable[[str], Org], admin_api: AdminClient) -> None:
    acme = org("acme-identity")
    user = acme.make_user("reader", None)
    with pytest.raises(ClientError) as e:
        user.kms.create_key()
    assert code(e) == "AccessDeniedException"
    admin_api.call("PutUserPolicy", AccountId=acme.account_id, UserName="reader", PolicyName="create",
                   PolicyDocument=policy({"Effect": "Allow", "Action": ["kms:CreateKey", "kms:Encrypt"],
                                          "Resource": "*"}))
    key = user.kms.create_key()["KeyMetadata"]
    user.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    with pytest.raises(ClientError) as e:
        user.kms.list_keys()
    assert code(e) == "AccessDeniedException"
    assert admin_api.call("ListUserPolicies", AccountId=acme.account_id, UserName="reader")["PolicyNames"] == ["create"]
    admin_api.call("DeleteUserPolicy", AccountId=acme.account_id, UserName="reader", PolicyName="create")
    with pytest.raises(ClientError) as e:
        user.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert code(e) == "AccessDeniedException"


def test_malformed_identity_policy_refused(org: Callable[[str], Org], admin_api: AdminClient) -> None:
    acme = org("acme-bad-identity")
    acme.make_user("u", None)
    from openkms.client.admin import AdminError

    with pytest.raises(AdminError) as e:
        admin_api.call("PutUserPolicy", AccountId=acme.account_id, UserName="u", PolicyName="bad",
                       PolicyDocument="{not json")
    assert e.value.code == "MalformedPolicyDocumentException"


def test_audit_shows_cross_account_use_to_the_key_owner(server: ServerProcess, org: Callable[[str], Org]) -> None:
    owner, partner = org("audit-owner"), org("audit-partner")
    key = owner.admin.kms.create_key(Policy=policy(
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{owner.account_id}:root"}, "Action": "kms:*",
         "Resource": "*"},
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{partner.account_id}:root"},
         "Action": "kms:Encrypt", "Resource": "*"}))["KeyMetadata"]
    request_id = partner.admin.kms.encrypt(KeyId=key["Arn"], Plaintext=b"x")["ResponseMetadata"]["RequestId"]
    seen = {}
    for who in (owner, partner):
        # Each account's administrator queries the audit log through the admin API, scoped to its account.
        user = who.admin
        client = user.kms
        creds = client._request_signer._credentials  # the same keys, for the admin API client
        api = AdminClient(server.endpoint, creds.access_key, creds.secret_key, REGION)
        events = api.call("QueryAuditEvents", KeyId=key["KeyId"], EventName="Encrypt")["Events"]
        seen[who.account_id] = [e["requestID"] for e in events]
    assert request_id in seen[owner.account_id] and request_id in seen[partner.account_id]
    assert ACCOUNT_ID  # the bootstrap account is neither of them
