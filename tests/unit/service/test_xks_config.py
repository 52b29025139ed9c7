"""The XksProxy* members of CreateCustomKeyStore and UpdateCustomKeyStore, checked before any proxy
is asked: the endpoint's form (openkms's deviations from AWS: a port, an IP address, http:// only
where the operator allows it), connectivity, and the members each store type takes."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openkms.errors import KMSError, UnsupportedOperationException, ValidationException
from openkms.keystore.xks import XksOptions
from openkms.service import xks

CREDENTIAL = {"AccessKeyId": "ABCDEFGHIJKLMNOPQRSTUVWX", "RawSecretAccessKey": "s" * 44}


def ctx(allow_http: bool = False) -> Any:
    return SimpleNamespace(keystores=SimpleNamespace(xks_options=XksOptions(allow_http=allow_http)))


def params(**extra: Any) -> dict[str, Any]:
    return {"CustomKeyStoreName": "s", "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
            "XksProxyUriEndpoint": "https://xks.example.com", "XksProxyUriPath": "/p/kms/xks/v1",
            "XksProxyConnectivity": "PUBLIC_ENDPOINT", "XksProxyAuthenticationCredential": CREDENTIAL, **extra}


@pytest.mark.parametrize("endpoint, normalised", [
    ("https://xks.example.com", "https://xks.example.com"),
    ("https://xks.internal:8443", "https://xks.internal:8443"),
    ("https://10.0.0.7:443", "https://10.0.0.7:443"),
    ("https://[fd00::7]:8443", "https://[fd00::7]:8443"),
    ("https://xks.example.com/", "https://xks.example.com"),
])
def test_endpoints_openkms_takes(endpoint: str, normalised: str) -> None:
    config, secret = xks.new_store_config(ctx(), params(XksProxyUriEndpoint=endpoint))
    assert config.uri_endpoint == normalised
    assert secret.reveal() == CREDENTIAL["RawSecretAccessKey"] and CREDENTIAL["RawSecretAccessKey"] not in repr(config)


@pytest.mark.parametrize("endpoint", [
    "http://xks.example.com", "ftp://xks.example.com", "https://xks.example.com/path", "https://user@xks.example.com",
    "https://xks.example.com?x=1", "https://xks.example.com:99999", "https://", "xks.example.com",
])
def test_endpoints_refused(endpoint: str) -> None:
    with pytest.raises(ValidationException):
        xks.new_store_config(ctx(), params(XksProxyUriEndpoint=endpoint))


def test_http_only_where_the_operator_allows_it() -> None:
    with pytest.raises(ValidationException, match="OPENKMS_XKS_ALLOW_HTTP"):
        xks.new_store_config(ctx(), params(XksProxyUriEndpoint="http://127.0.0.1:8080"))
    config, _ = xks.new_store_config(ctx(allow_http=True), params(XksProxyUriEndpoint="http://127.0.0.1:8080"))
    assert config.uri_endpoint == "http://127.0.0.1:8080"


@pytest.mark.parametrize("extra, error", [
    ({"XksProxyConnectivity": "VPC_ENDPOINT_SERVICE"}, UnsupportedOperationException),
    ({"XksProxyVpcEndpointServiceName": "com.amazonaws.vpce.us-east-1.vpce-svc-1"}, UnsupportedOperationException),
    ({"XksProxyConnectivity": None}, ValidationException),
    ({"XksProxyUriPath": None}, ValidationException),
    ({"XksProxyAuthenticationCredential": None}, ValidationException),
    ({"KeyStorePassword": "kmsuser-pin"}, ValidationException),
    ({"CloudHsmClusterId": "cluster-abcdefghijk"}, ValidationException),
])
def test_members_an_external_key_store_takes(extra: dict[str, Any], error: type[KMSError]) -> None:
    with pytest.raises(error):
        xks.new_store_config(ctx(), params(**extra))


@given(st.text(max_size=80))
def test_any_endpoint_text_is_taken_or_refused_cleanly(text: str) -> None:
    """Never another exception (a ValueError here would be a 500)."""
    with contextlib.suppress(ValidationException):
        config, _ = xks.new_store_config(ctx(allow_http=True), params(XksProxyUriEndpoint=text))
        assert config.uri_endpoint.startswith(("https://", "http://"))
