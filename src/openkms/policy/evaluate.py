"""Authorization decisions for KMS keys: key policy, identity policies and grants together.

The rules (KMS developer guide, "Determining access" / "Default key policy"; IAM "Policy
evaluation logic" and "Cross-account policy evaluation logic"), in the order applied:

1. An explicit ``Deny`` that applies -- in the key policy or any identity policy -- denies, whatever
   allows the request elsewhere, grants included.
2. Same account (caller's account = key's account):
   * a key policy statement that names the caller (its ARN, ``"*"``, or -- for the account's root
     user -- the account) allows it outright;
   * a key policy statement that names only the caller's *account* (``"111122223333"`` or
     ``arn:aws:iam::111122223333:root``) delegates: the caller also needs an identity policy that
     allows the action on the key. Without such a key policy statement, identity policies that
     allow are ineffective (unlike most AWS resources -- this is KMS's rule).
3. Another account: the key policy must allow the caller (its ARN, its account, or ``"*"``) AND
   the caller's own identity policy must allow the action on the key ARN.
4. A grant to the caller allows the operations it lists under its constraints, in either account.
   A grant to the caller's account allows when the caller's identity policy also allows.
5. Otherwise: denied (implicit deny).

:func:`evaluate` applies them in that order: :func:`_explicit_deny` (1), :func:`_key_policy_decision`
(2 and 3), :func:`_grant_decision` (4); an operation without a key goes to :func:`_keyless_decision`
after rule 1.

The account root user is not subject to identity policies: wherever an identity policy allow is
needed, the root user has it. Operations without a key (``CreateKey``, ``ListKeys``, ...) are
evaluated with ``key_policy=None``: identity policies alone decide.

Denial messages follow AWS's AccessDeniedException text, e.g. ``User: <arn> is not authorized to
perform: kms:Decrypt on resource: <key arn> because no identity-based policy allows the kms:Decrypt
action``. When both a resource-based and an identity-based allow are missing, the message names
the resource-based policy (the one checked first).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import AccessDeniedException, KMSInternalException
from .document import Policy, PolicyKind, PrincipalMatch, Statement, parse_key_policy
from .grants import Grant, grant_allows, grant_allows_via_account, is_narrower_grant
from .request import ContextValue, RequestContext, root_arn


class Basis(enum.Enum):
    """What a decision rests on (for audit records and tests)."""

    KEY_POLICY = "key-policy"  # the key policy names the caller
    KEY_AND_IDENTITY_POLICY = "key-policy+identity-policy"  # key policy delegates or is cross-account
    IDENTITY_POLICY = "identity-policy"  # an operation without a key
    GRANT = "grant"
    ACCOUNT_GRANT_AND_IDENTITY_POLICY = "account-grant+identity-policy"
    EXPLICIT_DENY_RESOURCE = "explicit-deny:resource-based"
    EXPLICIT_DENY_IDENTITY = "explicit-deny:identity-based"
    NO_RESOURCE_ALLOW = "implicit-deny:no-resource-based-allow"
    NO_IDENTITY_ALLOW = "implicit-deny:no-identity-based-allow"
    WIDER_THAN_PARENT_GRANT = "deny:grant-wider-than-parent-grant"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one :class:`RequestContext`.

    ``reason`` is the AccessDeniedException message when denied, and a short description of what
    allowed the request otherwise. ``sid`` names the deciding statement (or grant id) when known.
    """

    allowed: bool
    reason: str
    basis: Basis
    sid: str | None = None

    def raise_if_denied(self) -> None:
        """Raise :class:`AccessDeniedException` with AWS's message when the request is denied."""
        if not self.allowed:
            raise AccessDeniedException(self.reason)


def _conditions_hold(statement: Statement, request: RequestContext) -> bool:
    keys = request.keys
    for condition in statement.conditions:  # noqa: SIM110 - a loop, not all(genexpr): the hot path
        if not condition.holds(keys.get(condition.key)):
            return False
    return True


def _applies(statement: Statement, request: RequestContext, check_resource: bool) -> PrincipalMatch:
    """How a statement applies to a request: NONE, or how its principal names the caller.

    The principal is checked first: in a key policy most statements name someone else, and a set
    lookup rules them out cheapest. Conditions are left to the caller (they cost the most). The
    common ``Principal`` case is :meth:`Principals.match` inlined, as this runs for every statement
    of every request.
    """
    principals = statement.principals
    if principals is None or statement.not_principal:
        level = statement.principal_match(request.principal_ids, request.principal_account, request.is_root)
        if level is PrincipalMatch.NONE:
            return level
    elif principals.everyone or not principals.arns.isdisjoint(request.principal_ids):
        level = PrincipalMatch.DIRECT
    elif request.principal_account in principals.accounts:
        level = PrincipalMatch.DIRECT if request.is_root else PrincipalMatch.ACCOUNT
    else:
        return PrincipalMatch.NONE
    if not statement.action_applies(request.action_folded):
        return PrincipalMatch.NONE
    if check_resource and not statement.resource_applies(request.resource_arn):
        return PrincipalMatch.NONE
    return level


def _find_deny(policy: Policy, request: RequestContext, check_resource: bool = True) -> Statement | None:
    """The first Deny statement of ``policy`` that applies to the request (any principal match)."""
    for statement in policy.denies:
        if _applies(statement, request, check_resource) and _conditions_hold(statement, request):
            return statement
    return None


def _allow_level(
    policy: Policy, request: RequestContext, check_resource: bool = True
) -> tuple[PrincipalMatch, Statement | None]:
    """The strongest way an Allow statement of ``policy`` names the caller, and that statement."""
    best, chosen = PrincipalMatch.NONE, None
    for statement in policy.allows:
        level = _applies(statement, request, check_resource)
        if level > best and _conditions_hold(statement, request):
            best, chosen = level, statement
            if best is PrincipalMatch.DIRECT:
                break
    return best, chosen


def _identity_allow(policies: Sequence[Policy], request: RequestContext) -> Statement | None:
    for policy in policies:
        level, statement = _allow_level(policy, request)
        if level is not PrincipalMatch.NONE:
            return statement
    return None


def _denied(request: RequestContext, tail: str, basis: Basis, sid: str | None = None) -> Decision:
    message = (
        f"User: {request.principal_arn} is not authorized to perform: {request.action} "
        f"on resource: {request.resource_arn} {tail}"
    )
    return Decision(False, message, basis, sid)


def _check_kinds(key_policy: Policy | None, identity_policies: Sequence[Policy]) -> None:
    if key_policy is not None and key_policy.kind is not PolicyKind.KEY:
        raise KMSInternalException("evaluate() needs a key policy as key_policy")
    if any(p.kind is not PolicyKind.IDENTITY for p in identity_policies):
        raise KMSInternalException("evaluate() needs identity policies as identity_policies")


_EXPLICIT_DENIES = {
    PolicyKind.KEY: ("with an explicit deny in a resource-based policy", Basis.EXPLICIT_DENY_RESOURCE),
    PolicyKind.IDENTITY: ("with an explicit deny in an identity-based policy", Basis.EXPLICIT_DENY_IDENTITY),
}


def _explicit_deny(request: RequestContext, policies: Iterable[Policy]) -> Decision | None:
    """Rule 1: the first Deny that applies, in the key policy (given first) or an identity policy."""
    for policy in policies:
        statement = _find_deny(policy, request)
        if statement is not None:
            tail, basis = _EXPLICIT_DENIES[policy.kind]
            return _denied(request, tail, basis, statement.sid)
    return None


def _no_identity_allow(request: RequestContext) -> Decision:
    return _denied(
        request, f"because no identity-based policy allows the {request.action} action", Basis.NO_IDENTITY_ALLOW
    )


def _keyless_decision(request: RequestContext, identities: Sequence[Policy]) -> Decision:
    """An operation without a key: the root user may, anyone else needs an identity policy allow."""
    if request.is_root:
        return Decision(True, "allowed for the account root user", Basis.IDENTITY_POLICY)
    statement = _identity_allow(identities, request)
    if statement is not None:
        return Decision(True, "allowed by an identity-based policy", Basis.IDENTITY_POLICY, statement.sid)
    return _no_identity_allow(request)


class _IdentityAllow:
    """Whether the caller's identity policies allow the request, looked up at most once and only
    when a rule needs it. The root user needs none (it is allowed, with ``statement`` None)."""

    __slots__ = ("_checked", "_identities", "_request", "statement")

    def __init__(self, request: RequestContext, identities: Sequence[Policy]) -> None:
        self._request = request
        self._identities = identities
        self._checked = False
        self.statement: Statement | None = None

    def allows(self) -> bool:
        if not self._checked:
            self._checked = True
            if not self._request.is_root:
                self.statement = _identity_allow(self._identities, self._request)
        return self._request.is_root or self.statement is not None


def _key_policy_decision(
    request: RequestContext, level: PrincipalMatch, key_statement: Statement | None, identity: _IdentityAllow
) -> Decision | None:
    """Rules 2 and 3: the key policy names the caller (same account: allowed outright), or names it
    or its account and an identity policy allows too. None when the key policy does not allow."""
    if level is PrincipalMatch.NONE:
        return None
    if level is PrincipalMatch.DIRECT and request.principal_account == request.resource_account:
        assert key_statement is not None
        return Decision(True, "allowed by the key policy", Basis.KEY_POLICY, key_statement.sid)
    if identity.allows():
        sid = identity.statement.sid if identity.statement is not None else None
        return Decision(
            True, "allowed by the key policy and an identity-based policy", Basis.KEY_AND_IDENTITY_POLICY, sid
        )
    return None


def _grant_decision(
    request: RequestContext, grants: Sequence[Grant], new_grant: Grant | None, identity: _IdentityAllow
) -> Decision | None:
    """Rule 4: a grant to the caller, or to its account with an identity policy allow. For
    CreateGrant (``new_grant`` given) the grant must also be at least as wide as ``new_grant``:
    when grants allow the request but none is, denied. None when no grant allows."""
    too_wide: Grant | None = None  # a grant that allows the request, but not the grant asked for
    for grant in grants:
        if grant_allows(grant, request):
            if new_grant is None or is_narrower_grant(new_grant, grant):
                return Decision(True, "allowed by a grant", Basis.GRANT, grant.grant_id or None)
            too_wide = too_wide or grant
    for grant in grants:
        if grant_allows_via_account(grant, request) and identity.allows():
            if new_grant is None or is_narrower_grant(new_grant, grant):
                return Decision(
                    True,
                    "allowed by a grant to the account and an identity-based policy",
                    Basis.ACCOUNT_GRANT_AND_IDENTITY_POLICY,
                    grant.grant_id or None,
                )
            too_wide = too_wide or grant
    if too_wide is not None:
        return _denied(
            request,
            "because a grant allows kms:CreateGrant only for grants with the same or fewer operations "
            "and the same or stricter constraints",
            Basis.WIDER_THAN_PARENT_GRANT,
            too_wide.grant_id or None,
        )
    return None


def evaluate(
    request: RequestContext,
    key_policy: Policy | None,
    identity_policies: Iterable[Policy] = (),
    grants: Iterable[Grant] = (),
    new_grant: Grant | None = None,
) -> Decision:
    """Decide a request against the key's policy, the caller's identity policies and the key's grants.

    ``key_policy`` is None for operations that involve no key. Default deny: the request is allowed
    only as the module docstring lays out.

    ``new_grant`` is the grant a ``kms:CreateGrant`` request asks for. A caller whom only a grant
    allows CreateGrant may create only grants at least as narrow as that grant (its operations or
    fewer, its constraints or stricter: :func:`is_narrower_grant`); a wider one is denied. A caller
    whom a policy allows CreateGrant is not limited so (AWS's rule, "Granting CreateGrant
    permission").
    """
    identities = tuple(identity_policies)
    _check_kinds(key_policy, identities)
    denied = _explicit_deny(request, identities if key_policy is None else (key_policy, *identities))
    if denied is not None:
        return denied
    if key_policy is None:
        return _keyless_decision(request, identities)
    level, key_statement = _allow_level(key_policy, request)
    identity = _IdentityAllow(request, identities)
    allowed = _key_policy_decision(request, level, key_statement, identity)
    if allowed is not None:
        return allowed
    by_grant = _grant_decision(request, tuple(grants), new_grant, identity)
    if by_grant is not None:
        return by_grant
    # Rule 5, implicit deny: the message names the resource-based policy when it is what is missing.
    if level is not PrincipalMatch.NONE:
        return _no_identity_allow(request)
    return _denied(
        request, f"because no resource-based policy allows the {request.action} action", Basis.NO_RESOURCE_ALLOW
    )


def would_lock_out(
    policy: Policy | str,
    principal_arn: str,
    principal_account: str,
    *,
    key_arn: str = "",
    context: Mapping[str, ContextValue] | None = None,
) -> bool:
    """PutKeyPolicy/CreateKey's lockout safety check: True when ``policy`` would not let the caller
    make a later ``kms:PutKeyPolicy`` call on the key.

    The caller keeps access when a key policy Allow for ``kms:PutKeyPolicy`` names it directly
    (its ARN, ``"*"``) or names its account (root delegation -- identity policies are not
    consulted, as in AWS), and no Deny for ``kms:PutKeyPolicy`` applies to it. Conditions are
    evaluated against ``context`` plus the caller's own keys; a statement whose conditions need
    keys that are absent does not count. ``Resource`` elements are checked only when ``key_arn``
    is given (CreateKey may not know the ARN yet).
    """
    compiled = parse_key_policy(policy) if isinstance(policy, str) else policy
    if compiled.kind is not PolicyKind.KEY:
        raise KMSInternalException("would_lock_out() needs a key policy")
    request = RequestContext(
        principal_arn=principal_arn,
        principal_account=principal_account,
        action="kms:PutKeyPolicy",
        resource_arn=key_arn or "*",
        resource_account=principal_account if not key_arn else "",
        context=dict(context or {}),
    )
    check_resource = bool(key_arn)
    if _find_deny(compiled, request, check_resource) is not None:
        return True
    level, _ = _allow_level(compiled, request, check_resource)
    return level is PrincipalMatch.NONE


_DEFAULT_KEY_POLICY = """{
  "Version" : "2012-10-17",
  "Id" : "key-default-1",
  "Statement" : [ {
    "Sid" : "Enable IAM User Permissions",
    "Effect" : "Allow",
    "Principal" : {
      "AWS" : "%s"
    },
    "Action" : "kms:*",
    "Resource" : "*"
  } ]
}"""


def default_key_policy(account_id: str, partition: str = "aws") -> str:
    """The key policy AWS gives a key created through the API without one, byte for byte as
    GetKeyPolicy returns it: the account principal may do ``kms:*``, i.e. the account's root user
    directly and its other principals through their identity policies."""
    return _DEFAULT_KEY_POLICY % root_arn(account_id, partition)


def evaluate_resource(
    request: RequestContext, resource_policy: Policy | None, identity_policies: Iterable[Policy] = ()
) -> Decision:
    """Decide a request on a resource of a service other than KMS (a secret), by IAM's rules: an
    explicit Deny anywhere denies; in the resource's account an Allow in either the resource policy
    (naming the caller) or an identity policy allows; across accounts both must allow (the resource
    policy naming the caller or its account). The root user needs no identity policy in its own
    account. Unlike KMS's key policies, a resource that has no policy leaves it to identity policies."""
    identities = tuple(identity_policies)
    _check_kinds(resource_policy, identities)
    denied = _explicit_deny(request, identities if resource_policy is None else (resource_policy, *identities))
    if denied is not None:
        return denied
    level, statement = (PrincipalMatch.NONE, None) if resource_policy is None else _allow_level(resource_policy,
                                                                                               request)
    identity = _IdentityAllow(request, identities)
    same_account = request.principal_account == request.resource_account
    if same_account:
        if level is PrincipalMatch.DIRECT:
            assert statement is not None
            return Decision(True, "allowed by the resource-based policy", Basis.KEY_POLICY, statement.sid)
        if identity.allows():
            sid = identity.statement.sid if identity.statement is not None else None
            return Decision(True, "allowed by an identity-based policy", Basis.IDENTITY_POLICY, sid)
        return _no_identity_allow(request)
    if level is PrincipalMatch.NONE:
        return _denied(
            request, f"because no resource-based policy allows the {request.action} action", Basis.NO_RESOURCE_ALLOW
        )
    if identity.allows():
        sid = identity.statement.sid if identity.statement is not None else None
        return Decision(True, "allowed by the resource-based policy and an identity-based policy",
                        Basis.KEY_AND_IDENTITY_POLICY, sid)
    return _no_identity_allow(request)
