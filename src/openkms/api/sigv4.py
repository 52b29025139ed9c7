"""Verification of AWS Signature Version 4 on incoming requests.

The server rebuilds the canonical request from what arrived, over exactly the headers the client
says it signed, and compares signatures in constant time. The algorithm (openkms/sigv4.py, shared
with the signer of openkms's own requests) is the one botocore's `SigV4Auth` signs with (tests
check the two agree on random requests); it is written out because building a botocore AWSRequest
per call would cost more than the rest of an Encrypt.

Errors, as AWS names them: no Authorization header -> MissingAuthenticationTokenException; a
header that cannot be read -> IncompleteSignatureException; an unknown or inactive access key ->
UnrecognizedClientException; a wrong signature, scope or a clock skew over 5 minutes ->
InvalidSignatureException. A correctly signed request replayed within the window is accepted.

The verifier is generic in what a credential lookup returns beside the secret (the KMS API's
Principal; the XKS proxy's access key id), so that another API signed with SigV4 reuses it as is.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from ..errors import (
    IncompleteSignatureException,
    InvalidSignatureException,
    MissingAuthenticationTokenException,
    UnrecognizedClientException,
)
from ..model import Principal, SecretStr
from ..sigv4 import ALGORITHM, signing_key, string_to_sign

MAX_SKEW = timedelta(minutes=5)
P = TypeVar("P")  # what a lookup returns beside the secret: the caller, for the API that verifies
Lookup = Callable[[str], "tuple[SecretStr, Principal] | None"]


_AMZ_DATE_RE = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z\Z", re.ASCII)


def _parse_amz_date(value: str) -> datetime:
    """X-Amz-Date (yyyymmddThhmmssZ); strptime costs more than the rest of the signature check."""
    m = _AMZ_DATE_RE.match(value)
    try:
        if m is None:
            raise ValueError
        year, month, day, hour, minute, second = (int(g) for g in m.groups())
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise IncompleteSignatureException("The request must carry a valid X-Amz-Date header.") from None


class SigV4Verifier(Generic[P]):
    def __init__(self, region: str, service: str, lookup: Callable[[str], tuple[SecretStr, P] | None]) -> None:
        self.region = region
        self.service = service
        self._lookup = lookup
        self._keys: dict[tuple[str, str, str], bytes] = {}

    def _key_for(self, secret: str, date: str, service: str) -> bytes:
        cache_key = (secret, date, service)
        key = self._keys.get(cache_key)
        if key is None:
            if len(self._keys) > 4096:
                self._keys.clear()
            key = self._keys[cache_key] = signing_key(secret, date, self.region, service)
        return key

    def verify(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
               now: datetime | None = None, service: str | None = None) -> tuple[P, str]:
        """Check the request's signature. `headers` has lower-case names (repeated ones joined by ',').
        `service` is the signing service the request must be scoped to (default: this verifier's)."""
        auth = parse_authorization(headers)
        found = self._lookup(auth.access_key_id)
        if found is None:
            raise UnrecognizedClientException("The security token included in the request is invalid.")
        if "x-amz-security-token" in headers:
            raise UnrecognizedClientException("The security token included in the request is invalid.")
        secret, principal = found

        now = now or datetime.now(UTC)
        amz_date, signed_at = auth.amz_date, auth.signed_at
        if signed_at < now - MAX_SKEW:
            raise InvalidSignatureException(
                f"Signature expired: {amz_date} is now earlier than "
                f"{(now - MAX_SKEW).strftime('%Y%m%dT%H%M%SZ')} ({now.strftime('%Y%m%dT%H%M%SZ')} - 5 min.)")
        if signed_at > now + MAX_SKEW:
            raise InvalidSignatureException(
                f"Signature not yet current: {amz_date} is still later than "
                f"{(now + MAX_SKEW).strftime('%Y%m%dT%H%M%SZ')} ({now.strftime('%Y%m%dT%H%M%SZ')} + 5 min.)")
        self.check_scope(auth, service or self.service)
        date, region, scope_service = auth.date, auth.region, auth.service

        signed = auth.signed_headers
        signed_names: Sequence[str] = signed.split(";")
        if "host" not in signed_names:
            raise InvalidSignatureException("The host header must be signed.")
        for name in signed_names:
            if name not in headers:
                raise InvalidSignatureException(f"Header {name} is listed as signed but is not present.")
        text = string_to_sign(method, path, query, headers, list(signed_names), body, amz_date,
                              f"{date}/{region}/{scope_service}/aws4_request")
        expected = hmac.new(self._key_for(secret.reveal(), date, scope_service), text.encode(), "sha256").hexdigest()
        if not hmac.compare_digest(expected.encode(), auth.signature.encode("utf-8", "surrogatepass")):
            raise InvalidSignatureException(
                "The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method.")
        return principal, auth.access_key_id

    def check_scope(self, auth: Authorization, service: str) -> None:
        """The credential scope names the request's date, this server's region and `service`."""
        if auth.date != auth.amz_date[:8]:
            raise InvalidSignatureException(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP.")
        if auth.service != service:
            raise InvalidSignatureException(f"Credential should be scoped to correct service: '{service}'.")
        if auth.region != self.region:
            raise InvalidSignatureException(
                f"Credential should be scoped to a valid region. This server serves '{self.region}'.")


@dataclass(frozen=True)
class Authorization:
    """What a SigV4 Authorization header (and X-Amz-Date) says, read but not yet checked."""

    access_key_id: str
    date: str  # the credential scope's yyyymmdd
    region: str
    service: str
    signed_headers: str
    signature: str
    amz_date: str
    signed_at: datetime


def parse_authorization(headers: dict[str, str]) -> Authorization:
    """The request's Authorization header, read; MissingAuthenticationTokenException or
    IncompleteSignatureException if it is absent or cannot be read."""
    auth = headers.get("authorization")
    if not auth:
        raise MissingAuthenticationTokenException("Missing Authentication Token")
    if not auth.startswith(ALGORITHM + " "):
        raise IncompleteSignatureException(
            f"Authorization header requires the {ALGORITHM} algorithm.")
    fields: dict[str, str] = {}
    for part in auth[len(ALGORITHM) + 1:].split(","):
        name, sep, value = part.strip().partition("=")
        if sep:
            fields[name] = value
    credential, signed, signature = fields.get("Credential"), fields.get("SignedHeaders"), fields.get("Signature")
    if not credential or not signed or not signature:
        raise IncompleteSignatureException(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters.")
    scope = credential.split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise IncompleteSignatureException(
            "Credential must have the form <AccessKeyId>/<date>/<region>/<service>/aws4_request.")
    access_key_id, date, region, scope_service, _ = scope
    amz_date = headers.get("x-amz-date", "")
    return Authorization(access_key_id, date, region, scope_service, signed, signature, amz_date,
                         _parse_amz_date(amz_date))
