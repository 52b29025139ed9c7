"""The request context: who asks to do what to which key, and the condition keys of the request.

Built once per API call by the service and handed to :func:`openkms.policy.evaluate`. All lookups
the evaluator needs are prepared at construction (lower-cased action, the caller's identities, a
lower-cased condition-key table), so evaluating many statements costs only hash lookups.

Condition keys are looked up case-insensitively, the whole key included (``kms:EncryptionContext:
AppName`` and ``kms:encryptioncontext:appname`` are one key, as the KMS developer guide documents
for the encryption-context key and IAM for all context key names). Values keep their case.

Values may be given as ``str``, ``bool`` (``"true"``/``"false"``), ``int``/``float``/``Decimal``,
``datetime`` (naive = UTC), ``bytes`` (base64, for ``BinaryEquals``) or a list/tuple/set/frozenset
of those (a multi-valued key such as ``aws:TagKeys``). ``None`` and empty collections mean the key
is absent.

Keys filled in automatically unless given in ``context``: ``aws:PrincipalArn``,
``aws:PrincipalAccount``, ``kms:CallerAccount``; and, when ``encryption_context`` is a non-empty
mapping, ``kms:EncryptionContext:<key>`` for each pair and ``kms:EncryptionContextKeys`` (the keys,
with their case). Keys the service should supply when they apply: ``aws:CurrentTime``,
``aws:EpochTime``, ``aws:SourceIp``, ``kms:ViaService``, ``kms:KeySpec``, ``kms:KeyUsage``,
``kms:KeyOrigin``, ``kms:EncryptionAlgorithm``, ``kms:SigningAlgorithm``, ``kms:GrantOperations``,
``kms:GranteePrincipal``, ``kms:RetiringPrincipal``, ``kms:GrantIsForAWSResource``,
``kms:GrantConstraintType``, ``kms:RequestAlias``, ``kms:ResourceAliases``,
``kms:BypassPolicyLockoutSafetyCheck``, ``aws:ResourceTag/<k>``, ``aws:RequestTag/<k>``,
``aws:TagKeys``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType

from .conditions import Values

ContextScalar = str | bool | int | float | Decimal | datetime | bytes
ContextValue = (
    ContextScalar | list[ContextScalar] | tuple[ContextScalar, ...] | frozenset[ContextScalar] | None
)

ROOT_ARN_RE = re.compile(r"arn:([a-z0-9-]+):iam::(\d{12}):root\Z")
_ASSUMED_ROLE_RE = re.compile(r"arn:([a-z0-9-]+):sts::(\d{12}):assumed-role/([^/]+)/.+\Z")
_ARN_ACCOUNT_RE = re.compile(r"arn:[^:]*:[^:]*:[^:]*:(\d{12}):")

#: The encryption context is exposed under this prefix (lower-cased like every key).
ENCRYPTION_CONTEXT_PREFIX = "kms:encryptioncontext:"


def root_arn(account_id: str, partition: str = "aws") -> str:
    """The ARN of an account principal (the account and its administrators)."""
    return f"arn:{partition}:iam::{account_id}:root"


def _scalar_text(value: ContextScalar) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _values(value: ContextValue) -> Values:
    if value is None:
        return None
    if isinstance(value, list | tuple | set | frozenset):
        texts = tuple(_scalar_text(v) for v in value)
        return texts or None
    return (_scalar_text(value),)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """One authorization question: may ``principal_arn`` perform ``action`` on ``resource_arn``?

    ``action`` is the IAM action name (``kms:Decrypt``). ``resource_arn`` is the key ARN for key
    operations and ``"*"`` for operations without a resource (``kms:CreateKey``, ``kms:ListKeys``).
    ``resource_account`` defaults to the account in ``resource_arn``. ``encryption_context`` is the
    request's encryption context when the operation takes one (symmetric Encrypt, Decrypt,
    GenerateDataKey*, ReEncrypt): grant constraints apply only then, so pass ``{}`` for such a
    request without context and ``None`` for operations that take none (asymmetric/HMAC keys,
    DescribeKey, RetireGrant, ...).
    """

    principal_arn: str
    principal_account: str
    action: str
    resource_arn: str = "*"
    resource_account: str = ""
    context: Mapping[str, ContextValue] = field(default_factory=dict, hash=False)
    encryption_context: Mapping[str, str] | None = field(default=None, hash=False)
    # Derived once in __post_init__:
    action_folded: str = field(init=False, repr=False, compare=False)
    principal_ids: frozenset[str] = field(init=False, repr=False, compare=False)
    is_root: bool = field(init=False, repr=False, compare=False)
    keys: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        if not self.resource_account:
            found = _ARN_ACCOUNT_RE.match(self.resource_arn)
            setattr_(self, "resource_account", found.group(1) if found else self.principal_account)
        setattr_(self, "action_folded", self.action.lower())
        root = ROOT_ARN_RE.match(self.principal_arn) if self.principal_arn.endswith(":root") else None
        setattr_(self, "is_root", bool(root and root.group(2) == self.principal_account))
        ids = {self.principal_arn}
        role = _ASSUMED_ROLE_RE.match(self.principal_arn) if ":assumed-role/" in self.principal_arn else None
        if role:  # a role session is also known by the role's ARN (path-less, as in its session ARN)
            ids.add(f"arn:{role.group(1)}:iam::{role.group(2)}:role/{role.group(3)}")
        setattr_(self, "principal_ids", frozenset(ids))

        keys: dict[str, tuple[str, ...]] = {
            "aws:principalarn": (self.principal_arn,),
            "aws:principalaccount": (self.principal_account,),
            "kms:calleraccount": (self.principal_account,),
        }
        if self.encryption_context:
            merged: dict[str, list[str]] = {}
            for ec_key, ec_value in self.encryption_context.items():
                merged.setdefault(ENCRYPTION_CONTEXT_PREFIX + ec_key.lower(), []).append(ec_value)
            keys.update((k, tuple(v)) for k, v in merged.items())
            keys["kms:encryptioncontextkeys"] = tuple(self.encryption_context)
        for name, value in self.context.items():
            texts = _values(value)
            if texts is None:
                keys.pop(name.lower(), None)
            else:
                keys[name.lower()] = texts
        setattr_(self, "keys", MappingProxyType(keys))

    @property
    def root_arn(self) -> str:
        """The account principal of the caller's account."""
        partition = self.principal_arn.split(":", 2)[1] if self.principal_arn.startswith("arn:") else "aws"
        return root_arn(self.principal_account, partition)

    def values(self, key: str) -> Values:
        """The request's values of a condition key (any case), or None when it has none."""
        return self.keys.get(key.lower())
