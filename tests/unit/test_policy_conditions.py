"""Condition operators (openkms.policy.conditions) against AWS's documented examples.

Each row: a Condition block as it would appear in a policy, the request's condition keys
(MISSING = the request does not carry the key), and whether the block holds. Sources: the IAM
JSON policy reference ("Condition operators", "multivalued context keys") and the KMS developer
guide ("AWS KMS condition keys").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from openkms.policy import MalformedPolicyDocumentException, RequestContext
from openkms.policy.conditions import compile_condition_block

ACCT = "111122223333"
BOB = f"arn:aws:iam::{ACCT}:user/bob"
KEY = f"arn:aws:kms:us-east-1:{ACCT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
MISSING: dict[str, Any] = {}
EBS = "ec2.us-west-2.amazonaws.com"
TRICKY_ARN = "arn:aws:someservice:us-east-2:999999999999:store/abc:111122223333:finance/document.txt"


def holds(
    block: dict[str, Any], context: dict[str, Any], encryption_context: dict[str, str] | None = None
) -> bool:
    conditions = compile_condition_block(block)
    request = RequestContext(
        BOB, ACCT, "kms:Decrypt", KEY, context=context, encryption_context=encryption_context
    )
    return all(c.holds(request.values(c.key)) for c in conditions)


def one(operator: str, key: str, value: Any) -> dict[str, Any]:
    return {operator: {key: value}}


CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    # --- String ---------------------------------------------------------------------------------
    ("StringEquals exact", one("StringEquals", "kms:ViaService", EBS), {"kms:ViaService": EBS}, True),
    (
        "StringEquals is case-sensitive",
        one("StringEquals", "kms:ViaService", EBS),
        {"kms:ViaService": EBS.upper()},
        False,
    ),
    ("StringEquals missing key is false", one("StringEquals", "kms:ViaService", EBS), MISSING, False),
    (
        "StringEquals values are ORed",
        one("StringEquals", "kms:KeySpec", ["RSA_2048", "RSA_4096"]),
        {"kms:KeySpec": "RSA_4096"},
        True,
    ),
    (
        "StringNotEquals equal",
        one("StringNotEquals", "kms:EncryptionAlgorithm", "RSAES_OAEP_SHA_256"),
        {"kms:EncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
        False,
    ),
    (
        "StringNotEquals different",
        one("StringNotEquals", "kms:EncryptionAlgorithm", "RSAES_OAEP_SHA_256"),
        {"kms:EncryptionAlgorithm": "RSAES_OAEP_SHA_1"},
        True,
    ),
    (
        "StringNotEquals missing key is true",
        one("StringNotEquals", "kms:EncryptionAlgorithm", "X"),
        MISSING,
        True,
    ),
    (
        "StringNotEquals with a list: none may match",
        one("StringNotEquals", "kms:KeySpec", ["A", "B"]),
        {"kms:KeySpec": "B"},
        False,
    ),
    (
        "StringEqualsIgnoreCase",
        one("StringEqualsIgnoreCase", "kms:RequestAlias", "alias/ExampleApp"),
        {"kms:RequestAlias": "ALIAS/exampleapp"},
        True,
    ),
    (
        "StringNotEqualsIgnoreCase equal but for case",
        one("StringNotEqualsIgnoreCase", "kms:RequestAlias", "alias/App"),
        {"kms:RequestAlias": "ALIAS/APP"},
        False,
    ),
    (
        "StringNotEqualsIgnoreCase missing",
        one("StringNotEqualsIgnoreCase", "kms:RequestAlias", "a"),
        MISSING,
        True,
    ),
    (
        "StringLike prefix (DataKeyPairSpec RSA*)",
        one("StringLike", "kms:DataKeyPairSpec", "RSA*"),
        {"kms:DataKeyPairSpec": "RSA_2048"},
        True,
    ),
    (
        "StringLike no match",
        one("StringLike", "kms:DataKeyPairSpec", "RSA*"),
        {"kms:DataKeyPairSpec": "ECC_NIST_P256"},
        False,
    ),
    (
        "StringLike is case-sensitive",
        one("StringLike", "kms:DataKeyPairSpec", "RSA*"),
        {"kms:DataKeyPairSpec": "rsa_2048"},
        False,
    ),
    (
        "StringLike ? is one character",
        one("StringLike", "kms:KeySpec", "RSA_?048"),
        {"kms:KeySpec": "RSA_2048"},
        True,
    ),
    (
        "StringLike ? is exactly one",
        one("StringLike", "kms:KeySpec", "RSA_20?"),
        {"kms:KeySpec": "RSA_2048"},
        False,
    ),
    (
        "StringLike empty value matches empty",
        one("StringLike", "s3:prefix", ["", "home/"]),
        {"s3:prefix": ""},
        True,
    ),
    (
        "StringLike star in the middle",
        one("StringLike", "kms:RequestAlias", "alias/*/prod"),
        {"kms:RequestAlias": "alias/team/app/prod"},
        True,
    ),
    (
        "StringNotLike non-matching",
        one("StringNotLike", "kms:KeySpec", "RSA*"),
        {"kms:KeySpec": "ECC_NIST_P256"},
        True,
    ),
    (
        "StringNotLike matching",
        one("StringNotLike", "kms:KeySpec", "RSA*"),
        {"kms:KeySpec": "RSA_3072"},
        False,
    ),
    ("StringNotLike missing", one("StringNotLike", "kms:KeySpec", "RSA*"), MISSING, True),
    (
        "key names are case-insensitive",
        one("StringEquals", "KMS:VIASERVICE", EBS),
        {"kms:ViaService": EBS},
        True,
    ),
    (
        "keys within an operator are ANDed (EBS example)",
        {"StringEquals": {"kms:CallerAccount": ACCT, "kms:ViaService": EBS}},
        MISSING,
        False,
    ),
    (
        "keys within an operator, all present",
        {"StringEquals": {"kms:CallerAccount": ACCT, "kms:ViaService": EBS}},
        {"kms:ViaService": EBS},
        True,
    ),
    (
        "operators are ANDed",
        {"StringEquals": {"kms:ViaService": EBS}, "StringLike": {"kms:KeySpec": "RSA*"}},
        {"kms:ViaService": EBS, "kms:KeySpec": "ECC_NIST_P256"},
        False,
    ),
    (
        "JSON numbers compare as their text",
        one("StringEquals", "kms:CallerAccount", 111122223333),
        MISSING,
        True,
    ),
    (
        "aws:ResourceTag key part is case-insensitive",
        one("StringEquals", "aws:resourcetag/PROJECT", "Alpha"),
        {"aws:ResourceTag/Project": "Alpha"},
        True,
    ),
    (
        "aws:RequestTag value is case-sensitive",
        one("StringEquals", "aws:RequestTag/Project", "Alpha"),
        {"aws:RequestTag/Project": "alpha"},
        False,
    ),
    # --- Numeric --------------------------------------------------------------------------------
    (
        "NumericLessThanEquals at bound (s3:max-keys)",
        one("NumericLessThanEquals", "s3:max-keys", "10"),
        {"s3:max-keys": "10"},
        True,
    ),
    (
        "NumericLessThanEquals above",
        one("NumericLessThanEquals", "s3:max-keys", "10"),
        {"s3:max-keys": 11},
        False,
    ),
    ("NumericLessThanEquals missing", one("NumericLessThanEquals", "s3:max-keys", "10"), MISSING, False),
    ("NumericEquals 10 == 10.0", one("NumericEquals", "n", 10), {"n": "10.0"}, True),
    (
        "NumericEquals is exact for big integers",
        one("NumericEquals", "n", "9007199254740993"),
        {"n": 9007199254740992},
        False,
    ),
    ("NumericNotEquals equal", one("NumericNotEquals", "n", "5"), {"n": 5}, False),
    ("NumericNotEquals missing", one("NumericNotEquals", "n", "5"), MISSING, True),
    ("NumericLessThan", one("NumericLessThan", "n", "5"), {"n": 4.5}, True),
    ("NumericLessThan equal", one("NumericLessThan", "n", "5"), {"n": 5}, False),
    ("NumericGreaterThan", one("NumericGreaterThan", "n", "5"), {"n": 6}, True),
    ("NumericGreaterThanEquals", one("NumericGreaterThanEquals", "n", "5"), {"n": "5"}, True),
    ("NumericGreaterThan non-number request value", one("NumericGreaterThan", "n", "5"), {"n": "abc"}, False),
    ("NumericNotEquals non-number request value", one("NumericNotEquals", "n", "5"), {"n": "abc"}, True),
    # --- Date -----------------------------------------------------------------------------------
    (
        "DateGreaterThan (TokenIssueTime example)",
        one("DateGreaterThan", "aws:TokenIssueTime", "2020-01-01T00:00:01Z"),
        {"aws:TokenIssueTime": datetime(2020, 6, 1, tzinfo=UTC)},
        True,
    ),
    (
        "DateGreaterThan before",
        one("DateGreaterThan", "aws:TokenIssueTime", "2020-01-01T00:00:01Z"),
        {"aws:TokenIssueTime": "2019-12-31T23:59:59Z"},
        False,
    ),
    (
        "DateGreaterThan missing",
        one("DateGreaterThan", "aws:TokenIssueTime", "2020-01-01T00:00:01Z"),
        MISSING,
        False,
    ),
    (
        "DateLessThan at the instant",
        one("DateLessThan", "aws:CurrentTime", "2019-07-16T12:00:00Z"),
        {"aws:CurrentTime": "1563278400"},
        False,
    ),
    (
        "DateLessThanEquals at the instant",
        one("DateLessThanEquals", "aws:CurrentTime", "2019-07-16T12:00:00Z"),
        {"aws:CurrentTime": "1563278400"},
        True,
    ),
    (
        "DateEquals epoch policy value vs ISO request",
        one("DateEquals", "aws:CurrentTime", "1563278400"),
        {"aws:CurrentTime": "2019-07-16T12:00:00Z"},
        True,
    ),
    (
        "DateEquals across time zones",
        one("DateEquals", "aws:CurrentTime", "2019-07-16T14:00:00+02:00"),
        {"aws:CurrentTime": datetime(2019, 7, 16, 12, tzinfo=UTC)},
        True,
    ),
    (
        "DateEquals date-only is midnight UTC",
        one("DateEquals", "aws:CurrentTime", "2019-07-16"),
        {"aws:CurrentTime": "2019-07-16T00:00:00Z"},
        True,
    ),
    (
        "DateEquals naive datetime is UTC",
        one("DateEquals", "aws:CurrentTime", "2019-07-16T12:00:00Z"),
        {"aws:CurrentTime": datetime(2019, 7, 16, 12)},
        True,
    ),
    (
        "DateGreaterThanEquals year-month",
        one("DateGreaterThanEquals", "aws:CurrentTime", "2019-07"),
        {"aws:CurrentTime": "2019-07-01T00:00:00Z"},
        True,
    ),
    ("DateNotEquals missing", one("DateNotEquals", "aws:CurrentTime", "2019-07-16"), MISSING, True),
    (
        "DateNotEquals different",
        one("DateNotEquals", "aws:CurrentTime", "2019-07-16"),
        {"aws:CurrentTime": "2019-07-17"},
        True,
    ),
    (
        "Date with unparseable request value",
        one("DateLessThan", "aws:CurrentTime", "2019-07-16"),
        {"aws:CurrentTime": "yesterday"},
        False,
    ),
    # --- Bool and Null --------------------------------------------------------------------------
    (
        "Bool true (GrantIsForAWSResource)",
        one("Bool", "kms:GrantIsForAWSResource", True),
        {"kms:GrantIsForAWSResource": True},
        True,
    ),
    (
        "Bool false request",
        one("Bool", "kms:GrantIsForAWSResource", True),
        {"kms:GrantIsForAWSResource": False},
        False,
    ),
    (
        "Bool string policy value",
        one("Bool", "aws:SecureTransport", "false"),
        {"aws:SecureTransport": "false"},
        True,
    ),
    (
        "Bool is case-insensitive",
        one("Bool", "aws:SecureTransport", "TRUE"),
        {"aws:SecureTransport": "True"},
        True,
    ),
    ("Bool missing", one("Bool", "kms:GrantIsForAWSResource", True), MISSING, False),
    (
        "Null true, key absent (BypassPolicyLockoutSafetyCheck)",
        one("Null", "kms:BypassPolicyLockoutSafetyCheck", True),
        MISSING,
        True,
    ),
    (
        "Null true, key present",
        one("Null", "kms:BypassPolicyLockoutSafetyCheck", True),
        {"kms:BypassPolicyLockoutSafetyCheck": False},
        False,
    ),
    (
        "Null false, key present",
        one("Null", "aws:TokenIssueTime", "false"),
        {"aws:TokenIssueTime": "2020-01-01T00:00:00Z"},
        True,
    ),
    ("Null false, key absent", one("Null", "aws:TokenIssueTime", "false"), MISSING, False),
    ("Null true, empty list counts as absent", one("Null", "aws:TagKeys", "true"), {"aws:TagKeys": []}, True),
    # --- IP address -----------------------------------------------------------------------------
    (
        "IpAddress in range",
        one("IpAddress", "aws:SourceIp", "203.0.113.0/24"),
        {"aws:SourceIp": "203.0.113.5"},
        True,
    ),
    (
        "IpAddress out of range",
        one("IpAddress", "aws:SourceIp", "203.0.113.0/24"),
        {"aws:SourceIp": "198.51.100.1"},
        False,
    ),
    ("IpAddress missing", one("IpAddress", "aws:SourceIp", "203.0.113.0/24"), MISSING, False),
    (
        "IpAddress IPv6 range",
        one("IpAddress", "aws:SourceIp", ["203.0.113.0/24", "2001:DB8:1234:5678::/64"]),
        {"aws:SourceIp": "2001:db8:1234:5678::1"},
        True,
    ),
    (
        "IpAddress bare address is /32",
        one("IpAddress", "aws:SourceIp", "203.0.113.7"),
        {"aws:SourceIp": "203.0.113.8"},
        False,
    ),
    (
        "IpAddress host bits set in the CIDR",
        one("IpAddress", "aws:SourceIp", "203.0.113.9/24"),
        {"aws:SourceIp": "203.0.113.200"},
        True,
    ),
    (
        "IpAddress garbage request value",
        one("IpAddress", "aws:SourceIp", "0.0.0.0/0"),
        {"aws:SourceIp": "x"},
        False,
    ),
    (
        "NotIpAddress inside",
        one("NotIpAddress", "aws:SourceIp", "203.0.113.0/24"),
        {"aws:SourceIp": "203.0.113.5"},
        False,
    ),
    (
        "NotIpAddress outside",
        one("NotIpAddress", "aws:SourceIp", "203.0.113.0/24"),
        {"aws:SourceIp": "10.0.0.1"},
        True,
    ),
    ("NotIpAddress missing", one("NotIpAddress", "aws:SourceIp", "203.0.113.0/24"), MISSING, True),
    # --- ARN ------------------------------------------------------------------------------------
    (
        "ArnLike does not let * cross a colon (IAM example)",
        one("ArnLike", "aws:SourceArn", "arn:aws:someservice:*:111122223333:finance/*"),
        {"aws:SourceArn": TRICKY_ARN},
        False,
    ),
    (
        "StringLike does (same IAM example)",
        one("StringLike", "aws:SourceArn", "arn:aws:someservice:*:111122223333:finance/*"),
        {"aws:SourceArn": TRICKY_ARN},
        True,
    ),
    (
        "ArnLike matches per part",
        one("ArnLike", "aws:SourceArn", "arn:aws:someservice:*:111122223333:finance/*"),
        {"aws:SourceArn": "arn:aws:someservice:us-east-2:111122223333:finance/doc.txt"},
        True,
    ),
    (
        "ArnEquals takes wildcards like ArnLike",
        one("ArnEquals", "aws:SourceArn", "arn:aws:sns:*:111122223333:t?pic"),
        {"aws:SourceArn": "arn:aws:sns:us-east-1:111122223333:topic"},
        True,
    ),
    (
        "ArnEquals exact",
        one("ArnEquals", "aws:SourceArn", "arn:aws:sns:us-east-1:123456789012:TOPIC-ID"),
        {"aws:SourceArn": "arn:aws:sns:us-east-1:123456789012:TOPIC-ID"},
        True,
    ),
    (
        "ArnEquals resource part may hold colons",
        one("ArnEquals", "aws:SourceArn", "arn:aws:lambda:*:*:function:*"),
        {"aws:SourceArn": "arn:aws:lambda:us-east-1:111122223333:function:f:prod"},
        True,
    ),
    (
        "ArnLike request value is not an ARN",
        one("ArnLike", "aws:SourceArn", "arn:aws:sns:*:*:*"),
        {"aws:SourceArn": "topic"},
        False,
    ),
    (
        "ArnLike '*' matches anything",
        one("ArnLike", "aws:SourceArn", "*"),
        {"aws:SourceArn": "whatever"},
        True,
    ),
    (
        "ArnLike on the caller (aws:PrincipalArn is filled in)",
        one("ArnLike", "aws:PrincipalArn", f"arn:aws:iam::{ACCT}:user/*"),
        MISSING,
        True,
    ),
    ("ArnNotLike missing", one("ArnNotLike", "aws:SourceArn", "arn:aws:sns:*:*:*"), MISSING, True),
    ("ArnNotEquals matching", one("ArnNotEquals", "aws:PrincipalArn", BOB), MISSING, False),
    # --- Binary ---------------------------------------------------------------------------------
    (
        "BinaryEquals",
        one("BinaryEquals", "k", "QmluYXJ5VmFsdWVJbkJhc2U2NA=="),
        {"k": b"BinaryValueInBase64"},
        True,
    ),
    (
        "BinaryEquals different bytes",
        one("BinaryEquals", "k", "QmluYXJ5VmFsdWVJbkJhc2U2NA=="),
        {"k": b"x"},
        False,
    ),
    # --- IfExists -------------------------------------------------------------------------------
    (
        "StringLikeIfExists missing (EC2 InstanceType example)",
        one("StringLikeIfExists", "ec2:InstanceType", ["t1.*", "t2.*", "m3.*"]),
        MISSING,
        True,
    ),
    (
        "StringLikeIfExists present, matching",
        one("StringLikeIfExists", "ec2:InstanceType", ["t1.*", "t2.*"]),
        {"ec2:InstanceType": "t2.micro"},
        True,
    ),
    (
        "StringLikeIfExists present, not matching",
        one("StringLikeIfExists", "ec2:InstanceType", ["t1.*", "t2.*"]),
        {"ec2:InstanceType": "m5.large"},
        False,
    ),
    (
        "StringNotEqualsIfExists missing is true",
        one("StringNotEqualsIfExists", "aws:ResourceTag/Team", "x"),
        MISSING,
        True,
    ),
    (
        "StringNotEqualsIfExists present and equal",
        one("StringNotEqualsIfExists", "aws:ResourceTag/Team", "x"),
        {"aws:ResourceTag/Team": "x"},
        False,
    ),
    ("NumericLessThanIfExists missing", one("NumericLessThanIfExists", "n", 3), MISSING, True),
    (
        "BoolIfExists present false",
        one("BoolIfExists", "aws:MultiFactorAuthPresent", "true"),
        {"aws:MultiFactorAuthPresent": False},
        False,
    ),
    # --- Set operators --------------------------------------------------------------------------
    (
        "ForAllValues: every request value listed (DynamoDB example)",
        one("ForAllValues:StringLike", "dynamodb:requestedAttributes", ["PostDateTime", "Message", "Tags"]),
        {"dynamodb:requestedAttributes": ["PostDateTime", "Message"]},
        True,
    ),
    (
        "ForAllValues: one request value not listed",
        one("ForAllValues:StringLike", "dynamodb:requestedAttributes", ["PostDateTime", "Message", "Tags"]),
        {"dynamodb:requestedAttributes": ["PostDateTime", "UserName"]},
        False,
    ),
    (
        "ForAllValues: missing key is true",
        one("ForAllValues:StringEquals", "aws:TagKeys", ["a"]),
        MISSING,
        True,
    ),
    (
        "ForAllValues: empty set is true",
        one("ForAllValues:StringEquals", "aws:TagKeys", ["a"]),
        {"aws:TagKeys": []},
        True,
    ),
    (
        "ForAnyValue: one match (DynamoDB Deny example)",
        one("ForAnyValue:StringLike", "dynamodb:requestedAttributes", ["ID", "PostDateTime"]),
        {"dynamodb:requestedAttributes": ["UserName", "Message", "PostDateTime"]},
        True,
    ),
    (
        "ForAnyValue: no match",
        one("ForAnyValue:StringLike", "dynamodb:requestedAttributes", ["ID", "PostDateTime"]),
        {"dynamodb:requestedAttributes": ["UserName"]},
        False,
    ),
    (
        "ForAnyValue: missing key is false",
        one("ForAnyValue:StringEquals", "aws:TagKeys", ["a"]),
        MISSING,
        False,
    ),
    (
        "ForAnyValue: empty set is false",
        one("ForAnyValue:StringEquals", "aws:TagKeys", ["a"]),
        {"aws:TagKeys": []},
        False,
    ),
    (
        "ForAllValues:StringNotEquals: no request value listed",
        one("ForAllValues:StringNotEquals", "aws:TagKeys", ["a", "b"]),
        {"aws:TagKeys": ["c", "d"]},
        True,
    ),
    (
        "ForAllValues:StringNotEquals: one listed",
        one("ForAllValues:StringNotEquals", "aws:TagKeys", ["a", "b"]),
        {"aws:TagKeys": ["a", "c"]},
        False,
    ),
    (
        "ForAnyValue:StringNotEquals: one unlisted",
        one("ForAnyValue:StringNotEquals", "aws:TagKeys", ["a", "b"]),
        {"aws:TagKeys": ["a", "c"]},
        True,
    ),
    (
        "ForAnyValue:StringNotEquals: all listed",
        one("ForAnyValue:StringNotEquals", "aws:TagKeys", ["a", "b"]),
        {"aws:TagKeys": ["a", "b"]},
        False,
    ),
    (
        "ForAnyValue:StringNotEquals: missing is false",
        one("ForAnyValue:StringNotEquals", "aws:TagKeys", ["a"]),
        MISSING,
        False,
    ),
    (
        "ForAnyValue:StringEqualsIfExists: missing is true",
        one("ForAnyValue:StringEqualsIfExists", "aws:TagKeys", ["a"]),
        MISSING,
        True,
    ),
    (
        "set prefixes are case-insensitive",
        one("forallvalues:stringequals", "aws:TagKeys", ["a"]),
        {"aws:TagKeys": ["a"]},
        True,
    ),
    (
        "plain operator on a multi-valued key: any value",
        one("StringEquals", "aws:TagKeys", "a"),
        {"aws:TagKeys": ["b", "a"]},
        True,
    ),
    (
        "plain negated operator on a multi-valued key: none",
        one("StringNotEquals", "aws:TagKeys", "a"),
        {"aws:TagKeys": ["b", "a"]},
        False,
    ),
]


@pytest.mark.parametrize(("block", "context", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_condition_table(block: dict[str, Any], context: dict[str, Any], expected: bool) -> None:
    assert holds(block, context) is expected


# --- the encryption context keys (KMS developer guide examples) ---------------------------------

EC_CASES: list[tuple[str, dict[str, Any], dict[str, str] | None, bool]] = [
    (
        "required pair present (AppName=ExampleApp)",
        one("StringEquals", "kms:EncryptionContext:AppName", "ExampleApp"),
        {"AppName": "ExampleApp", "x": "y"},
        True,
    ),
    (
        "context key part is case-insensitive ('Appname' example)",
        one("StringEquals", "kms:EncryptionContext:Appname", "ExampleApp"),
        {"appNAME": "ExampleApp"},
        True,
    ),
    (
        "context value is case-sensitive under StringEquals",
        one("StringEquals", "kms:EncryptionContext:AppName", "ExampleApp"),
        {"AppName": "exampleapp"},
        False,
    ),
    (
        "context value under StringEqualsIgnoreCase",
        one("StringEqualsIgnoreCase", "kms:EncryptionContext:AppName", "ExampleApp"),
        {"AppName": "EXAMPLEAPP"},
        True,
    ),
    (
        "no encryption context",
        one("StringEquals", "kms:EncryptionContext:AppName", "ExampleApp"),
        None,
        False,
    ),
    (
        "two pairs required (Department=IT and Project=Alpha)",
        {
            "StringEquals": {
                "kms:EncryptionContext:Department": "IT",
                "kms:EncryptionContext:Project": "Alpha",
            }
        },
        {"Department": "IT"},
        False,
    ),
    (
        "two pairs present",
        {
            "StringEquals": {
                "kms:EncryptionContext:Department": "IT",
                "kms:EncryptionContext:Project": "Alpha",
            }
        },
        {"Department": "IT", "Project": "Alpha", "Other": "1"},
        True,
    ),
    (
        "Stage=Restricted or Production (Deny example)",
        one("StringEquals", "kms:EncryptionContext:Stage", ["Restricted", "Production"]),
        {"Stage": "Production"},
        True,
    ),
    (
        "Stage=Test does not match the Deny",
        one("StringEquals", "kms:EncryptionContext:Stage", ["Restricted"]),
        {"Stage": "Test"},
        False,
    ),
    (
        "ForAnyValue EncryptionContextKeys AppName",
        one("ForAnyValue:StringEquals", "kms:EncryptionContextKeys", "AppName"),
        {"AppName": "Helper", "Project": "Alpha"},
        True,
    ),
    (
        "ForAnyValue EncryptionContextKeys, other key only",
        one("ForAnyValue:StringEquals", "kms:EncryptionContextKeys", "AppName"),
        {"Project": "Alpha"},
        False,
    ),
    (
        "ForAnyValue EncryptionContextKeys is case-sensitive",
        one("ForAnyValue:StringEquals", "kms:EncryptionContextKeys", "AppName"),
        {"appname": "Helper"},
        False,
    ),
    (
        "ForAnyValue EncryptionContextKeys, no context",
        one("ForAnyValue:StringEquals", "kms:EncryptionContextKeys", "AppName"),
        None,
        False,
    ),
    (
        "ForAllValues EncryptionContextKeys limits the keys",
        one("ForAllValues:StringEquals", "kms:EncryptionContextKeys", ["Department", "Project"]),
        {"Department": "IT", "Stage": "x"},
        False,
    ),
    (
        "ForAllValues EncryptionContextKeys allows no context",
        one("ForAllValues:StringEquals", "kms:EncryptionContextKeys", ["Department", "Project"]),
        {},
        True,
    ),
    (
        "pair required + keys limited: the pair alone",
        {
            "StringEquals": {"kms:EncryptionContext:AppName": "ExampleApp"},
            "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["AppName"]},
        },
        {"AppName": "ExampleApp"},
        True,
    ),
    (
        "pair required + keys limited: no context fails",
        {
            "StringEquals": {"kms:EncryptionContext:AppName": "ExampleApp"},
            "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["AppName"]},
        },
        {},
        False,
    ),
    (
        "Null false on EncryptionContextKeys requires a context",
        one("Null", "kms:EncryptionContextKeys", False),
        {},
        False,
    ),
    (
        "Null false on EncryptionContextKeys with a context",
        one("Null", "kms:EncryptionContextKeys", False),
        {"a": "b"},
        True,
    ),
]


@pytest.mark.parametrize(("block", "ec", "expected"), [c[1:] for c in EC_CASES], ids=[c[0] for c in EC_CASES])
def test_encryption_context_conditions(
    block: dict[str, Any], ec: dict[str, str] | None, expected: bool
) -> None:
    assert holds(block, {}, encryption_context=ec) is expected


# --- malformed condition blocks -----------------------------------------------------------------

MALFORMED: list[tuple[str, Any, str]] = [
    ("unknown operator", one("StringEqualz", "k", "v"), "Unknown condition operator"),
    ("unknown set operator", one("ForSomeValues:StringEquals", "k", "v"), "set operator"),
    ("NullIfExists", one("NullIfExists", "k", "true"), "Null"),
    ("Null with a set operator", one("ForAnyValue:Null", "k", "true"), "Null"),
    ("Null with a non-boolean", one("Null", "k", "maybe"), "Null"),
    ("Null with both", one("Null", "k", ["true", "false"]), "Null"),
    ("Bool with a non-boolean", one("Bool", "k", "yes"), "true or false"),
    ("Numeric with a word", one("NumericEquals", "k", "ten"), "not a number"),
    ("Numeric with NaN text", one("NumericEquals", "k", "nan"), "not a number"),
    ("Date with a word", one("DateEquals", "k", "yesterday"), "ISO 8601"),
    ("IpAddress with a bad CIDR", one("IpAddress", "aws:SourceIp", "300.1.1.1/8"), "CIDR"),
    ("BinaryEquals with non-base64", one("BinaryEquals", "k", "!!!"), "base64"),
    ("block is not an object", ["StringEquals"], "JSON object"),
    ("operator body is not an object", {"StringEquals": "k"}, "must map"),
    ("value is an object", one("StringEquals", "k", {"a": 1}), "strings, numbers or booleans"),
    ("value is null", one("StringEquals", "k", None), "strings, numbers or booleans"),
    ("empty value list", one("StringEquals", "k", []), "no values"),
    ("empty key", one("StringEquals", "", "v"), "empty condition key"),
]


@pytest.mark.parametrize(("block", "needle"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_conditions(block: Any, needle: str) -> None:
    with pytest.raises(MalformedPolicyDocumentException) as caught:
        compile_condition_block(block)
    assert needle in caught.value.message


def test_operator_names_are_case_insensitive() -> None:
    assert holds(one("stringequals", "k", "v"), {"k": "v"})
    assert holds(one("STRINGLIKEIFEXISTS", "k", "v*"), {})
