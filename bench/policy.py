"""What a ten-statement key policy with conditions costs Encrypt, against the default key policy, with wrk.

    python bench/policy.py [--repeat 3] [--user] [--duration 10] [--connections 64] [--storage-url URL] [--json]

Starts one real `openkms serve` (embedded SQLite unless --storage-url) on a loopback port and has
its bootstrapped admin (who acts as its account's root user) create two symmetric keys: key A with
the default key policy, key B with `ten_statement_policy`, ten statements mixing Allow and Deny with
conditions. It signs one `TrentService.Encrypt` of 32 random bytes with EncryptionContext
{"tenant": "t1"} per key and has wrk replay it: a short warm-up per key, then measured runs that
alternate between the keys (A B, B A, A B, ...) so that drift on a busy box hits both alike. Prints
req/s, p50 and p99 per key, the relative cost 1 - B/A of the medians and whether the issue's target
(<= 15%) is met. With --user it does the same for a non-admin user of a second account, who may
Encrypt through an identity policy on keys whose key policy delegates to that account's root.
It prints; it asserts nothing about timing. Exit status: 0 measured, 1 a run failed (the server,
a non-200 answer, the policy not doing what it should), 2 wrk is missing.

The ten statements are arranged so that every request under test walks all of them: the evaluator
checks every Deny that names the caller and the action (here all four, each with a condition that
does not match), then the Allows in order until one names the caller directly. The admin is its
account's root, which the root statement ("Enable IAM User Permissions") names directly, so that
statement comes LAST: the five Allows before it name everyone ("*") or a role, and their conditions
do not all hold. (With the root statement first, as in most real policies, the admin's requests
would stop there; the user's never stop early, as the root statement only delegates to them.)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# The repository root, for `tests.server` and `bench` when run as `python bench/policy.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._load import (
    REGION,
    BenchError,
    LoadOptions,
    SignedRequest,
    WrkStats,
    add_load_arguments,
    check_load_arguments,
    check_replay,
    create_key,
    error_type,
    measure_alternating,
    median_stats,
    met_text,
    replay_once,
    run_bench,
    signed_request,
    table_header,
    table_row,
)
from bench._moto import KmsServer, openkms_hint, running_servers
from openkms.client.admin import AdminClient, AdminError
from openkms.policy import (
    Basis,
    Decision,
    RequestContext,
    evaluate,
    parse_identity_policy,
    parse_key_policy,
    root_arn,
)

PLAINTEXT_BYTES = 32
ENCRYPTION_CONTEXT = {"tenant": "t1"}
# Sent once to key B, which must refuse it: proof that the server enforces the policy under test.
DENIED_CONTEXT = {"tenant": "t1", "classification": "secret"}
TARGET_MAX_COST = 0.15  # the issue: ten-statement policy throughput within 15% of the default policy's
ROOT_SID = "Enable IAM User Permissions"
DEFAULT_LOAD = LoadOptions(repeat=3)
NAME_WIDTH = 36

TENANT_ACCOUNT_NAME = "bench-policy-tenant"
TENANT_ADMIN = "bench-admin"
TENANT_USER = "bench-encryptor"


def ten_statements(account_id: str) -> list[dict[str, Any]]:
    """The statements of a realistic ten-statement key policy for a key of `account_id`.

    For the benchmark's request (Encrypt, EncryptionContext {"tenant": "t1"}, from 127.0.0.1, by the
    account's root or by a user with an identity policy) no Deny's conditions hold, no Allow before
    the last one holds, and the last statement, the root statement, allows (or delegates).
    `check_design` verifies exactly that.
    """
    crypto = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*"]
    statements: list[dict[str, Any]] = [
        {"Sid": "DenySecretClassification", "Effect": "Deny", "Principal": {"AWS": "*"},
         "Action": crypto, "Resource": "*",
         "Condition": {"StringEquals": {"kms:EncryptionContext:classification": "secret"}}},
        {"Sid": "AllowTenantServiceRole", "Effect": "Allow",
         "Principal": {"AWS": f"arn:aws:iam::{account_id}:role/tenant-service"},
         "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*"], "Resource": "*",
         "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": ["t1", "t2", "t3"]}}},
        # Not kms:*: a missing aws:SourceIp (as in CreateKey's lockout check) makes NotIpAddress true.
        {"Sid": "DenyOutsideTrustedNetworks", "Effect": "Deny", "Principal": {"AWS": "*"},
         "Action": crypto, "Resource": "*",
         "Condition": {"NotIpAddress": {"aws:SourceIp": ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12",
                                                         "192.168.0.0/16", "::1/128"]}}},
        {"Sid": "AllowPlatformRolesWithTenantContext", "Effect": "Allow", "Principal": {"AWS": "*"},
         "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*"], "Resource": "*",
         "Condition": {"StringLike": {"kms:EncryptionContext:tenant": "t*"},
                       "ArnLike": {"aws:PrincipalArn": f"arn:aws:iam::{account_id}:role/platform-*"}}},
        {"Sid": "DenySensitiveContextKeys", "Effect": "Deny", "Principal": {"AWS": "*"},
         "Action": ["kms:Encrypt", "kms:GenerateDataKey*"], "Resource": "*",
         "Condition": {"ForAnyValue:StringEquals": {
             "kms:EncryptionContextKeys": ["ssn", "card_number", "password"]}}},
        {"Sid": "AllowSmallBatchJobs", "Effect": "Allow", "Principal": {"AWS": "*"},
         "Action": ["kms:Encrypt", "kms:GenerateDataKey*"], "Resource": "*",
         "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": "t1", "kms:CallerAccount": account_id},
                       "NumericLessThan": {"kms:EncryptionContext:batch_size": "1000"}}},
        {"Sid": "DenyAfterDecommission", "Effect": "Deny", "Principal": {"AWS": "*"},
         "Action": "kms:*", "Resource": "*",
         "Condition": {"DateGreaterThan": {"aws:CurrentTime": "2099-12-31T23:59:59Z"}}},
        {"Sid": "AllowDuringMigrationWindow", "Effect": "Allow", "Principal": {"AWS": "*"},
         "Action": crypto, "Resource": "*",
         "Condition": {"StringEquals": {"kms:CallerAccount": account_id},
                       "DateLessThan": {"aws:CurrentTime": "2021-01-01T00:00:00Z"}}},
        {"Sid": "AllowApplicationSubnetsOverTls", "Effect": "Allow", "Principal": {"AWS": "*"},
         "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*",
         "Condition": {"IpAddress": {"aws:SourceIp": ["10.20.0.0/16", "10.30.0.0/16"]},
                       "Bool": {"aws:SecureTransport": "true"}}},
        {"Sid": ROOT_SID, "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
         "Action": "kms:*", "Resource": "*"},
    ]
    return statements


def key_policy_text(statements: list[dict[str, Any]]) -> str:
    return json.dumps({"Version": "2012-10-17", "Id": "bench-policy", "Statement": statements}, indent=2)


def ten_statement_policy(account_id: str) -> str:
    """The key policy of key B (see `ten_statements`), as CreateKey takes it."""
    return key_policy_text(ten_statements(account_id))


def encrypt_identity_policy(account_id: str) -> str:
    """The non-admin user's identity policy: Encrypt with any key of its account."""
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "EncryptWithAccountKeys", "Effect": "Allow", "Action": "kms:Encrypt",
        "Resource": f"arn:aws:kms:*:{account_id}:key/*"}]})


@dataclass
class Load:
    """Encrypt with one key, signed by one caller, and what wrk measured."""

    caller: str  # "admin" or "user"
    policy: str  # "default" or "ten-statement"
    endpoint: str
    access_key_id: str
    secret_access_key: str
    key_id: str
    runs: list[WrkStats] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.caller}, {self.policy} key policy"

    def request(self, context: dict[str, str] | None = None) -> SignedRequest:
        """A freshly signed Encrypt of new random bytes (a signature replays for 5 minutes)."""
        payload = {"KeyId": self.key_id, "Plaintext": base64.b64encode(os.urandom(PLAINTEXT_BYTES)).decode(),
                   "EncryptionContext": context or ENCRYPTION_CONTEXT}
        return signed_request(self.endpoint, "TrentService.Encrypt", payload, self.access_key_id,
                              self.secret_access_key, region=REGION)


@dataclass
class Pair:
    """One caller's two keys: A with the default key policy, B with the ten-statement policy."""

    caller: str
    account_id: str  # of the keys, and of the caller
    default: Load
    policy: Load

    def costs(self) -> list[float]:
        """1 - B/A of req/s for each round (A and B of a round ran next to each other)."""
        return [1 - b["requests_per_sec"] / a["requests_per_sec"]
                for a, b in zip(self.default.runs, self.policy.runs, strict=True) if a["requests_per_sec"]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_load_arguments(parser, DEFAULT_LOAD, peer=False)
    parser.add_argument("--user", action="store_true",
                        help="also measure a non-admin user of a second account, allowed by an identity policy")
    args = parser.parse_args(argv)
    check_load_arguments(parser, args)
    return args


def admin_call(admin: AdminClient, operation: str, **params: Any) -> dict[str, Any]:
    try:
        return admin.call(operation, **params)
    except (AdminError, OSError) as exc:
        raise BenchError(f"admin API {operation} failed: {exc}") from exc


def kms_client(endpoint: str, access_key_id: str, secret_access_key: str) -> Any:
    return boto3.client("kms", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=access_key_id,
                        aws_secret_access_key=secret_access_key, config=Config(retries={"max_attempts": 1}))


def key_metadata(client: Any, key_id: str) -> dict[str, Any]:
    try:
        return dict(client.describe_key(KeyId=key_id)["KeyMetadata"])
    except (ClientError, BotoCoreError) as exc:
        raise BenchError(f"DescribeKey {key_id} failed: {exc}") from exc


def check_design(account_id: str, arn: str, principal: str, identity_policy: str | None) -> None:
    """Evaluate the benchmark's request in-process against the ten-statement policy and variants of
    it, to make sure it walks all ten statements as the module docstring says:

    - the whole policy allows it (for the admin: by the root statement; for the user: by the root
      statement's delegation and the identity policy), and the root statement is the last one;
    - without the root statement it is denied: no other Allow's conditions hold;
    - each Deny stripped of its Condition (plus the root statement) denies it: every Deny names the
      caller and the action, so the evaluator tests its conditions on every request.
    """
    request = RequestContext(principal, account_id, "kms:Encrypt", arn, account_id, {
        "aws:CurrentTime": datetime.now(UTC), "aws:SourceIp": "127.0.0.1", "kms:KeySpec": "SYMMETRIC_DEFAULT",
        "kms:KeyUsage": "ENCRYPT_DECRYPT", "kms:KeyOrigin": "AWS_KMS",
        "kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}, ENCRYPTION_CONTEXT)
    identities = [parse_identity_policy(identity_policy)] if identity_policy else []

    def decide(statements: list[dict[str, Any]]) -> Decision:
        return evaluate(request, parse_key_policy(key_policy_text(statements)), identities)

    def fail(why: str, decision: Decision) -> BenchError:
        return BenchError(f"the ten-statement policy is not what bench/policy.py means to measure: {why} "
                          f"(for {principal}: allowed={decision.allowed}, basis {decision.basis.value}, "
                          f"statement {decision.sid!r}: {decision.reason})")

    statements = ten_statements(account_id)
    *others, root = statements
    decision = decide(statements)
    wanted = Basis.KEY_POLICY if identity_policy is None else Basis.KEY_AND_IDENTITY_POLICY
    if root["Sid"] != ROOT_SID:
        raise fail(f"the last statement should be {ROOT_SID!r}, not {root.get('Sid')!r}", decision)
    if not decision.allowed or decision.basis is not wanted:
        raise fail(f"the request should be allowed ({wanted.value})", decision)
    if identity_policy is None and decision.sid != ROOT_SID:
        raise fail(f"the request should be allowed by {ROOT_SID!r}", decision)
    decision = decide(others)
    if decision.allowed:
        raise fail("without the root statement the request should be denied", decision)
    for deny in (s for s in others if s["Effect"] == "Deny"):
        decision = decide([{k: v for k, v in deny.items() if k != "Condition"}, root])
        if decision.basis is not Basis.EXPLICIT_DENY_RESOURCE:
            raise fail(f"{deny['Sid']} without its condition should deny the request", decision)


def check_enforced(load: Load) -> None:
    """Key B must refuse an Encrypt whose context says classification=secret (its first statement)."""
    status, body = replay_once(load.request(DENIED_CONTEXT))
    if status != 400 or error_type(body) != "AccessDeniedException":
        raise BenchError(f"{load.label}: Encrypt with EncryptionContext {DENIED_CONTEXT} answered HTTP {status} "
                         f"{error_type(body)}, not 400 AccessDeniedException: the key policy is not enforced")


def admin_pair(server: KmsServer, hint: str) -> Pair:
    """The bootstrap admin (its account's root) and its keys A and B."""
    client = server.client()
    key_a = create_key("openkms", client, hint, Description="bench/policy.py default key policy")
    account_id = str(key_metadata(client, key_a)["AWSAccountId"])
    key_b = create_key("openkms", client, hint, Description="bench/policy.py ten-statement key policy",
                       Policy=ten_statement_policy(account_id))
    check_design(account_id, str(key_metadata(client, key_b)["Arn"]), root_arn(account_id), None)
    creds = (server.endpoint, server.access_key_id, server.secret_access_key)
    return Pair("admin", account_id, Load("admin", "default", *creds, key_a),
                Load("admin", "ten-statement", *creds, key_b))


def user_pair(server: KmsServer, hint: str) -> Pair:
    """A second account with an admin (to create keys C and D) and a non-admin user who may Encrypt
    through an identity policy; keys C (default policy) and D (ten statements) delegate to its root."""
    admin = AdminClient(server.endpoint, server.access_key_id, server.secret_access_key, REGION)
    account_id = str(admin_call(admin, "CreateAccount", Name=TENANT_ACCOUNT_NAME)["Account"]["AccountId"])
    admin_call(admin, "CreateUser", AccountId=account_id, UserName=TENANT_ADMIN, Admin=True)
    tenant_admin = admin_call(admin, "CreateAccessKey", AccountId=account_id, UserName=TENANT_ADMIN)["AccessKey"]
    user = admin_call(admin, "CreateUser", AccountId=account_id, UserName=TENANT_USER)["User"]
    identity_policy = encrypt_identity_policy(account_id)
    admin_call(admin, "PutUserPolicy", AccountId=account_id, UserName=TENANT_USER, PolicyName="encrypt",
               PolicyDocument=identity_policy)
    user_key = admin_call(admin, "CreateAccessKey", AccountId=account_id, UserName=TENANT_USER)["AccessKey"]
    client = kms_client(server.endpoint, tenant_admin["AccessKeyId"], tenant_admin["SecretAccessKey"])
    key_c = create_key("openkms", client, hint, Description="bench/policy.py default key policy (user)")
    key_d = create_key("openkms", client, hint, Description="bench/policy.py ten-statement key policy (user)",
                       Policy=ten_statement_policy(account_id))
    check_design(account_id, str(key_metadata(client, key_d)["Arn"]), str(user["Arn"]), identity_policy)
    creds = (server.endpoint, str(user_key["AccessKeyId"]), str(user_key["SecretAccessKey"]))
    return Pair("user", account_id, Load("user", "default", *creds, key_c),
                Load("user", "ten-statement", *creds, key_d))


def run(args: argparse.Namespace, workdir: Path) -> list[Pair]:
    options = LoadOptions.from_args(args)
    hint = openkms_hint(args.storage_url)
    with running_servers(workdir, storage_url=args.storage_url, moto=False) as servers:
        server = servers[0][1]
        pairs = [admin_pair(server, hint)] + ([user_pair(server, hint)] if args.user else [])
        loads = [load for pair in pairs for load in (pair.default, pair.policy)]
        for load in loads:
            check_replay(load.request(), load.label)
        for pair in pairs:
            check_enforced(pair.policy)
        measure_alternating(loads, options)
    return pairs


def summarize(pairs: list[Pair], args: argparse.Namespace, load_before: float, load_after: float) -> dict[str, Any]:
    comparisons: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for pair in pairs:
        a, b = median_stats(pair.default.runs), median_stats(pair.policy.runs)
        cost = 1 - b["requests_per_sec"] / a["requests_per_sec"] if a["requests_per_sec"] else None
        for load, median in ((pair.default, a), (pair.policy, b)):
            results[load.label] = {"caller": load.caller, "key_policy": load.policy, "median": median,
                                   "runs": load.runs}
        comparisons[pair.caller] = {
            "cost": cost,  # 1 - B/A of the median req/s
            "cost_per_round": pair.costs(),
            "target": {"want": f"<= {TARGET_MAX_COST:g}", "value": cost,
                       "met": None if cost is None else cost <= TARGET_MAX_COST},
        }
    return {
        "benchmark": "policy",
        "operation": "TrentService.Encrypt",
        "plaintext_bytes": PLAINTEXT_BYTES,
        "encryption_context": ENCRYPTION_CONTEXT,
        "storage": "postgresql" if args.storage_url else "sqlite (embedded)",
        # Other work on the box skews every figure: how busy it was before the server started and
        # at the end (the latter includes the benchmark's own load).
        "load_average_before": round(load_before, 2),
        "load_average_after": round(load_after, 2),
        "wrk": LoadOptions.from_args(args).summary(),
        "ten_statement_policy": {pair.caller: json.loads(ten_statement_policy(pair.account_id)) for pair in pairs},
        "results": results,
        "comparisons": comparisons,
    }


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_table(summary: dict[str, Any]) -> None:
    wrk = summary["wrk"]
    load = LoadOptions(duration=wrk["duration_s"], warmup=wrk["warmup_s"], connections=wrk["connections"],
                       threads=wrk["threads"], repeat=wrk["runs"])
    print(f"Encrypt of {summary['plaintext_bytes']} bytes with EncryptionContext "
          f"{json.dumps(summary['encryption_context'])}, {load.describe()}, {wrk['runs']} measured run(s) per key, "
          f"alternating (medians), openkms storage: {summary['storage']}, "
          f"load average before {summary['load_average_before']:.2f}, after {summary['load_average_after']:.2f}")
    print(table_header(NAME_WIDTH))
    targets = []
    for caller, comparison in summary["comparisons"].items():
        for label, result in summary["results"].items():
            if result["caller"] == caller:
                print(table_row(label, result["median"], NAME_WIDTH))
        for label, result in summary["results"].items():
            if result["caller"] == caller:
                print(f"  {label} runs req/s: " + " / ".join(f"{r['requests_per_sec']:,.0f}" for r in result["runs"]))
        rounds = ", ".join(percent(c) for c in comparison["cost_per_round"])
        print(f"{caller}: cost of the ten-statement policy (1 - B/A req/s): {percent(comparison['cost'])} "
              f"(per round: {rounds})")
        targets.append(f"{caller} {met_text(comparison['target']['met'])} ({percent(comparison['cost'])})")
    print(f"issue target: ten-statement policy within {TARGET_MAX_COST:.0%} of the default policy: "
          + "; ".join(targets))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]

    def measure(tmp: Path) -> dict[str, Any]:
        pairs = run(args, tmp)
        return summarize(pairs, args, load_before, os.getloadavg()[0])
    return run_bench("bench/policy.py", args, measure, print_table, needs_moto=False)

if __name__ == "__main__":
    sys.exit(main())
