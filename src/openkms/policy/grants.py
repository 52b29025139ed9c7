"""Grants: per-key delegations that allow (never deny) a grantee a fixed list of operations.

Semantics (KMS developer guide "Grants in AWS KMS", API reference ``GrantConstraints``):

* A grant allows its grantee principal exactly the operations it lists (``Decrypt``,
  ``GenerateDataKey``, ...; the IAM action is ``kms:<operation>``). Grants only allow; an explicit
  ``Deny`` in the key policy or an identity policy still wins (the KMS guide: a Deny "takes
  precedence over all grants for this KMS key and its principals").
* Constraints apply only to operations that take an encryption context (cryptographic operations
  with a symmetric key); for others (asymmetric/HMAC keys, ``DescribeKey``, ``RetireGrant``) they
  are ignored. The request says which case it is: ``RequestContext.encryption_context`` is
  ``None`` when the operation takes no context.
* ``EncryptionContextSubset``: every constraint pair must be in the request's context, which may
  hold more. ``EncryptionContextEquals``: the request's context must be exactly the constraint.
  In both, keys compare case-insensitively and values case-sensitively (the API reference: "in a
  grant constraint, the key in each key-value pair is not case sensitive, but the value is case
  sensitive"). A grant carrying both constraints needs both.
* A grant whose grantee is an account principal (``arn:aws:iam::<acct>:root``) is used directly by
  that account's root user; other principals of the account may use it when their identity
  policies allow the operation on the key (handled in :func:`openkms.policy.evaluate`).
* A grant that allows ``CreateGrant`` lets the grantee create only grants at least as narrow:
  :func:`is_narrower_grant` checks operations and constraints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import ValidationException
from .request import RequestContext

#: The GrantOperation enum of the KMS API model (botocore kms/2014-11-01), checked by a unit test.
GRANT_OPERATIONS = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "Encapsulate",  # newer KMS models (ML-KEM); harmless for older ones
        "Decapsulate",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "ReEncryptFrom",
        "ReEncryptTo",
        "Sign",
        "Verify",
        "GetPublicKey",
        "CreateGrant",
        "RetireGrant",
        "DescribeKey",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GenerateMac",
        "VerifyMac",
        "DeriveSharedSecret",
    }
)


def _fold(context: Mapping[str, str] | None) -> Mapping[str, str] | None:
    if context is None:
        return None
    return MappingProxyType({k.lower(): v for k, v in context.items()})


@dataclass(frozen=True, slots=True)
class Grant:
    """A grant on one key, as far as authorization cares.

    ``operations`` are KMS operation names (``"Decrypt"``), validated against the API model's
    enum. Constraint maps are copied read-only; lookups use their key-folded twins.
    """

    grantee_principal: str
    operations: frozenset[str]
    retiring_principal: str | None = None
    encryption_context_subset: Mapping[str, str] | None = field(default=None, hash=False)
    encryption_context_equals: Mapping[str, str] | None = field(default=None, hash=False)
    grant_id: str = ""
    name: str = ""
    key_arn: str = ""
    _operations_folded: frozenset[str] = field(init=False, repr=False, compare=False, hash=False)
    _subset_folded: Mapping[str, str] | None = field(init=False, repr=False, compare=False, hash=False)
    _equals_folded: Mapping[str, str] | None = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        operations = frozenset(self.operations)
        unknown = sorted(operations - GRANT_OPERATIONS)
        if unknown:
            raise ValidationException(f"Unknown grant operation: {unknown[0]}")
        setattr_ = object.__setattr__
        setattr_(self, "operations", operations)
        setattr_(self, "_operations_folded", frozenset("kms:" + op.lower() for op in operations))
        for name in ("encryption_context_subset", "encryption_context_equals"):
            value = getattr(self, name)
            if value is not None:
                setattr_(self, name, MappingProxyType(dict(value)))
        setattr_(self, "_subset_folded", _fold(self.encryption_context_subset))
        setattr_(self, "_equals_folded", _fold(self.encryption_context_equals))

    @property
    def has_constraints(self) -> bool:
        return self.encryption_context_subset is not None or self.encryption_context_equals is not None

    def permits_operation(self, action_folded: str) -> bool:
        """Whether the grant lists the operation of a lower-cased IAM action (``kms:decrypt``)."""
        return action_folded in self._operations_folded

    def constraints_hold(self, encryption_context: Mapping[str, str] | None) -> bool:
        """Whether the constraints admit a request's encryption context (None: not applicable)."""
        if encryption_context is None or not self.has_constraints:
            return True
        folded: dict[str, str] = {}
        for key, value in encryption_context.items():
            if folded.setdefault(key.lower(), value) != value:
                return False  # two pairs differing only in key case: ambiguous, so no match
        subset, equals = self._subset_folded, self._equals_folded
        if subset is not None and any(folded.get(k) != v for k, v in subset.items()):
            return False
        return equals is None or folded == dict(equals)


def grant_allows(grant: Grant, request: RequestContext) -> bool:
    """Whether ``grant`` by itself allows the request: the caller *is* the grantee (or the root
    user of a grantee account), the operation is listed, and the constraints hold.

    Explicit denies are not this function's business; :func:`openkms.policy.evaluate` checks them.
    """
    if grant.key_arn and request.resource_arn != "*" and grant.key_arn != request.resource_arn:
        return False
    if grant.grantee_principal not in request.principal_ids and not (
        request.is_root and grant.grantee_principal == request.root_arn
    ):
        return False
    return grant.permits_operation(request.action_folded) and grant.constraints_hold(
        request.encryption_context
    )


def grant_allows_via_account(grant: Grant, request: RequestContext) -> bool:
    """Like :func:`grant_allows` for a grant to the caller's *account*: true when the grant would
    allow the request for the account, so that the caller's identity policy decides."""
    if request.is_root or grant.grantee_principal != request.root_arn:
        return False
    if grant.key_arn and request.resource_arn != "*" and grant.key_arn != request.resource_arn:
        return False
    return grant.permits_operation(request.action_folded) and grant.constraints_hold(
        request.encryption_context
    )


def is_narrower_grant(child: Grant, parent: Grant) -> bool:
    """Whether a grant created under ``parent`` (which allows ``CreateGrant``) is at least as narrow.

    Its operations must be a subset of the parent's. If the parent has an
    ``EncryptionContextSubset``, the child needs a subset or equals constraint that contains every
    parent pair; if the parent has ``EncryptionContextEquals``, the child needs the same equals
    constraint (a subset would widen it).
    """
    if not child.operations <= parent.operations:
        return False
    parent_subset = parent._subset_folded
    parent_equals = parent._equals_folded
    child_subset = child._subset_folded
    child_equals = child._equals_folded
    if parent_equals is not None and (child_equals is None or dict(child_equals) != dict(parent_equals)):
        return False
    if parent_subset is not None:
        candidates = [c for c in (child_subset, child_equals) if c is not None]
        if not candidates:
            return False

        def contains(pairs: Mapping[str, str]) -> bool:
            return all(pairs.get(k) == v for k, v in parent_subset.items())

        # The child narrows the parent when the constraint the child *will be checked against*
        # implies the parent's: with both child constraints present, both are checked, so one
        # implying the parent's pairs is enough.
        if not any(contains(c) for c in candidates):
            return False
    return True
