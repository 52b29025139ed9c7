"""Value objects shared by every layer: frozen dataclasses and enums, no behaviour that does I/O."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime


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


class Origin(str, enum.Enum):
    AWS_KMS = "AWS_KMS"
    EXTERNAL = "EXTERNAL"


@dataclass(frozen=True, slots=True)
class KeySpecInfo:
    """What one key spec is and what it supports. New specs are new rows, not new branches."""

    name: str
    usages: tuple[KeyUsage, ...]
    encryption_algorithms: tuple[str, ...] = ()
    signing_algorithms: tuple[str, ...] = ()
    mac_algorithms: tuple[str, ...] = ()
    key_agreement_algorithms: tuple[str, ...] = ()
    material_bytes: int = 0


KEY_SPECS: dict[str, KeySpecInfo] = {
    "SYMMETRIC_DEFAULT": KeySpecInfo(
        name="SYMMETRIC_DEFAULT",
        usages=(KeyUsage.ENCRYPT_DECRYPT,),
        encryption_algorithms=("SYMMETRIC_DEFAULT",),
        material_bytes=32,
    ),
}


class PrincipalType(str, enum.Enum):
    USER = "IAMUser"
    ROOT = "Root"


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    name: str
    created: datetime


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a user of an account. `is_admin` may call the admin API."""

    principal_id: str
    account_id: str
    name: str
    is_admin: bool
    created: datetime

    @property
    def arn(self) -> str:
        return f"arn:aws:iam::{self.account_id}:user/{self.name}"


@dataclass(frozen=True, slots=True)
class AccessKey:
    access_key_id: str
    principal_id: str
    status: str  # "Active" | "Inactive"
    created: datetime
    secret: SecretStr = field(repr=False)


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

    def __reduce__(self) -> object:
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

    @property
    def arn(self) -> str:
        return key_arn(self.region, self.account_id, self.key_id)

    @property
    def spec(self) -> KeySpecInfo:
        return KEY_SPECS[self.key_spec]


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

    @property
    def account_id(self) -> str:
        return self.principal.account_id


KEY_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
KEY_ARN_RE = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):(\d{12}):key/(.+)$")
ALIAS_ARN_RE = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):(\d{12}):(alias/.+)$")
ALIAS_NAME_RE = re.compile(r"^alias/[a-zA-Z0-9/_-]+$")


def key_arn(region: str, account_id: str, key_id: str) -> str:
    return f"arn:aws:kms:{region}:{account_id}:key/{key_id}"


def alias_arn(region: str, account_id: str, alias_name: str) -> str:
    return f"arn:aws:kms:{region}:{account_id}:{alias_name}"
