"""Request quotas: AWS's per-account request rates, enforced per node, set per account by an operator.

Each API call counts against one quota of the caller's account (for a cross-account call, the
caller's, not the key owner's, as in AWS). KMS's cryptographic operations share a quota by the type
of the key they use (symmetric, RSA, ECC); GenerateDataKeyPair has one per key pair spec; the other
operations have one each; Secrets Manager's operations share quotas as AWS's do. A call above its
quota is answered ThrottlingException (HTTP 400), which the AWS SDKs and the CLI retry with backoff.

The defaults are AWS's (the AWS KMS Developer Guide, "Request quotas", and the Secrets Manager User
Guide, "Quotas"); an operation AWS gives no figure for takes the figure of its kind, marked `ours`.
An operator overrides a quota for one account, or for every account (`*`), through the admin API
(PutRequestQuota); the overrides live in the store, so every node applies the same ones.

Quotas are counted per node, in memory: N nodes behind a load balancer admit up to N times a quota
in all. A bucket holds one second's worth of calls (at least one call), so a quota is a rate with
bursts of up to one second.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .cache import TTLCache
from .model import Key, KeyFamily
from .ratelimit import TokenBucket
from .storage import Store
from .storage.repos import Changes

EVERY_ACCOUNT = "*"
MAX_BUCKETS = 100_000


@dataclass(frozen=True)
class Quota:
    name: str        # how an operator names it: "kms:symmetric", "kms:CreateKey", "secretsmanager:GetSecretValue"
    rate: float      # AWS's default, requests per second
    title: str       # AWS's name for it
    operations: tuple[str, ...]
    ours: bool = False  # AWS publishes no figure: the figure of its kind


SYMMETRIC, RSA, ECC = "kms:symmetric", "kms:rsa", "kms:ecc"
CRYPTOGRAPHIC = ("Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "GenerateMac",
                 "ReEncrypt", "VerifyMac", "Sign", "Verify", "DeriveSharedSecret")
PAIR_OPERATIONS = ("GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext")
PAIR_RATES = {"RSA_2048": 1.0, "RSA_3072": 0.5, "RSA_4096": 0.1, "ECC_NIST_P256": 25.0, "ECC_NIST_P384": 10.0,
              "ECC_NIST_P521": 5.0, "ECC_SECG_P256K1": 25.0, "SM2": 25.0}

_KMS_SINGLE: dict[str, float] = {
    "CancelKeyDeletion": 5, "ConnectCustomKeyStore": 5, "CreateAlias": 5, "CreateCustomKeyStore": 5,
    "CreateGrant": 50, "CreateKey": 5, "DeleteAlias": 5, "DeleteCustomKeyStore": 5, "DeleteImportedKeyMaterial": 5,
    "DescribeCustomKeyStores": 5, "DescribeKey": 100, "DisableKey": 5, "DisableKeyRotation": 5,
    "DisconnectCustomKeyStore": 5, "EnableKey": 5, "EnableKeyRotation": 5, "GetKeyPolicy": 30,
    "GetKeyRotationStatus": 30, "GetParametersForImport": 0.25, "GetPublicKey": 5, "ImportKeyMaterial": 5,
    "ListAliases": 100, "ListGrants": 100, "ListKeyPolicies": 100, "ListKeys": 100, "ListResourceTags": 100,
    "ListRetirableGrants": 5, "PutKeyPolicy": 5, "RetireGrant": 15, "RevokeGrant": 15, "ScheduleKeyDeletion": 5,
    "TagResource": 5, "UntagResource": 5, "UpdateAlias": 5, "UpdateCustomKeyStore": 5, "UpdateKeyDescription": 5,
}
_KMS_OURS: dict[str, float] = {"RotateKeyOnDemand": 5, "ListKeyRotations": 100, "GetKeyLastUsage": 30}

_SECRETS: list[tuple[str, float, str, tuple[str, ...], bool]] = [
    ("GetSecretValue", 10_000, "GetSecretValue API request rate", ("GetSecretValue",), False),
    ("DescribeSecret", 40_000, "DescribeSecret API request rate", ("DescribeSecret",), False),
    ("BatchGetSecretValue", 100, "BatchGetSecretValue API request rate", ("BatchGetSecretValue",), False),
    ("ListSecrets", 100, "ListSecrets API request rate", ("ListSecrets",), False),
    ("resource-policies", 50, "Combined rate of DeleteResourcePolicy, GetResourcePolicy, PutResourcePolicy, "
     "and ValidateResourcePolicy API requests",
     ("DeleteResourcePolicy", "GetResourcePolicy", "PutResourcePolicy", "ValidateResourcePolicy",
      "ListResourcePolicies"), False),
    ("writes", 50, "Combined rate of PutSecretValue, RemoveRegionsFromReplication, ReplicateSecretToRegion, "
     "StopReplicationToReplica, UpdateSecret, and UpdateSecretVersionStage API requests",
     ("PutSecretValue", "UpdateSecret", "UpdateSecretVersionStage", "ReplicateSecretToRegions",
      "RemoveRegionsFromReplication", "StopReplicationToReplica", "AssociateCrossAccountReplica",
      "DisassociateCrossAccountReplica"), False),
    ("RestoreSecret", 50, "RestoreSecret API request rate", ("RestoreSecret",), False),
    ("rotation", 50, "Combined rate of RotateSecret and CancelRotateSecret API requests",
     ("RotateSecret", "CancelRotateSecret"), False),
    ("tags", 50, "Combined rate of TagResource and UntagResource API requests", ("TagResource", "UntagResource"),
     False),
    ("CreateSecret", 50, "CreateSecret API request rate", ("CreateSecret",), True),
    ("DeleteSecret", 50, "DeleteSecret API request rate", ("DeleteSecret",), True),
    ("ListSecretVersionIds", 50, "ListSecretVersionIds API request rate", ("ListSecretVersionIds",), True),
    ("GetRandomPassword", 50, "GetRandomPassword API request rate", ("GetRandomPassword",), True),
]


def _table() -> dict[str, Quota]:
    quotas = [
        Quota(SYMMETRIC, 10_000, "Cryptographic operations (symmetric) request rate",
              (*CRYPTOGRAPHIC, "GenerateRandom")),
        Quota(RSA, 500, "Cryptographic operations (RSA) request rate", CRYPTOGRAPHIC),
        Quota(ECC, 300, "Cryptographic operations (ECC) request rate", CRYPTOGRAPHIC),
    ]
    quotas += [Quota(f"kms:GenerateDataKeyPair:{spec}", rate, f"GenerateDataKeyPair ({spec}) request rate",
                     PAIR_OPERATIONS, ours=spec == "SM2") for spec, rate in PAIR_RATES.items()]
    quotas += [Quota(f"kms:{op}", rate, f"{op} request rate", (op,)) for op, rate in _KMS_SINGLE.items()]
    quotas += [Quota(f"kms:{op}", rate, f"{op} request rate", (op,), ours=True) for op, rate in _KMS_OURS.items()]
    quotas += [Quota(f"secretsmanager:{name}", rate, title, ops, ours) for name, rate, title, ops, ours in _SECRETS]
    return {q.name: q for q in quotas}


QUOTAS: dict[str, Quota] = _table()
KMS_SINGLE: dict[str, str] = {op: f"kms:{op}" for op in (*_KMS_SINGLE, *_KMS_OURS)}
SECRETS_OF: dict[str, str] = {op: f"secretsmanager:{name}" for name, _, _, ops, _ in _SECRETS for op in ops}


def key_quota(key: Key | None) -> str:
    """The shared quota a cryptographic operation with `key` counts against."""
    if key is None:
        return SYMMETRIC  # the call will fail; it still counts, as in AWS
    family = key.spec.family
    if family is KeyFamily.RSA:
        return RSA
    if family in (KeyFamily.ECC, KeyFamily.ML_DSA):
        return ECC  # ML-DSA has no AWS figure of its own here: it counts with the other signing curves
    return SYMMETRIC


def pair_quota(key_pair_spec: object) -> str | None:
    return f"kms:GenerateDataKeyPair:{key_pair_spec}" if key_pair_spec in PAIR_RATES else None


class RequestQuotas:
    """The buckets of this node, one per (account, quota), at the rates the store's overrides set."""

    def __init__(self, store: Store, cache_ttl: float, enabled: bool = True) -> None:
        self.enabled = enabled
        self._store = store
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()
        self._overrides: TTLCache[str, dict[str, float]] = TTLCache(cache_ttl, 10_000, "request_quotas")
        store.on_commit(self._committed)

    def _committed(self, changes: Changes) -> None:
        if changes.everything:
            self._overrides.clear()
        for account_id in changes.quotas:
            if account_id == EVERY_ACCOUNT:
                self._overrides.clear()
            else:
                self._overrides.pop(account_id)

    def overrides(self, account_id: str) -> dict[str, float]:
        def load() -> dict[str, float]:
            with self._store.begin() as tx:
                return tx.quotas.for_account(account_id)
        return self._overrides.get(account_id, load)

    def rate(self, account_id: str, quota_name: str) -> float:
        """The rate in force: the account's override, else the one for every account, else AWS's."""
        for whose in (account_id, EVERY_ACCOUNT):
            rate = self.overrides(whose).get(quota_name)
            if rate is not None:
                return rate
        return QUOTAS[quota_name].rate

    def take(self, account_id: str, quota_name: str) -> bool:
        """Whether one more call of `account_id` fits in `quota_name` now (and count it)."""
        if not self.enabled:
            return True
        rate = self.rate(account_id, quota_name)
        key = (account_id, quota_name)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate:
            with self._lock:
                if len(self._buckets) >= MAX_BUCKETS:
                    self._buckets.clear()  # crude but bounded: a cleared bucket starts full
                bucket = self._buckets[key] = TokenBucket(rate)
        return bucket.take()
