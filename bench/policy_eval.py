"""A tiny timing of the policy engine (not a test): ``python -m openkms.policy._bench``.

Compiles a ten-statement key policy with conditions once, then times evaluate() for a few typical
requests, and times compilation itself. Prints microseconds per call. Belongs in bench/ once the
engine is wired in; kept here so it ships with the library it measures.
"""

from __future__ import annotations

import json
import timeit
from functools import partial

from openkms.policy import Grant, RequestContext, default_key_policy, evaluate, parse_identity_policy, parse_key_policy

ACCT = "111122223333"
KEY = f"arn:aws:kms:us-east-1:{ACCT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
BOB = f"arn:aws:iam::{ACCT}:user/bob"


def _statement(i: int) -> dict[str, object]:
    return {
        "Sid": f"S{i}",
        "Effect": "Allow",
        "Principal": {"AWS": [f"arn:aws:iam::{ACCT}:user/u{i}", f"arn:aws:iam::{ACCT}:role/r{i}"]},
        "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*"],
        "Resource": "*",
        "Condition": {
            "StringEquals": {"kms:EncryptionContext:App": f"app{i}", "kms:ViaService": "s3.amazonaws.com"},
            "IpAddress": {"aws:SourceIp": ["10.0.0.0/8", "203.0.113.0/24"]},
            "ForAllValues:StringLike": {"kms:EncryptionContextKeys": ["App", "Tenant*"]},
        },
    }


POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            json.loads(default_key_policy(ACCT))["Statement"][0],
            {
                "Sid": "DenyOldAlgorithms",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "kms:*",
                "Resource": "*",
                "Condition": {"StringNotEqualsIfExists": {"kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}},
            },
            *(_statement(i) for i in range(8)),
        ],
    }
)


def main() -> None:
    compiled = parse_key_policy(POLICY)
    identity = [
        parse_identity_policy(
            json.dumps({"Statement": {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": KEY}})
        )
    ]
    context = {
        "kms:ViaService": "s3.amazonaws.com",
        "aws:SourceIp": "203.0.113.7",
        "kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
    }
    ec = {"App": "app7", "TenantId": "t1"}
    cases = {
        "last statement allows (all conditions checked)": (
            RequestContext(
                f"arn:aws:iam::{ACCT}:user/u7",
                ACCT,
                "kms:Decrypt",
                KEY,
                context=context,
                encryption_context=ec,
            ),
            [],
            [],
        ),
        "no statement names the caller; delegation + identity": (
            RequestContext(BOB, ACCT, "kms:Decrypt", KEY, context=context, encryption_context=ec),
            identity,
            [],
        ),
        "denied (no identity policy), then grants scanned": (
            RequestContext(BOB, ACCT, "kms:Encrypt", KEY, context=context, encryption_context=ec),
            [],
            [Grant(f"arn:aws:iam::{ACCT}:user/g{i}", frozenset({"Decrypt"})) for i in range(5)],
        ),
    }
    n = 20000
    print(f"policy: {len(compiled.statements)} statements, {len(POLICY)} bytes")
    for name, (request, identities, grants) in cases.items():
        decision = evaluate(request, compiled, identities, grants)
        seconds = min(
            timeit.repeat(partial(evaluate, request, compiled, identities, grants), number=n, repeat=5)
        )
        print(f"  evaluate, {name}: {seconds / n * 1e6:.2f} us  (allowed={decision.allowed})")
    build = min(
        timeit.repeat(
            lambda: RequestContext(BOB, ACCT, "kms:Decrypt", KEY, context=context, encryption_context=ec),
            number=n,
            repeat=5,
        )
    )
    print(f"  RequestContext construction: {build / n * 1e6:.2f} us")
    parse = min(timeit.repeat(lambda: parse_key_policy(POLICY), number=500, repeat=3))
    print(f"  parse_key_policy (compile once per change): {parse / 500 * 1e6:.0f} us")


if __name__ == "__main__":
    main()
