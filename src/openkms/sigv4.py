"""AWS Signature Version 4: the algorithm, shared by the server's verifier (api/sigv4.py) and the
signer of the requests openkms itself sends (keystore/xks.py, to XKS proxies).

It is the algorithm botocore's `SigV4Auth` implements (tests check that both sign alike and that
the verifier accepts what either signs); it is written out because building a botocore
AWSRequest per call costs more than the rest of an XKS call's work on the client side.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote

from .model import SecretStr

ALGORITHM = "AWS4-HMAC-SHA256"


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    k = hmac.digest(("AWS4" + secret).encode(), date.encode(), "sha256")
    k = hmac.digest(k, region.encode(), "sha256")
    k = hmac.digest(k, service.encode(), "sha256")
    return hmac.digest(k, b"aws4_request", "sha256")


def canonical_query(query: str) -> str:
    if not query:
        return ""
    pairs = parse_qsl(query, keep_blank_values=True)
    encoded = sorted((quote(k, safe='-_.~'), quote(v, safe='-_.~')) for k, v in pairs)  # SigV4 sorts encoded
    return "&".join(f"{k}={v}" for k, v in encoded)


def canonical_value(value: str) -> str:
    return " ".join(value.split())


def string_to_sign(method: str, path: str, query: str, headers: Mapping[str, str], signed_names: list[str],
                   body: bytes, amz_date: str, scope: str) -> str:
    """`headers` has lower-case names; `signed_names` are the ones signed, sorted."""
    lines = "".join(f"{name}:{canonical_value(headers[name])}\n" for name in signed_names)
    canonical = "\n".join((method, path or "/", canonical_query(query), lines, ";".join(signed_names),
                           hashlib.sha256(body).hexdigest()))
    return "\n".join((ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()))


class SigV4Signer:
    """Signs requests for one credential, region and service, as botocore's SigV4Auth does (every
    header given is signed; the path is sent and signed as `quote(path, safe="/~")`, with no dot
    segments to normalise). The derived signing key is kept for its day."""

    def __init__(self, access_key_id: str, secret: SecretStr, region: str, service: str) -> None:
        self.access_key_id = access_key_id
        self._secret = secret
        self.region = region
        self.service = service
        self._key: tuple[str, bytes] = ("", b"")

    def __repr__(self) -> str:
        return f"SigV4Signer({self.access_key_id[:4]}..., {self.region}, {self.service})"

    def sign(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
             now: float | None = None) -> dict[str, str]:
        """The headers to add to the request: X-Amz-Date and Authorization. `headers` are the
        request's others (Host among them), all signed."""
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        date = amz_date[:8]
        if self._key[0] != date:
            self._key = (date, signing_key(self._secret.reveal(), date, self.region, self.service))
        lowered = {name.lower(): value for name, value in headers.items()}
        lowered["x-amz-date"] = amz_date
        names = sorted(lowered)
        scope = f"{date}/{self.region}/{self.service}/aws4_request"
        text = string_to_sign(method, quote(path, safe="/~"), "", lowered, names, body, amz_date, scope)
        signature = hmac.new(self._key[1], text.encode(), "sha256").hexdigest()
        return {"X-Amz-Date": amz_date,
                "Authorization": f"{ALGORITHM} Credential={self.access_key_id}/{scope}, "
                                 f"SignedHeaders={';'.join(names)}, Signature={signature}"}
