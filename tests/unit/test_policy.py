"""The policy engine (openkms.policy): documents, wildcards, the KMS decision rules, lockout check.

Condition operators live in test_policy_conditions.py, grants in test_policy_grants.py and the
property tests in test_policy_properties.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from openkms.errors import AccessDeniedException, KMSInternalException, LimitExceededException
from openkms.policy import (
    MAX_POLICY_BYTES,
    Basis,
    Decision,
    MalformedPolicyDocumentException,
    Policy,
    PolicyKind,
    RequestContext,
    default_key_policy,
    evaluate,
    parse_identity_policy,
    parse_key_policy,
    parse_policy,
    would_lock_out,
)
from openkms.policy.wildcard import Glob, GlobSet

ACCT = "111122223333"
OTHER = "444455556666"
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY = f"arn:aws:kms:us-east-1:{ACCT}:key/{KEY_ID}"
OTHER_KEY = f"arn:aws:kms:us-east-1:{ACCT}:key/0000abcd-12ab-34cd-56ef-1234567890ab"
ROOT = f"arn:aws:iam::{ACCT}:root"
BOB = f"arn:aws:iam::{ACCT}:user/bob"
ALICE = f"arn:aws:iam::{ACCT}:user/alice"
CAROL = f"arn:aws:iam::{OTHER}:user/carol"
OTHER_ROOT = f"arn:aws:iam::{OTHER}:root"


def statement(
    principal: Any = None, action: Any = "kms:*", resource: Any = "*", effect: Any = "Allow", **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"Effect": effect}
    if principal is not None:
        body["Principal"] = principal if principal == "*" else {"AWS": principal}
    if action is not None:
        body["Action"] = action
    if resource is not None:
        body["Resource"] = resource
    body.update(extra)
    return body


def key_policy(*statements: dict[str, Any]) -> Policy:
    return parse_key_policy(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))


def identity_policy(*statements: dict[str, Any]) -> Policy:
    return parse_identity_policy(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))


def request(
    principal: str = BOB,
    action: str = "kms:Decrypt",
    resource: str = KEY,
    context: dict[str, Any] | None = None,
    encryption_context: dict[str, str] | None = None,
) -> RequestContext:
    account = principal.split(":")[4]
    return RequestContext(
        principal, account, action, resource, context=context or {}, encryption_context=encryption_context
    )


DEFAULT = parse_key_policy(default_key_policy(ACCT))
ALLOW_DECRYPT_ON_KEY = identity_policy(statement(action="kms:Decrypt", resource=KEY))


def denial(principal: str, action: str, resource: str, tail: str) -> str:
    return f"User: {principal} is not authorized to perform: {action} on resource: {resource} {tail}"


# --- the default key policy ---------------------------------------------------------------------


def test_default_key_policy_is_byte_for_byte_aws() -> None:
    assert default_key_policy(ACCT) == (
        "{\n"
        '  "Version" : "2012-10-17",\n'
        '  "Id" : "key-default-1",\n'
        '  "Statement" : [ {\n'
        '    "Sid" : "Enable IAM User Permissions",\n'
        '    "Effect" : "Allow",\n'
        '    "Principal" : {\n'
        '      "AWS" : "arn:aws:iam::111122223333:root"\n'
        "    },\n"
        '    "Action" : "kms:*",\n'
        '    "Resource" : "*"\n'
        "  } ]\n"
        "}"
    )
    assert json.loads(default_key_policy(ACCT))["Statement"][0]["Principal"] == {"AWS": ROOT}


def test_default_key_policy_parses_and_keeps_its_text() -> None:
    assert DEFAULT.text == default_key_policy(ACCT)
    assert DEFAULT.version == "2012-10-17" and DEFAULT.id == "key-default-1"
    (only,) = DEFAULT.statements
    assert only.sid == "Enable IAM User Permissions"
    assert only.principals is not None and only.principals.accounts == frozenset({ACCT})
    assert default_key_policy(ACCT, partition="aws-cn").count("arn:aws-cn:iam::111122223333:root") == 1


def test_default_key_policy_root_delegation() -> None:
    """Root: allowed outright. Other principals: only with an identity policy that allows."""
    assert evaluate(request(ROOT), DEFAULT).basis is Basis.KEY_POLICY
    denied = evaluate(request(BOB), DEFAULT)
    assert not denied.allowed and denied.basis is Basis.NO_IDENTITY_ALLOW
    assert denied.reason == denial(
        BOB, "kms:Decrypt", KEY, "because no identity-based policy allows the kms:Decrypt action"
    )
    allowed = evaluate(request(BOB), DEFAULT, [ALLOW_DECRYPT_ON_KEY])
    assert allowed.allowed and allowed.basis is Basis.KEY_AND_IDENTITY_POLICY
    # The identity policy must name this key and this action.
    assert not evaluate(request(BOB, resource=OTHER_KEY), DEFAULT, [ALLOW_DECRYPT_ON_KEY]).allowed
    assert not evaluate(request(BOB, action="kms:Encrypt"), DEFAULT, [ALLOW_DECRYPT_ON_KEY]).allowed


def test_account_id_principal_means_the_account() -> None:
    by_id = key_policy(statement(ACCT))
    assert evaluate(request(ROOT), by_id).allowed
    assert evaluate(request(BOB), by_id).basis is Basis.NO_IDENTITY_ALLOW
    assert evaluate(request(BOB), by_id, [ALLOW_DECRYPT_ON_KEY]).allowed


# --- same-account rules -------------------------------------------------------------------------


def test_key_policy_naming_the_user_needs_no_identity_policy() -> None:
    policy = key_policy(statement(ROOT), statement(BOB, ["kms:Decrypt", "kms:Encrypt"]))
    decision = evaluate(request(BOB), policy)
    assert decision.allowed and decision.basis is Basis.KEY_POLICY


def test_identity_policy_is_ineffective_without_key_policy_delegation() -> None:
    policy = key_policy(statement(ALICE))
    decision = evaluate(request(BOB), policy, [ALLOW_DECRYPT_ON_KEY])
    assert not decision.allowed and decision.basis is Basis.NO_RESOURCE_ALLOW
    assert decision.reason == denial(
        BOB, "kms:Decrypt", KEY, "because no resource-based policy allows the kms:Decrypt action"
    )
    assert evaluate(request(ALICE), policy).allowed
    assert not evaluate(request(ROOT), policy).allowed  # the root user is not named either


def test_everyone_principal_same_account() -> None:
    for principal in ("*", {"AWS": "*"}):
        policy = parse_key_policy(
            json.dumps(
                {
                    "Statement": {
                        "Effect": "Allow",
                        "Principal": principal,
                        "Action": "kms:Decrypt",
                        "Resource": "*",
                    }
                }
            )
        )
        assert evaluate(request(BOB), policy).basis is Basis.KEY_POLICY


def test_callers_account_condition_with_everyone_principal() -> None:
    """The AWS managed key for EBS: {"AWS": "*"} + kms:CallerAccount + kms:ViaService."""
    policy = key_policy(
        statement(
            "*",
            ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*"],
            Condition={
                "StringEquals": {"kms:CallerAccount": ACCT, "kms:ViaService": "ec2.us-west-2.amazonaws.com"}
            },
        )
    )
    via_ebs = {"kms:ViaService": "ec2.us-west-2.amazonaws.com"}
    assert evaluate(request(BOB, context=via_ebs), policy).allowed
    assert evaluate(request(BOB, "kms:ReEncryptFrom", context=via_ebs), policy).allowed
    assert not evaluate(request(BOB), policy).allowed
    assert not evaluate(request(BOB, "kms:ScheduleKeyDeletion", context=via_ebs), policy).allowed


def test_explicit_deny_in_key_policy_wins() -> None:
    policy = key_policy(
        statement(ROOT),
        statement(BOB),
        statement(BOB, "kms:Decrypt", effect="Deny", Sid="NoDecrypt"),
    )
    decision = evaluate(request(BOB), policy, [ALLOW_DECRYPT_ON_KEY])
    assert (
        not decision.allowed
        and decision.basis is Basis.EXPLICIT_DENY_RESOURCE
        and decision.sid == "NoDecrypt"
    )
    assert decision.reason == denial(
        BOB, "kms:Decrypt", KEY, "with an explicit deny in a resource-based policy"
    )
    assert evaluate(request(BOB, "kms:Encrypt"), policy).allowed


def test_explicit_deny_in_identity_policy_wins() -> None:
    policy = key_policy(statement(BOB))
    deny = identity_policy(statement(action="kms:*", resource="*", effect="Deny"))
    decision = evaluate(request(BOB), policy, [ALLOW_DECRYPT_ON_KEY, deny])
    assert not decision.allowed and decision.basis is Basis.EXPLICIT_DENY_IDENTITY
    assert decision.reason.endswith("with an explicit deny in an identity-based policy")


def test_deny_naming_the_account_covers_its_principals() -> None:
    policy = key_policy(statement(BOB), statement(ROOT, "kms:Decrypt", effect="Deny"))
    assert not evaluate(request(BOB), policy).allowed
    assert evaluate(request(BOB, "kms:Encrypt"), policy).allowed


def test_deny_with_negated_condition_limits_the_algorithm() -> None:
    """KMS guide: Deny unless kms:EncryptionAlgorithm is RSAES_OAEP_SHA_256 (a double negative)."""
    policy = key_policy(
        statement(ROOT),
        statement(
            BOB,
            ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*"],
            effect="Deny",
            Condition={"StringNotEquals": {"kms:EncryptionAlgorithm": "RSAES_OAEP_SHA_256"}},
        ),
        statement(BOB, "kms:Decrypt"),
    )
    assert evaluate(request(BOB, context={"kms:EncryptionAlgorithm": "RSAES_OAEP_SHA_256"}), policy).allowed
    assert not evaluate(request(BOB, context={"kms:EncryptionAlgorithm": "RSAES_OAEP_SHA_1"}), policy).allowed
    assert not evaluate(request(BOB), policy).allowed  # key missing: the negated condition is true


def test_conditions_gate_allows() -> None:
    policy = key_policy(
        statement(BOB, "kms:Decrypt", Condition={"IpAddress": {"aws:SourceIp": "203.0.113.0/24"}})
    )
    assert evaluate(request(BOB, context={"aws:SourceIp": "203.0.113.9"}), policy).allowed
    assert (
        evaluate(request(BOB, context={"aws:SourceIp": "10.1.1.1"}), policy).basis is Basis.NO_RESOURCE_ALLOW
    )


def test_time_window_with_current_time() -> None:
    policy = key_policy(
        statement(
            BOB,
            "kms:Decrypt",
            Condition={
                "DateGreaterThan": {"aws:CurrentTime": "2024-01-01T00:00:00Z"},
                "DateLessThan": {"aws:CurrentTime": "2024-12-31T23:59:59Z"},
            },
        )
    )
    inside = {"aws:CurrentTime": datetime(2024, 6, 1, tzinfo=UTC)}
    after = {"aws:CurrentTime": datetime(2025, 6, 1, tzinfo=UTC)}
    assert evaluate(request(BOB, context=inside), policy).allowed
    assert not evaluate(request(BOB, context=after), policy).allowed
    assert not evaluate(request(BOB), policy).allowed


def test_not_action_allow() -> None:
    policy = key_policy(statement(BOB, None, NotAction=["kms:ScheduleKeyDeletion", "kms:PutKeyPolicy"]))
    assert evaluate(request(BOB, "kms:Decrypt"), policy).allowed
    assert not evaluate(request(BOB, "kms:ScheduleKeyDeletion"), policy).allowed
    assert not evaluate(request(BOB, "kms:putkeypolicy"), policy).allowed


def test_not_principal_deny_needs_the_account_listed() -> None:
    """IAM: with Deny + NotPrincipal, list the account next to the user, or the user is denied too."""
    both = key_policy(
        statement("*"),
        {"Effect": "Deny", "NotPrincipal": {"AWS": [BOB, ROOT]}, "Action": "kms:*", "Resource": "*"},
    )
    assert evaluate(request(BOB), both).allowed
    assert evaluate(request(ROOT), both).allowed
    assert evaluate(request(ALICE), both).basis is Basis.EXPLICIT_DENY_RESOURCE
    assert (
        evaluate(request(CAROL), both, [identity_policy(statement())]).basis is Basis.EXPLICIT_DENY_RESOURCE
    )
    user_only = key_policy(
        statement("*"), {"Effect": "Deny", "NotPrincipal": {"AWS": BOB}, "Action": "kms:*", "Resource": "*"}
    )
    assert evaluate(request(BOB), user_only).basis is Basis.EXPLICIT_DENY_RESOURCE


def test_not_principal_allow() -> None:
    policy = key_policy(
        {"Effect": "Allow", "NotPrincipal": {"AWS": [ALICE, ROOT]}, "Action": "kms:*", "Resource": "*"}
    )
    assert evaluate(request(BOB), policy).allowed
    assert not evaluate(request(ALICE), policy).allowed


def test_role_session_matches_its_role() -> None:
    session = f"arn:aws:sts::{ACCT}:assumed-role/EncryptionApp/i-0abc"
    policy = key_policy(statement(f"arn:aws:iam::{ACCT}:role/EncryptionApp", "kms:Decrypt"))
    assert evaluate(request(session), policy).allowed
    assert not evaluate(request(f"arn:aws:sts::{ACCT}:assumed-role/Other/i-0abc"), policy).allowed


def test_key_policy_statement_without_action_or_resource_is_ineffective() -> None:
    """PutKeyPolicy reference: the request succeeds but the statement has no effect."""
    no_action = key_policy(statement(BOB, action=None))
    no_resource = key_policy(statement(BOB, resource=None))
    deny_no_action = key_policy(statement(BOB), statement(BOB, action=None, effect="Deny"))
    assert no_action.statements[0].inert and no_resource.statements[0].inert
    assert not evaluate(request(BOB), no_action).allowed
    assert not evaluate(request(BOB), no_resource).allowed
    assert evaluate(request(BOB), deny_no_action).allowed


def test_key_policy_resource_naming_the_key() -> None:
    policy = key_policy(statement(BOB, "kms:Decrypt", resource=KEY))
    assert evaluate(request(BOB), policy).allowed
    assert not evaluate(request(BOB, resource=OTHER_KEY), policy).allowed


def test_decision_raise_if_denied() -> None:
    evaluate(request(ROOT), DEFAULT).raise_if_denied()
    decision = evaluate(request(BOB), DEFAULT)
    with pytest.raises(AccessDeniedException) as caught:
        decision.raise_if_denied()
    assert caught.value.message == decision.reason
    assert caught.value.code == "AccessDeniedException"


def test_policy_kinds_are_checked() -> None:
    with pytest.raises(KMSInternalException):
        evaluate(request(BOB), ALLOW_DECRYPT_ON_KEY)
    with pytest.raises(KMSInternalException):
        evaluate(request(BOB), DEFAULT, [DEFAULT])


def test_any_identity_policy_may_allow() -> None:
    unrelated = identity_policy(statement(action="kms:Encrypt", resource=KEY))
    assert evaluate(request(BOB), DEFAULT, [unrelated, ALLOW_DECRYPT_ON_KEY]).allowed


# --- cross-account ------------------------------------------------------------------------------


def test_cross_account_needs_key_policy_and_identity_policy() -> None:
    carol_may = identity_policy(statement(action=["kms:Decrypt", "kms:Encrypt"], resource=KEY))
    grants_other = key_policy(statement(ROOT), statement(OTHER_ROOT, ["kms:Decrypt", "kms:Encrypt"]))
    decision = evaluate(request(CAROL), grants_other, [carol_may])
    assert decision.allowed and decision.basis is Basis.KEY_AND_IDENTITY_POLICY
    missing_identity = evaluate(request(CAROL), grants_other)
    assert missing_identity.reason == denial(
        CAROL, "kms:Decrypt", KEY, "because no identity-based policy allows the kms:Decrypt action"
    )
    missing_key = evaluate(request(CAROL), DEFAULT, [carol_may])
    assert missing_key.reason == denial(
        CAROL, "kms:Decrypt", KEY, "because no resource-based policy allows the kms:Decrypt action"
    )


def test_cross_account_user_named_in_key_policy_still_needs_identity_policy() -> None:
    names_carol = key_policy(statement(ROOT), statement(CAROL, "kms:Decrypt"))
    assert evaluate(request(CAROL), names_carol).basis is Basis.NO_IDENTITY_ALLOW
    assert evaluate(request(CAROL), names_carol, [identity_policy(statement(resource=KEY))]).allowed


def test_cross_account_everyone_principal_still_needs_identity_policy() -> None:
    everyone = key_policy(statement("*", "kms:Decrypt"))
    assert not evaluate(request(CAROL), everyone).allowed
    assert evaluate(
        request(CAROL), everyone, [identity_policy(statement(resource="arn:aws:kms:*:*:key/*"))]
    ).allowed


def test_cross_account_root_needs_only_the_key_policy() -> None:
    grants_other = key_policy(statement(OTHER, "kms:Decrypt"))
    assert evaluate(request(OTHER_ROOT), grants_other).allowed
    assert not evaluate(request(OTHER_ROOT), DEFAULT).allowed


def test_cross_account_identity_deny_wins() -> None:
    grants_other = key_policy(statement(OTHER_ROOT))
    both = [identity_policy(statement(resource=KEY)), identity_policy(statement(resource=KEY, effect="Deny"))]
    assert evaluate(request(CAROL), grants_other, both).basis is Basis.EXPLICIT_DENY_IDENTITY


# --- operations without a key -------------------------------------------------------------------


def test_operations_without_a_key_use_identity_policies() -> None:
    create = identity_policy(statement(action="kms:CreateKey", resource="*"))
    keys_only = identity_policy(statement(action="kms:CreateKey", resource=f"arn:aws:kms:*:{ACCT}:key/*"))
    assert evaluate(request(BOB, "kms:CreateKey", "*"), None, [create]).basis is Basis.IDENTITY_POLICY
    denied = evaluate(request(BOB, "kms:CreateKey", "*"), None, [keys_only])
    assert denied.reason == denial(
        BOB, "kms:CreateKey", "*", "because no identity-based policy allows the kms:CreateKey action"
    )
    assert evaluate(request(ROOT, "kms:CreateKey", "*"), None).allowed
    deny = identity_policy(
        statement(
            action="kms:Create*",
            resource="*",
            effect="Deny",
            Condition={"Bool": {"kms:BypassPolicyLockoutSafetyCheck": True}},
        )
    )
    bypass = request(BOB, "kms:CreateKey", "*", context={"kms:BypassPolicyLockoutSafetyCheck": True})
    assert evaluate(bypass, None, [create, deny]).basis is Basis.EXPLICIT_DENY_IDENTITY
    assert evaluate(request(BOB, "kms:CreateKey", "*"), None, [create, deny]).allowed


# --- actions and resources: wildcards -----------------------------------------------------------

ACTION_CASES = [
    ("kms:*", "kms:Decrypt", True),
    ("*", "kms:Decrypt", True),
    ("kms:Encrypt*", "kms:Encrypt", True),
    ("kms:Encrypt*", "kms:Decrypt", False),
    ("kms:ReEncrypt*", "kms:ReEncryptFrom", True),
    ("kms:GenerateDataKey*", "kms:GenerateDataKeyPairWithoutPlaintext", True),
    ("kms:GenerateDataKey*", "kms:GenerateMac", False),
    ("KMS:DECRYPT", "kms:Decrypt", True),
    ("kms:decrypt", "KMS:Decrypt", True),
    ("kms:Gen?rateDataKey", "kms:GenerateDataKey", True),
    ("kms:Gen?rateDataKey", "kms:GenerateDataKeyPair", False),
    ("kms:Describe*", "kms:DescribeKey", True),
    ("kms:*Key", "kms:DescribeKey", True),
    ("kms:*Key", "kms:DescribeKeys", False),
    ("s3:*", "kms:Decrypt", False),
    ("kms:Decrypt", "kms:DecryptX", False),
]


@pytest.mark.parametrize(("pattern", "action", "expected"), ACTION_CASES)
def test_action_wildcards(pattern: str, action: str, expected: bool) -> None:
    policy = key_policy(statement(BOB, pattern))
    assert evaluate(request(BOB, action), policy).allowed is expected


RESOURCE_CASES = [
    (f"arn:aws:kms:us-east-1:{ACCT}:key/*", KEY, True),
    (f"arn:aws:kms:*:{ACCT}:key/*", KEY, True),
    (f"arn:aws:kms:*:{OTHER}:key/*", KEY, False),
    (f"arn:aws:kms:us-east-1:{ACCT}:KEY/*", KEY, False),  # resources compare case-sensitively
    (f"arn:aws:kms:us-east-1:{ACCT}:key/1234abcd-*", KEY, True),
    (f"arn:aws:kms:us-east-1:{ACCT}:key/????????-12ab-34cd-56ef-1234567890ab", KEY, True),
    ("arn:aws:kms:*", KEY, True),
    (KEY, KEY, True),
    (OTHER_KEY, KEY, False),
    (f"arn:aws:kms:us-east-1:{ACCT}:alias/*", KEY, False),
]


@pytest.mark.parametrize(("pattern", "resource", "expected"), RESOURCE_CASES)
def test_identity_policy_resource_wildcards(pattern: str, resource: str, expected: bool) -> None:
    allow = identity_policy(statement(action="kms:Decrypt", resource=pattern))
    assert evaluate(request(BOB, resource=resource), DEFAULT, [allow]).allowed is expected


def test_not_resource() -> None:
    allow = identity_policy(statement(action="kms:Decrypt", resource=None, NotResource=OTHER_KEY))
    assert evaluate(request(BOB), DEFAULT, [allow]).allowed
    assert not evaluate(request(BOB, resource=OTHER_KEY), DEFAULT, [allow]).allowed


def test_glob_has_no_catastrophic_backtracking() -> None:
    glob = Glob("*a*a*a*a*a*a*a*a*a*a*a*a*b")
    assert not glob.matches("a" * 20000)
    assert glob.matches("a" * 200 + "b")
    assert GlobSet(["x", "*y*"]).matches("zzyzz")
    assert not GlobSet(["x", "y?"]).matches("y")


# --- documents: shape and errors ----------------------------------------------------------------


def test_statement_may_be_an_object_and_version_defaults() -> None:
    policy = parse_key_policy(json.dumps({"Statement": statement(BOB)}))
    assert policy.version == "2008-10-17" and len(policy.statements) == 1
    assert parse_key_policy(json.dumps({"Version": "2008-10-17", "Statement": []})).statements == ()


def test_policies_are_immutable_and_reusable() -> None:
    with pytest.raises(AttributeError):
        DEFAULT.statements = ()  # type: ignore[misc]
    assert hash(DEFAULT.statements[0].principals) == hash(DEFAULT.statements[0].principals)
    for _ in range(3):
        assert evaluate(request(ROOT), DEFAULT).allowed


def test_parse_policy_kinds() -> None:
    text = json.dumps({"Statement": statement(action="kms:*")})
    assert parse_policy(text, PolicyKind.IDENTITY).kind is PolicyKind.IDENTITY
    with pytest.raises(MalformedPolicyDocumentException, match="must have a Principal"):
        parse_policy(text)


def test_policy_size_limit() -> None:
    filler = "x" * (MAX_POLICY_BYTES + 1)
    with pytest.raises(LimitExceededException):
        parse_key_policy(json.dumps({"Id": filler, "Statement": []}))
    padded = json.dumps({"Statement": []})
    padded += " " * (MAX_POLICY_BYTES - len(padded))
    assert parse_key_policy(padded).statements == ()
    # Bytes, not characters: "é" is two bytes of UTF-8.
    with pytest.raises(LimitExceededException):
        parse_key_policy(
            json.dumps({"Id": "é" * (MAX_POLICY_BYTES // 2), "Statement": []}, ensure_ascii=False)
        )


BAD_DOCUMENTS: list[tuple[str, Any, str]] = [
    ("not JSON", "{", "not valid JSON"),
    ("trailing garbage", '{"Statement": []} x', "not valid JSON"),
    ("not an object", "[]", "JSON object"),
    ("a string", '"policy"', "JSON object"),
    ("not a string", b'{"Statement": []}', "JSON document in a string"),
    ("None", None, "JSON document in a string"),
    ("NaN literal", '{"Id": NaN, "Statement": []}', "NaN"),
    ("Infinity literal", '{"Statement": [], "Id": -Infinity}', "Infinity"),
    ("duplicate element", '{"Statement": [], "Statement": []}', "Duplicate"),
    ("duplicate in a statement", '{"Statement": {"Effect": "Allow", "Effect": "Deny"}}', "Duplicate"),
    ("deep nesting", '{"Id": ' + "[" * 5000 + "]" * 5000 + "}", "JSON"),
    ("unknown top-level element", {"Statement": [], "Statements": []}, "Unknown element"),
    ("missing Statement", {"Version": "2012-10-17"}, "no Statement"),
    ("bad version", {"Version": "2012-10-18", "Statement": []}, "Version"),
    ("version not a string", {"Version": 2012, "Statement": []}, "Version"),
    ("Id not a string", {"Id": 1, "Statement": []}, "Id must be a string"),
    ("statement not an object", {"Statement": ["x"]}, "JSON object"),
    ("unknown statement element", {"Statement": statement(BOB, Conditions={})}, "unknown element"),
    ("Sid not a string", {"Statement": statement(BOB, Sid=1)}, "Sid"),
    (
        "missing Effect",
        {"Statement": {"Principal": "*", "Action": "kms:*", "Resource": "*"}},
        "missing Effect",
    ),
    ("lower-case Effect", {"Statement": statement(BOB, effect="allow")}, "Effect must be"),
    ("unknown Effect", {"Statement": statement(BOB, effect="Maybe")}, "Effect must be"),
    ("Effect a list", {"Statement": statement(BOB, effect=["Allow"])}, "Effect must be"),
    ("no Principal in a key policy", {"Statement": statement()}, "must have a Principal"),
    ("Principal and NotPrincipal", {"Statement": statement(BOB, NotPrincipal={"AWS": ALICE})}, "both"),
    ("Action and NotAction", {"Statement": statement(BOB, NotAction="kms:Decrypt")}, "both"),
    ("Resource and NotResource", {"Statement": statement(BOB, NotResource=KEY)}, "both"),
    ("invalid principal name", {"Statement": statement("bob")}, "invalid principals"),
    ("principal account too short", {"Statement": statement("11112222333")}, "invalid principals"),
    ("empty principal list", {"Statement": statement([])}, "invalid principals"),
    ("principal list with a number", {"Statement": statement([BOB, 7])}, "invalid principals"),
    (
        "unknown principal type",
        {"Statement": {**statement(), "Principal": {"Users": BOB}}},
        "invalid principals",
    ),
    ("empty principal object", {"Statement": {**statement(), "Principal": {}}}, "invalid principals"),
    ("principal a number", {"Statement": {**statement(), "Principal": 5}}, "invalid principals"),
    ("action without a service", {"Statement": statement(BOB, "Decrypt")}, "service:action"),
    ("action with spaces", {"Statement": statement(BOB, "kms: Decrypt")}, "service:action"),
    ("empty action list", {"Statement": statement(BOB, [])}, "non-empty"),
    ("empty action", {"Statement": statement(BOB, "")}, "non-empty"),
    ("action an object", {"Statement": statement(BOB, {"a": 1})}, "non-empty"),
    ("resource not an ARN", {"Statement": statement(BOB, resource="key/abc")}, "ARN"),
    ("resource a number", {"Statement": statement(BOB, resource=1)}, "non-empty"),
    (
        "unknown condition operator",
        {"Statement": statement(BOB, Condition={"StringEqual": {"a": "b"}})},
        "Unknown condition operator",
    ),
    (
        "bad condition value",
        {"Statement": statement(BOB, Condition={"IpAddress": {"aws:SourceIp": "10.0.0.0/33"}})},
        "CIDR",
    ),
]


@pytest.mark.parametrize(
    ("document", "needle"), [c[1:] for c in BAD_DOCUMENTS], ids=[c[0] for c in BAD_DOCUMENTS]
)
def test_malformed_key_policies(document: Any, needle: str) -> None:
    text = json.dumps(document) if isinstance(document, dict) else document
    with pytest.raises(MalformedPolicyDocumentException) as caught:
        parse_key_policy(text)
    assert needle in caught.value.message
    assert caught.value.code == "MalformedPolicyDocumentException" and caught.value.status == 400


BAD_IDENTITY_DOCUMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("Principal in an identity policy", {"Statement": statement(BOB)}, "cannot have a Principal"),
    ("missing Action", {"Statement": statement(action=None)}, "missing Action"),
    ("missing Resource", {"Statement": statement(resource=None)}, "missing Resource"),
]


@pytest.mark.parametrize(
    ("document", "needle"),
    [c[1:] for c in BAD_IDENTITY_DOCUMENTS],
    ids=[c[0] for c in BAD_IDENTITY_DOCUMENTS],
)
def test_malformed_identity_policies(document: dict[str, Any], needle: str) -> None:
    with pytest.raises(MalformedPolicyDocumentException, match=needle):
        parse_identity_policy(json.dumps(document))


def test_principal_forms_accepted() -> None:
    policy = key_policy(
        statement(
            [
                ACCT,
                ROOT,
                BOB,
                f"arn:aws:iam::{ACCT}:role/R",
                "*",
                f"arn:aws:sts::{ACCT}:assumed-role/R/s",
                "arn:aws-cn:iam::444455556666:root",
            ]
        )
    )
    principals = policy.statements[0].principals
    assert principals is not None and principals.everyone
    assert principals.accounts == frozenset({ACCT, OTHER})
    services = key_policy({**statement(), "Principal": {"Service": "logs.us-east-1.amazonaws.com"}})
    assert not evaluate(request(BOB), services).allowed  # service principals never match a caller


# --- the lockout safety check -------------------------------------------------------------------


def test_lockout_default_policy_keeps_everyone_in_the_account() -> None:
    assert not would_lock_out(default_key_policy(ACCT), ROOT, ACCT)
    assert not would_lock_out(DEFAULT, BOB, ACCT)  # through the root delegation


def test_lockout_policy_without_the_caller() -> None:
    alice_only = key_policy(statement(ALICE, "kms:*"))
    assert would_lock_out(alice_only, BOB, ACCT)
    assert not would_lock_out(alice_only, ALICE, ACCT)
    assert would_lock_out(alice_only, ROOT, ACCT)


def test_lockout_needs_put_key_policy_specifically() -> None:
    assert would_lock_out(key_policy(statement(BOB, ["kms:Encrypt", "kms:Decrypt"])), BOB, ACCT)
    assert not would_lock_out(key_policy(statement(BOB, "kms:Put*")), BOB, ACCT)
    assert not would_lock_out(key_policy(statement(BOB, None, NotAction="kms:Decrypt")), BOB, ACCT)


def test_lockout_explicit_deny() -> None:
    policy = key_policy(statement(ROOT), statement(BOB, "kms:PutKeyPolicy", effect="Deny"))
    assert would_lock_out(policy, BOB, ACCT)
    assert not would_lock_out(policy, ALICE, ACCT)


def test_lockout_conditions_and_resources() -> None:
    conditional = key_policy(
        statement(BOB, "kms:PutKeyPolicy", Condition={"Null": {"kms:BypassPolicyLockoutSafetyCheck": True}})
    )
    assert not would_lock_out(conditional, BOB, ACCT)
    from_office = key_policy(statement(BOB, Condition={"IpAddress": {"aws:SourceIp": "203.0.113.0/24"}}))
    assert would_lock_out(from_office, BOB, ACCT)
    assert not would_lock_out(from_office, BOB, ACCT, context={"aws:SourceIp": "203.0.113.1"})
    this_key = key_policy(statement(BOB, resource=KEY))
    assert not would_lock_out(this_key, BOB, ACCT)  # no key ARN given: Resource is not checked
    assert not would_lock_out(this_key, BOB, ACCT, key_arn=KEY)
    assert would_lock_out(this_key, BOB, ACCT, key_arn=OTHER_KEY)


def test_lockout_rejects_malformed_text() -> None:
    with pytest.raises(MalformedPolicyDocumentException):
        would_lock_out("{", BOB, ACCT)
    with pytest.raises(KMSInternalException):
        would_lock_out(ALLOW_DECRYPT_ON_KEY, BOB, ACCT)


# --- the request context ------------------------------------------------------------------------


def test_request_context_fills_in_and_normalizes_keys() -> None:
    moment = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    r = RequestContext(
        BOB,
        ACCT,
        "kms:Encrypt",
        KEY,
        context={
            "aws:CurrentTime": moment,
            "kms:GrantIsForAWSResource": True,
            "aws:TagKeys": ["a", "b"],
            "aws:RequestTag/Empty": [],
            "kms:ViaService": None,
            "n": 5,
        },
        encryption_context={"AppName": "X", "appname": "Y"},
    )
    assert r.values("AWS:PRINCIPALARN") == (BOB,)
    assert r.values("aws:PrincipalAccount") == (ACCT,)
    assert r.values("kms:CallerAccount") == (ACCT,)
    assert r.values("aws:CurrentTime") == ("2024-01-02T03:04:05+00:00",)
    assert r.values("kms:GrantIsForAWSResource") == ("true",)
    assert r.values("aws:TagKeys") == ("a", "b")
    assert r.values("aws:RequestTag/Empty") is None and r.values("kms:ViaService") is None
    assert r.values("n") == ("5",)
    assert r.values("kms:EncryptionContext:APPNAME") == ("X", "Y")  # keys differing only in case
    assert r.values("kms:EncryptionContextKeys") == ("AppName", "appname")
    assert r.resource_account == ACCT and not r.is_root and r.action_folded == "kms:encrypt"


def test_request_context_overrides_and_root() -> None:
    r = RequestContext(ROOT, ACCT, "kms:CreateKey", context={"kms:CallerAccount": OTHER})
    assert r.is_root and r.resource_arn == "*" and r.resource_account == ACCT
    assert r.values("kms:CallerAccount") == (OTHER,)
    assert not RequestContext(OTHER_ROOT, ACCT, "kms:Decrypt", KEY).is_root  # root of another account
    assert RequestContext(CAROL, OTHER, "kms:Decrypt", KEY).resource_account == ACCT
    assert (
        RequestContext(BOB, ACCT, "kms:Decrypt", KEY, encryption_context={}).values(
            "kms:EncryptionContextKeys"
        )
        is None
    )


def test_decision_is_a_value() -> None:
    decision = evaluate(request(ROOT), DEFAULT)
    assert decision == Decision(
        True, "allowed by the key policy", Basis.KEY_POLICY, "Enable IAM User Permissions"
    )
