"""A small client for the openkms admin API, signed with botocore's SigV4 signer.

Errors: an answer from the server is an `AdminError` (its AWS error code, message and the
operation called); not reaching the server is `urllib.error.URLError` (an `OSError`), as urllib
raises it, with an `ssl.SSLError` as its reason when the certificate does not verify.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


class AdminError(Exception):
    def __init__(self, code: str, message: str, operation: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.operation = operation


class AdminClient:
    def __init__(self, endpoint_url: str, access_key_id: str, secret_access_key: str, region: str,
                 session_token: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 user_agent: str = "openkms-admin-client") -> None:
        self.endpoint_url = endpoint_url.rstrip("/") + "/"
        self._credentials = Credentials(access_key_id, secret_access_key, session_token)
        self.region = region
        self._ssl_context = ssl_context
        self.user_agent = user_agent

    def __repr__(self) -> str:
        return f"AdminClient({self.endpoint_url!r}, region={self.region!r})"

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        body = json.dumps({k: v for k, v in params.items() if v is not None}).encode()
        request = AWSRequest(method="POST", url=self.endpoint_url, data=body, headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"OpenKMSAdmin.{operation}",
            "User-Agent": self.user_agent,
        })
        SigV4Auth(self._credentials, "kms", self.region).add_auth(request)
        prepared = request.prepare()
        http_request = urllib.request.Request(prepared.url, data=body, method="POST",
                                              headers=dict(prepared.headers.items()))
        try:
            with urllib.request.urlopen(http_request, timeout=30, context=self._ssl_context) as response:
                return json.loads(response.read() or b"{}")  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())
            except ValueError:
                raise AdminError("HTTPError", f"HTTP {exc.code}", operation) from None
            if not isinstance(error, dict):
                raise AdminError("HTTPError", f"HTTP {exc.code}", operation) from None
            code = str(error.get("__type", "Error")).rpartition("#")[2]
            raise AdminError(code, str(error.get("message", error.get("Message", ""))), operation) from None
