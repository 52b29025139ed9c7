"""The admin API: accounts, users and access keys, for `openkms admin` and automation.

Same wire protocol as KMS (JSON 1.1, SigV4 with service `kms`), target prefix `OpenKMSAdmin.`.
Only principals with the admin flag may call it; others get AccessDeniedException.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import orjson

from ..accounts import Accounts
from ..audit.log import AuditLog
from ..crypto.signing import public_pem
from ..errors import AccessDeniedException, NotFoundException, SerializationException, ValidationException
from ..model import Caller
from ..storage import Store

TARGET_PREFIX = "OpenKMSAdmin."

# operation -> {member: (type, required)}
SCHEMAS: dict[str, dict[str, tuple[type, bool]]] = {
    "CreateAccount": {"AccountId": (str, False), "Name": (str, True)},
    "ListAccounts": {},
    "CreateUser": {"AccountId": (str, True), "UserName": (str, True), "Admin": (bool, False)},
    "ListUsers": {"AccountId": (str, True)},
    "CreateAccessKey": {"AccountId": (str, True), "UserName": (str, True)},
    "ListAccessKeys": {"AccountId": (str, True), "UserName": (str, True)},
    "UpdateAccessKey": {"AccessKeyId": (str, True), "Status": (str, True)},
    "DeleteAccessKey": {"AccessKeyId": (str, True)},
    "PutUserPolicy": {"AccountId": (str, True), "UserName": (str, True), "PolicyName": (str, True),
                      "PolicyDocument": (str, True)},
    "GetUserPolicy": {"AccountId": (str, True), "UserName": (str, True), "PolicyName": (str, True)},
    "DeleteUserPolicy": {"AccountId": (str, True), "UserName": (str, True), "PolicyName": (str, True)},
    "ListUserPolicies": {"AccountId": (str, True), "UserName": (str, True)},
    "QueryAuditEvents": {"StartTime": (float, False), "EndTime": (float, False), "AccountId": (str, False),
                         "PrincipalArn": (str, False), "KeyId": (str, False), "EventName": (str, False),
                         "ErrorCode": (str, False), "Limit": (int, False), "NextToken": (str, False)},
    "GetAuditPublicKey": {},
    "CreateAuditDigest": {},
}
# Open to every principal: a user sees the audit records of its own account, where it is the
# caller's account or the account that owns the key used (so a key owner sees others' use of it).
OPEN_TO_ALL = frozenset({"QueryAuditEvents", "GetAuditPublicKey"})
MAX_AUDIT_PAGE = 1000


def _check(op: str, body: dict[str, Any]) -> dict[str, Any]:
    schema = SCHEMAS[op]
    missing = [name for name, (_, required) in schema.items() if required and body.get(name) is None]
    if missing:
        raise ValidationException(
            f"{len(missing)} validation error{'s' if len(missing) > 1 else ''} detected: " + "; ".join(
                f"Value null at '{m[0].lower() + m[1:]}' failed to satisfy constraint: Member must not be null"
                for m in missing))
    out = {}
    for name, (kind, _) in schema.items():
        if body.get(name) is not None:
            value = body[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise SerializationException(f"Unexpected value type at '{name}'.")
            body = {**body, name: value}
            out[name] = body[name]
    return out


class AdminAPI:
    def __init__(self, accounts: Accounts, store: Store, audit: AuditLog, forget_identity: Any = None) -> None:
        self.accounts = accounts
        self._forget_identity = forget_identity or (lambda principal_id: None)
        self.store = store
        self.audit = audit
        self._handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "CreateAccount": self._create_account,
            "ListAccounts": self._list_accounts,
            "CreateUser": self._create_user,
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
        }
        self._caller: Caller | None = None

    def has(self, op: str) -> bool:
        return op in self._handlers

    def call(self, caller: Caller, op: str, body: dict[str, Any]) -> dict[str, Any]:
        if not caller.principal.is_admin and op not in OPEN_TO_ALL:
            raise AccessDeniedException(
                f"User: {caller.principal.arn} is not authorized to perform: openkms-admin:{op} "
                "because it is not an administrator")
        params = _check(op, body)
        if op == "QueryAuditEvents" and not caller.principal.is_admin:
            if params.get("AccountId") not in (None, caller.account_id):
                raise AccessDeniedException(
                    f"User: {caller.principal.arn} may only read the audit records of account {caller.account_id}")
            params["AccountId"] = caller.account_id
        return self._handlers[op](params)

    @staticmethod
    def redact_input(op: str, body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k in SCHEMAS.get(op, {})}

    @staticmethod
    def redact_output(op: str, result: dict[str, Any]) -> dict[str, Any] | None:
        if op == "CreateAccessKey":
            key = dict(result["AccessKey"])
            key.pop("SecretAccessKey", None)
            return {"AccessKey": key}
        if op in ("QueryAuditEvents", "GetAuditPublicKey"):
            return None  # records of records would only grow the log
        return result

    def _create_account(self, p: dict[str, Any]) -> dict[str, Any]:
        a = self.accounts.create_account(p["Name"], p.get("AccountId"))
        return {"Account": {"AccountId": a.account_id, "Name": a.name, "CreationDate": a.created.timestamp()}}

    def _list_accounts(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"Accounts": [{"AccountId": a.account_id, "Name": a.name, "CreationDate": a.created.timestamp()}
                             for a in self.accounts.list_accounts()]}

    def _create_user(self, p: dict[str, Any]) -> dict[str, Any]:
        u = self.accounts.create_user(p["AccountId"], p["UserName"], bool(p.get("Admin", False)))
        return {"User": {"UserName": u.name, "AccountId": u.account_id, "Arn": u.arn, "Admin": u.is_admin}}

    def _list_users(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"Users": [{"UserName": u.name, "AccountId": u.account_id, "Arn": u.arn, "Admin": u.is_admin}
                          for u in self.accounts.list_users(p["AccountId"])]}

    def _create_access_key(self, p: dict[str, Any]) -> dict[str, Any]:
        issued = self.accounts.create_access_key(p["AccountId"], p["UserName"])
        return {"AccessKey": {"AccessKeyId": issued.access_key_id,
                              "SecretAccessKey": issued.secret.reveal(),
                              "UserName": issued.principal.name, "AccountId": issued.principal.account_id,
                              "Status": "Active"}}

    def _list_access_keys(self, p: dict[str, Any]) -> dict[str, Any]:
        keys = self.accounts.list_access_keys(p["AccountId"], p["UserName"])
        for k in keys:
            k["CreateDate"] = k["CreateDate"].timestamp()  # type: ignore[attr-defined]
        return {"AccessKeys": keys}

    def _update_access_key(self, p: dict[str, Any]) -> dict[str, Any]:
        self.accounts.set_access_key_status(p["AccessKeyId"], p["Status"])
        return {}

    def _delete_access_key(self, p: dict[str, Any]) -> dict[str, Any]:
        self.accounts.delete_access_key(p["AccessKeyId"])
        return {}

    def _query_audit_events(self, p: dict[str, Any]) -> dict[str, Any]:
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

    def _get_audit_public_key(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"PublicKeyPem": public_pem(self.audit.public_key).decode(), "NodeId": self.audit.node_id}

    def _create_audit_digest(self, p: dict[str, Any]) -> dict[str, Any]:
        self.audit.digest_now()
        return {}

    def _put_user_policy(self, p: dict[str, Any]) -> dict[str, Any]:
        self.accounts.put_user_policy(p["AccountId"], p["UserName"], p["PolicyName"], p["PolicyDocument"])
        self._forget_identity(self.accounts.principal_id(p["AccountId"], p["UserName"]))
        return {}

    def _get_user_policy(self, p: dict[str, Any]) -> dict[str, Any]:
        for name, document in self.accounts.user_policies(p["AccountId"], p["UserName"]):
            if name == p["PolicyName"]:
                return {"UserName": p["UserName"], "PolicyName": name, "PolicyDocument": document}
        raise NotFoundException(f"User {p['UserName']} has no policy {p['PolicyName']}.")

    def _delete_user_policy(self, p: dict[str, Any]) -> dict[str, Any]:
        self._forget_identity(self.accounts.delete_user_policy(p["AccountId"], p["UserName"], p["PolicyName"]))
        return {}

    def _list_user_policies(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"PolicyNames": [name for name, _ in self.accounts.user_policies(p["AccountId"], p["UserName"])]}
