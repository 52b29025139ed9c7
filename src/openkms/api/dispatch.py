"""Which API a JSON 1.1 request is for, by the prefix of its X-Amz-Target; each API knows its own
operations. A new API is one class here and one entry in `Dispatcher`'s list.

    TrentService.<Operation>    KMS: validated against botocore's model, served by the service's table
    secretsmanager.<Operation>  Secrets Manager: botocore's model, the secrets package's table
    OpenKMSAdmin.<Operation>    the admin API (accounts, users, access keys, audit queries)

(STS on the same endpoint speaks the Query protocol, not JSON 1.1: see sts.py.)
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

from ..errors import (
    AlreadyExistsException,
    DependencyTimeoutException,
    InternalServiceError,
    KMSInternalException,
    ResourceExistsException,
    UnknownOperationException,
    UnsupportedOperationException,
)
from ..lane import Lane
from ..model import Caller
from ..onloop import ON_LOOP, OnLoop
from ..quotas import CRYPTOGRAPHIC, KMS_SINGLE, PAIR_OPERATIONS, SECRETS_OF, SYMMETRIC, key_quota, pair_quota
from ..secrets import OPERATIONS as SECRETS_OPERATIONS
from ..service import OPERATIONS, Context, Op
from . import shapes
from .admin import TARGET_PREFIX as ADMIN_PREFIX
from .admin import AdminAPI

KMS_PREFIX = "TrentService."
SECRETS_PREFIX = "secretsmanager."
READ_ONLY_PREFIXES = ("Describe", "List", "Get")  # for operations no table describes
# The calls that use a custom key store's token run on its lane (keystore/pkcs11.py), those that
# use only external key stores' keys on the event loop, waiting on the proxy there (onloop.py);
# any other call that names one of their keys (DescribeKey, tags, deletion: the store's round
# trips) runs on the shared pool, so that it neither waits behind the token's traffic nor holds it up.
TOKEN_OPERATIONS = frozenset((*CRYPTOGRAPHIC, "GenerateRandom"))


class JsonApi(Protocol):
    prefix: str
    event_source: str | None  # None: kms.amazonaws.com
    signing_service: str  # the SigV4 service name its requests are signed for

    def known(self, name: str) -> bool: ...

    def blocking(self, name: str, caller_account: str | None, body: bytes) -> bool | Lane | OnLoop:
        """Whether the call may wait (on CPU or a remote key store): then it runs off the event loop,
        on the server's shared pool of blocking threads (True) or on the lane given (an HSM
        token's own thread: keystore/pkcs11.py); or ON_LOOP: on the loop, suspended while it
        waits on an XKS proxy (onloop.py)."""
        ...

    def tracked(self, name: str) -> bool: ...

    def read_only(self, name: str) -> bool: ...

    throttled: str  # the message of its ThrottlingException

    def quota(self, name: str, caller_account: str, payload: dict[str, Any]) -> str | None:
        """The request quota (quotas.py) a call counts against, None for none."""
        ...

    def call(self, caller: Caller, name: str, payload: dict[str, Any],
             noted: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(rendered response, redacted response elements). The redacted request goes in
        `noted["params"]` as soon as it parses, so a call that then fails is recorded with it."""
        ...


class KmsApi:
    prefix: str = KMS_PREFIX
    event_source: str | None = None
    signing_service: str = "kms"
    throttled: str = "You have exceeded the rate at which you may call KMS. Reduce the frequency of your calls."

    def __init__(self, service: Context) -> None:
        self._service = service
        self._model = shapes.operations()

    def known(self, name: str) -> bool:
        return name in self._model

    def blocking(self, name: str, caller_account: str | None, body: bytes) -> bool | Lane | OnLoop:
        op = OPERATIONS.get(name)
        if op is None:
            return False
        if op.blocking:
            return True
        if not self._service.keystores.any_custom_key_stores():
            return False  # the common case costs nothing more
        # A call that names a key of a custom key store (or the store itself) waits on its HSM.
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(payload, dict):
            return False
        keystores = self._service.keystores
        on_token = name in TOKEN_OPERATIONS
        cks_id = payload.get("CustomKeyStoreId")
        if cks_id:
            return (on_token and isinstance(cks_id, str) and keystores.lane(cks_id)) or True
        refs = [payload.get(m) for m in ("KeyId", "DestinationKeyId", "SourceKeyId")]
        ciphertext = payload.get("CiphertextBlob")
        if isinstance(ciphertext, str):
            refs.append(_blob_key_id(ciphertext))
        lookup = self._service.keys
        stores = list(dict.fromkeys(
            key.custom_key_store_id for ref in refs
            if isinstance(ref, str) and (key := lookup.peek(caller_account, ref)) is not None
            and key.custom_key_store_id is not None))
        if not stores:
            return False
        if on_token:
            # Only external key stores', opened here: on the loop, waiting on the proxy there.
            if all(keystores.external(s) for s in stores):
                return ON_LOOP
            # On a token's lane once its store is open here (the first call opens it).
            for cks in stores:
                if (lane := keystores.lane(cks)) is not None:
                    return lane
        return True

    def tracked(self, name: str) -> bool:
        op = OPERATIONS.get(name)
        return op is not None and op.tracked

    def quota(self, name: str, caller_account: str, payload: dict[str, Any]) -> str | None:
        single = KMS_SINGLE.get(name)
        if single is not None:
            return single
        if name == "GenerateRandom":
            return SYMMETRIC
        if name in PAIR_OPERATIONS:
            return pair_quota(payload.get("KeyPairSpec"))
        if name not in CRYPTOGRAPHIC:
            return None
        # Shared by the type of the key the call uses (ReEncrypt: the key it encrypts under).
        ref = payload.get("DestinationKeyId" if name == "ReEncrypt" else "KeyId")
        if not isinstance(ref, str) and name == "Decrypt" and isinstance(payload.get("CiphertextBlob"), str):
            ref = _blob_key_id(payload["CiphertextBlob"])
        return key_quota(self._service.keys.peek(caller_account, ref) if isinstance(ref, str) else None)

    def read_only(self, name: str) -> bool:
        op = OPERATIONS.get(name)
        return op.read_only if op is not None else name.startswith(READ_ONLY_PREFIXES)

    def call(self, caller: Caller, name: str, payload: dict[str, Any],
             noted: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return _call(self._service, self._model, OPERATIONS, KMS_PREFIX, caller, name, payload, noted)


class AdminJsonApi:
    prefix: str = ADMIN_PREFIX
    event_source: str | None = "openkms.admin"
    signing_service: str = "kms"
    throttled: str = "Rate exceeded"

    def __init__(self, admin: AdminAPI) -> None:
        self._admin = admin

    def known(self, name: str) -> bool:
        return self._admin.has(name)

    def blocking(self, name: str, caller_account: str | None, body: bytes) -> bool:
        # Registering an HSM cluster loads its module and looks for the token.
        return name == "CreateHsmCluster"

    def tracked(self, name: str) -> bool:
        return False

    def quota(self, name: str, caller_account: str, payload: dict[str, Any]) -> str | None:
        return None  # the operators' own API

    def read_only(self, name: str) -> bool:
        return name.startswith(READ_ONLY_PREFIXES)

    def call(self, caller: Caller, name: str, payload: dict[str, Any],
             noted: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if not self._admin.has(name):
            raise UnknownOperationException(f"Unknown operation {ADMIN_PREFIX}{name}.")
        noted["params"] = self._admin.redact_input(name, payload)
        result = self._admin.call(caller, name, payload)
        return result, self._admin.redact_output(name, result)


def _blob_key_id(ciphertext_b64: str) -> str | None:
    """The key id a ciphertext blob names (its bytes 1-16), read without decoding the whole blob."""
    try:
        head = base64.b64decode(ciphertext_b64[:24], validate=True)
    except (binascii.Error, ValueError):
        return None
    return str(uuid.UUID(bytes=head[1:17])) if len(head) >= 17 and head[0] in (1, 2) else None


def _call(service: Context, models: dict[str, Any], table: Mapping[str, Op], prefix: str, caller: Caller, name: str,
          payload: dict[str, Any], noted: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """An operation of a botocore-modelled API: validated and parsed by its model, served by its
    table, rendered (and redacted for the audit record) by its model."""
    model = models.get(name)
    if model is None:
        raise UnknownOperationException(f"Unknown operation {prefix}{name}.")
    op = table.get(name)
    if op is None:
        raise UnsupportedOperationException(f"{name} is not supported by this server yet.")
    params = model.parse(payload)
    noted["params"] = model.redact_input(params) if model.redact_input else None
    result = op.handler(service, caller.for_operation(name, tuple(params.get("GrantTokens") or ())), params)
    return model.render(result), model.redact_output(result) if model.redact_output else None


class SecretsManagerApi:
    """AWS Secrets Manager (JSON 1.1, X-Amz-Target secretsmanager.<Operation>, signed for the
    service secretsmanager), validated against botocore's model, served by secrets.OPERATIONS."""

    prefix: str = SECRETS_PREFIX
    event_source: str | None = "secretsmanager.amazonaws.com"
    signing_service: str = "secretsmanager"
    throttled: str = "Rate exceeded"

    def __init__(self, service: Context) -> None:
        self._service = service
        self._model = shapes.operations("secretsmanager")

    def known(self, name: str) -> bool:
        return name in self._model

    def blocking(self, name: str, caller_account: str | None, body: bytes) -> bool:
        # A value is sealed by a KMS key, which may be in a custom key store (an HSM, a proxy).
        return name in SECRETS_OPERATIONS and self._service.keystores.any_custom_key_stores()

    def tracked(self, name: str) -> bool:
        return False

    def quota(self, name: str, caller_account: str, payload: dict[str, Any]) -> str | None:
        return SECRETS_OF.get(name)

    def read_only(self, name: str) -> bool:
        op = SECRETS_OPERATIONS.get(name)
        return op.read_only if op is not None else name.startswith(READ_ONLY_PREFIXES)

    def call(self, caller: Caller, name: str, payload: dict[str, Any],
             noted: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        try:
            return _call(self._service, self._model, SECRETS_OPERATIONS, SECRETS_PREFIX, caller, name, payload,
                         noted)
        except (KMSInternalException, DependencyTimeoutException) as exc:
            raise InternalServiceError(exc.message) from None  # Secrets Manager's own codes, not KMS's
        except AlreadyExistsException as exc:
            raise ResourceExistsException(exc.message) from None


class Dispatcher:
    def __init__(self, apis: list[JsonApi]) -> None:
        self.apis = apis

    def route(self, target: str) -> tuple[JsonApi, str] | None:
        """The API of an X-Amz-Target and the operation's name, or None for no API's prefix."""
        for api in self.apis:
            if target.startswith(api.prefix):
                return api, target[len(api.prefix):]
        return None
