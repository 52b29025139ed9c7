"""The admin API: accounts, users and access keys, for `openkms admin` and automation.

Same wire protocol as KMS (JSON 1.1, SigV4 with service `kms`), target prefix `OpenKMSAdmin.`.

Two levels of administration (`OPERATIONS` says which operation takes which):

- an **operator** (the bootstrap administrator, and users an operator makes with `Operator`)
  manages every account: creates and deletes accounts, and acts in any of them;
- an **account administrator** (`Admin`) acts as its account's root user: it manages its own
  account's users (administrators included), their policies and access keys, and reads its own
  account's audit records. It cannot act on another account, on an operator, or make one.

Everyone else may only ask who it is (GetUser), read the audit public key, and query the audit
records of its own account. Every refusal is AccessDeniedException, recorded like every call.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from ..accounts import Accounts
from ..audit.log import AuditLog
from ..crypto.certificates import is_certificate
from ..crypto.signing import public_pem
from ..errors import (
    AccessDeniedException,
    AlreadyExistsException,
    CloudHsmClusterInUseException,
    CloudHsmClusterNotFoundException,
    DeleteConflictException,
    NotFoundException,
    SerializationException,
    ValidationException,
)
from ..keystore.pkcs11 import ConnectError, check_token
from ..model import Caller, HsmCluster, Principal
from ..policy import root_arn
from ..quotas import EVERY_ACCOUNT, QUOTAS, RequestQuotas
from ..secrets.functions import OPERATOR_KINDS, RotationFunctions
from ..storage import Store

TARGET_PREFIX = "OpenKMSAdmin."


class Scope(enum.Enum):
    """Who may call an admin operation (the authorization matrix test reads `OPERATIONS`)."""

    OPERATOR = "operator"  # operators only: they manage every account
    ACCOUNT = "account"    # an operator, or an administrator of the account the call is about
    ANY = "any"            # every authenticated user; what it sees is its own account's


@dataclass(frozen=True)
class AdminOperation:
    schema: dict[str, tuple[type, bool]]  # member -> (type, required)
    scope: Scope
    # How the call names the account (and user) it is about, for Scope.ACCOUNT: "account" (an
    # AccountId member), "user" (AccountId and UserName), "access-key" (an AccessKeyId member),
    # or "" (ListAccounts: no target; an account administrator sees its own account).
    target: str = ""


_USER: dict[str, tuple[type, bool]] = {"AccountId": (str, True), "UserName": (str, True)}
OPERATIONS: dict[str, AdminOperation] = {
    "CreateAccount": AdminOperation({"AccountId": (str, False), "Name": (str, True)}, Scope.OPERATOR),
    "DeleteAccount": AdminOperation({"AccountId": (str, True)}, Scope.OPERATOR),
    "ListAccounts": AdminOperation({}, Scope.ACCOUNT),
    "CreateUser": AdminOperation({**_USER, "Admin": (bool, False), "Operator": (bool, False)}, Scope.ACCOUNT,
                                 "account"),
    # GetUser without members answers the caller itself, for every user (who am I, at what level).
    "GetUser": AdminOperation(_USER, Scope.ACCOUNT, "user"),
    "DeleteUser": AdminOperation(_USER, Scope.ACCOUNT, "user"),
    "ListUsers": AdminOperation({"AccountId": (str, True)}, Scope.ACCOUNT, "account"),
    "CreateAccessKey": AdminOperation(_USER, Scope.ACCOUNT, "user"),
    "ListAccessKeys": AdminOperation(_USER, Scope.ACCOUNT, "user"),
    "UpdateAccessKey": AdminOperation({"AccessKeyId": (str, True), "Status": (str, True)}, Scope.ACCOUNT,
                                      "access-key"),
    "DeleteAccessKey": AdminOperation({"AccessKeyId": (str, True)}, Scope.ACCOUNT, "access-key"),
    "PutUserPolicy": AdminOperation({**_USER, "PolicyName": (str, True), "PolicyDocument": (str, True)},
                                    Scope.ACCOUNT, "user"),
    "GetUserPolicy": AdminOperation({**_USER, "PolicyName": (str, True)}, Scope.ACCOUNT, "user"),
    "DeleteUserPolicy": AdminOperation({**_USER, "PolicyName": (str, True)}, Scope.ACCOUNT, "user"),
    "ListUserPolicies": AdminOperation(_USER, Scope.ACCOUNT, "user"),
    "QueryAuditEvents": AdminOperation({"StartTime": (float, False), "EndTime": (float, False),
                                        "AccountId": (str, False), "PrincipalArn": (str, False),
                                        "KeyId": (str, False), "EventName": (str, False),
                                        "ErrorCode": (str, False), "Limit": (int, False),
                                        "NextToken": (str, False)}, Scope.ANY),
    "GetAuditPublicKey": AdminOperation({}, Scope.ANY),
    "CreateAuditDigest": AdminOperation({}, Scope.OPERATOR),
    # HSM clusters: PKCS#11 tokens that tenants' custom key stores (AWS_CLOUDHSM) may use.
    # A cluster is registered for one tenant account (AccountId), as a CloudHSM cluster belongs to one.
    "CreateHsmCluster": AdminOperation({"Pkcs11Module": (str, True), "TokenLabel": (str, True),
                                        "TrustAnchorCertificate": (str, True), "AccountId": (str, True)},
                                       Scope.OPERATOR),
    "ListHsmClusters": AdminOperation({}, Scope.OPERATOR),
    "DescribeHsmCluster": AdminOperation({"ClusterId": (str, True)}, Scope.OPERATOR),
    "DeleteHsmCluster": AdminOperation({"ClusterId": (str, True)}, Scope.OPERATOR),
    # Rotation functions of Secrets Manager (secrets/functions.py): an account's own; a command
    # runs on the server's machine, so only an operator registers one (checked in the handler).
    "CreateRotationFunction": AdminOperation({"AccountId": (str, True), "FunctionName": (str, True),
                                              "Kind": (str, True), "Url": (str, False), "Command": (list, False),
                                              "Environment": (dict, False), "TimeoutSeconds": (int, False),
                                              "PasswordLength": (int, False), "ExcludeCharacters": (str, False),
                                              "AllowedHosts": (list, False), "MasterSecretArn": (str, False)},
                                             Scope.ACCOUNT, "account"),
    "ListRotationFunctions": AdminOperation({"AccountId": (str, True)}, Scope.ACCOUNT, "account"),
    # request quotas (quotas.py): an operator sets them; an account administrator reads its own
    "PutRequestQuota": AdminOperation({"AccountId": (str, True), "QuotaName": (str, True), "Value": (float, True)},
                                      Scope.OPERATOR),
    "DeleteRequestQuota": AdminOperation({"AccountId": (str, True), "QuotaName": (str, True)}, Scope.OPERATOR),
    "ListRequestQuotas": AdminOperation({"AccountId": (str, True)}, Scope.ACCOUNT, "account"),
    "DeleteRotationFunction": AdminOperation({"AccountId": (str, True), "FunctionName": (str, True)},
                                             Scope.ACCOUNT, "account"),
}
MAX_AUDIT_PAGE = 1000
CLUSTER_ID_CHARS = "abcdefghijklmnopqrstuvwxyz234567"  # AWS's pattern: cluster-[2-7a-zA-Z]{11,16}


def _denied(me: Principal, op: str, resource: str, why: str) -> AccessDeniedException:
    return AccessDeniedException(
        f"User: {me.arn} is not authorized to perform: openkms-admin:{op} on resource: {resource} because {why}")


def _check(op: str, body: dict[str, Any]) -> dict[str, Any]:
    schema = OPERATIONS[op].schema
    missing = [name for name, (_, required) in schema.items() if required and body.get(name) is None]
    if missing:
        raise ValidationException.null_members(missing)
    out = {}
    for name, (kind, _) in schema.items():
        if body.get(name) is not None:
            value = body[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise SerializationException(f"Unexpected value type at '{name}'.")
            out[name] = value
    return out


def user_view(u: Principal) -> dict[str, Any]:
    return {"UserName": u.name, "AccountId": u.account_id, "Arn": u.arn, "Admin": u.is_admin,
            "Operator": u.is_operator, "Level": u.level}


class AdminAPI:
    def __init__(self, accounts: Accounts, store: Store, audit: AuditLog,
                 root_token: tuple[str, str] | None = None,
                 rotation_functions: RotationFunctions | None = None,
                 quotas: RequestQuotas | None = None) -> None:
        self.accounts = accounts
        self.quotas = quotas
        self.rotation_functions = rotation_functions
        self.store = store
        self.audit = audit
        self.root_token = root_token  # (module, token label) of the root key's token, never a cluster
        self._handlers: dict[str, Callable[[Caller, dict[str, Any]], dict[str, Any]]] = {
            "CreateAccount": self._create_account,
            "DeleteAccount": self._delete_account,
            "ListAccounts": self._list_accounts,
            "CreateUser": self._create_user,
            "GetUser": self._get_user,
            "DeleteUser": self._delete_user,
            "ListUsers": self._list_users,
            "CreateAccessKey": self._create_access_key,
            "ListAccessKeys": self._list_access_keys,
            "UpdateAccessKey": self._update_access_key,
            "DeleteAccessKey": self._delete_access_key,
            "PutUserPolicy": self._put_user_policy,
            "GetUserPolicy": self._get_user_policy,
            "DeleteUserPolicy": self._delete_user_policy,
            "ListUserPolicies": self._list_user_policies,
            "QueryAuditEvents": self._query_audit_events,
            "GetAuditPublicKey": self._get_audit_public_key,
            "CreateAuditDigest": self._create_audit_digest,
            "CreateHsmCluster": self._create_hsm_cluster,
            "ListHsmClusters": self._list_hsm_clusters,
            "DescribeHsmCluster": self._describe_hsm_cluster,
            "DeleteHsmCluster": self._delete_hsm_cluster,
            "CreateRotationFunction": self._create_rotation_function,
            "ListRotationFunctions": self._list_rotation_functions,
            "DeleteRotationFunction": self._delete_rotation_function,
            "PutRequestQuota": self._put_request_quota,
            "DeleteRequestQuota": self._delete_request_quota,
            "ListRequestQuotas": self._list_request_quotas,
        }
        assert set(self._handlers) == set(OPERATIONS)

    def has(self, op: str) -> bool:
        return op in self._handlers

    def call(self, caller: Caller, op: str, body: dict[str, Any]) -> dict[str, Any]:
        operation = OPERATIONS[op]
        me = caller.principal
        if op == "GetUser" and body.get("AccountId") is None and body.get("UserName") is None:
            return {"User": user_view(me)}  # who am I, and at what level: open to every user
        if operation.scope is Scope.OPERATOR and not me.is_operator:
            raise _denied(me, op, "*", "only an operator may" if me.is_admin else "it is not an administrator")
        if operation.scope is Scope.ACCOUNT and not me.is_admin:
            raise _denied(me, op, "*", "it is not an administrator")
        params = _check(op, body)
        if operation.scope is Scope.ACCOUNT and not me.is_operator:
            self._authorize_account_admin(me, op, operation, params)
        if op == "QueryAuditEvents" and not me.is_operator:
            if params.get("AccountId") not in (None, caller.account_id):
                raise _denied(me, op, root_arn(params["AccountId"]),
                              f"it may only read the audit records of account {caller.account_id}")
            params["AccountId"] = caller.account_id
        return self._handlers[op](caller, params)

    def _authorize_account_admin(self, me: Principal, op: str, operation: AdminOperation,
                                 params: dict[str, Any]) -> None:
        """An account administrator acts as its account's root: it manages its own account's users
        (administrators too), never another account's, never an operator, and makes no operators."""
        if not me.is_admin:
            raise _denied(me, op, "*", "it is not an administrator")
        target_user: Principal | None = None
        if operation.target == "access-key":
            target_user = self.accounts.owner_of_access_key(params["AccessKeyId"])
            account = target_user.account_id
        elif operation.target in ("account", "user"):
            account = params["AccountId"]
        else:
            return  # ListAccounts: the handler shows an account administrator only its own account
        if account != me.account_id:
            raise _denied(me, op, root_arn(account),
                          f"an account administrator manages only its own account ({me.account_id})")
        if operation.target == "user":
            target_user = self.accounts.user(account, params["UserName"])
        if target_user is not None and target_user.is_operator:
            raise _denied(me, op, target_user.arn, "only an operator may manage an operator")
        if op == "CreateUser" and params.get("Operator"):
            raise _denied(me, op, root_arn(account), "only an operator may make an operator")

    @staticmethod
    def redact_input(op: str, body: dict[str, Any]) -> dict[str, Any]:
        kept = {k: v for k, v in body.items() if op in OPERATIONS and k in OPERATIONS[op].schema}
        if "Environment" in kept:  # a command's variables may hold credentials, whatever was sent
            names = kept["Environment"] if isinstance(kept["Environment"], dict) else {}
            kept["Environment"] = {str(k): "HIDDEN_DUE_TO_SECURITY_REASONS" for k in names}
        return kept

    @staticmethod
    def redact_output(op: str, result: dict[str, Any]) -> dict[str, Any] | None:
        if op == "CreateAccessKey":
            key = dict(result["AccessKey"])
            key.pop("SecretAccessKey", None)
            return {"AccessKey": key}
        if op == "CreateRotationFunction":
            return {k: v for k, v in result.items() if k != "SigningSecret"}
        if op in ("QueryAuditEvents", "GetAuditPublicKey"):
            return None  # records of records would only grow the log
        return result

    def _create_account(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        a = self.accounts.create_account(p["Name"], p.get("AccountId"))
        return {"Account": {"AccountId": a.account_id, "Name": a.name, "CreationDate": a.created.timestamp()}}

    def _delete_account(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        if p["AccountId"] == caller.account_id:
            raise DeleteConflictException("An operator cannot delete the account it belongs to.")
        self.accounts.delete_account(p["AccountId"])
        return {}

    def _list_accounts(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        accounts = self.accounts.list_accounts()
        if not caller.principal.is_operator:
            accounts = [a for a in accounts if a.account_id == caller.account_id]
        return {"Accounts": [{"AccountId": a.account_id, "Name": a.name, "CreationDate": a.created.timestamp()}
                             for a in accounts]}

    def _create_user(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        u = self.accounts.create_user(p["AccountId"], p["UserName"], bool(p.get("Admin", False)),
                                      bool(p.get("Operator", False)))
        return {"User": user_view(u)}

    def _get_user(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        return {"User": user_view(self.accounts.user(p["AccountId"], p["UserName"]))}

    def _delete_user(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        if (p["AccountId"], p["UserName"]) == (caller.account_id, caller.principal.name):
            raise DeleteConflictException("A user cannot delete itself.")
        self.accounts.delete_user(p["AccountId"], p["UserName"])
        return {}

    def _list_users(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        return {"Users": [user_view(u) for u in self.accounts.list_users(p["AccountId"])]}

    def _create_access_key(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        issued = self.accounts.create_access_key(p["AccountId"], p["UserName"])
        return {"AccessKey": {"AccessKeyId": issued.access_key_id,
                              "SecretAccessKey": issued.secret.reveal(),
                              "UserName": issued.principal.name, "AccountId": issued.principal.account_id,
                              "Status": "Active"}}

    def _list_access_keys(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        keys = self.accounts.list_access_keys(p["AccountId"], p["UserName"])
        for k in keys:
            k["CreateDate"] = k["CreateDate"].timestamp()  # type: ignore[attr-defined]
        return {"AccessKeys": keys}

    def _update_access_key(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        self.accounts.set_access_key_status(p["AccessKeyId"], p["Status"])
        return {}

    def _delete_access_key(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        self.accounts.delete_access_key(p["AccessKeyId"])
        return {}

    def _query_audit_events(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        limit = p.get("Limit") or 100
        if not 1 <= limit <= MAX_AUDIT_PAGE:
            raise ValidationException(f"Limit must be between 1 and {MAX_AUDIT_PAGE}.")
        after = None
        if p.get("NextToken"):
            try:
                t0, node, seq = base64.urlsafe_b64decode(p["NextToken"].encode()).decode().split("|")
                after = (float(t0), node, int(seq))
            except (ValueError, binascii.Error, UnicodeError):
                raise ValidationException("NextToken is not valid.") from None
        key_id = p.get("KeyId")
        if key_id and "/" in key_id:
            key_id = key_id.rsplit("/", 1)[1]
        with self.store.begin() as tx:
            rows = tx.audit.query(start=p.get("StartTime"), end=p.get("EndTime"), account=p.get("AccountId"),
                                  principal=p.get("PrincipalArn"), key_id=key_id, event_name=p.get("EventName"),
                                  error_code=p.get("ErrorCode"), after=after, limit=limit + 1)
        page = rows[:limit]
        result: dict[str, Any] = {"Events": [orjson.loads(r.record)["event"] for r in page]}
        if page:
            # Cursor: where this page ended, to follow the log (`openkms audit tail -f`).
            last = page[-1]
            result["Cursor"] = base64.urlsafe_b64encode(
                f"{last.event_time!r}|{last.node_id}|{last.seq}".encode()).decode()
            if len(rows) > limit:
                result["NextToken"] = result["Cursor"]
        return result

    def _get_audit_public_key(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        return {"PublicKeyPem": public_pem(self.audit.public_key).decode(), "NodeId": self.audit.node_id}

    def _create_audit_digest(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        self.audit.digest_now()
        return {}

    def _put_user_policy(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        self.accounts.put_user_policy(p["AccountId"], p["UserName"], p["PolicyName"], p["PolicyDocument"])
        return {}

    def _get_user_policy(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        for name, document in self.accounts.user_policies(p["AccountId"], p["UserName"]):
            if name == p["PolicyName"]:
                return {"UserName": p["UserName"], "PolicyName": name, "PolicyDocument": document}
        raise NotFoundException(f"User {p['UserName']} has no policy {p['PolicyName']}.")

    def _delete_user_policy(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        self.accounts.delete_user_policy(p["AccountId"], p["UserName"], p["PolicyName"])
        return {}

    def _list_user_policies(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        return {"PolicyNames": [name for name, _ in self.accounts.user_policies(p["AccountId"], p["UserName"])]}

    # -- HSM clusters -----------------------------------------------------------------------------
    def _create_hsm_cluster(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        if not is_certificate(p["TrustAnchorCertificate"]):
            raise ValidationException("TrustAnchorCertificate is not a PEM certificate.")
        self.accounts.account(p["AccountId"])  # NotFoundException
        token = (os.path.realpath(p["Pkcs11Module"]), p["TokenLabel"])
        if self.root_token is not None and token == (os.path.realpath(self.root_token[0]), self.root_token[1]):
            raise ValidationException("That token holds the root key: it cannot back custom key stores.")
        try:
            check_token(p["Pkcs11Module"], p["TokenLabel"])
        except ConnectError as exc:
            raise ValidationException(f"The HSM cannot be used: {exc.message}.") from None
        with self.store.begin() as tx:
            if any((os.path.realpath(c.module_path), c.token_label) == token for c in tx.clusters.all()):
                raise AlreadyExistsException(f"Token {p['TokenLabel']} of {p['Pkcs11Module']} is registered already.")
            cluster = HsmCluster("cluster-" + "".join(secrets.choice(CLUSTER_ID_CHARS) for _ in range(11)),
                                 p["Pkcs11Module"], p["TokenLabel"], p["TrustAnchorCertificate"], datetime.now(UTC),
                                 p["AccountId"])
            tx.clusters.insert(cluster)
        return {"ClusterId": cluster.cluster_id}

    @staticmethod
    def _cluster_view(c: HsmCluster, key_stores: list[str]) -> dict[str, Any]:
        return {"ClusterId": c.cluster_id, "AccountId": c.account_id, "Pkcs11Module": c.module_path,
                "TokenLabel": c.token_label,
                "TrustAnchorCertificate": c.trust_anchor, "CreationDate": c.created.timestamp(),
                "CustomKeyStoreIds": key_stores}

    def _list_hsm_clusters(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        with self.store.begin() as tx:
            return {"Clusters": [self._cluster_view(c, [s.custom_key_store_id for s in tx.key_stores.on_cluster(
                c.cluster_id)]) for c in tx.clusters.all()]}

    def _describe_hsm_cluster(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        with self.store.begin() as tx:
            cluster = tx.clusters.get(p["ClusterId"])
            if cluster is None:
                raise CloudHsmClusterNotFoundException(f"HSM cluster {p['ClusterId']} does not exist.")
            stores = [s.custom_key_store_id for s in tx.key_stores.on_cluster(cluster.cluster_id)]
        return {"Cluster": self._cluster_view(cluster, stores)}

    def _delete_hsm_cluster(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        with self.store.begin() as tx:
            if tx.clusters.get(p["ClusterId"]) is None:
                raise CloudHsmClusterNotFoundException(f"HSM cluster {p['ClusterId']} does not exist.")
            users = tx.key_stores.on_cluster(p["ClusterId"])
            if users:
                raise CloudHsmClusterInUseException(
                    f"HSM cluster {p['ClusterId']} is used by custom key store {users[0].custom_key_store_id}.")
            tx.clusters.delete(p["ClusterId"])
        return {}

    # -- rotation functions ------------------------------------------------------------------------
    def _need_rotation(self) -> RotationFunctions:
        if self.rotation_functions is None:
            raise ValidationException("Rotation functions are not available on this server.")
        return self.rotation_functions

    def _create_rotation_function(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        if p["Kind"] in OPERATOR_KINDS and not caller.principal.is_operator:
            raise _denied(caller.principal, "CreateRotationFunction", root_arn(p["AccountId"]),
                          f"only an operator may register a {p['Kind']} function (it runs on, or connects from, "
                          "the server's machine)")
        self.accounts.account(p["AccountId"])  # NotFoundException for an account that does not exist
        registry = self._need_rotation()
        fn, signing = registry.create(p["AccountId"], p["FunctionName"], p["Kind"], p,
                                      datetime.now(UTC))
        out: dict[str, Any] = {"RotationFunction": fn.view(registry.region)}
        if signing is not None:
            out["SigningSecret"] = signing  # shown this once
        return out

    def _list_rotation_functions(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        registry = self._need_rotation()
        return {"RotationFunctions": [fn.view(registry.region) for fn in registry.list(p["AccountId"])]}

    def _delete_rotation_function(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        self._need_rotation().delete(p["AccountId"], p["FunctionName"])
        return {}

    # -- request quotas ----------------------------------------------------------------------------
    MAX_QUOTA = 1_000_000.0

    def _quota_target(self, p: dict[str, Any]) -> tuple[str, str]:
        account_id, name = p["AccountId"], p["QuotaName"]
        if account_id != EVERY_ACCOUNT:
            self.accounts.account(account_id)  # NotFoundException for an account that does not exist
        if name not in QUOTAS:
            raise ValidationException(f"There is no request quota {name!r}: ListRequestQuotas names them all.")
        return account_id, name

    def _put_request_quota(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        account_id, name = self._quota_target(p)
        value = p["Value"]
        if not 0 < value <= self.MAX_QUOTA:
            raise ValidationException(f"Value must be more than 0 and at most {self.MAX_QUOTA:,.0f} requests per "
                                      "second.")
        with self.store.begin() as tx:
            tx.quotas.put(account_id, name, value, datetime.now(UTC))
        return {"Quota": self._quota_view(account_id, name)}

    def _delete_request_quota(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        account_id, name = self._quota_target(p)
        with self.store.begin() as tx:
            if not tx.quotas.delete(account_id, name):
                raise NotFoundException(f"Account {account_id} has no request quota {name} of its own.")
        return {"Quota": self._quota_view(account_id, name)}

    def _list_request_quotas(self, caller: Caller, p: dict[str, Any]) -> dict[str, Any]:
        account_id = p["AccountId"]
        if account_id != EVERY_ACCOUNT:
            self.accounts.account(account_id)
        return {"Quotas": [self._quota_view(account_id, name) for name in QUOTAS],
                "Enforced": self.quotas is not None and self.quotas.enabled}

    def _quota_view(self, account_id: str, name: str) -> dict[str, Any]:
        quota = QUOTAS[name]
        value, source = quota.rate, "default"
        if self.quotas is not None:
            whose = (account_id,) if account_id == EVERY_ACCOUNT else (account_id, EVERY_ACCOUNT)
            for owner in whose:
                rate = self.quotas.overrides(owner).get(name)
                if rate is not None:
                    value, source = rate, "account" if owner == account_id else "every-account"
                    break
        return {"QuotaName": name, "Title": quota.title, "Value": value, "DefaultValue": quota.rate,
                "Source": source, "Operations": list(quota.operations), "AwsFigure": not quota.ours}
