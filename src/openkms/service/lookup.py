"""Finding keys: the cached key and alias lookups, and the one authorization decision on a key.

Every path from a request to a key goes through `authorized` (look it up, then decide), or through
`find` followed by an explicit `decide` (Decrypt routes by the key its ciphertext names; the
ListAliases filter only narrows a listing the identity policies allowed). There is no default
that skips the decision: `decide` refuses an empty action.

Caches: key metadata and alias targets are kept for `cache_ttl` seconds. The lookup never needs
to be told about a change: it listens to the store, and every committed transaction that wrote a
key or an alias drops those entries on this node (see `storage.store.Changes`). Other nodes sharing
the store see the change within the TTL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..access import AccessControl
from ..audit.context import note_key
from ..cache import TTLCache
from ..errors import KMSInternalException, NotFoundException
from ..keystore.registry import KeyStores
from ..model import ALIAS_ARN_RE, KEY_ARN_RE, KEY_ID_RE, Caller, Key, alias_arn
from ..policy import Grant
from ..storage import Changes, Store


class KeyLookup:
    def __init__(self, store: Store, access: AccessControl, keystores: KeyStores, region: str,
                 cache_ttl: float = 5.0) -> None:
        self._store = store
        self._access = access
        self._keystores = keystores
        self._region = region
        self._keys: TTLCache[str, Key | None] = TTLCache(cache_ttl, name="keys")
        self._aliases: TTLCache[tuple[str, str], str | None] = TTLCache(cache_ttl, name="aliases")
        store.on_commit(self._committed)

    def _committed(self, changes: Changes) -> None:
        if changes.everything:
            self._keys.clear()
            self._aliases.clear()
        for key_id in changes.keys:
            self._keys.pop(key_id)
        for account_and_name in changes.aliases:
            self._aliases.pop(account_and_name)

    # -- cached reads -------------------------------------------------------------------------
    def load(self, key_id: str) -> Key | None:
        """A key by id, of any account (no authorization: for the lookups below and scheduled work).
        A key of a custom key store that is not connected comes back marked `store_unavailable`."""
        def load() -> Key | None:
            with self._store.begin() as tx:
                return tx.keys.get(key_id)
        key = self._keys.get(key_id, load)
        if key is not None and key.custom_key_store_id is not None and \
                not self._keystores.connected(key.custom_key_store_id):
            return dataclasses.replace(key, store_unavailable=True)
        return key

    def peek(self, account_id: str | None, key_ref: str) -> Key | None:
        """The key a reference names, or None; no authorization, no audit note, no error (only to
        route a request before it runs)."""
        if key_ref.startswith("alias/"):
            if account_id is None:
                return None
            key_id = self.alias_target(account_id, key_ref)
        elif (m := KEY_ARN_RE.match(key_ref)) is not None:
            key_id = m.group(3)
        elif (m := ALIAS_ARN_RE.match(key_ref)) is not None:
            key_id = self.alias_target(m.group(2), m.group(3))
        else:
            key_id = key_ref if KEY_ID_RE.match(key_ref) else None
        return self.load(key_id) if key_id else None

    def refresh(self, key_id: str) -> Key | None:
        """Read the key again from the store (another node may have changed it)."""
        self._keys.pop(key_id)
        return self.load(key_id)

    def alias_target(self, account_id: str, name: str) -> str | None:
        def load() -> str | None:
            with self._store.begin() as tx:
                alias = tx.aliases.get(account_id, name)
            return alias.target_key_id if alias else None
        return self._aliases.get((account_id, name), load)

    # -- the lookups requests make ------------------------------------------------------------
    def find(self, caller: Caller, key_ref: str, allow_alias: bool = True) -> tuple[Key, str | None]:
        """A key id, key ARN, alias name or alias ARN -> (the key, the alias name it was named by).

        No authorization: only where an explicit `decide` follows. A key of another account can
        only be named by its key ARN; aliases never resolve across accounts or regions.
        """
        account = caller.account_id
        key_id: str | None
        request_alias = None
        if key_ref.startswith("alias/") or ALIAS_ARN_RE.match(key_ref):
            if not allow_alias:
                raise NotFoundException(f"Invalid keyId '{key_ref}'. An alias is not accepted here.")
            m = ALIAS_ARN_RE.match(key_ref)
            if m:
                region, alias_account, name = m.groups()
                if alias_account != account or region != self._region:
                    raise NotFoundException(f"Alias {key_ref} is not found.")
            else:
                name = key_ref
            key_id = self.alias_target(account, name)
            if key_id is None:
                raise NotFoundException(f"Alias {alias_arn(self._region, account, name)} is not found.")
            request_alias = name
            owner = account
        else:
            m = KEY_ARN_RE.match(key_ref)
            if m:
                region, owner, key_id = m.groups()
                if region != self._region:
                    raise NotFoundException(f"Key '{key_ref}' does not exist")
            elif KEY_ID_RE.match(key_ref):
                key_id, owner = key_ref, account
            else:
                raise NotFoundException(f"Invalid keyId '{key_ref}'")
        key = self.load(key_id)
        if key is None or key.account_id != owner:
            raise NotFoundException(f"Key 'arn:aws:kms:{self._region}:{owner}:key/{key_id}' does not exist")
        note_key(key.arn, key.account_id)
        return key, request_alias

    def authorized(self, caller: Caller, key_ref: str, action: str, *, allow_alias: bool = True,
                   encryption_context: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None,
                   new_grant: Grant | None = None) -> Key:
        """The key `key_ref` names, if the caller may `kms:<action>` it; AccessDeniedException if not."""
        key, request_alias = self.find(caller, key_ref, allow_alias)
        self.decide(caller, key, action, request_alias=request_alias, encryption_context=encryption_context,
                    extra=extra, new_grant=new_grant)
        return key

    def decide(self, caller: Caller, key: Key, action: str, *, request_alias: str | None = None,
               encryption_context: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None,
               new_grant: Grant | None = None) -> None:
        """The one authorization decision for a request on `key` (key policy, identity policies, grants)."""
        if not action:
            # Fail closed: there is no way to ask for a key without saying what it is wanted for.
            raise KMSInternalException("A key was looked up without an action to authorize.")
        if request_alias is not None:
            extra = {**(extra or {}), "kms:RequestAlias": request_alias}
        self._access.authorize(caller, key, action, encryption_context=encryption_context, extra=extra,
                               grant_tokens=caller.grant_tokens, new_grant=new_grant)
