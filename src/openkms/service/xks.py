"""External key stores (CustomKeyStoreType EXTERNAL_KEY_STORE): the XksProxy* members of
CreateCustomKeyStore and UpdateCustomKeyStore, connecting, and CreateKey with an XksKeyId, as AWS
defines them. The proxy client and the double encryption are in keystore/xks.py.

Create, Update and Connect call the proxy's GetHealthStatus with the values they would save, as AWS
does; CreateKey asks the proxy for the external key's metadata (AES_256, ENCRYPT and DECRYPT,
ENABLED). The credential's secret is sealed under the root key and never returned.

Where AWS's rules cannot hold on a private network, openkms deviates (README, "Hold your own key"):
the endpoint may carry a port and be an IP address or a private name; its certificate is checked
against the operator's CA bundle; `http://` only where the operator allows it; connectivity
VPC_ENDPOINT_SERVICE is an AWS network feature and answers UnsupportedOperationException.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from ..errors import (
    CustomKeyStoreInvalidStateException,
    DependencyTimeoutException,
    KMSError,
    UnsupportedOperationException,
    ValidationException,
    XksKeyAlreadyInUseException,
    XksKeyInvalidConfigurationException,
    XksKeyNotFoundException,
    XksProxyIncorrectAuthenticationCredentialException,
    XksProxyInvalidConfigurationException,
    XksProxyInvalidResponseException,
    XksProxyUriInUseException,
    XksProxyUriUnreachableException,
)
from ..keystore.xks import XksClient, XksError, XksHealth
from ..model import ConnectionState, CustomKeyStore, SecretStr, XksProxyConfig
from ..storage import Tx
from .context import Context, Params

EXTERNAL = "EXTERNAL_KEY_STORE"
PUBLIC = "PUBLIC_ENDPOINT"
VPC = "VPC_ENDPOINT_SERVICE"
XKS_MEMBERS = ("XksProxyUriEndpoint", "XksProxyUriPath", "XksProxyVpcEndpointServiceName",
               "XksProxyVpcEndpointServiceOwner", "XksProxyAuthenticationCredential", "XksProxyConnectivity")
# Members that change only while the store is DISCONNECTED (AWS); the others also while CONNECTED.
XKS_NEEDS_DISCONNECTED = ("XksProxyUriEndpoint", "XksProxyConnectivity", "XksProxyVpcEndpointServiceName",
                          "XksProxyVpcEndpointServiceOwner")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")

# How a failed GetHealthStatus ends a Create or an Update, and a Connect (ConnectionErrorCode).
_CREATE_ERRORS: dict[str, type[KMSError]] = {
    "auth": XksProxyIncorrectAuthenticationCredentialException,
    "uri_path": XksProxyInvalidConfigurationException, "denied": XksProxyInvalidConfigurationException,
    "unreachable": XksProxyUriUnreachableException, "timeout": XksProxyUriUnreachableException,
    "tls": XksProxyUriUnreachableException, "throttled": XksProxyUriUnreachableException,
    "dependency_timeout": XksProxyUriUnreachableException, "internal": XksProxyUriUnreachableException,
}
CONNECTION_ERRORS = {
    "auth": "INVALID_CREDENTIALS", "denied": "XKS_PROXY_ACCESS_DENIED", "uri_path": "XKS_PROXY_INVALID_CONFIGURATION",
    "tls": "XKS_PROXY_INVALID_TLS_CONFIGURATION", "timeout": "XKS_PROXY_TIMED_OUT",
    "unreachable": "XKS_PROXY_NOT_REACHABLE", "dependency_timeout": "XKS_PROXY_NOT_REACHABLE",
    "internal": "XKS_PROXY_NOT_REACHABLE", "throttled": "XKS_PROXY_NOT_REACHABLE",
}


def _endpoint(ctx: Context, value: str) -> str:
    """The proxy's endpoint: https://host[:port] (http:// where the operator allows it)."""
    form = ValidationException("XksProxyUriEndpoint must be a scheme, a host and an optional port, with no path.")
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError when out of range
    except ValueError:
        raise form from None
    allowed = ("https", "http") if ctx.keystores.xks_options.allow_http else ("https",)
    if parts.scheme not in allowed:
        raise ValidationException("XksProxyUriEndpoint must begin with https://" +
                                  ("" if ctx.keystores.xks_options.allow_http else
                                   " (this server refuses http:// unless OPENKMS_XKS_ALLOW_HTTP is set)") + ".")
    if not _HOST.match(parts.netloc) or parts.path not in ("", "/") or parts.query or parts.fragment or \
            "@" in parts.netloc or (port is not None and not 0 < port < 65536):
        raise form
    return f"{parts.scheme}://{parts.netloc}"


def _connectivity(p: Params, default: str | None) -> str | None:
    value = p.get("XksProxyConnectivity") or default
    if value == VPC or p.get("XksProxyVpcEndpointServiceName") or p.get("XksProxyVpcEndpointServiceOwner"):
        raise UnsupportedOperationException("XksProxyConnectivity VPC_ENDPOINT_SERVICE is not supported by this "
                                            "server: use PUBLIC_ENDPOINT with an endpoint this server reaches.")
    return value


def _credential(p: Params) -> tuple[str, SecretStr] | None:
    credential = p.get("XksProxyAuthenticationCredential")
    if credential is None:
        return None
    return credential["AccessKeyId"], SecretStr(credential["RawSecretAccessKey"])


def check_health(client: XksClient) -> None:
    """GetHealthStatus before a Create or an Update is saved: AWS's exception for each failure."""
    try:
        client.health("CreateCustomKeyStore")
    except XksError as exc:
        raise _CREATE_ERRORS.get(exc.cause, XksProxyInvalidResponseException)(exc.message) from None
    finally:
        client.close()


def connection_error(client: XksClient) -> tuple[str | None, str | None]:
    """Connect: (None, None) if the proxy answers healthy, else (ConnectionErrorCode, why)."""
    try:
        client.health("ConnectCustomKeyStore")
        return None, None
    except XksError as exc:
        return CONNECTION_ERRORS.get(exc.cause, "XKS_PROXY_INVALID_RESPONSE"), exc.message
    finally:
        client.close()


def new_store_config(ctx: Context, p: Params) -> tuple[XksProxyConfig, SecretStr]:
    """CreateCustomKeyStore's XksProxy* members, checked (the proxy is asked by the caller)."""
    for member in ("CloudHsmClusterId", "TrustAnchorCertificate", "KeyStorePassword"):
        if p.get(member) is not None:
            raise ValidationException(f"{member} is not valid for a custom key store of type {EXTERNAL}.")
    connectivity = _connectivity(p, None)
    for member in ("XksProxyUriEndpoint", "XksProxyUriPath", "XksProxyAuthenticationCredential"):
        if p.get(member) is None:
            raise ValidationException(f"{member} is required for a custom key store of type {EXTERNAL}.")
    if connectivity is None:
        raise ValidationException(f"XksProxyConnectivity is required for a custom key store of type {EXTERNAL}.")
    credential = _credential(p)
    assert credential is not None
    return XksProxyConfig(_endpoint(ctx, p["XksProxyUriEndpoint"]), p["XksProxyUriPath"], connectivity,
                          credential[0]), credential[1]


def updated_config(ctx: Context, row: CustomKeyStore, p: Params) -> tuple[XksProxyConfig, SecretStr | None] | None:
    """UpdateCustomKeyStore's XksProxy* members over the stored ones: (the new configuration, the
    new secret or None to keep it), or None when no XksProxy* member is given."""
    if not any(p.get(m) is not None for m in XKS_MEMBERS):
        return None
    if p.get("CloudHsmClusterId") or p.get("KeyStorePassword"):
        raise ValidationException(f"CloudHsmClusterId and KeyStorePassword are not valid for a custom key store "
                                  f"of type {EXTERNAL}.")
    assert row.xks is not None
    connectivity = _connectivity(p, row.xks.connectivity)
    credential = _credential(p)
    endpoint = _endpoint(ctx, p["XksProxyUriEndpoint"]) if p.get("XksProxyUriEndpoint") else row.xks.uri_endpoint
    config = XksProxyConfig(endpoint, p.get("XksProxyUriPath") or row.xks.uri_path, connectivity or PUBLIC,
                            credential[0] if credential else row.xks.access_key_id)
    return config, credential[1] if credential else None


def check_uri_free(tx: Tx, account_id: str, config: XksProxyConfig, except_store: str | None = None) -> None:
    if any(s.custom_key_store_id != except_store
           for s in tx.key_stores.with_xks_uri(account_id, config.uri_endpoint, config.uri_path)):
        raise XksProxyUriInUseException(
            "Another external key store in this account uses the same XksProxyUriEndpoint and XksProxyUriPath.")


def entry_members(row: CustomKeyStore, health: XksHealth | None) -> dict[str, Any]:
    """DescribeCustomKeyStores: XksProxyConfiguration (the secret is never shown); and, an openkms
    extension (api/shapes.py MODEL_EXTENSIONS), XksProxyHealth: what this node last learnt of the
    proxy's health, while the store is connected."""
    assert row.xks is not None
    members: dict[str, Any] = {"XksProxyConfiguration": {
        "Connectivity": row.xks.connectivity, "AccessKeyId": row.xks.access_key_id,
        "UriEndpoint": row.xks.uri_endpoint, "UriPath": row.xks.uri_path}}
    if health is not None and row.connection_state is ConnectionState.CONNECTED:
        members["XksProxyHealth"] = {"Status": health.status, "CheckedAt": health.checked, "Detail": health.detail}
    return members


def check_external_key(ctx: Context, row: CustomKeyStore, xks_key_id: str) -> None:
    """CreateKey: the external key must exist and be AES_256, for ENCRYPT and DECRYPT, ENABLED, and
    no other key of the store may use it."""
    with ctx.store.begin() as tx:
        if tx.key_stores.key_with_xks_key_id(row.custom_key_store_id, xks_key_id) is not None:
            raise XksKeyAlreadyInUseException(f"External key {xks_key_id} is already used by a KMS key in "
                                              f"custom key store {row.custom_key_store_id}.")
    client = ctx.keystores.xks_client(row.custom_key_store_id)
    try:
        metadata = client.metadata(xks_key_id, "CreateKey")
    except XksError as exc:
        if exc.cause == "key_not_found":
            raise XksKeyNotFoundException(f"The external key store proxy has no key {xks_key_id}.") from None
        if exc.cause == "timeout":
            raise DependencyTimeoutException(exc.message) from None
        raise CustomKeyStoreInvalidStateException(exc.message) from None
    finally:
        client.close()
    usage = set(metadata["keyUsage"])
    if metadata["keySpec"] != "AES_256" or not {"ENCRYPT", "DECRYPT"} <= usage or metadata["keyStatus"] != "ENABLED":
        raise XksKeyInvalidConfigurationException(
            f"External key {xks_key_id} must be an AES_256 key for ENCRYPT and DECRYPT, ENABLED; the proxy says "
            f"{metadata['keySpec'][:32]}, {sorted(str(u)[:16] for u in usage)[:4]}, {metadata['keyStatus'][:32]}.")
