"""Value objects shared by every layer: frozen dataclasses and enums, no behaviour that does I/O."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime
from typing import NoReturn


class KeyState(str, enum.Enum):
    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PENDING_DELETION = "PendingDeletion"
    PENDING_IMPORT = "PendingImport"
    UNAVAILABLE = "Unavailable"


class KeyUsage(str, enum.Enum):
    ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
    SIGN_VERIFY = "SIGN_VERIFY"
    GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"
    KEY_AGREEMENT = "KEY_AGREEMENT"
    ENCAPSULATE_DECAPSULATE = "ENCAPSULATE_DECAPSULATE"  # ML-KEM keys: not offered yet


class Origin(str, enum.Enum):
    AWS_KMS = "AWS_KMS"
    EXTERNAL = "EXTERNAL"
    AWS_CLOUDHSM = "AWS_CLOUDHSM"  # made in, and never leaving, an HSM of a custom key store
    EXTERNAL_KEY_STORE = "EXTERNAL_KEY_STORE"  # double-encrypted with a key of the customer's key manager

    @property
    def imports_material(self) -> bool:
        """The customer brings the material (BYOK): it can expire, be deleted and be imported again."""
        return self is Origin.EXTERNAL

    @property
    def in_custom_key_store(self) -> bool:
        """The key lives in a key store the customer registers (an HSM, or an external key manager
        that every use calls out to): no rotation, no data key pairs, as in AWS."""
        return self in (Origin.AWS_CLOUDHSM, Origin.EXTERNAL_KEY_STORE)


class KeyFamily(str, enum.Enum):
    SYMMETRIC = "symmetric"  # AES-256-GCM inside the ciphertext blob
    HMAC = "hmac"
    RSA = "rsa"
    ECC = "ecc"
    ML_DSA = "ml-dsa"


@dataclass(frozen=True, slots=True)
class KeySpecInfo:
    """What one key spec is and what it supports. New specs are new rows, not new branches."""

    name: str
    family: KeyFamily
    algorithms: dict[KeyUsage, tuple[str, ...]]  # usage -> algorithms it allows with that usage
    material_bytes: int = 0  # generated material length for raw (symmetric and HMAC) specs

    @property
    def usages(self) -> tuple[KeyUsage, ...]:
        return tuple(self.algorithms)

    def allowed(self, usage: KeyUsage) -> tuple[str, ...]:
        return self.algorithms.get(usage, ())

    @property
    def raw_material(self) -> bool:
        """Material is secret bytes (symmetric, HMAC), not a private key."""
        return self.family in (KeyFamily.SYMMETRIC, KeyFamily.HMAC)

    @property
    def rotatable(self) -> bool:
        """Can take new material under the same key (automatic or on-demand rotation, new imports)."""
        return self.family is KeyFamily.SYMMETRIC

    @property
    def has_public_key(self) -> bool:
        return self.family in (KeyFamily.RSA, KeyFamily.ECC, KeyFamily.ML_DSA)

    @property
    def ciphertext(self) -> str | None:
        """What Encrypt makes with it: "blob" (names its key, takes an encryption context), "rsa"
        (RSA-OAEP: Decrypt needs the KeyId, no context), or None (no encryption)."""
        return {KeyFamily.SYMMETRIC: "blob", KeyFamily.RSA: "rsa"}.get(self.family)


_RSA_SIGN = tuple(f"RSASSA_{p}_SHA_{n}" for p in ("PSS", "PKCS1_V1_5") for n in (256, 384, 512))
_RSA_ENCRYPT = ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256")
_SIGN, _ENCRYPT = KeyUsage.SIGN_VERIFY, KeyUsage.ENCRYPT_DECRYPT
_MAC, _AGREE = KeyUsage.GENERATE_VERIFY_MAC, KeyUsage.KEY_AGREEMENT

_SYM, _RSA, _ECC, _HMAC, _MLDSA = KeyFamily.SYMMETRIC, KeyFamily.RSA, KeyFamily.ECC, KeyFamily.HMAC, KeyFamily.ML_DSA

KEY_SPECS: dict[str, KeySpecInfo] = {
    "SYMMETRIC_DEFAULT": KeySpecInfo("SYMMETRIC_DEFAULT", _SYM, {_ENCRYPT: ("SYMMETRIC_DEFAULT",)}, 32),
    **{f"RSA_{bits}": KeySpecInfo(f"RSA_{bits}", _RSA, {_ENCRYPT: _RSA_ENCRYPT, _SIGN: _RSA_SIGN})
       for bits in (2048, 3072, 4096)},
    **{f"ECC_NIST_P{n}": KeySpecInfo(f"ECC_NIST_P{n}", _ECC, {_SIGN: (f"ECDSA_SHA_{h}",), _AGREE: ("ECDH",)})
       for n, h in ((256, 256), (384, 384), (521, 512))},
    "ECC_SECG_P256K1": KeySpecInfo("ECC_SECG_P256K1", _ECC, {_SIGN: ("ECDSA_SHA_256",)}),
    # ED25519_PH_SHA_512 (pre-hashed Ed25519) is not offered: pyca/cryptography has no Ed25519ph.
    "ECC_NIST_EDWARDS25519": KeySpecInfo("ECC_NIST_EDWARDS25519", _ECC, {_SIGN: ("ED25519_SHA_512",)}),
    **{f"HMAC_{n}": KeySpecInfo(f"HMAC_{n}", _HMAC, {_MAC: (f"HMAC_SHA_{n}",)}, n // 8) for n in (224, 256, 384, 512)},
    **{f"ML_DSA_{n}": KeySpecInfo(f"ML_DSA_{n}", _MLDSA, {_SIGN: ("ML_DSA_SHAKE_256",)}) for n in (44, 65, 87)},
}

# Key pair specs GenerateDataKeyPair can make (SM2 is left out).
DATA_KEY_PAIR_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096", "ECC_NIST_P256", "ECC_NIST_P384",
                       "ECC_NIST_P521", "ECC_SECG_P256K1", "ECC_NIST_EDWARDS25519")


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    name: str
    created: datetime


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a user of an account.

    Three levels: a plain user (only what policies allow it); an account administrator
    (`is_admin`: acts as its account's root user and manages its own account's users, policies,
    access keys and audit records); an operator (`is_operator`, always also `is_admin`: manages
    every account). The bootstrap administrator is an operator.
    """

    principal_id: str
    account_id: str
    name: str
    is_admin: bool
    created: datetime
    is_operator: bool = False

    @property
    def arn(self) -> str:
        return f"arn:aws:iam::{self.account_id}:user/{self.name}"

    @property
    def level(self) -> str:
        """What the admin API and `openkms admin` show: operator, account-admin or user."""
        return "operator" if self.is_operator else "account-admin" if self.is_admin else "user"


class SecretStr:
    """A secret string (a secret access key) that never shows itself in a repr or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "SecretStr(***)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("secrets cannot be pickled")


@dataclass(frozen=True, slots=True)
class Key:
    """The metadata of one KMS key. Key material lives in versions, never here."""

    key_id: str
    account_id: str
    region: str
    description: str
    key_spec: str
    key_usage: KeyUsage
    origin: Origin
    state: KeyState
    created: datetime
    deletion_date: datetime | None = None
    pending_window_days: int | None = None
    current_version: int = 1
    rotation_period_days: int | None = None  # automatic rotation on when set
    next_rotation: datetime | None = None
    valid_to: datetime | None = None  # expiry of imported material in use
    expiration_model: str | None = None
    policy: str | None = None  # the key policy's JSON; None: the default key policy
    custom_key_store_id: str | None = None  # the custom key store that holds the material, if any
    xks_key_id: str | None = None  # in an external key store: the external key's id at its proxy
    key_manager: str = "CUSTOMER"  # AWS: an AWS managed key (alias/aws/<service>), made for a service
    # Not stored: set by the key lookup while the key's custom key store is not connected.
    store_unavailable: bool = False

    @property
    def arn(self) -> str:
        return key_arn(self.region, self.account_id, self.key_id)

    @property
    def effective_state(self) -> KeyState:
        """The state callers see: Unavailable while the custom key store is not connected (AWS's
        rule for enabled and disabled keys); the stored state otherwise."""
        if self.store_unavailable and self.state in (KeyState.ENABLED, KeyState.DISABLED):
            return KeyState.UNAVAILABLE
        return self.state

    @property
    def spec(self) -> KeySpecInfo:
        return KEY_SPECS[self.key_spec]


@dataclass(frozen=True, slots=True)
class HsmCluster:
    """A PKCS#11 token an operator registered, to back CloudHSM-type custom key stores."""

    cluster_id: str  # AWS's pattern: cluster-[2-7a-zA-Z]{11,16}
    module_path: str
    token_label: str
    trust_anchor: str  # PEM certificate; a key store on the cluster must present the same one
    created: datetime
    # The tenant the cluster is registered for: only its account may make a key store on it (in
    # AWS a cluster belongs to one account). None only for a cluster registered before schema v6.
    account_id: str | None


class ConnectionState(str, enum.Enum):
    CONNECTED = "CONNECTED"
    CONNECTING = "CONNECTING"
    DISCONNECTED = "DISCONNECTED"
    DISCONNECTING = "DISCONNECTING"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class CustomKeyStore:
    """A tenant's custom key store. The token user's PIN is kept sealed in the store, never here."""

    custom_key_store_id: str  # cks- and 17 hex digits, as AWS makes them
    account_id: str
    name: str
    store_type: str  # AWS_CLOUDHSM
    cluster_id: str | None
    connection_state: ConnectionState
    connection_error_code: str | None
    created: datetime
    xks: XksProxyConfig | None = None  # an external key store's proxy (EXTERNAL_KEY_STORE)


@dataclass(frozen=True, slots=True)
class XksProxyConfig:
    """Where an external key store's XKS proxy is. Its credential's secret is sealed in the store."""

    uri_endpoint: str
    uri_path: str
    connectivity: str  # PUBLIC_ENDPOINT
    access_key_id: str

    def __repr__(self) -> str:  # the access key id is sensitive in AWS's model: never in a log
        return f"XksProxyConfig({self.uri_endpoint}{self.uri_path}, {self.connectivity})"


@dataclass(frozen=True, slots=True)
class KeyVersion:
    """One version of a key's material (the material itself stays in the key store)."""

    key_id: str
    version: int
    created: datetime
    material_id: str
    has_material: bool
    rotation_type: str | None = None
    rotated: datetime | None = None
    import_state: str | None = None
    valid_to: datetime | None = None
    expiration_model: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Alias:
    account_id: str
    name: str
    target_key_id: str
    created: datetime
    updated: datetime


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is making a request, as established by SigV4 authentication."""

    principal: Principal
    access_key_id: str
    source_ip: str = ""
    operation: str = ""  # the KMS operation being called: the action key policies are asked about
    grant_tokens: tuple[str, ...] = ()
    # Set when another service calls KMS on the caller's behalf (kms:ViaService), e.g.
    # "secretsmanager.us-east-1.amazonaws.com" for the data keys of the caller's secrets.
    via_service: str | None = None

    @property
    def account_id(self) -> str:
        return self.principal.account_id

    def for_operation(self, operation: str, grant_tokens: tuple[str, ...]) -> Caller:
        return Caller(self.principal, self.access_key_id, self.source_ip, operation, grant_tokens, self.via_service)

    def via(self, service: str, operation: str) -> Caller:
        """The caller as another service presents it to KMS when it calls `operation` for it."""
        return Caller(self.principal, self.access_key_id, self.source_ip, operation, (), service)


KEY_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
KEY_ARN_RE = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):(\d{12}):key/(.+)$")
ALIAS_ARN_RE = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):(\d{12}):(alias/.+)$")
ALIAS_NAME_RE = re.compile(r"^alias/[a-zA-Z0-9/_-]+$")


def key_arn(region: str, account_id: str, key_id: str) -> str:
    return f"arn:aws:kms:{region}:{account_id}:key/{key_id}"


def alias_arn(region: str, account_id: str, alias_name: str) -> str:
    return f"arn:aws:kms:{region}:{account_id}:{alias_name}"


# -- secrets ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Secret:
    """A secret of the Secrets Manager API: its metadata. Its values are in its versions, sealed."""

    secret_id: str  # internal
    account_id: str
    region: str
    name: str
    arn: str  # arn:aws:secretsmanager:<region>:<account>:secret:<name>-<6 random characters>
    description: str | None
    kms_key_id: str | None  # as the caller gave it; None: the account's aws/secretsmanager key
    created: datetime
    last_changed: datetime
    last_accessed: datetime | None = None
    deletion_date: datetime | None = None  # marked for deletion: when it is deleted for good
    rotation_lambda_arn: str | None = None
    rotation_rules: str | None = None  # JSON: AutomaticallyAfterDays, Duration, ScheduleExpression
    rotation_enabled: bool = False
    last_rotated: datetime | None = None
    next_rotation: datetime | None = None
    policy: str | None = None  # the resource policy (JSON text)


@dataclass(frozen=True, slots=True)
class SecretVersion:
    """One version of a secret's value, sealed under a data key only KMS can open."""

    secret_id: str
    version_id: str
    created: datetime
    last_accessed: datetime | None
    kind: str | None  # "string" or "binary"; None: no value yet (a rotation's AWSPENDING)
    key_arn: str | None  # the KMS key that protects the data key
    encrypted_data_key: bytes | None
    sealed_value: bytes | None

    def __repr__(self) -> str:
        return f"SecretVersion({self.secret_id!r}, {self.version_id!r}, {self.kind}, key={self.key_arn})"
