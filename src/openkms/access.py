"""Authorization of KMS requests: key policies, identity policies and grants, as AWS evaluates them.

The rules live in the pure `policy` package; this module feeds it. It keeps compiled policies
(compiled once per change of the text, never per request), the identity policies of each user and
the grants of each key in small caches, and builds each request's condition context:

- always: aws:CurrentTime, aws:SourceIp, aws:PrincipalArn/Account, kms:CallerAccount, kms:KeySpec,
  kms:KeyUsage, kms:KeyOrigin, and the operation's own keys (kms:EncryptionContext:*,
  kms:EncryptionAlgorithm, kms:SigningAlgorithm, kms:GrantOperations, kms:RequestAlias, ...);
- only when a policy in play refers to them (they cost a lookup): kms:ResourceAliases and
  aws:ResourceTag/<k>.

Administrators (the bootstrap admin and users made with --admin) act as their account's root
user: the default key policy allows them, and no identity policy is needed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from .cache import TTLCache
from .model import Caller, Key
from .policy import (
    Grant,
    Policy,
    RequestContext,
    default_key_policy,
    evaluate,
    evaluate_resource,
    parse_identity_policy,
    parse_key_policy,
    root_arn,
)
from .storage import Changes, Store

MAX_CACHED = 10_000


def _freeze(mapping: Mapping[str, Any] | None) -> Any:
    """A hashable, order-independent form of a context or encryption context."""
    if mapping is None:
        return None
    return frozenset((k, tuple(v) if isinstance(v, list | tuple | set | frozenset) else v)
                     for k, v in mapping.items())


def principal_arn(caller: Caller) -> str:
    p = caller.principal
    return root_arn(p.account_id) if p.is_admin else p.arn


def condition_keys(policy: Policy) -> frozenset[str]:
    return frozenset(c.key.lower() for s in policy.statements for c in s.conditions)


def grant_from_row(row: Any, key_arn: str) -> Grant:
    constraints = json.loads(row.constraints) if row.constraints else {}
    return Grant(grantee_principal=row.grantee_principal, operations=frozenset(json.loads(row.operations)),
                 retiring_principal=row.retiring_principal,
                 encryption_context_subset=constraints.get("EncryptionContextSubset"),
                 encryption_context_equals=constraints.get("EncryptionContextEquals"),
                 grant_id=row.grant_id, name=row.name or "", key_arn=key_arn)


class AccessControl:
    def __init__(self, store: Store, cache_ttl: float = 5.0) -> None:
        self._store = store
        store.on_commit(self._committed)
        self._compiled: dict[str, tuple[Policy, frozenset[str]]] = {}
        self._resource_policies: dict[str, Policy] = {}
        self._identity: TTLCache[str, tuple[Policy, ...]] = TTLCache(cache_ttl, MAX_CACHED, "identity_policies")
        self._grants: TTLCache[str, tuple[Grant, ...]] = TTLCache(cache_ttl, MAX_CACHED, "grants")
        self._lookups: TTLCache[tuple[str, str], Any] = TTLCache(cache_ttl, MAX_CACHED, "key_policies")
        self._decisions: dict[tuple[Any, ...], tuple[Policy, tuple[Policy, ...], tuple[Grant, ...], Any]] = {}

    # -- compiled policies ----------------------------------------------------------------------
    def key_policy(self, key: Key) -> tuple[Policy, frozenset[str]]:
        text = key.policy or default_key_policy(key.account_id)
        hit = self._compiled.get(text)
        if hit is None:
            policy = parse_key_policy(text)
            if len(self._compiled) > MAX_CACHED:
                self._compiled.clear()
            hit = self._compiled[text] = (policy, condition_keys(policy))
        return hit

    def identity_policies(self, principal_id: str) -> tuple[Policy, ...]:
        def load() -> tuple[Policy, ...]:
            with self._store.begin() as tx:
                documents = tx.policies.for_principal(principal_id)
            return tuple(parse_identity_policy(doc) for _, doc in documents)
        return self._identity.get(principal_id, load)


    # -- grants ---------------------------------------------------------------------------------
    def grants(self, key: Key, grant_tokens: Iterable[str] = ()) -> tuple[Grant, ...]:
        """The key's grants (cached), plus any grant named by a token in the request: a grant token
        works at once, even on a node whose cache predates the grant (as in AWS)."""
        def load() -> tuple[Grant, ...]:
            with self._store.begin() as tx:
                rows = tx.grants.for_key(key.key_id)
            return tuple(grant_from_row(r, key.arn) for r in rows)
        grants = self._grants.get(key.key_id, load)
        known = {g.grant_id for g in grants}
        extra = []
        for token in grant_tokens:
            row = self._grant_for_token(token)
            if row is not None and row.key_id == key.key_id and row.grant_id not in known:
                extra.append(grant_from_row(row, key.arn))
        return grants + tuple(extra)

    def _grant_for_token(self, token: str) -> Any:
        with self._store.begin() as tx:
            return tx.grants.by_token_hash(hashlib.sha256(token.encode()).hexdigest())


    # -- lookups only some policies need ----------------------------------------------------------
    def _cached(self, kind: str, key_id: str, load: Any) -> Any:
        return self._lookups.get((kind, key_id), load)

    def _committed(self, changes: Changes) -> None:
        """Drop what a committed transaction changed (of this node, or another node's as heard)."""
        if changes.everything:
            for cache in (self._identity, self._grants, self._lookups):
                cache.clear()
        for principal_id in changes.identities:
            self._identity.pop(principal_id)
        for key_id in changes.grants:
            self._grants.pop(key_id)
        for key_id in changes.alias_keys:
            self._lookups.pop(("aliases", key_id))
        for key_id in changes.tags:
            self._lookups.pop(("tags", key_id))

    def _aliases_of(self, key: Key) -> list[str]:
        def load() -> list[str]:
            with self._store.begin() as tx:
                return tx.aliases.names_for_key(key.key_id)
        return self._cached("aliases", key.key_id, load)  # type: ignore[no-any-return]

    def _tags_of(self, key: Key) -> list[tuple[str, str]]:
        def load() -> list[tuple[str, str]]:
            with self._store.begin() as tx:
                return tx.tags.for_key(key.key_id)
        return self._cached("tags", key.key_id, load)  # type: ignore[no-any-return]

    # -- decisions ------------------------------------------------------------------------------
    def _base_context(self, caller: Caller, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        # Second precision, as IAM's ISO 8601 times carry it (and so decisions can be reused
        # within a second).
        context: dict[str, Any] = {"aws:CurrentTime": datetime.now(UTC).replace(microsecond=0)}
        if caller.source_ip:
            context["aws:SourceIp"] = caller.source_ip
        if caller.via_service:
            context["kms:ViaService"] = caller.via_service
        if extra:
            context.update(extra)
        return context

    def authorize(self, caller: Caller, key: Key, action: str, *,
                  encryption_context: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None,
                  grant_tokens: Iterable[str] = (), new_grant: Grant | None = None) -> None:
        """Raise AccessDeniedException unless `caller` may do `kms:<action>` with `key`.

        `new_grant`: for CreateGrant, the grant asked for; a caller allowed only by a grant may
        create it only if it is at least as narrow as that grant. Such decisions are not cached
        (they depend on the whole new grant, and CreateGrant is rare)."""
        policy, needs = self.key_policy(key)
        identities, identity_needs = self._identity_with_needs(caller.principal.principal_id)
        needs = needs | identity_needs
        context: dict[str, Any] = {}
        if needs:
            # Only the condition keys some policy in play refers to: converting the others would be
            # work on every request for nothing (the default key policy has no conditions at all).
            available = self._base_context(caller, extra)
            available["kms:KeySpec"] = key.key_spec
            available["kms:KeyUsage"] = key.key_usage.value
            available["kms:KeyOrigin"] = key.origin.value
            if "kms:resourcealiases" in needs:
                available["kms:ResourceAliases"] = self._aliases_of(key)
            if any(n.startswith("aws:resourcetag/") for n in needs):
                for k, v in self._tags_of(key):
                    available[f"aws:ResourceTag/{k}"] = v
            context = {k: v for k, v in available.items() if k.lower() in needs}
        grants = self.grants(key, grant_tokens)
        principal = principal_arn(caller)
        # A decision depends on nothing but these: the compiled policies and grants in play (held in
        # the entry and compared by identity, so a changed policy or grant never meets an old
        # decision), the request's fields, the condition values the policies refer to, and the
        # encryption context. Repeated requests are answered from here instead of re-evaluated.
        cache_key = (id(policy), id(identities), id(grants), principal, caller.account_id, action, key.arn,
                     _freeze(context), _freeze(encryption_context))
        hit = self._decisions.get(cache_key) if new_grant is None else None
        if hit is not None and hit[0] is policy and hit[1] is identities and hit[2] is grants:
            decision = hit[3]
        else:
            request = RequestContext(principal, caller.account_id, "kms:" + action, key.arn, key.account_id,
                                     context, encryption_context)
            decision = evaluate(request, policy, identities, grants, new_grant=new_grant)
            if new_grant is None:
                if len(self._decisions) >= MAX_CACHED:
                    self._decisions.clear()
                self._decisions[cache_key] = (policy, identities, grants, decision)
        decision.raise_if_denied()

    def _identity_with_needs(self, principal_id: str) -> tuple[tuple[Policy, ...], frozenset[str]]:
        policies = self.identity_policies(principal_id)
        if not policies:
            return policies, frozenset()
        return policies, frozenset().union(*(self._compiled_needs(p) for p in policies))

    def _compiled_needs(self, policy: Policy) -> frozenset[str]:
        hit = self._compiled.get(policy.text)
        if hit is None:
            hit = self._compiled[policy.text] = (policy, condition_keys(policy))
        return hit[1]

    def authorize_identity(self, caller: Caller, action: str, extra: Mapping[str, Any] | None = None) -> None:
        """For operations on no key (CreateKey, ListKeys, ...): identity policies alone decide."""
        request = RequestContext(principal_arn(caller), caller.account_id, "kms:" + action, "*", caller.account_id,
                                 self._base_context(caller, extra))
        decision = evaluate(request, None, self.identity_policies(caller.principal.principal_id))
        decision.raise_if_denied()

    def resource_policy(self, text: str) -> Policy:
        """A resource policy of another service (a secret's), compiled once per text."""
        policy = self._resource_policies.get(text)
        if policy is None:
            if len(self._resource_policies) >= MAX_CACHED:
                self._resource_policies.clear()
            policy = self._resource_policies[text] = parse_key_policy(text)
        return policy

    def authorize_resource(self, caller: Caller, action: str, resource_arn: str, resource_account: str,
                           policy_text: str | None = None, extra: Mapping[str, Any] | None = None) -> None:
        """Raise AccessDeniedException unless `caller` may do `action` (a full IAM action such as
        secretsmanager:GetSecretValue) on a resource of another service, by IAM's rules
        (policy.evaluate_resource): its resource policy and the caller's identity policies."""
        request = RequestContext(principal_arn(caller), caller.account_id, action, resource_arn, resource_account,
                                 self._base_context(caller, extra))
        policy = self.resource_policy(policy_text) if policy_text else None
        decision = evaluate_resource(request, policy, self.identity_policies(caller.principal.principal_id))
        decision.raise_if_denied()
