"""Property tests for the policy engine: whatever the document, parsing either yields a Policy or
raises MalformedPolicyDocumentException (never a TypeError, KeyError, RecursionError, ... that
would become a 500), and evaluating a compiled policy never raises at all."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openkms.policy import (
    Decision,
    Grant,
    MalformedPolicyDocumentException,
    Policy,
    PolicyKind,
    RequestContext,
    evaluate,
    parse_policy,
    would_lock_out,
)
from openkms.policy.conditions import OPERATORS, compile_condition_block
from openkms.policy.wildcard import Glob, GlobSet

ACCT = "111122223333"
KEY = f"arn:aws:kms:us-east-1:{ACCT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)


def parse_or_malformed(text: Any, kind: PolicyKind) -> Policy | None:
    try:
        return parse_policy(text, kind)
    except MalformedPolicyDocumentException:
        return None


@given(json_values, st.sampled_from(PolicyKind))
def test_parse_random_json_never_raises_anything_else(document: Any, kind: PolicyKind) -> None:
    parse_or_malformed(json.dumps(document), kind)


@given(st.text(max_size=200), st.sampled_from(PolicyKind))
def test_parse_random_text_never_raises_anything_else(text: str, kind: PolicyKind) -> None:
    parse_or_malformed(text, kind)


def test_lone_surrogate_is_malformed() -> None:
    with pytest.raises(MalformedPolicyDocumentException):
        parse_policy('{"Id": "\ud800", "Statement": []}')


# --- policy-shaped documents: close enough to the grammar to reach every compiler ----------------

ACCOUNTS = ["111122223333", "444455556666"]
PRINCIPAL_NAMES = st.sampled_from(
    [
        "*",
        *ACCOUNTS,
        *(f"arn:aws:iam::{a}:root" for a in ACCOUNTS),
        f"arn:aws:iam::{ACCT}:user/bob",
        f"arn:aws:iam::{ACCT}:role/R",
        "bob",
        "",
        "arn:aws:iam::1:root",
    ]
)
principals = st.one_of(
    st.just("*"),
    st.dictionaries(
        st.sampled_from(["AWS", "Service", "Users"]),
        st.one_of(PRINCIPAL_NAMES, st.lists(PRINCIPAL_NAMES, max_size=3)),
        max_size=2,
    ),
    json_values,
)
ACTION_NAMES = st.sampled_from(
    [
        "*",
        "kms:*",
        "kms:Decrypt",
        "kms:Encrypt*",
        "KMS:DESCRIBE?EY",
        "kms:PutKeyPolicy",
        "Decrypt",
        "kms:",
        "",
    ]
)
actions = st.one_of(ACTION_NAMES, st.lists(ACTION_NAMES, max_size=4), json_values)
RESOURCE_NAMES = st.sampled_from(["*", KEY, f"arn:aws:kms:*:{ACCT}:key/*", "arn:aws:kms:*", "key/x", ""])
resources = st.one_of(RESOURCE_NAMES, st.lists(RESOURCE_NAMES, max_size=3), json_values)
base_operators = [*(v[0] for v in OPERATORS.values()), "StringEqual", "Nul"]
operator_names = st.builds(
    lambda prefix, base, suffix: prefix + base + suffix,
    st.sampled_from(["", "ForAllValues:", "ForAnyValue:", "ForSome:"]),
    st.sampled_from(base_operators),
    st.sampled_from(["", "IfExists"]),
)
condition_keys = st.sampled_from(
    [
        "kms:CallerAccount",
        "aws:SourceIp",
        "aws:CurrentTime",
        "kms:EncryptionContext:AppName",
        "kms:EncryptionContextKeys",
        "aws:TagKeys",
        "n",
        "",
    ]
)
condition_values = st.sampled_from(
    [
        "111122223333",
        "203.0.113.0/24",
        "2020-01-01T00:00:00Z",
        "1563278400",
        "true",
        "false",
        "10",
        "a*b?",
        "arn:aws:*:*:*:*",
        "QUJD",
        "not valid ☃",
        True,
        5,
        1.5,
    ]
)
conditions = st.one_of(
    st.dictionaries(
        operator_names,
        st.dictionaries(
            condition_keys, st.one_of(condition_values, st.lists(condition_values, max_size=3)), max_size=3
        ),
        max_size=3,
    ),
    json_values,
)
statements = st.fixed_dictionaries(
    {},
    optional={
        "Sid": st.one_of(st.text(max_size=8), st.integers()),
        "Effect": st.sampled_from(["Allow", "Deny", "allow", "Maybe"]),
        "Principal": principals,
        "NotPrincipal": principals,
        "Action": actions,
        "NotAction": actions,
        "Resource": resources,
        "NotResource": resources,
        "Condition": conditions,
    },
)

# Valid statements with valid conditions, so that evaluation is exercised on real policies too.
FAMILIES: list[tuple[list[str], list[str], Any]] = [
    (
        [
            "StringEquals",
            "StringNotEquals",
            "StringEqualsIgnoreCase",
            "StringNotEqualsIgnoreCase",
            "StringLike",
            "StringNotLike",
        ],
        ["kms:CallerAccount", "kms:EncryptionContext:AppName", "aws:TagKeys", "kms:ViaService"],
        st.sampled_from(["111122223333", "ExampleApp", "a*", "?", "b"]),
    ),
    (
        ["NumericEquals", "NumericNotEquals", "NumericLessThan", "NumericGreaterThanEquals"],
        ["n"],
        st.sampled_from(["1", "10", "-2.5", 3]),
    ),
    (
        ["DateLessThan", "DateGreaterThan", "DateEquals", "DateNotEquals"],
        ["aws:CurrentTime"],
        st.sampled_from(["2019-07-16T12:00:00Z", "1563278400", "2020-01-01"]),
    ),
    (
        ["Bool"],
        ["kms:GrantIsForAWSResource", "aws:SecureTransport"],
        st.sampled_from(["true", "false", True]),
    ),
    (
        ["IpAddress", "NotIpAddress"],
        ["aws:SourceIp"],
        st.sampled_from(["203.0.113.0/24", "10.0.0.0/8", "::/0"]),
    ),
    (
        ["ArnLike", "ArnNotEquals"],
        ["aws:PrincipalArn"],
        st.sampled_from([f"arn:aws:iam::{ACCT}:user/*", "arn:aws:iam::*:root", "*"]),
    ),
]
valid_condition = st.sampled_from(FAMILIES).flatmap(
    lambda family: st.builds(
        lambda prefix, op, suffix, key, values: {prefix + op + suffix: {key: values}},
        st.sampled_from(["", "", "ForAllValues:", "ForAnyValue:"]),
        st.sampled_from(family[0]),
        st.sampled_from(["", "IfExists"]),
        st.sampled_from(family[1]),
        st.lists(family[2], min_size=1, max_size=3),
    )
) | st.builds(lambda flag: {"Null": {"kms:EncryptionContextKeys": flag}}, st.booleans())
VALID_PRINCIPALS = st.sampled_from(
    [
        "*",
        {"AWS": "*"},
        {"AWS": ACCT},
        {"AWS": f"arn:aws:iam::{ACCT}:root"},
        {"AWS": f"arn:aws:iam::{ACCT}:user/bob"},
        {"AWS": ["444455556666", f"arn:aws:iam::{ACCT}:role/R"]},
    ]
)
good_statements = st.builds(
    lambda effect, principal, action, resource, condition, negate: {
        "Effect": effect,
        ("NotPrincipal" if negate == 1 else "Principal"): principal,
        ("NotAction" if negate == 2 else "Action"): action,
        "Resource": resource,
        **({"Condition": condition} if condition else {}),
    },
    st.sampled_from(["Allow", "Allow", "Deny"]),
    VALID_PRINCIPALS,
    st.lists(
        st.sampled_from(["kms:*", "kms:Decrypt", "kms:Encrypt*", "kms:PutKeyPolicy", "*"]),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from(["*", KEY, f"arn:aws:kms:*:{ACCT}:key/*"]),
    st.one_of(
        st.none(),
        st.lists(valid_condition, max_size=3).map(lambda cs: {k: v for c in cs for k, v in c.items()}),
    ),
    st.sampled_from([0, 0, 0, 1, 2]),
)
documents = st.fixed_dictionaries(
    {
        "Statement": st.one_of(
            statements, st.lists(st.one_of(statements, good_statements, good_statements), max_size=4)
        )
    },
    optional={
        "Version": st.sampled_from(["2012-10-17", "2008-10-17", "2020-01-01"]),
        "Id": st.text(max_size=8),
    },
)
contexts = st.fixed_dictionaries(
    {},
    optional={
        "aws:SourceIp": st.sampled_from(["203.0.113.9", "10.0.0.1", "::1", "bogus"]),
        "aws:CurrentTime": st.sampled_from(["2019-07-16T12:00:00Z", "1563278400", "later"]),
        "aws:TagKeys": st.lists(st.sampled_from(["a", "b", "AppName"]), max_size=3),
        "n": st.one_of(st.integers(), st.text(max_size=3)),
    },
)
callers = st.sampled_from(
    [
        f"arn:aws:iam::{ACCT}:root",
        f"arn:aws:iam::{ACCT}:user/bob",
        "arn:aws:iam::444455556666:user/carol",
        f"arn:aws:sts::{ACCT}:assumed-role/R/s",
    ]
)
encryption_contexts = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["AppName", "appname", "x"]), st.sampled_from(["ExampleApp", "a*b?", ""]), max_size=3
    ),
)


def without_principals(document: dict[str, Any]) -> dict[str, Any]:
    """The identity-policy twin of a key policy document: statements lose their principals."""
    raw = document["Statement"]
    strip = [
        {k: v for k, v in s.items() if k not in ("Principal", "NotPrincipal")}
        for s in (raw if isinstance(raw, list) else [raw])
    ]
    return {**document, "Statement": strip}


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    documents,
    st.sampled_from(PolicyKind),
    st.booleans(),
    callers,
    st.sampled_from(["kms:Decrypt", "kms:PutKeyPolicy", "kms:DescribeKey"]),
    contexts,
    encryption_contexts,
)
def test_policy_shaped_documents_parse_or_are_malformed_and_evaluate_cleanly(
    document: dict[str, Any],
    kind: PolicyKind,
    strip: bool,
    caller: str,
    action: str,
    context: dict[str, Any],
    ec: dict[str, str] | None,
) -> None:
    if kind is PolicyKind.IDENTITY and strip:
        document = without_principals(document)
    policy = parse_or_malformed(json.dumps(document), kind)
    if policy is None:
        return
    request = RequestContext(
        caller, caller.split(":")[4], action, KEY, context=context, encryption_context=ec
    )
    grants = [Grant(caller, frozenset({"Decrypt"}), encryption_context_subset={"AppName": "ExampleApp"})]
    if kind is PolicyKind.KEY:
        first = evaluate(request, policy, (), grants)
        assert first == evaluate(request, policy, (), grants)  # pure: same question, same answer
        would_lock_out(policy, caller, caller.split(":")[4], context=context)
    else:
        first = evaluate(request, None, [policy])
    assert isinstance(first, Decision)
    assert first.allowed or first.reason.startswith(f"User: {caller} is not authorized to perform: {action}")


# --- condition algebra --------------------------------------------------------------------------

NEGATIONS = [
    ("StringEquals", "StringNotEquals", st.sampled_from(["a", "b", "A"])),
    ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase", st.sampled_from(["a", "b", "A"])),
    ("StringLike", "StringNotLike", st.sampled_from(["a", "a*", "?", "*b", "ab"])),
    ("NumericEquals", "NumericNotEquals", st.sampled_from(["1", "2", "1.0", "x"])),
    ("DateEquals", "DateNotEquals", st.sampled_from(["2020-01-01", "1577836800", "2021-01-01T00:00:00Z"])),
    ("IpAddress", "NotIpAddress", st.sampled_from(["10.0.0.1", "10.0.1.1", "::1", "x"])),
    ("ArnLike", "ArnNotLike", st.sampled_from(["arn:aws:s3:::b", "arn:aws:sqs:x:1:q", "x"])),
]


@pytest.mark.parametrize(("positive", "negative", "values"), NEGATIONS, ids=[n[0] for n in NEGATIONS])
@given(data=st.data())
def test_negated_operators_are_exactly_not_positive(
    positive: str, negative: str, values: Any, data: Any
) -> None:
    policy_values = data.draw(st.lists(values.filter(lambda v: v != "x"), min_size=1, max_size=3))
    request_values = data.draw(st.one_of(st.none(), st.lists(values, min_size=1, max_size=3)))
    request = RequestContext(
        "arn:aws:iam::111122223333:user/bob",
        ACCT,
        "kms:Decrypt",
        KEY,
        context={} if request_values is None else {"k": request_values},
    )
    (pos,) = compile_condition_block({positive: {"k": policy_values}})
    (neg,) = compile_condition_block({negative: {"k": policy_values}})
    assert neg.holds(request.values("k")) is not pos.holds(request.values("k"))


def reference_glob(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


@given(st.text(alphabet="ab*?", max_size=10), st.text(alphabet="ab", max_size=12))
def test_glob_agrees_with_a_regex(pattern: str, value: str) -> None:
    assert Glob(pattern).matches(value) is reference_glob(pattern, value)


@given(st.text(alphabet="aB*?", max_size=8), st.text(alphabet="Ab", max_size=10))
def test_folded_glob_is_case_insensitive(pattern: str, value: str) -> None:
    assert Glob(pattern, fold=True).matches(value.lower()) is reference_glob(pattern.lower(), value.lower())


@given(
    st.lists(st.text(alphabet="aB*?", max_size=6), min_size=1, max_size=4),
    st.text(alphabet="Ab", max_size=10),
)
def test_glob_set_is_an_or_of_globs(patterns: list[str], value: str) -> None:
    """Literals, trailing-star prefixes and general globs take different paths; all must agree."""
    for fold in (False, True):
        folded = [p.lower() for p in patterns] if fold else patterns
        probe = value.lower() if fold else value
        expected = any(reference_glob(p, probe) for p in folded)
        assert GlobSet(patterns, fold=fold).matches(value) is expected
