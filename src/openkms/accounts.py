"""Accounts, principals and access keys: who may call openkms.

Secret access keys are sealed under the root key in the store (SigV4 needs the secret itself on
the server side, so a one-way hash will not do). The signing path looks access keys up through a
small in-process cache; changes made through this node take effect at once.
"""

from __future__ import annotations

import base64
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from .cache import TTLCache
from .crypto.root import RootKey
from .errors import (
    AlreadyExistsException,
    DeleteConflictException,
    InvalidCiphertextException,
    KMSInternalException,
    NotFoundException,
    ValidationException,
)
from .model import Account, Principal, SecretStr
from .policy import parse_identity_policy
from .storage import Changes, Store, from_ts

ACCOUNT_ID_RE = re.compile(r"^[0-9]{12}\Z")  # \Z: "$" would accept a trailing newline
ACCESS_KEY_ID_RE = re.compile(r"^[A-Z0-9]{16,128}\Z")
POLICY_NAME_RE = re.compile(r"^[\w+=,.@-]{1,128}\Z", re.ASCII)
USER_NAME_RE = re.compile(r"^[\w+=,.@-]{1,64}\Z")
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def new_account_id() -> str:
    return str(secrets.randbelow(9 * 10**11) + 10**11)


def new_access_key_id() -> str:
    return "AKIA" + "".join(secrets.choice(_B32) for _ in range(16))


def new_secret_access_key() -> str:
    return base64.b64encode(secrets.token_bytes(30)).decode()


def secret_aad(access_key_id: str) -> bytes:
    return f"openkms:access-key:{access_key_id}".encode()


@dataclass(frozen=True)
class IssuedKey:
    """A freshly made access key pair, returned once to whoever asked for it."""

    access_key_id: str
    secret: SecretStr
    principal: Principal


class Accounts:
    def __init__(self, store: Store, root: RootKey, cache_ttl: float = 5.0) -> None:
        self._store = store
        self._root = root
        self._cache: TTLCache[str, tuple[SecretStr, Principal] | None] = TTLCache(cache_ttl, max_entries=10_000,
                                                                                  name="access_keys")
        store.on_commit(self._committed)

    def _committed(self, changes: Changes) -> None:
        # A key made, switched off or deleted through this node (or another) takes effect at once.
        if changes.everything:
            self._cache.clear()
        for access_key_id in changes.access_keys:
            self._cache.pop(access_key_id)

    # -- the signing path -------------------------------------------------------------------
    def credentials(self, access_key_id: str) -> tuple[SecretStr, Principal] | None:
        """The secret and principal of an active access key, or None if there is none."""
        return self._cache.get(access_key_id, lambda: self._load_credentials(access_key_id))

    def _load_credentials(self, access_key_id: str) -> tuple[SecretStr, Principal] | None:
        with self._store.begin() as tx:
            row = tx.accounts.access_key_row(access_key_id)
            if row is None or row.status != "Active":
                return None
            principal = tx.accounts.principal(row.principal_id)
        if principal is None:
            return None
        try:
            secret = self._root.unseal(bytes(row.sealed_secret), secret_aad(access_key_id)).decode()
        except InvalidCiphertextException:
            raise KMSInternalException("An access key failed its integrity check.") from None
        return SecretStr(secret), principal

    # -- bootstrap --------------------------------------------------------------------------
    def is_empty(self) -> bool:
        with self._store.begin() as tx:
            return tx.accounts.count() == 0

    def bootstrap(self, account_id: str | None, access_key_id: str | None, secret: str | None) -> IssuedKey:
        """First start: one account, an operator in it, and that user's access key."""
        account = self.create_account(name="admin", account_id=account_id)
        self.create_user(account.account_id, "admin", is_admin=True, is_operator=True)
        return self.create_access_key(account.account_id, "admin", access_key_id=access_key_id, secret=secret)

    # -- administration ---------------------------------------------------------------------
    def create_account(self, name: str, account_id: str | None = None) -> Account:
        account_id = account_id or new_account_id()
        if not ACCOUNT_ID_RE.match(account_id):
            raise ValidationException("An account id is 12 digits.")
        if not name or len(name) > 256:
            raise ValidationException("An account name is 1 to 256 characters.")
        account = Account(account_id, name, datetime.now(UTC))
        with self._store.begin() as tx:
            if tx.accounts.get(account_id) is not None:
                raise AlreadyExistsException(f"Account {account_id} already exists.")
            tx.accounts.insert(account)
        return account

    def list_accounts(self) -> list[Account]:
        with self._store.begin() as tx:
            return tx.accounts.all()

    def account(self, account_id: str) -> Account:
        with self._store.begin() as tx:
            account = tx.accounts.get(account_id)
        if account is None:
            raise NotFoundException(f"Account {account_id} does not exist.")
        return account

    def create_user(self, account_id: str, name: str, is_admin: bool = False, is_operator: bool = False) -> Principal:
        if not USER_NAME_RE.match(name):
            raise ValidationException("A user name is 1 to 64 characters of letters, digits and +=,.@_-")
        principal = Principal(uuid.uuid4().hex, account_id, name, is_admin or is_operator, datetime.now(UTC),
                              is_operator)
        with self._store.begin() as tx:
            if tx.accounts.get(account_id) is None:
                raise NotFoundException(f"Account {account_id} does not exist.")
            if tx.accounts.principal_by_name(account_id, name) is not None:
                raise AlreadyExistsException(f"User {name} already exists in account {account_id}.")
            tx.accounts.insert_principal(principal)
        return principal

    def list_users(self, account_id: str) -> list[Principal]:
        with self._store.begin() as tx:
            if tx.accounts.get(account_id) is None:
                raise NotFoundException(f"Account {account_id} does not exist.")
            return tx.accounts.principals(account_id)

    def delete_user(self, account_id: str, name: str) -> Principal:
        """Delete a user, its access keys (they stop working at once on this node) and its policies."""
        with self._store.begin() as tx:
            principal = tx.accounts.principal_by_name(account_id, name)
            if principal is None:
                raise NotFoundException(f"User {name} does not exist in account {account_id}.")
            tx.accounts.delete_principal(principal.principal_id)
        return principal

    def delete_account(self, account_id: str) -> list[Principal]:
        """Delete an account and its users; refused while it holds keys that are not deleted yet."""
        with self._store.begin() as tx:
            if tx.accounts.get(account_id) is None:
                raise NotFoundException(f"Account {account_id} does not exist.")
            keys = tx.accounts.key_count(account_id)
            if keys:
                raise DeleteConflictException(
                    f"Account {account_id} still holds {keys} key(s) that are not deleted: schedule their "
                    "deletion and wait for it to complete first.")
            secrets = len(tx.secrets.for_account(account_id))
            if secrets:
                raise DeleteConflictException(
                    f"Account {account_id} still holds {secrets} secret(s): delete them (ForceDeleteWithoutRecovery, "
                    "or wait for their recovery window to end) first.")
            for key_id in tx.accounts.managed_key_ids(account_id):  # aws/secretsmanager: nobody else deletes it
                tx.keys.delete(key_id)
            for function in tx.rotation_functions.for_account(account_id):
                tx.rotation_functions.delete(account_id, function.name)
            users = tx.accounts.principals(account_id)
            tx.accounts.delete(account_id)
        return users

    def user(self, account_id: str, name: str) -> Principal:
        return self._user(account_id, name)

    def owner_of_access_key(self, access_key_id: str) -> Principal:
        """The user an access key (active or not) belongs to."""
        with self._store.begin() as tx:
            row = tx.accounts.access_key_row(access_key_id)
            principal = tx.accounts.principal(row.principal_id) if row is not None else None
        if principal is None:
            raise NotFoundException("That access key does not exist.")
        return principal

    def _user(self, account_id: str, name: str) -> Principal:
        with self._store.begin() as tx:
            principal = tx.accounts.principal_by_name(account_id, name)
        if principal is None:
            raise NotFoundException(f"User {name} does not exist in account {account_id}.")
        return principal

    def create_access_key(self, account_id: str, user_name: str, access_key_id: str | None = None,
                          secret: str | None = None) -> IssuedKey:
        principal = self._user(account_id, user_name)
        access_key_id = access_key_id or new_access_key_id()
        secret = secret or new_secret_access_key()
        if not ACCESS_KEY_ID_RE.match(access_key_id):
            raise ValidationException("An access key id is 16 to 128 upper-case letters and digits.")
        if not 16 <= len(secret) <= 128:
            raise ValidationException("A secret access key is 16 to 128 characters.")
        sealed = self._root.seal(secret.encode(), secret_aad(access_key_id))
        with self._store.begin() as tx:
            if tx.accounts.access_key_row(access_key_id) is not None:
                raise AlreadyExistsException("That access key id is already in use.")
            tx.accounts.insert_access_key(access_key_id, principal.principal_id, sealed, datetime.now(UTC))
        return IssuedKey(access_key_id, SecretStr(secret), principal)

    def list_access_keys(self, account_id: str, user_name: str) -> list[dict[str, object]]:
        principal = self._user(account_id, user_name)
        with self._store.begin() as tx:
            rows = tx.accounts.access_keys(principal.principal_id)
        return [{"AccessKeyId": r.access_key_id, "Status": r.status, "CreateDate": from_ts(r.created),
                 "UserName": principal.name, "AccountId": principal.account_id} for r in rows]

    def set_access_key_status(self, access_key_id: str, status: str) -> None:
        if status not in ("Active", "Inactive"):
            raise ValidationException("Status must be Active or Inactive.")
        with self._store.begin() as tx:
            if not tx.accounts.set_access_key_status(access_key_id, status):
                raise NotFoundException("That access key does not exist.")

    def delete_access_key(self, access_key_id: str) -> None:
        with self._store.begin() as tx:
            if not tx.accounts.delete_access_key(access_key_id):
                raise NotFoundException("That access key does not exist.")

    # -- identity policies ------------------------------------------------------------------
    def put_user_policy(self, account_id: str, user_name: str, policy_name: str, document: str) -> None:
        """Attach (or replace) a named identity policy; MalformedPolicyDocumentException if invalid."""
        if not POLICY_NAME_RE.match(policy_name):
            raise ValidationException("A policy name is 1 to 128 characters of letters, digits and +=,.@_-")
        parse_identity_policy(document)
        principal = self._user(account_id, user_name)
        with self._store.begin() as tx:
            tx.policies.put(principal.principal_id, policy_name, document)

    def delete_user_policy(self, account_id: str, user_name: str, policy_name: str) -> str:
        principal = self._user(account_id, user_name)
        with self._store.begin() as tx:
            if not tx.policies.delete(principal.principal_id, policy_name):
                raise NotFoundException(f"User {user_name} has no policy {policy_name}.")
        return principal.principal_id

    def user_policies(self, account_id: str, user_name: str) -> list[tuple[str, str]]:
        principal = self._user(account_id, user_name)
        with self._store.begin() as tx:
            return tx.policies.for_principal(principal.principal_id)

    def principal_id(self, account_id: str, user_name: str) -> str:
        return self._user(account_id, user_name).principal_id
