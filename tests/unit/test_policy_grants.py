"""Grants (openkms.policy.grants) alone and inside evaluate(): operations, constraints, precedence."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import botocore
import pytest

from openkms.errors import ValidationException
from openkms.policy import (
    GRANT_OPERATIONS,
    Basis,
    Grant,
    RequestContext,
    default_key_policy,
    evaluate,
    grant_allows,
    is_narrower_grant,
    parse_identity_policy,
    parse_key_policy,
)

ACCT = "111122223333"
OTHER = "444455556666"
KEY = f"arn:aws:kms:us-west-2:{ACCT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_KEY = f"arn:aws:kms:us-west-2:{ACCT}:key/0000abcd-12ab-34cd-56ef-1234567890ab"
BOB = f"arn:aws:iam::{ACCT}:user/bob"
ALICE = f"arn:aws:iam::{ACCT}:user/alice"
CAROL = f"arn:aws:iam::{OTHER}:user/carol"
OTHER_ROOT = f"arn:aws:iam::{OTHER}:root"
DEFAULT = parse_key_policy(default_key_policy(ACCT))
FINANCE = {"Department": "Finance", "Classification": "Public"}


def request(
    principal: str = BOB, action: str = "kms:Decrypt", ec: dict[str, str] | None = None, resource: str = KEY
) -> RequestContext:
    return RequestContext(principal, principal.split(":")[4], action, resource, encryption_context=ec)


def grant(grantee: str = BOB, *operations: str, **constraints: Any) -> Grant:
    return Grant(grantee, frozenset(operations or ("Decrypt",)), **constraints)


def test_grant_operations_match_the_kms_api_model() -> None:
    model = Path(botocore.__file__).parent / "data" / "kms" / "2014-11-01" / "service-2.json.gz"
    shapes = json.loads(gzip.decompress(model.read_bytes()))["shapes"]
    # Every operation the installed model lets a grant name is known to the engine (newer models
    # add operations; the engine may know some an older model lacks).
    assert frozenset(shapes["GrantOperation"]["enum"]) <= GRANT_OPERATIONS


def test_grantee_gets_exactly_the_listed_operations() -> None:
    g = grant(BOB, "Decrypt", "GenerateDataKey")
    assert grant_allows(g, request(BOB, "kms:Decrypt", {}))
    assert grant_allows(g, request(BOB, "kms:GenerateDataKey", {}))
    assert not grant_allows(g, request(BOB, "kms:Encrypt", {}))
    assert not grant_allows(g, request(BOB, "kms:GenerateDataKeyWithoutPlaintext", {}))
    assert not grant_allows(g, request(ALICE, "kms:Decrypt", {}))


def test_unknown_grant_operation_is_rejected() -> None:
    with pytest.raises(ValidationException, match="Unknown grant operation"):
        grant(BOB, "Decrypt", "ScheduleKeyDeletion")


# The KMS developer guide's EncryptionContextSubset example, with the API reference's rule that
# constraint keys are case-insensitive and values case-sensitive.
SUBSET_CASES = [
    ({"Department": "Finance", "Classification": "Public"}, True),
    ({"Classification": "Public", "Department": "Finance"}, True),
    ({"Customer": "12345", "Department": "Finance", "Classification": "Public", "Purpose": "Test"}, True),
    ({"department": "Finance", "CLASSIFICATION": "Public"}, True),  # keys: any case
    ({"Department": "Finance"}, False),
    ({"department": "finance", "classification": "public"}, False),  # values: exact case
    ({"Classification": "Public", "Customer": "12345"}, False),
    ({}, False),
    ({"Department": "Finance", "department": "Other", "Classification": "Public"}, False),  # ambiguous
]


@pytest.mark.parametrize(("ec", "expected"), SUBSET_CASES)
def test_encryption_context_subset(ec: dict[str, str], expected: bool) -> None:
    g = grant(BOB, "Decrypt", "GenerateDataKey", encryption_context_subset=FINANCE)
    assert grant_allows(g, request(BOB, "kms:Decrypt", ec)) is expected


EQUALS_CASES = [
    ({"Department": "Finance", "Classification": "Public"}, True),
    ({"classification": "Public", "DEPARTMENT": "Finance"}, True),
    ({"Department": "Finance", "Classification": "Public", "Extra": "1"}, False),
    ({"Department": "Finance"}, False),
    ({"Department": "finance", "Classification": "Public"}, False),
    ({}, False),
]


@pytest.mark.parametrize(("ec", "expected"), EQUALS_CASES)
def test_encryption_context_equals(ec: dict[str, str], expected: bool) -> None:
    g = grant(BOB, "Decrypt", encryption_context_equals=FINANCE)
    assert grant_allows(g, request(BOB, "kms:Decrypt", ec)) is expected


def test_empty_constraints() -> None:
    assert grant_allows(grant(BOB, encryption_context_equals={}), request(BOB, ec={}))
    assert not grant_allows(grant(BOB, encryption_context_equals={}), request(BOB, ec={"a": "b"}))
    assert grant_allows(grant(BOB, encryption_context_subset={}), request(BOB, ec={"a": "b"}))


def test_both_constraints_must_hold() -> None:
    g = grant(BOB, encryption_context_subset={"a": "1"}, encryption_context_equals={"a": "1", "b": "2"})
    assert grant_allows(g, request(BOB, ec={"a": "1", "b": "2"}))
    assert not grant_allows(g, request(BOB, ec={"a": "1"}))


def test_constraints_are_ignored_where_there_is_no_encryption_context() -> None:
    """Asymmetric keys, DescribeKey, RetireGrant: the service passes encryption_context=None."""
    g = grant(BOB, "Sign", "DescribeKey", "RetireGrant", encryption_context_subset=FINANCE)
    assert grant_allows(g, request(BOB, "kms:Sign", None))
    assert grant_allows(g, request(BOB, "kms:DescribeKey", None))
    assert not grant_allows(g, request(BOB, "kms:Decrypt", None))


def test_grant_for_another_key_does_not_apply() -> None:
    g = Grant(BOB, frozenset({"Decrypt"}), key_arn=OTHER_KEY)
    assert not grant_allows(g, request(BOB, ec={}))
    assert grant_allows(Grant(BOB, frozenset({"Decrypt"}), key_arn=KEY), request(BOB, ec={}))


def test_grant_is_an_immutable_value() -> None:
    source = {"a": "1"}
    g = grant(BOB, encryption_context_subset=source)
    source["a"] = "2"
    assert g.encryption_context_subset == {"a": "1"}
    with pytest.raises(TypeError):
        g.encryption_context_subset["a"] = "3"  # type: ignore[index]
    with pytest.raises(AttributeError):
        g.grantee_principal = ALICE  # type: ignore[misc]
    assert g == grant(BOB, encryption_context_subset={"a": "1"})
    assert isinstance(hash(g), int)


# --- grants inside evaluate() -------------------------------------------------------------------


def test_grant_allows_without_key_or_identity_policy() -> None:
    no_bob = parse_key_policy(
        json.dumps(
            {
                "Statement": {
                    "Effect": "Allow",
                    "Principal": {"AWS": ALICE},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            }
        )
    )
    g = Grant(BOB, frozenset({"Decrypt"}), grant_id="g-1")
    decision = evaluate(request(BOB, ec={}), no_bob, grants=[g])
    assert decision.allowed and decision.basis is Basis.GRANT and decision.sid == "g-1"
    assert evaluate(request(BOB, "kms:Encrypt", {}), no_bob, grants=[g]).basis is Basis.NO_RESOURCE_ALLOW


def test_grant_constraint_failure_falls_back_to_the_policies() -> None:
    g = grant(BOB, encryption_context_subset=FINANCE)
    assert not evaluate(request(BOB, ec={"Department": "IT"}), DEFAULT, grants=[g]).allowed
    assert evaluate(request(BOB, ec=FINANCE), DEFAULT, grants=[g]).allowed


def test_explicit_deny_in_key_policy_beats_a_grant() -> None:
    """KMS guide: a Deny in the key policy "takes precedence over all grants for this KMS key"."""
    policy = parse_key_policy(
        json.dumps(
            {
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": f"arn:aws:iam::{ACCT}:root"},
                        "Action": "kms:*",
                        "Resource": "*",
                    },
                    {
                        "Effect": "Deny",
                        "Principal": {"AWS": BOB},
                        "Action": "kms:Decrypt",
                        "Resource": "*",
                        "Condition": {"StringNotEquals": {"kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}},
                    },
                ]
            }
        )
    )
    g = grant(BOB)
    assert evaluate(request(BOB, ec={}), policy, grants=[g]).basis is Basis.EXPLICIT_DENY_RESOURCE
    sym = RequestContext(
        BOB,
        ACCT,
        "kms:Decrypt",
        KEY,
        context={"kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT"},
        encryption_context={},
    )
    assert evaluate(sym, policy, grants=[g]).basis is Basis.GRANT


def test_explicit_deny_in_identity_policy_beats_a_grant() -> None:
    deny = parse_identity_policy(
        json.dumps({"Statement": {"Effect": "Deny", "Action": "kms:*", "Resource": "*"}})
    )
    assert evaluate(request(BOB, ec={}), DEFAULT, [deny], [grant(BOB)]).basis is Basis.EXPLICIT_DENY_IDENTITY


def test_cross_account_grant_to_a_user() -> None:
    assert evaluate(request(CAROL, ec={}), DEFAULT, grants=[grant(CAROL)]).basis is Basis.GRANT


def test_grant_to_an_account() -> None:
    """The account's root user uses it directly; its other principals need an identity policy."""
    g = grant(OTHER_ROOT)
    assert evaluate(request(OTHER_ROOT, ec={}), DEFAULT, grants=[g]).basis is Basis.GRANT
    assert not evaluate(request(CAROL, ec={}), DEFAULT, grants=[g]).allowed
    carol_may = parse_identity_policy(
        json.dumps({"Statement": {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": KEY}})
    )
    decision = evaluate(request(CAROL, ec={}), DEFAULT, [carol_may], [g])
    assert decision.allowed and decision.basis is Basis.ACCOUNT_GRANT_AND_IDENTITY_POLICY
    alice_only = parse_key_policy(
        json.dumps(
            {
                "Statement": {
                    "Effect": "Allow",
                    "Principal": {"AWS": ALICE},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            }
        )
    )
    assert not evaluate(request(BOB, ec={}), alice_only, [carol_may], [g]).allowed  # bob: another account


def test_grants_for_other_principals_are_ignored() -> None:
    assert not evaluate(request(BOB, ec={}), DEFAULT, grants=[grant(ALICE), grant(CAROL)]).allowed


# --- CreateGrant under a grant: child grants at least as narrow ---------------------------------

PARENT_SUBSET = grant(BOB, "Decrypt", "GenerateDataKey", "CreateGrant", encryption_context_subset={"a": "1"})
PARENT_EQUALS = grant(BOB, "Decrypt", "CreateGrant", encryption_context_equals={"a": "1"})
PARENT_FREE = grant(BOB, "Decrypt", "GenerateDataKey", "CreateGrant")

NARROWER_CASES = [
    ("subset of operations", grant(ALICE, "Decrypt"), PARENT_FREE, True),
    ("extra operation", grant(ALICE, "Decrypt", "Encrypt"), PARENT_FREE, False),
    (
        "child constrains an unconstrained parent",
        grant(ALICE, encryption_context_subset={"x": "y"}),
        PARENT_FREE,
        True,
    ),
    ("child drops the subset", grant(ALICE), PARENT_SUBSET, False),
    ("child keeps the subset", grant(ALICE, encryption_context_subset={"A": "1"}), PARENT_SUBSET, True),
    ("child adds pairs", grant(ALICE, encryption_context_subset={"a": "1", "b": "2"}), PARENT_SUBSET, True),
    ("child changes a value", grant(ALICE, encryption_context_subset={"a": "2"}), PARENT_SUBSET, False),
    ("subset -> equals", grant(ALICE, encryption_context_equals={"a": "1", "b": "2"}), PARENT_SUBSET, True),
    ("equals -> subset widens", grant(ALICE, encryption_context_subset={"a": "1"}), PARENT_EQUALS, False),
    ("equals -> same equals", grant(ALICE, encryption_context_equals={"A": "1"}), PARENT_EQUALS, True),
    (
        "equals -> other equals",
        grant(ALICE, encryption_context_equals={"a": "1", "b": "2"}),
        PARENT_EQUALS,
        False,
    ),
]


@pytest.mark.parametrize(
    ("child", "parent", "expected"), [c[1:] for c in NARROWER_CASES], ids=[c[0] for c in NARROWER_CASES]
)
def test_is_narrower_grant(child: Grant, parent: Grant, expected: bool) -> None:
    assert is_narrower_grant(child, parent) is expected


# -- CreateGrant through a grant: the new grant may not be wider (evaluate's new_grant) --------------

def test_create_grant_from_a_grant_only_as_narrow_as_that_grant() -> None:
    parent = grant(BOB, "CreateGrant", "Decrypt", encryption_context_equals={"tenant": "t1"})
    ask = request(BOB, "kms:CreateGrant")
    narrow = grant(ALICE, "Decrypt", encryption_context_equals={"tenant": "t1"})
    assert evaluate(ask, DEFAULT, (), [parent], new_grant=narrow).basis is Basis.GRANT
    for wide in (grant(ALICE, "Decrypt"),
                 grant(ALICE, "Decrypt", "Encrypt", encryption_context_equals={"tenant": "t1"}),
                 grant(ALICE, "Decrypt", encryption_context_subset={"tenant": "t1"})):
        decision = evaluate(ask, DEFAULT, (), [parent], new_grant=wide)
        assert not decision.allowed and decision.basis is Basis.WIDER_THAN_PARENT_GRANT
        assert decision.reason.startswith(f"User: {BOB} is not authorized to perform: kms:CreateGrant on resource: ")


def test_a_second_grant_wide_enough_allows_it() -> None:
    narrow_parent = grant(BOB, "CreateGrant", "Decrypt", encryption_context_equals={"tenant": "t1"})
    wide_parent = grant(BOB, "CreateGrant", "Decrypt", "Encrypt")
    wanted = grant(ALICE, "Decrypt", "Encrypt")
    assert evaluate(request(BOB, "kms:CreateGrant"), DEFAULT, (), [narrow_parent, wide_parent],
                    new_grant=wanted).allowed


def test_create_grant_allowed_by_a_policy_is_not_limited() -> None:
    # The account's root (the key policy names it) may grant anything, whatever its grants say.
    root = f"arn:aws:iam::{ACCT}:root"
    parent = grant(root, "CreateGrant")
    decision = evaluate(RequestContext(root, ACCT, "kms:CreateGrant", KEY), DEFAULT, (), [parent],
                        new_grant=grant(ALICE, "Decrypt", "Encrypt"))
    assert decision.allowed and decision.basis is Basis.KEY_POLICY


def test_create_grant_through_an_account_grant_is_limited_too() -> None:
    identity = parse_identity_policy(json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "kms:CreateGrant", "Resource": KEY}]}))
    parent = grant(OTHER_ROOT, "CreateGrant", "Decrypt", encryption_context_subset={"tenant": "c"})
    ask = RequestContext(CAROL, OTHER, "kms:CreateGrant", KEY)
    assert not evaluate(ask, DEFAULT, [identity], [parent], new_grant=grant(CAROL, "Decrypt")).allowed
    assert evaluate(ask, DEFAULT, [identity], [parent],
                    new_grant=grant(CAROL, "Decrypt", encryption_context_subset={"tenant": "c", "x": "y"})).allowed
