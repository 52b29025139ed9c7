"""The admin API: accounts, users and access keys, for `openkms admin` and automation.

Same wire protocol as KMS (JSON 1.1, SigV4 with service `kms`), target prefix `OpenKMSAdmin.`.
Only principals with the admin flag may call it; others get AccessDeniedException.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..accounts import Accounts
from ..errors import AccessDeniedException, SerializationException, ValidationException
from ..model import Caller

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
}


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
            if not isinstance(body[name], kind):
                raise SerializationException(f"Unexpected value type at '{name}'.")
            out[name] = body[name]
    return out


class AdminAPI:
    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts
        self._handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "CreateAccount": self._create_account,
            "ListAccounts": self._list_accounts,
            "CreateUser": self._create_user,
            "ListUsers": self._list_users,
            "CreateAccessKey": self._create_access_key,
            "ListAccessKeys": self._list_access_keys,
            "UpdateAccessKey": self._update_access_key,
            "DeleteAccessKey": self._delete_access_key,
        }

    def has(self, op: str) -> bool:
        return op in self._handlers

    def call(self, caller: Caller, op: str, body: dict[str, Any]) -> dict[str, Any]:
        if not caller.principal.is_admin:
            raise AccessDeniedException(
                f"User: {caller.principal.arn} is not authorized to perform: openkms-admin:{op} "
                "because it is not an administrator")
        return self._handlers[op](_check(op, body))

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
