"""Policy documents: JSON text -> an immutable compiled :class:`Policy`, once per change.

Grammar (IAM JSON policy reference, KMS key-policy rules):

* Top level: ``Version`` (``"2012-10-17"`` or ``"2008-10-17"``; optional, default
  ``"2008-10-17"`` as in IAM), ``Id`` (string, optional), ``Statement`` (an object or a list of
  objects, required). Any other element is an error.
* Statement: ``Sid`` (string), ``Effect`` (``Allow`` | ``Deny``, required), ``Principal`` or
  ``NotPrincipal`` (required in key policies, forbidden in identity policies), ``Action`` or
  ``NotAction``, ``Resource`` or ``NotResource``, ``Condition``. Both halves of a pair -> error.
* Action: ``"*"`` or ``"service:name"`` with ``*``/``?`` wildcards, matched case-insensitively.
  Resource: ``"*"`` or an ARN with wildcards, matched case-sensitively (``*`` may cross colons).
* Principal: ``"*"`` or an object whose ``AWS`` entry is ``"*"``, a 12-digit account id, the
  account ARN ``arn:aws:iam::<acct>:root`` (both mean the *account*, see :mod:`.evaluate`), or a
  user/role/assumed-role ARN; a string or a non-empty list. ``Service``, ``Federated`` and
  ``CanonicalUser`` entries are accepted but never match an openkms caller.
* Duplicate JSON object keys, ``NaN``/``Infinity`` literals and non-string element names are
  rejected rather than resolved silently (JSON parsers disagree on them; policies must not).

Missing ``Action``/``Resource``: an identity policy statement without them is malformed (IAM
rejects it). A *key* policy statement without them is accepted but has no effect -- the KMS API
reference for PutKeyPolicy says exactly that ("the PutKeyPolicy API request succeeds, even though
the policy statement is ineffective").

Size: a key policy longer than 32 KB (32,768 bytes of UTF-8) raises ``LimitExceededException``
(the PutKeyPolicy reference: "If the key policy exceeds the length constraint, KMS returns a
LimitExceededException"). Everything else wrong raises :class:`MalformedPolicyDocumentException`.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field

from ..errors import LimitExceededException, MalformedPolicyDocumentException
from .conditions import Condition, compile_condition_block
from .wildcard import GlobSet

MAX_POLICY_BYTES = 32 * 1024
VERSIONS = ("2012-10-17", "2008-10-17")
DEFAULT_VERSION = "2008-10-17"

_TOP_LEVEL = frozenset({"Version", "Id", "Statement"})
_STATEMENT = frozenset(
    {
        "Sid",
        "Effect",
        "Principal",
        "NotPrincipal",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
    }
)
_PRINCIPAL_TYPES = frozenset({"AWS", "Service", "Federated", "CanonicalUser"})
_ACCOUNT_ID_RE = re.compile(r"\d{12}\Z")
_ROOT_RE = re.compile(r"arn:[a-z0-9-]+:iam::(\d{12}):root\Z")
_PRINCIPAL_ARN_RE = re.compile(r"arn:[a-z0-9-]+:(?:iam|sts)::\d{12}:\S+\Z")
_ACTION_RE = re.compile(r"[A-Za-z0-9*?-]+:[^\s:]*\Z")
INVALID_PRINCIPALS = "Policy contains a statement with one or more invalid principals."


class PolicyKind(enum.Enum):
    """Key policies are resource-based (they name principals); identity policies are not."""

    KEY = "key"
    IDENTITY = "identity"


class Effect(enum.Enum):
    ALLOW = "Allow"
    DENY = "Deny"


class PrincipalMatch(enum.IntEnum):
    """How a statement's principal element relates to a caller."""

    NONE = 0
    ACCOUNT = 1  # names the caller's account (the account principal): delegation to its IAM policies
    DIRECT = 2  # names the caller itself, or everyone


@dataclass(frozen=True, slots=True)
class Principals:
    """A compiled ``Principal``/``NotPrincipal`` element."""

    everyone: bool = False
    accounts: frozenset[str] = frozenset()  # account ids named by id or by their root ARN
    arns: frozenset[str] = frozenset()  # user, role and assumed-role ARNs
    others: tuple[tuple[str, str], ...] = ()  # (type, value) of Service/Federated/CanonicalUser

    def match(self, principal_ids: frozenset[str], account: str, is_root: bool) -> PrincipalMatch:
        """How this element names the caller (``Principal`` semantics).

        The account principal matches the account's root user directly; for every other
        principal of that account it is a delegation (:attr:`PrincipalMatch.ACCOUNT`).
        """
        if self.everyone or not self.arns.isdisjoint(principal_ids):
            return PrincipalMatch.DIRECT
        if account in self.accounts:
            return PrincipalMatch.DIRECT if is_root else PrincipalMatch.ACCOUNT
        return PrincipalMatch.NONE

    def excludes(self, principal_ids: frozenset[str], account: str, is_root: bool) -> bool:
        """``NotPrincipal`` semantics: the caller is exempt only if *each* identity it carries is
        listed -- its account, and (unless it is the account's root user) its own ARN. This is why
        IAM tells authors to list the account next to a user in ``NotPrincipal``."""
        if self.everyone:
            return True
        if account not in self.accounts:
            return False
        return is_root or not self.arns.isdisjoint(principal_ids)


@dataclass(frozen=True, slots=True)
class Statement:
    """One compiled statement. ``inert`` statements (key policy without Action/Resource) never apply."""

    sid: str | None
    effect: Effect
    principals: Principals | None
    not_principal: bool
    actions: GlobSet | None
    not_action: bool
    resources: GlobSet | None
    not_resource: bool
    conditions: tuple[Condition, ...]
    inert: bool = False

    def principal_match(self, principal_ids: frozenset[str], account: str, is_root: bool) -> PrincipalMatch:
        if self.principals is None:  # identity policy: it belongs to the caller
            return PrincipalMatch.DIRECT
        if self.not_principal:
            excluded = self.principals.excludes(principal_ids, account, is_root)
            return PrincipalMatch.NONE if excluded else PrincipalMatch.DIRECT
        return self.principals.match(principal_ids, account, is_root)

    def action_applies(self, action_folded: str) -> bool:
        assert self.actions is not None
        return self.actions.matches_folded(action_folded) is not self.not_action

    def resource_applies(self, resource_arn: str) -> bool:
        assert self.resources is not None
        return self.resources.matches_folded(resource_arn) is not self.not_resource


@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled, immutable policy. ``text`` is the document exactly as given (GetKeyPolicy)."""

    kind: PolicyKind
    version: str
    id: str | None
    statements: tuple[Statement, ...]
    text: str = field(repr=False, compare=False)
    # The effective statements split by effect, so evaluation scans only what it needs.
    denies: tuple[Statement, ...] = field(init=False, repr=False, compare=False)
    allows: tuple[Statement, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        live = [s for s in self.statements if not s.inert]
        object.__setattr__(self, "denies", tuple(s for s in live if s.effect is Effect.DENY))
        object.__setattr__(self, "allows", tuple(s for s in live if s.effect is Effect.ALLOW))


# --- JSON loading -------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedPolicyDocumentException(f"Duplicate element in policy document: {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> object:
    raise MalformedPolicyDocumentException(f"Invalid JSON value in policy document: {name}")


def _load(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except MalformedPolicyDocumentException:
        raise
    except json.JSONDecodeError as exc:
        raise MalformedPolicyDocumentException(
            f"The policy is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (RecursionError, ValueError):  # absurd nesting, or numbers too long to convert
        raise MalformedPolicyDocumentException("The policy is not valid JSON") from None


# --- element compilers ---------------------------------------------------------------------------


def _strings(value: object, element: str, *, where: str) -> tuple[str, ...]:
    """A string or a non-empty list of strings."""
    items = value if isinstance(value, list) else [value]
    strings = tuple(v for v in items if isinstance(v, str) and v)
    if not items or len(strings) != len(items):
        raise MalformedPolicyDocumentException(
            f"{where}: {element} must be a non-empty string or a non-empty list of non-empty strings"
        )
    return strings


def _principals(value: object, *, where: str) -> Principals:
    if value == "*":
        return Principals(everyone=True)
    if not isinstance(value, dict) or not value:
        raise MalformedPolicyDocumentException(f"{where}: {INVALID_PRINCIPALS}")
    everyone = False
    accounts: set[str] = set()
    arns: set[str] = set()
    others: list[tuple[str, str]] = []
    for kind, raw in value.items():
        if kind not in _PRINCIPAL_TYPES:
            raise MalformedPolicyDocumentException(f"{where}: {INVALID_PRINCIPALS}")
        try:
            names = _strings(raw, "Principal", where=where)
        except MalformedPolicyDocumentException:
            raise MalformedPolicyDocumentException(f"{where}: {INVALID_PRINCIPALS}") from None
        for name in names:
            if kind != "AWS":
                others.append((kind, name))
            elif name == "*":
                everyone = True
            elif _ACCOUNT_ID_RE.match(name):
                accounts.add(name)
            elif root := _ROOT_RE.match(name):
                accounts.add(root.group(1))
            elif _PRINCIPAL_ARN_RE.match(name):
                arns.add(name)
            else:
                raise MalformedPolicyDocumentException(f"{where}: {INVALID_PRINCIPALS}")
    return Principals(everyone, frozenset(accounts), frozenset(arns), tuple(others))


def _actions(value: object, element: str, *, where: str) -> GlobSet:
    patterns = _strings(value, element, where=where)
    for pattern in patterns:
        if pattern != "*" and not _ACTION_RE.match(pattern):
            raise MalformedPolicyDocumentException(
                f'{where}: {element} {pattern!r} must be "*" or of the form "service:action"'
            )
    return GlobSet(patterns, fold=True)


def _resources(value: object, element: str, *, where: str) -> GlobSet:
    patterns = _strings(value, element, where=where)
    for pattern in patterns:
        if pattern != "*" and not pattern.startswith("arn:"):
            raise MalformedPolicyDocumentException(f'{where}: {element} {pattern!r} must be "*" or an ARN')
    return GlobSet(patterns)


def _pair(statement: dict[str, object], name: str, *, where: str) -> tuple[object, bool] | None:
    """The value of ``name`` or ``Not<name>`` and whether it was the negated one."""
    negated = "Not" + name
    if name in statement and negated in statement:
        raise MalformedPolicyDocumentException(f"{where}: has both {name} and {negated}")
    if name in statement:
        return statement[name], False
    if negated in statement:
        return statement[negated], True
    return None


def _statement(raw: object, index: int, kind: PolicyKind) -> Statement:
    where = f"Statement {index}"
    if not isinstance(raw, dict):
        raise MalformedPolicyDocumentException(f"{where}: a statement must be a JSON object")
    unknown = sorted(set(raw) - _STATEMENT)
    if unknown:
        raise MalformedPolicyDocumentException(f"{where}: unknown element {unknown[0]!r}")
    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        raise MalformedPolicyDocumentException(f"{where}: Sid must be a string")
    if isinstance(sid, str):
        where = f"Statement {sid!r}" if sid else where
    if "Effect" not in raw:
        raise MalformedPolicyDocumentException(f"{where}: missing Effect")
    try:
        effect = Effect(raw["Effect"])
    except (ValueError, TypeError):
        raise MalformedPolicyDocumentException(
            f'{where}: Effect must be "Allow" or "Deny", not {raw["Effect"]!r}'
        ) from None

    principal = _pair(raw, "Principal", where=where)
    if kind is PolicyKind.KEY and principal is None:
        raise MalformedPolicyDocumentException(f"{where}: a key policy statement must have a Principal")
    if kind is PolicyKind.IDENTITY and principal is not None:
        raise MalformedPolicyDocumentException(f"{where}: an identity policy cannot have a Principal")
    principals = _principals(principal[0], where=where) if principal else None

    action = _pair(raw, "Action", where=where)
    resource = _pair(raw, "Resource", where=where)
    if kind is PolicyKind.IDENTITY:
        if action is None:
            raise MalformedPolicyDocumentException(f"{where}: missing Action or NotAction")
        if resource is None:
            raise MalformedPolicyDocumentException(f"{where}: missing Resource or NotResource")
    actions = _actions(action[0], "NotAction" if action[1] else "Action", where=where) if action else None
    resources = (
        _resources(resource[0], "NotResource" if resource[1] else "Resource", where=where)
        if resource
        else None
    )
    conditions = compile_condition_block(raw["Condition"]) if "Condition" in raw else ()
    return Statement(
        sid=sid,
        effect=effect,
        principals=principals,
        not_principal=bool(principal and principal[1]),
        actions=actions,
        not_action=bool(action and action[1]),
        resources=resources,
        not_resource=bool(resource and resource[1]),
        conditions=conditions,
        inert=actions is None or resources is None,
    )


def parse_policy(text: object, kind: PolicyKind = PolicyKind.KEY) -> Policy:
    """Validate a policy document and compile it. Call once per change, keep the result.

    Raises :class:`MalformedPolicyDocumentException` for anything but a valid document, and
    ``LimitExceededException`` for a document over 32 KB.
    """
    if not isinstance(text, str):
        raise MalformedPolicyDocumentException("The policy must be a JSON document in a string")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates
        raise MalformedPolicyDocumentException("The policy is not valid UTF-8 text") from None
    if size > MAX_POLICY_BYTES:
        raise LimitExceededException(
            f"The policy document is {size} bytes long; the limit is {MAX_POLICY_BYTES} bytes"
        )
    document = _load(text)
    if not isinstance(document, dict):
        raise MalformedPolicyDocumentException("The policy must be a JSON object")
    unknown = sorted(set(document) - _TOP_LEVEL)
    if unknown:
        raise MalformedPolicyDocumentException(f"Unknown element in policy document: {unknown[0]!r}")
    version = document.get("Version", DEFAULT_VERSION)
    if version not in VERSIONS:
        raise MalformedPolicyDocumentException(
            f'Unsupported policy Version {version!r}; use "2012-10-17" or "2008-10-17"'
        )
    policy_id = document.get("Id")
    if policy_id is not None and not isinstance(policy_id, str):
        raise MalformedPolicyDocumentException("Id must be a string")
    if "Statement" not in document:
        raise MalformedPolicyDocumentException("The policy has no Statement")
    raw = document["Statement"]
    raws = raw if isinstance(raw, list) else [raw]
    statements = tuple(_statement(s, i, kind) for i, s in enumerate(raws))
    return Policy(kind=kind, version=str(version), id=policy_id, statements=statements, text=text)


def parse_key_policy(text: object) -> Policy:
    """:func:`parse_policy` for a key policy (statements name principals)."""
    return parse_policy(text, PolicyKind.KEY)


def parse_identity_policy(text: object) -> Policy:
    """:func:`parse_policy` for an identity (IAM) policy (statements name no principal)."""
    return parse_policy(text, PolicyKind.IDENTITY)
