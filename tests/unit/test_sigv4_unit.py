"""openkms.api.sigv4.SigV4Verifier against botocore's own signer (botocore.auth.SigV4Auth).

Requests are signed by botocore exactly as boto3 would sign them, then handed to the verifier the
way the HTTP layer does: lower-case header names, the raw query string, the body bytes. The
credential store is an in-memory fake.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from unittest import mock
from urllib.parse import urlsplit

import pytest
from botocore.auth import SIGNED_HEADERS_BLACKLIST, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from openkms.api.sigv4 import SigV4Verifier
from openkms.errors import (
    IncompleteSignatureException,
    InvalidSignatureException,
    KMSError,
    MissingAuthenticationTokenException,
    UnrecognizedClientException,
)
from openkms.model import Principal, SecretStr

REGION = "us-east-1"
ACCESS_KEY_ID = "AKIAUNITTEST0000001"
SECRET = "unit-test-secret/with+odd=characters"
ENDPOINT = "http://127.0.0.1:8080"
PRINCIPAL = Principal("p-1", "111122223333", "alice", False, datetime(2024, 1, 1, tzinfo=UTC))
SIGNED_AT = datetime(2024, 5, 17, 12, 30, 45, tzinfo=UTC)


def lookup(access_key_id: str) -> tuple[SecretStr, Principal] | None:
    return (SecretStr(SECRET), PRINCIPAL) if access_key_id == ACCESS_KEY_ID else None


VERIFIER = SigV4Verifier(REGION, "kms", lookup)


@dataclass(frozen=True)
class Signed:
    """A request as it reaches the verifier."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def verify(self, verifier: SigV4Verifier = VERIFIER, now: datetime = SIGNED_AT) -> tuple[Principal, str]:
        return verifier.verify(self.method, self.path, self.query, self.headers, self.body, now=now)

    def with_header(self, name: str, value: str) -> Signed:
        return replace(self, headers={**self.headers, name: value})

    @property
    def signature(self) -> str:
        return self.headers["authorization"].rpartition("Signature=")[2]


def sign(body: bytes = b"{}", headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
         when: datetime = SIGNED_AT, access_key_id: str = ACCESS_KEY_ID, secret: str = SECRET,
         region: str = REGION, service: str = "kms") -> Signed:
    all_headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.ListKeys",
                   **(headers or {})}
    request = AWSRequest(method="POST", url=ENDPOINT + "/", data=body, headers=all_headers, params=params or {})
    with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
        SigV4Auth(Credentials(access_key_id, secret), service, region).add_auth(request)
    prepared = request.prepare()
    url = urlsplit(prepared.url)
    received = {name.lower(): value for name, value in prepared.headers.items()}
    received["host"] = url.netloc  # added by the HTTP client, signed by botocore
    return Signed("POST", url.path, url.query, received, body)


# -- acceptance ---------------------------------------------------------------------------------------
def test_accepts_a_boto_signed_request() -> None:
    principal, access_key_id = sign().verify()
    assert principal == PRINCIPAL
    assert access_key_id == ACCESS_KEY_ID


def test_accepts_the_same_request_twice() -> None:
    signed = sign()
    assert signed.verify() == signed.verify()


@pytest.mark.parametrize("skew", [timedelta(0), timedelta(minutes=4, seconds=59), -timedelta(minutes=5)])
def test_accepts_skew_up_to_five_minutes(skew: timedelta) -> None:
    sign().verify(now=SIGNED_AT + skew)


@pytest.mark.parametrize("skew", [timedelta(minutes=5, seconds=1), -timedelta(minutes=5, seconds=1),
                                  timedelta(hours=1), -timedelta(days=1)])
def test_rejects_skew_over_five_minutes(skew: timedelta) -> None:
    with pytest.raises(InvalidSignatureException, match=r"Signature (expired|not yet current)"):
        sign().verify(now=SIGNED_AT + skew)


printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20).filter(
    lambda n: n not in SIGNED_HEADERS_BLACKLIST and n not in {
        "host", "authorization", "x-amz-date", "x-amz-target", "content-type", "x-amz-security-token",
        "date", "x-amz-content-sha256"})
header_values = st.text(alphabet=printable, max_size=40) | st.builds(
    lambda a, b: f"{a}    {b}  ", st.text(alphabet=printable, max_size=10), st.text(alphabet=printable, max_size=10))
extra_headers = st.dictionaries(header_names, header_values, max_size=5)
query_params = st.dictionaries(st.text(alphabet=printable, min_size=1, max_size=10),
                               st.text(alphabet=printable, max_size=10), max_size=4)
bodies = st.binary(max_size=512)
moments = st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2099, 12, 31),
                       timezones=st.just(UTC)).map(lambda d: d.replace(microsecond=0))


@settings(max_examples=300)
@given(body=bodies, headers=extra_headers, when=moments)
def test_accepts_random_boto_signed_requests(body: bytes, headers: dict[str, str], when: datetime) -> None:
    signed = sign(body=body, headers=headers, when=when)
    assert signed.verify(now=when) == (PRINCIPAL, ACCESS_KEY_ID)


@settings(max_examples=300)
@given(body=bodies, params=query_params)
def test_accepts_random_query_strings(body: bytes, params: dict[str, str]) -> None:
    sign(body=body, params=params).verify()


def _canonical(value: str) -> str:
    return " ".join(value.split())


@given(body=bodies, headers=extra_headers, data=st.data())
def test_rejects_a_changed_signed_header(body: bytes, headers: dict[str, str], data: st.DataObject) -> None:
    signed = sign(body=body, headers=headers)
    names = signed.headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert set(headers) <= set(names), "botocore signs every extra header"
    name = data.draw(st.sampled_from(names), label="header")
    new_value = data.draw(header_values.filter(
        lambda v: _canonical(v) != _canonical(signed.headers[name])), label="new value")
    with pytest.raises((InvalidSignatureException, IncompleteSignatureException)):
        signed.with_header(name, new_value).verify()


@given(body=bodies, data=st.data())
def test_rejects_a_changed_body(body: bytes, data: st.DataObject) -> None:
    signed = sign(body=body)
    changed = data.draw(st.binary(max_size=512).filter(lambda b: b != body), label="changed body")
    with pytest.raises(InvalidSignatureException, match="signature we calculated does not match"):
        replace(signed, body=changed).verify()


@given(body=bodies, position=st.integers(min_value=0, max_value=63), data=st.data())
def test_rejects_a_changed_signature(body: bytes, position: int, data: st.DataObject) -> None:
    signed = sign(body=body)
    signature = signed.signature
    assert len(signature) == 64
    digit = data.draw(st.sampled_from("0123456789abcdef").filter(lambda c: c != signature[position]))
    forged = signature[:position] + digit + signature[position + 1:]
    auth = signed.headers["authorization"].replace(signature, forged)
    with pytest.raises(InvalidSignatureException):
        signed.with_header("authorization", auth).verify()


@given(params=query_params.filter(bool), data=st.data())
def test_rejects_a_changed_query(params: dict[str, str], data: st.DataObject) -> None:
    signed = sign(params=params)
    name = data.draw(st.sampled_from(sorted(params)))
    other = sign(params={**params, name: params[name] + "x"})
    with pytest.raises(InvalidSignatureException):
        replace(signed, query=other.query).verify()


def test_rejects_a_changed_path_or_method() -> None:
    signed = sign()
    with pytest.raises(InvalidSignatureException):
        replace(signed, path="/other").verify()
    with pytest.raises(InvalidSignatureException):
        replace(signed, method="PUT").verify()


# -- credentials and scope ----------------------------------------------------------------------------
def test_unknown_access_key() -> None:
    with pytest.raises(UnrecognizedClientException):
        sign(access_key_id="AKIANOBODY000000000").verify()


def test_wrong_secret() -> None:
    with pytest.raises(InvalidSignatureException, match="signature we calculated does not match"):
        sign(secret=SECRET + "x").verify()


@pytest.mark.parametrize(("region", "service", "match"), [
    ("eu-west-1", "kms", "region"),
    (REGION, "s3", "service"),
    (REGION, "kms-xks-proxy", "service"),
])
def test_wrong_scope(region: str, service: str, match: str) -> None:
    with pytest.raises(InvalidSignatureException, match=match):
        sign(region=region, service=service).verify()


def test_scope_date_must_match_x_amz_date() -> None:
    signed = sign()
    auth = signed.headers["authorization"].replace("/20240517/", "/20240516/")
    with pytest.raises(InvalidSignatureException, match="Date in Credential scope"):
        signed.with_header("authorization", auth).verify()


def test_security_tokens_are_not_accepted() -> None:
    with pytest.raises(UnrecognizedClientException):
        sign(headers={"X-Amz-Security-Token": "session"}).verify()


def test_host_must_be_signed() -> None:
    signed = sign()
    auth = signed.headers["authorization"]
    names = auth.split("SignedHeaders=")[1].split(",")[0]
    without_host = ";".join(n for n in names.split(";") if n != "host")
    with pytest.raises(InvalidSignatureException, match="host"):
        signed.with_header("authorization", auth.replace(names, without_host)).verify()


def test_signed_header_must_be_present() -> None:
    signed = sign(headers={"X-Extra": "1"})
    headers = dict(signed.headers)
    del headers["x-extra"]
    with pytest.raises(InvalidSignatureException, match="x-extra"):
        replace(signed, headers=headers).verify()


# -- malformed Authorization headers ------------------------------------------------------------------
def test_missing_authorization() -> None:
    signed = sign()
    headers = {k: v for k, v in signed.headers.items() if k != "authorization"}
    with pytest.raises(MissingAuthenticationTokenException):
        replace(signed, headers=headers).verify()


@pytest.mark.parametrize("auth", [
    "garbage",
    "Basic dXNlcjpwYXNz",
    "AWS4-HMAC-SHA256",
    "AWS4-HMAC-SHA256 ",
    "AWS4-HMAC-SHA256 Credential=AKIAUNITTEST0000001/20240517/us-east-1/kms/aws4_request",
    "AWS4-HMAC-SHA256 Credential=AKIAUNITTEST0000001/20240517/us-east-1/kms, SignedHeaders=host, Signature=00",
    "AWS4-HMAC-SHA256 Credential=, SignedHeaders=host, Signature=00",
    "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=00",
])
def test_unreadable_authorization(auth: str) -> None:
    with pytest.raises(IncompleteSignatureException):
        sign().with_header("authorization", auth).verify()


@pytest.mark.parametrize("amz_date", ["", "2024-05-17T12:30:45Z", "20240517", "yesterday"])
def test_unreadable_x_amz_date(amz_date: str) -> None:
    with pytest.raises(IncompleteSignatureException):
        sign().with_header("x-amz-date", amz_date).verify()


printable_or_not = st.text(max_size=200)


@settings(max_examples=300)
@given(auth=printable_or_not | st.builds(lambda s: "AWS4-HMAC-SHA256 " + s, printable_or_not))
def test_any_authorization_value_is_a_kms_error(auth: str) -> None:
    """Whatever arrives in the header, the verifier answers with an AWS error, never a crash."""
    with pytest.raises(KMSError) as caught:
        sign().with_header("authorization", auth).verify()
    assert caught.value.status < 500


@given(signature=st.text(min_size=1, max_size=80).filter(lambda s: "," not in s and s.strip() == s))
def test_any_signature_value_is_a_kms_error(signature: str) -> None:
    signed = sign()
    auth = signed.headers["authorization"].replace(signed.signature, signature)
    if signature == signed.signature:
        return
    with pytest.raises(InvalidSignatureException):
        signed.with_header("authorization", auth).verify()


# -- the signer (openkms.sigv4.SigV4Signer) signs as botocore does ------------------------------------
paths = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=1, max_size=12),
                 min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts)).filter(
    lambda p: "/./" not in p + "/" and "/../" not in p + "/")


@settings(max_examples=300)
@given(path=paths, body=bodies, headers=extra_headers, when=moments)
def test_the_signer_signs_as_botocore(path: str, body: bytes, headers: dict[str, str], when: datetime) -> None:
    from openkms.sigv4 import SigV4Signer

    sent = {"Host": "proxy.example:8443", "Content-Type": "application/json", **headers}
    request = AWSRequest(method="POST", url="https://proxy.example:8443" + path, data=body, headers=dict(sent))
    with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
        SigV4Auth(Credentials(ACCESS_KEY_ID, SECRET), "kms-xks-proxy", REGION).add_auth(request)
    ours = SigV4Signer(ACCESS_KEY_ID, SecretStr(SECRET), REGION, "kms-xks-proxy").sign(
        "POST", path, sent, body, now=when.timestamp())
    assert ours == {"X-Amz-Date": request.headers["X-Amz-Date"], "Authorization": request.headers["Authorization"]}
    verifier = SigV4Verifier(REGION, "kms-xks-proxy", lookup)
    received = {name.lower(): value for name, value in {**sent, **ours}.items()}
    assert verifier.verify("POST", path, "", received, body, now=when) == (PRINCIPAL, ACCESS_KEY_ID)


def test_the_signer_keeps_its_secret_out_of_its_repr() -> None:
    from openkms.sigv4 import SigV4Signer

    signer = SigV4Signer(ACCESS_KEY_ID, SecretStr(SECRET), REGION, "kms-xks-proxy")
    signer.sign("POST", "/", {"Host": "h"}, b"")
    assert SECRET not in repr(signer) and SECRET not in repr(vars(signer))
