"""The authorization matrix: for every operation the server implements, who is refused and who succeeds.

The operations come from botocore's KMS model (those the service implements) and from the admin
API's operation table, so a new operation fails `test_every_operation_has_a_row` until someone
says here who may call it. Each row sets up what its operation needs, then calls it, against a
real server on SQLite and on PostgreSQL:

KMS operations on a key of account A (named by its ARN) are refused (AccessDeniedException, or
for a row that says so the error AWS gives before authorization, e.g. NotFoundException for an
alias that only resolves in its own account) to
  - a user of A with no identity policy,
  - a user of another account B whose identity policy allows kms:* on every resource,
  - B's account administrator,
  - a user of A holding a grant on the key for some other operation;
and succeed for A's administrator (the account's root) and a user of A whose identity policy
allows kms:* (the default key policy delegates to identity policies). Operations on no key
(CreateKey, ListKeys, ...) are refused to A's users without an identity policy, grant or not.

Admin operations, all aimed at account A, are allowed as `OPERATIONS` scopes them: operator-only
ones to the operator; account ones to the operator and A's administrator, never to B's
administrator or A's plain user; open ones to everyone (scoped to the caller's own account).

Secrets Manager operations (botocore's secretsmanager model, every one of which the secrets
package's table serves) are authorized as `secretsmanager:<Operation>` by IAM's rules. On a secret
of A (made by A's administrator, with a value, named by its ARN) they succeed for A's administrator
and for `a_secrets`, a user of A whose identity policy allows secretsmanager:* and nothing of KMS
(the value is sealed under A's AWS managed key aws/secretsmanager, which any principal of A may use
through Secrets Manager). They are refused (AccessDeniedException) to A's user with no policy, to
A's user whose policy allows only kms:*, to `b_secrets` (B, secretsmanager:* and kms:Decrypt) and
to B's administrator, since the secret has no resource policy; two tests share a secret with B.
Operations on no secret are scoped to the caller's account, so B's principals succeed there. An
operation this server does not do (replication) or cannot do here
(RotateSecret with no rotation function) answers its error to the allowed callers only: the others
are refused first.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.loaders
import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from openkms.api.admin import OPERATIONS as ADMIN_OPERATIONS
from openkms.api.admin import Scope
from openkms.client.admin import AdminClient, AdminError
from openkms.client.byok import wrap_key_material
from openkms.secrets import OPERATIONS as SECRETS_OPERATIONS
from openkms.service import OPERATIONS
from tests.conftest import SoftHsm, softhsm_available, trust_anchor
from tests.server import REGION, ServerProcess

KMS_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]})
SECRETS_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"}]})
# A principal of B that reads A's shared secrets needs the right to decrypt with A's key too (IAM:
# across accounts both the key policy and the caller's own policies must allow).
SECRETS_AND_DECRYPT = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"},
    {"Effect": "Allow", "Action": ["kms:Decrypt", "kms:GenerateDataKey"], "Resource": "*"}]})


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def implemented_kms_operations() -> set[str]:
    """The operations of botocore's KMS model that the service's table serves."""
    model = botocore.loaders.Loader().load_service_model("kms", "service-2")
    return set(model["operations"]) & set(OPERATIONS)


@dataclass
class Who:
    name: str
    account_id: str
    user: str
    kms: Any
    admin: AdminClient
    sm: Any = None  # a Secrets Manager client

    @property
    def arn(self) -> str:
        return f"arn:aws:iam::{self.account_id}:user/{self.user}"


@dataclass
class World:
    server: ServerProcess
    operator: Who
    a: str          # the key's account
    b: str          # another account
    people: dict[str, Who]
    counter: list[int] = field(default_factory=lambda: [0])
    hsm: SoftHsm | None = None

    def __getitem__(self, name: str) -> Who:
        return self.people[name]

    def unique(self, prefix: str) -> str:
        self.counter[0] += 1
        return f"{prefix}-{self.counter[0]}-{secrets.token_hex(3)}"

    @property
    def root(self) -> Any:
        return self.people["a_admin"].kms

    @functools.cached_property
    def trust_anchor(self) -> str:
        return trust_anchor(Path(tempfile.mkdtemp()))


def _person(server: ServerProcess, operator: AdminClient, name: str, account_id: str, *, admin: bool = False,
            policy: str | None = None) -> Who:
    user = f"{name}-{secrets.token_hex(2)}"
    operator.call("CreateUser", AccountId=account_id, UserName=user, Admin=admin or None)
    if policy:
        operator.call("PutUserPolicy", AccountId=account_id, UserName=user, PolicyName="p", PolicyDocument=policy)
    key = operator.call("CreateAccessKey", AccountId=account_id, UserName=user)["AccessKey"]
    return Who(name, account_id, user, server.client(key["AccessKeyId"], key["SecretAccessKey"], retry=False),
               AdminClient(server.endpoint, key["AccessKeyId"], key["SecretAccessKey"], REGION),
               server.client(key["AccessKeyId"], key["SecretAccessKey"], service="secretsmanager", retry=False))


@pytest.fixture(scope="module")
def world(server: ServerProcess, request: pytest.FixtureRequest) -> World:
    op_client = AdminClient(server.endpoint, server.access_key_id, server.secret_access_key, REGION)
    me = op_client.call("GetUser")["User"]
    operator = Who("operator", me["AccountId"], me["UserName"], server.client(retry=False), op_client)
    a, b = (str(secrets.randbelow(9 * 10**11) + 10**11) for _ in range(2))
    op_client.call("CreateAccount", Name="matrix-a", AccountId=a)
    op_client.call("CreateAccount", Name="matrix-b", AccountId=b)
    people = {
        "a_admin": _person(server, op_client, "a_admin", a, admin=True),
        "a_user": _person(server, op_client, "a_user", a, policy=KMS_ALL),
        "a_bare": _person(server, op_client, "a_bare", a),
        "a_grantee": _person(server, op_client, "a_grantee", a),
        "b_user": _person(server, op_client, "b_user", b, policy=KMS_ALL),
        "b_admin": _person(server, op_client, "b_admin", b, admin=True),
        "a_secrets": _person(server, op_client, "a_secrets", a, policy=SECRETS_ALL),
        "b_secrets": _person(server, op_client, "b_secrets", b, policy=SECRETS_AND_DECRYPT),
    }
    hsm = request.getfixturevalue("softhsm") if softhsm_available() else None
    return World(server, operator, a, b, people, hsm=hsm)


# -- KMS rows ---------------------------------------------------------------------------------------

State = dict[str, Any]


@dataclass(frozen=True)
class Row:
    """`setup(world)` makes what one call needs (with A's administrator); `params(world, state, who)`
    is the request. `allowed`: who succeeds; `foreign`: the code B's principals get."""

    setup: Callable[[World], State]
    params: Callable[[World, State, Who], dict[str, Any]]
    on_key: bool = True
    allowed: tuple[str, ...] = ("a_admin", "a_user")
    foreign: str = "AccessDeniedException"
    # A resource of A that is not a key (a custom key store): B's principals get `foreign` for it.
    of_account: bool = False
    needs_hsm: bool = False


def key(spec: str = "SYMMETRIC_DEFAULT", usage: str | None = None, grantee_may: str = "DescribeKey",
        **extra: Any) -> Callable[[World], State]:
    """A new key of A, and a grant on it to `a_grantee` for another operation than the row's."""
    def setup(w: World) -> State:
        args: dict[str, Any] = {"KeySpec": spec, **extra}
        if usage:
            args["KeyUsage"] = usage
        md = w.root.create_key(**args)["KeyMetadata"]
        w.root.create_grant(KeyId=md["KeyId"], GranteePrincipal=w["a_grantee"].arn, Operations=[grantee_may])
        return {"arn": md["Arn"], "key_id": md["KeyId"]}
    return setup


def then(first: Callable[[World], State], more: Callable[[World, State], State]) -> Callable[[World], State]:
    def setup(w: World) -> State:
        state = first(w)
        state.update(more(w, state))
        return state
    return setup


def on_key(**fixed: Any) -> Callable[[World, State, Who], dict[str, Any]]:
    return lambda w, s, who: {"KeyId": s["arn"], **fixed}


def peer_public_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def imported(w: World, s: State) -> State:
    params = w.root.get_parameters_for_import(KeyId=s["arn"], WrappingAlgorithm="RSAES_OAEP_SHA_256",
                                              WrappingKeySpec="RSA_2048")
    return {"token": params["ImportToken"],
            "wrapped": wrap_key_material(params["PublicKey"], "RSAES_OAEP_SHA_256", os.urandom(32))}


def do_import(w: World, s: State) -> State:
    state = imported(w, s)
    w.root.import_key_material(KeyId=s["arn"], ImportToken=state["token"], EncryptedKeyMaterial=state["wrapped"],
                               ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    return {}


def grant(retiring: str | None = None) -> Callable[[World, State], State]:
    def more(w: World, s: State) -> State:
        args: dict[str, Any] = {"KeyId": s["key_id"], "GranteePrincipal": w["a_bare"].arn, "Operations": ["Decrypt"]}
        if retiring:
            args["RetiringPrincipal"] = w[retiring].arn
        g = w.root.create_grant(**args)
        return {"grant_id": g["GrantId"], "grant_token": g["GrantToken"]}
    return more


def alias(w: World, s: State) -> State:
    name = "alias/" + w.unique("matrix")
    w.root.create_alias(AliasName=name, TargetKeyId=s["key_id"])
    return {"alias": name, "other_key": w.root.create_key()["KeyMetadata"]["Arn"]}


def no_setup(w: World) -> State:
    return {}


PIN = "matrix-pin-1"
KEY_STORE: dict[str, Any] = {"on_key": False, "of_account": True, "foreign": "CustomKeyStoreNotFoundException",
                             "needs_hsm": True}


def new_cluster(w: World) -> str:
    """A fresh SoftHSM token registered as an HSM cluster of account A (one key store per cluster)."""
    assert w.hsm is not None
    label = w.hsm.init_token(pin=PIN)
    return str(w.operator.admin.call("CreateHsmCluster", Pkcs11Module=w.hsm.module, TokenLabel=label,
                                     TrustAnchorCertificate=w.trust_anchor, AccountId=w.a)["ClusterId"])


def new_key_store(w: World, connect: bool = False) -> State:
    cks = w.root.create_custom_key_store(CustomKeyStoreName=w.unique("store"), CloudHsmClusterId=new_cluster(w),
                                         TrustAnchorCertificate=w.trust_anchor,
                                         KeyStorePassword=PIN)["CustomKeyStoreId"]
    if connect:
        w.root.connect_custom_key_store(CustomKeyStoreId=cks)
    return {"cks": cks}


SYM = key()
CONTEXT = {"purpose": "matrix"}
ROWS: dict[str, Row] = {
    # keys
    "CreateKey": Row(no_setup, lambda w, s, who: {"Description": "matrix"}, on_key=False),
    "ListKeys": Row(no_setup, lambda w, s, who: {}, on_key=False),
    "DescribeKey": Row(key(grantee_may="Encrypt"), on_key()),
    "EnableKey": Row(then(SYM, lambda w, s: w.root.disable_key(KeyId=s["key_id"]) and {}), on_key()),
    "DisableKey": Row(SYM, on_key()),
    "ScheduleKeyDeletion": Row(SYM, on_key(PendingWindowInDays=7)),
    "CancelKeyDeletion": Row(then(SYM, lambda w, s: w.root.schedule_key_deletion(KeyId=s["key_id"]) and {}),
                             on_key()),
    "UpdateKeyDescription": Row(SYM, on_key(Description="changed")),
    "GetKeyLastUsage": Row(SYM, on_key()),
    # tags
    "TagResource": Row(SYM, on_key(Tags=[{"TagKey": "team", "TagValue": "a"}])),
    "UntagResource": Row(then(SYM, lambda w, s: w.root.tag_resource(
        KeyId=s["key_id"], Tags=[{"TagKey": "team", "TagValue": "a"}]) and {}), on_key(TagKeys=["team"])),
    "ListResourceTags": Row(SYM, on_key()),
    # aliases: an alias name only ever resolves in the caller's own account
    "CreateAlias": Row(SYM, lambda w, s, who: {"AliasName": "alias/" + w.unique("new"), "TargetKeyId": s["arn"]}),
    "UpdateAlias": Row(then(SYM, alias), lambda w, s, who: {"AliasName": s["alias"], "TargetKeyId": s["other_key"]}),
    "DeleteAlias": Row(then(SYM, alias), lambda w, s, who: {"AliasName": s["alias"]}, foreign="NotFoundException"),
    "ListAliases": Row(no_setup, lambda w, s, who: {}, on_key=False),
    # symmetric cryptography
    "Encrypt": Row(SYM, on_key(Plaintext=b"data", EncryptionContext=CONTEXT)),
    "Decrypt": Row(then(SYM, lambda w, s: {"ct": w.root.encrypt(KeyId=s["key_id"], Plaintext=b"data",
                                                                  EncryptionContext=CONTEXT)["CiphertextBlob"]}),
                   lambda w, s, who: {"CiphertextBlob": s["ct"], "EncryptionContext": CONTEXT}),
    "ReEncrypt": Row(then(SYM, lambda w, s: {
        "ct": w.root.encrypt(KeyId=s["key_id"], Plaintext=b"data")["CiphertextBlob"],
        "dest": w.root.create_key()["KeyMetadata"]["Arn"]}),
        lambda w, s, who: {"CiphertextBlob": s["ct"], "DestinationKeyId": s["dest"]}),
    "GenerateDataKey": Row(SYM, on_key(KeySpec="AES_256")),
    "GenerateDataKeyWithoutPlaintext": Row(SYM, on_key(KeySpec="AES_256")),
    "GenerateDataKeyPair": Row(SYM, on_key(KeyPairSpec="ECC_NIST_P256")),
    "GenerateDataKeyPairWithoutPlaintext": Row(SYM, on_key(KeyPairSpec="ECC_NIST_P256")),
    "GenerateRandom": Row(no_setup, lambda w, s, who: {"NumberOfBytes": 16}, on_key=False),
    # asymmetric and HMAC
    "GetPublicKey": Row(key("ECC_NIST_P256", "SIGN_VERIFY"), on_key()),
    "Sign": Row(key("ECC_NIST_P256", "SIGN_VERIFY"), on_key(Message=b"m", SigningAlgorithm="ECDSA_SHA_256")),
    "Verify": Row(then(key("ECC_NIST_P256", "SIGN_VERIFY"), lambda w, s: {"sig": w.root.sign(
        KeyId=s["key_id"], Message=b"m", SigningAlgorithm="ECDSA_SHA_256")["Signature"]}),
        lambda w, s, who: {"KeyId": s["arn"], "Message": b"m", "SigningAlgorithm": "ECDSA_SHA_256",
                           "Signature": s["sig"]}),
    "GenerateMac": Row(key("HMAC_256", "GENERATE_VERIFY_MAC"), on_key(Message=b"m", MacAlgorithm="HMAC_SHA_256")),
    "VerifyMac": Row(then(key("HMAC_256", "GENERATE_VERIFY_MAC"), lambda w, s: {"mac": w.root.generate_mac(
        KeyId=s["key_id"], Message=b"m", MacAlgorithm="HMAC_SHA_256")["Mac"]}),
        lambda w, s, who: {"KeyId": s["arn"], "Message": b"m", "MacAlgorithm": "HMAC_SHA_256", "Mac": s["mac"]}),
    "DeriveSharedSecret": Row(key("ECC_NIST_P256", "KEY_AGREEMENT"),
                              on_key(KeyAgreementAlgorithm="ECDH", PublicKey=peer_public_key())),
    # rotation
    "EnableKeyRotation": Row(SYM, on_key()),
    "DisableKeyRotation": Row(SYM, on_key()),
    "GetKeyRotationStatus": Row(SYM, on_key()),
    "RotateKeyOnDemand": Row(SYM, on_key()),
    "ListKeyRotations": Row(SYM, on_key()),
    # BYOK
    "GetParametersForImport": Row(key(Origin="EXTERNAL"),
                                  on_key(WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048")),
    "ImportKeyMaterial": Row(then(key(Origin="EXTERNAL"), imported), lambda w, s, who: {
        "KeyId": s["arn"], "ImportToken": s["token"], "EncryptedKeyMaterial": s["wrapped"],
        "ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"}),
    "DeleteImportedKeyMaterial": Row(then(key(Origin="EXTERNAL"), do_import), on_key()),
    # key policies
    "GetKeyPolicy": Row(SYM, on_key(PolicyName="default")),
    "ListKeyPolicies": Row(SYM, on_key()),
    "PutKeyPolicy": Row(SYM, lambda w, s, who: {"KeyId": s["arn"], "PolicyName": "default", "Policy": json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{w.a}:root"},
                                                 "Action": "kms:*", "Resource": "*"}]})}),
    # grants
    "CreateGrant": Row(SYM, lambda w, s, who: {"KeyId": s["arn"], "GranteePrincipal": w["a_bare"].arn,
                                               "Operations": ["Encrypt"]}),
    "ListGrants": Row(SYM, on_key()),
    "RevokeGrant": Row(then(SYM, grant()), lambda w, s, who: {"KeyId": s["arn"], "GrantId": s["grant_id"]}),
    # RetireGrant: by the key's account, or by the grant's retiring principal (here A's plain user).
    "RetireGrant": Row(then(SYM, grant(retiring="a_user")), lambda w, s, who: {"GrantToken": s["grant_token"]}),
    "ListRetirableGrants": Row(no_setup, lambda w, s, who: {"RetiringPrincipal": who.arn}, on_key=False),
    # custom key stores: identity policies decide; a store of another account is not found, and
    # neither is a cluster registered for another account
    "CreateCustomKeyStore": Row(lambda w: {"cluster": new_cluster(w)}, lambda w, s, who: {
        "CustomKeyStoreName": w.unique("store"), "CloudHsmClusterId": s["cluster"],
        "TrustAnchorCertificate": w.trust_anchor, "KeyStorePassword": PIN}, on_key=False, of_account=True,
        foreign="CloudHsmClusterNotFoundException", needs_hsm=True),
    "DescribeCustomKeyStores": Row(no_setup, lambda w, s, who: {}, on_key=False),
    "UpdateCustomKeyStore": Row(lambda w: new_key_store(w), lambda w, s, who: {
        "CustomKeyStoreId": s["cks"], "NewCustomKeyStoreName": w.unique("renamed")}, **KEY_STORE),
    "ConnectCustomKeyStore": Row(lambda w: new_key_store(w), lambda w, s, who: {"CustomKeyStoreId": s["cks"]},
                                 **KEY_STORE),
    "DisconnectCustomKeyStore": Row(lambda w: new_key_store(w, connect=True),
                                    lambda w, s, who: {"CustomKeyStoreId": s["cks"]}, **KEY_STORE),
    "DeleteCustomKeyStore": Row(lambda w: new_key_store(w), lambda w, s, who: {"CustomKeyStoreId": s["cks"]},
                                **KEY_STORE),
}


def call(who: Who, operation: str, params: dict[str, Any]) -> str | None:
    """The error code of the call, or None if it succeeded."""
    try:
        getattr(who.kms, snake(operation))(**params)
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
    return None


def test_every_operation_has_a_row() -> None:
    implemented = implemented_kms_operations()
    assert len(implemented) >= 46
    assert implemented - set(ROWS) == set(), "operations with no row in the authorization matrix"
    assert set(ROWS) - implemented == set(), "rows for operations the server does not implement"
    assert set(ADMIN_ROWS) == set(ADMIN_OPERATIONS), "admin operations with no row (or rows for none)"


@pytest.mark.parametrize("operation", sorted(ROWS))
def test_kms_operation(world: World, operation: str, request: pytest.FixtureRequest) -> None:
    row = ROWS[operation]
    if row.needs_hsm and world.hsm is None:
        request.getfixturevalue("softhsm")  # skips (fails in CI) without SoftHSM2
    state = row.setup(world)
    if row.on_key or row.of_account:
        refused = {"a_bare": "AccessDeniedException", "a_grantee": "AccessDeniedException",
                   "b_user": row.foreign, "b_admin": row.foreign}
    else:
        # A grant on some key gives no right to operations on no key.
        somekey = world.root.create_key()["KeyMetadata"]["KeyId"]
        world.root.create_grant(KeyId=somekey, GranteePrincipal=world["a_grantee"].arn, Operations=["DescribeKey"])
        refused = {"a_bare": "AccessDeniedException", "a_grantee": "AccessDeniedException"}
    refused.update({name: "AccessDeniedException" for name in ("a_user", "a_admin") if name not in row.allowed})
    for name, expected in refused.items():
        who = world[name]
        got = call(who, operation, row.params(world, state, who))
        assert got == expected, f"{operation} by {name}: {got or 'succeeded'}, expected {expected}"
    for i, name in enumerate(row.allowed):
        who = world[name]
        fresh = state if i == 0 else row.setup(world)
        got = call(who, operation, row.params(world, fresh, who))
        assert got is None, f"{operation} by {name} (allowed): {got}"


def test_retire_grant_by_its_retiring_principal(world: World) -> None:
    state = then(SYM, grant(retiring="a_user"))(world)
    assert call(world["a_bare"], "RetireGrant", {"GrantToken": state["grant_token"]}) == "AccessDeniedException"
    assert call(world["a_user"], "RetireGrant", {"GrantToken": state["grant_token"]}) is None


# -- admin rows -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdminRow:
    """`params(world)` is a request about account A, fresh for each call. `allowed` overrides what
    the operation's scope implies."""

    params: Callable[[World], dict[str, Any]]
    allowed: frozenset[str] | None = None
    needs_hsm: bool = False


def new_user(w: World, **extra: Any) -> dict[str, Any]:
    name = w.unique("u")
    w.operator.admin.call("CreateUser", AccountId=w.a, UserName=name)
    return {"AccountId": w.a, "UserName": name, **extra}


def new_access_key(w: World, **extra: Any) -> dict[str, Any]:
    user = new_user(w)
    key = w.operator.admin.call("CreateAccessKey", **user)["AccessKey"]
    return {"AccessKeyId": key["AccessKeyId"], **extra}


def user_with_policy(w: World, **extra: Any) -> dict[str, Any]:
    user = new_user(w)
    w.operator.admin.call("PutUserPolicy", **user, PolicyName="p", PolicyDocument=KMS_ALL)
    return {**user, "PolicyName": "p", **extra}


def empty_account(w: World) -> dict[str, Any]:
    account_id = str(secrets.randbelow(9 * 10**11) + 10**11)
    w.operator.admin.call("CreateAccount", Name="doomed", AccountId=account_id)
    return {"AccountId": account_id}


ADMIN_ROWS: dict[str, AdminRow] = {
    "CreateAccount": AdminRow(lambda w: {"Name": "new", "AccountId": str(secrets.randbelow(9 * 10**11) + 10**11)}),
    "DeleteAccount": AdminRow(empty_account),
    # An account administrator (of any account) lists its own account only.
    "ListAccounts": AdminRow(lambda w: {}, frozenset({"operator", "a_admin", "b_admin"})),
    "CreateUser": AdminRow(lambda w: {"AccountId": w.a, "UserName": w.unique("new"), "Admin": True}),
    "GetUser": AdminRow(new_user),
    "DeleteUser": AdminRow(new_user),
    "ListUsers": AdminRow(lambda w: {"AccountId": w.a}),
    "CreateAccessKey": AdminRow(new_user),
    "ListAccessKeys": AdminRow(new_user),
    "UpdateAccessKey": AdminRow(lambda w: new_access_key(w, Status="Inactive")),
    "DeleteAccessKey": AdminRow(new_access_key),
    "PutUserPolicy": AdminRow(lambda w: new_user(w, PolicyName="p", PolicyDocument=KMS_ALL)),
    "GetUserPolicy": AdminRow(user_with_policy),
    "DeleteUserPolicy": AdminRow(user_with_policy),
    "ListUserPolicies": AdminRow(new_user),
    # Everyone may query the audit log, of its own account only.
    "QueryAuditEvents": AdminRow(lambda w: {"AccountId": w.a, "Limit": 5},
                                 frozenset({"operator", "a_admin", "a_user", "a_bare"})),
    "GetAuditPublicKey": AdminRow(lambda w: {}),
    "CreateAuditDigest": AdminRow(lambda w: {}),
    "CreateHsmCluster": AdminRow(lambda w: {"Pkcs11Module": w.hsm.module, "TokenLabel": w.hsm.init_token(),  # type: ignore[union-attr]
                                            "TrustAnchorCertificate": w.trust_anchor, "AccountId": w.a},
                                 needs_hsm=True),
    "ListHsmClusters": AdminRow(lambda w: {}),
    "DescribeHsmCluster": AdminRow(lambda w: {"ClusterId": new_cluster(w)}, needs_hsm=True),
    "DeleteHsmCluster": AdminRow(lambda w: {"ClusterId": new_cluster(w)}, needs_hsm=True),
    "CreateRotationFunction": AdminRow(lambda w: {"AccountId": w.a, "FunctionName": w.unique("fn"),
                                                  "Kind": "random-password"}),
    "ListRotationFunctions": AdminRow(lambda w: {"AccountId": w.a}),
    "DeleteRotationFunction": AdminRow(lambda w: new_rotation_function(w)),
    # Request quotas: an operator sets them; an account administrator reads its own account's.
    "PutRequestQuota": AdminRow(lambda w: {"AccountId": w.a, "QuotaName": "kms:CreateKey", "Value": 20.0}),
    "DeleteRequestQuota": AdminRow(lambda w: new_request_quota(w)),
    "ListRequestQuotas": AdminRow(lambda w: {"AccountId": w.a}),
}


def new_request_quota(w: World) -> dict[str, Any]:
    w.operator.admin.call("PutRequestQuota", AccountId=w.a, QuotaName="kms:ListKeys", Value=200.0)
    return {"AccountId": w.a, "QuotaName": "kms:ListKeys"}


def new_rotation_function(w: World) -> dict[str, Any]:
    name = w.unique("fn")
    w.operator.admin.call("CreateRotationFunction", AccountId=w.a, FunctionName=name, Kind="random-password")
    return {"AccountId": w.a, "FunctionName": name}
SCOPE_ALLOWS = {Scope.OPERATOR: frozenset({"operator"}), Scope.ACCOUNT: frozenset({"operator", "a_admin"}),
                Scope.ANY: frozenset({"operator", "a_admin", "a_user", "a_bare", "b_admin"})}


@pytest.mark.parametrize("operation", sorted(ADMIN_ROWS))
def test_admin_operation(world: World, operation: str, request: pytest.FixtureRequest) -> None:
    row = ADMIN_ROWS[operation]
    if row.needs_hsm and world.hsm is None:
        request.getfixturevalue("softhsm")  # skips (fails in CI) without SoftHSM2
    allowed = row.allowed or SCOPE_ALLOWS[ADMIN_OPERATIONS[operation].scope]
    for name in ("a_bare", "a_user", "b_admin", "a_admin", "operator"):
        who = world.operator if name == "operator" else world[name]
        params = row.params(world)
        try:
            who.admin.call(operation, **params)
            got = None
        except AdminError as exc:
            got = exc.code
        if name in allowed:
            assert got is None, f"{operation} by {name} (allowed): {got}"
        else:
            assert got == "AccessDeniedException", f"{operation} by {name}: {got or 'succeeded'}"


def test_only_an_operator_registers_a_command(world: World) -> None:
    """A command rotation function runs on the server's machine: an account administrator may
    register webhooks and built-ins for its account, never a command; an operator may."""
    params = {"AccountId": world.a, "Kind": "command", "Command": [sys.executable, "-c", "pass"]}
    with pytest.raises(AdminError) as e:
        world["a_admin"].admin.call("CreateRotationFunction", FunctionName=world.unique("cmd"), **params)
    assert e.value.code == "AccessDeniedException"
    assert "only an operator may register a command" in e.value.message
    made = world.operator.admin.call("CreateRotationFunction", FunctionName=world.unique("cmd"), **params)
    assert made["RotationFunction"]["Kind"] == "command"
    hook = world["a_admin"].admin.call("CreateRotationFunction", AccountId=world.a, FunctionName=world.unique("wh"),
                                       Kind="webhook", Url="https://rotate.example.com/hook")
    assert hook["SigningSecret"] and hook["RotationFunction"]["Kind"] == "webhook"


def test_an_account_administrator_cannot_touch_an_operator(world: World) -> None:
    boss = world["a_admin"].admin
    operator_in_a = world.unique("op")
    world.operator.admin.call("CreateUser", AccountId=world.a, UserName=operator_in_a, Operator=True)
    target = {"AccountId": world.a, "UserName": operator_in_a}
    for operation, extra in (("CreateAccessKey", {}), ("DeleteUser", {}), ("ListAccessKeys", {}),
                             ("PutUserPolicy", {"PolicyName": "p", "PolicyDocument": KMS_ALL}),
                             ("ListUserPolicies", {}), ("GetUser", {})):
        with pytest.raises(AdminError) as e:
            boss.call(operation, **target, **extra)
        assert e.value.code == "AccessDeniedException", operation
        assert "only an operator may manage an operator" in e.value.message
    key = world.operator.admin.call("CreateAccessKey", **target)["AccessKey"]["AccessKeyId"]
    for operation, extra in (("UpdateAccessKey", {"Status": "Inactive"}), ("DeleteAccessKey", {})):
        with pytest.raises(AdminError) as e:
            boss.call(operation, AccessKeyId=key, **extra)
        assert e.value.code == "AccessDeniedException", operation
    with pytest.raises(AdminError) as e:
        boss.call("CreateUser", AccountId=world.a, UserName=world.unique("x"), Operator=True)
    assert e.value.code == "AccessDeniedException"


# -- Secrets Manager rows ---------------------------------------------------------------------------

def implemented_secrets_operations() -> set[str]:
    """The operations of botocore's Secrets Manager model."""
    return set(botocore.loaders.Loader().load_service_model("secretsmanager", "service-2")["operations"])


def answer_code(response: dict[str, Any]) -> str | None:
    """What a successful call answered, as an error code: None (it did what was asked)."""
    return None


def first_error(response: dict[str, Any]) -> str | None:
    """BatchGetSecretValue answers 200 and lists the secrets it could not read in Errors."""
    errors = response.get("Errors") or []
    return str(errors[0]["ErrorCode"]) if errors else None


@dataclass(frozen=True)
class SecretRow:
    """`setup(world)` makes what one call needs (with A's administrator); `params(world, state, who)`
    is the request. `answer`: what the allowed callers get (None: success; else the error code of
    an operation this server does not do). `outcome` reads a 200 answer (BatchGetSecretValue's
    Errors)."""

    setup: Callable[[World], State]
    params: Callable[[World, State, Who], dict[str, Any]]
    on_secret: bool = True
    answer: str | None = None
    outcome: Callable[[dict[str, Any]], str | None] = answer_code


SECRET_VALUE = "matrix-secret-value"


def secret(tags: bool = False, policy: bool = False, deleted: bool = False) -> Callable[[World], State]:
    """A new secret of A with a value, made by A's administrator (under A's aws/secretsmanager key)."""
    def setup(w: World) -> State:
        args: dict[str, Any] = {"Name": w.unique("matrix"), "SecretString": SECRET_VALUE}
        if tags:
            args["Tags"] = [{"Key": "team", "Value": "a"}]
        made = w["a_admin"].sm.create_secret(**args)
        if policy:
            w["a_admin"].sm.put_resource_policy(SecretId=made["ARN"], ResourcePolicy=own_account_policy(w))
        if deleted:
            w["a_admin"].sm.delete_secret(SecretId=made["ARN"], RecoveryWindowInDays=7)
        return {"arn": made["ARN"], "version": made["VersionId"]}
    return setup


def own_account_policy(w: World) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{w.a}:root"}, "Action": "secretsmanager:GetSecretValue",
        "Resource": "*"}]})


def on_secret(**fixed: Any) -> Callable[[World, State, Who], dict[str, Any]]:
    return lambda w, s, who: {"SecretId": s["arn"], **fixed}


SECRET = secret()
REPLICA = "arn:aws:secretsmanager:us-east-1:123456789012:secret:replica-AbCdEf"
UNSUPPORTED = "UnsupportedOperationException"
SECRETS_ROWS: dict[str, SecretRow] = {
    # secrets and values
    "CreateSecret": SecretRow(no_setup, lambda w, s, who: {"Name": w.unique("new"), "SecretString": "v"},
                              on_secret=False),
    "GetSecretValue": SecretRow(SECRET, on_secret()),
    "BatchGetSecretValue": SecretRow(SECRET, lambda w, s, who: {"SecretIdList": [s["arn"]]}, outcome=first_error),
    "PutSecretValue": SecretRow(SECRET, on_secret(SecretString="changed")),
    "UpdateSecret": SecretRow(SECRET, on_secret(Description="changed")),
    "DescribeSecret": SecretRow(SECRET, on_secret()),
    "ListSecrets": SecretRow(no_setup, lambda w, s, who: {}, on_secret=False),
    "ListSecretVersionIds": SecretRow(SECRET, on_secret()),
    "UpdateSecretVersionStage": SecretRow(SECRET, lambda w, s, who: {
        "SecretId": s["arn"], "VersionStage": "matrix", "MoveToVersionId": s["version"]}),
    "DeleteSecret": SecretRow(SECRET, on_secret(RecoveryWindowInDays=7)),
    "RestoreSecret": SecretRow(secret(deleted=True), on_secret()),
    "GetRandomPassword": SecretRow(no_setup, lambda w, s, who: {"PasswordLength": 16}, on_secret=False),
    # rotation: no rotation function can be given (RotateSecret) nor enabled (CancelRotateSecret)
    "RotateSecret": SecretRow(SECRET, on_secret(), answer="InvalidRequestException"),
    "CancelRotateSecret": SecretRow(SECRET, on_secret(), answer="InvalidRequestException"),
    # tags
    "TagResource": SecretRow(SECRET, on_secret(Tags=[{"Key": "team", "Value": "a"}])),
    "UntagResource": SecretRow(secret(tags=True), on_secret(TagKeys=["team"])),
    # resource policies
    "PutResourcePolicy": SecretRow(SECRET, lambda w, s, who: {"SecretId": s["arn"],
                                                              "ResourcePolicy": own_account_policy(w)}),
    "GetResourcePolicy": SecretRow(secret(policy=True), on_secret()),
    "DeleteResourcePolicy": SecretRow(secret(policy=True), on_secret()),
    "ValidateResourcePolicy": SecretRow(SECRET, lambda w, s, who: {"SecretId": s["arn"],
                                                                   "ResourcePolicy": own_account_policy(w)}),
    "ListResourcePolicies": SecretRow(secret(policy=True), on_secret()),
    # replication: not done by this server
    "ReplicateSecretToRegions": SecretRow(SECRET, on_secret(AddReplicaRegions=[{"Region": "eu-west-1"}]),
                                          answer=UNSUPPORTED),
    "RemoveRegionsFromReplication": SecretRow(SECRET, on_secret(RemoveReplicaRegions=["eu-west-1"]),
                                              answer=UNSUPPORTED),
    "StopReplicationToReplica": SecretRow(SECRET, on_secret(), answer=UNSUPPORTED),
    "AssociateCrossAccountReplica": SecretRow(SECRET, on_secret(CrossAccountReplicaARN=REPLICA), answer=UNSUPPORTED),
    "DisassociateCrossAccountReplica": SecretRow(SECRET, on_secret(CrossAccountReplicaARN=REPLICA),
                                                 answer=UNSUPPORTED),
}
# Who may call: on a secret of A, A's administrator and A's secretsmanager:* user; on no secret,
# B's principals too (in their own account).
SECRETS_ALLOWED = ("a_admin", "a_secrets")
SECRETS_REFUSED = ("a_bare", "a_user", "b_secrets", "b_admin")


def call_secrets(who: Who, operation: str, params: dict[str, Any],
                 outcome: Callable[[dict[str, Any]], str | None] = answer_code) -> str | None:
    """The error code of the Secrets Manager call (or `outcome` of its answer), None if it succeeded."""
    try:
        response = getattr(who.sm, snake(operation))(**params)
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
    return outcome(response)


def test_every_secrets_operation_has_a_row() -> None:
    model = implemented_secrets_operations()
    assert len(model) >= 26
    assert model - set(SECRETS_ROWS) == set(), "Secrets Manager operations with no row in the matrix"
    assert set(SECRETS_ROWS) - model == set(), "rows for operations botocore's model does not have"
    assert set(SECRETS_ROWS) == set(SECRETS_OPERATIONS), "rows and secrets.OPERATIONS differ"


@pytest.mark.parametrize("operation", sorted(SECRETS_ROWS))
def test_secrets_operation(world: World, operation: str) -> None:
    row = SECRETS_ROWS[operation]
    state = row.setup(world)
    refused = SECRETS_REFUSED if row.on_secret else ("a_bare", "a_user")
    allowed = SECRETS_ALLOWED if row.on_secret else (*SECRETS_ALLOWED, "b_secrets", "b_admin")
    failures = []
    for name in refused:
        who = world[name]
        got = call_secrets(who, operation, row.params(world, state, who), row.outcome)
        if got != "AccessDeniedException":
            failures.append(f"{operation} by {name}: {got or 'succeeded'}, expected AccessDeniedException")
    for i, name in enumerate(allowed):
        who = world[name]
        fresh = state if i == 0 or row.answer is not None else row.setup(world)
        got = call_secrets(who, operation, row.params(world, fresh, who), row.outcome)
        if got != row.answer:
            failures.append(f"{operation} by {name} (allowed): {got or 'succeeded'}, "
                            f"expected {row.answer or 'success'}")
    assert not failures, "\n".join(failures)


def shared_key(w: World) -> str:
    """A customer key of A whose key policy also lets account B decrypt (and describe) with it."""
    policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "Enable IAM User Permissions", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{w.a}:root"},
         "Action": "kms:*", "Resource": "*"},
        {"Sid": "Account B may decrypt", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{w.b}:root"},
         "Action": ["kms:Decrypt", "kms:DescribeKey"], "Resource": "*"}]}
    return str(w.root.create_key(Policy=json.dumps(policy))["KeyMetadata"]["Arn"])


def share_with_b(w: World, arn: str) -> None:
    w["a_admin"].sm.put_resource_policy(SecretId=arn, ResourcePolicy=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{w.b}:root"},
            "Action": ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"], "Resource": "*"}]}))


def test_a_secret_shared_with_another_account(world: World) -> None:
    """A resource policy naming B's account, and a KMS key B may decrypt with: B's user whose own
    policy allows secretsmanager:* (and kms:Decrypt) reads the secret; B's kms:*-only user does not
    (both sides of an account boundary must allow); what the policy does not grant stays refused."""
    name = world.unique("shared")
    made = world["a_admin"].sm.create_secret(Name=name, SecretString=SECRET_VALUE, KmsKeyId=shared_key(world))
    share_with_b(world, made["ARN"])
    b = world["b_secrets"].sm
    assert b.get_secret_value(SecretId=made["ARN"])["SecretString"] == SECRET_VALUE
    assert b.describe_secret(SecretId=made["ARN"])["Name"] == name
    for operation, params in (("PutSecretValue", {"SecretString": "from B"}), ("ListSecretVersionIds", {})):
        got = call_secrets(world["b_secrets"], operation, {"SecretId": made["ARN"], **params})
        assert got == "AccessDeniedException", f"{operation} by b_secrets (not in the resource policy): {got}"
    for operation in ("GetSecretValue", "DescribeSecret"):
        got = call_secrets(world["b_user"], operation, {"SecretId": made["ARN"]})
        assert got == "AccessDeniedException", f"{operation} by b_user (kms:* only): {got or 'succeeded'}"
    # By its name, B looks in its own account, where there is no such secret.
    assert call_secrets(world["b_secrets"], "DescribeSecret", {"SecretId": name}) == "ResourceNotFoundException"


def test_a_shared_secret_under_the_aws_managed_key_is_not_readable_across_accounts(world: World) -> None:
    """The aws/secretsmanager key's policy allows only its own account (kms:CallerAccount): B may
    describe a secret shared with it, but reading the value is refused by KMS, as in AWS."""
    arn = SECRET(world)["arn"]
    share_with_b(world, arn)
    assert call_secrets(world["b_secrets"], "DescribeSecret", {"SecretId": arn}) is None
    assert call_secrets(world["b_secrets"], "GetSecretValue", {"SecretId": arn}) == "AccessDeniedException"


def test_another_account_cannot_probe_secret_names(world: World) -> None:
    """From another account, a name that does not exist and one that does (with no policy for the
    caller) are refused alike, and the refusal does not show the secret's random ARN suffix."""
    made = world["a_admin"].sm.create_secret(Name=world.unique("probe"), SecretString=SECRET_VALUE)
    partial = made["ARN"][:-7]
    b = world["b_secrets"]
    for secret_id in (partial, partial[:-3] + "zzz", made["ARN"]):
        try:
            b.sm.describe_secret(SecretId=secret_id)
            raise AssertionError(f"DescribeSecret {secret_id} by b_secrets succeeded")
        except ClientError as exc:
            assert exc.response["Error"]["Code"] == "AccessDeniedException", (secret_id, exc.response["Error"])
            assert made["ARN"] not in exc.response["Error"]["Message"] or secret_id == made["ARN"]
    got = b.sm.batch_get_secret_value(SecretIdList=[partial, partial[:-3] + "zzz"])
    assert [e["ErrorCode"] for e in got["Errors"]] == ["AccessDeniedException"] * 2


def test_another_accounts_write_seals_under_the_owners_key(world: World) -> None:
    """A secret whose KmsKeyId is an alias name: a value written by another account (allowed by the
    resource policy) is sealed under the owner's key of that alias, never the writer's."""
    alias = "alias/" + world.unique("both")
    a_key = shared_key(world)
    world.root.create_alias(AliasName=alias, TargetKeyId=a_key)
    b_kms = world["b_user"].kms
    b_key = b_kms.create_key()["KeyMetadata"]["KeyId"]
    b_kms.create_alias(AliasName=alias, TargetKeyId=b_key)
    # A's key lets B generate data keys for this secret too (both sides must allow across accounts).
    policy = json.loads(world.root.get_key_policy(KeyId=a_key, PolicyName="default")["Policy"])
    policy["Statement"][1]["Action"] = ["kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey"]
    world.root.put_key_policy(KeyId=a_key, PolicyName="default", Policy=json.dumps(policy))
    made = world["a_admin"].sm.create_secret(Name=world.unique("aliased"), SecretString="from A", KmsKeyId=alias)
    world["a_admin"].sm.put_resource_policy(SecretId=made["ARN"], ResourcePolicy=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{world.b}:root"},
            "Action": ["secretsmanager:PutSecretValue", "secretsmanager:GetSecretValue"], "Resource": "*"}]}))
    world["b_secrets"].sm.put_secret_value(SecretId=made["ARN"], SecretString="from B")
    b_kms.disable_key(KeyId=b_key)  # B's own key of the same alias name: no power over A's secret
    assert world["a_admin"].sm.get_secret_value(SecretId=made["ARN"])["SecretString"] == "from B"
