"""A small client for the openkms admin API, signed with botocore's SigV4 signer."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


class AdminError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AdminClient:
    def __init__(self, endpoint_url: str, access_key_id: str, secret_access_key: str, region: str) -> None:
        self.endpoint_url = endpoint_url.rstrip("/") + "/"
        self._credentials = Credentials(access_key_id, secret_access_key)
        self.region = region

    def __repr__(self) -> str:
        return f"AdminClient({self.endpoint_url!r}, region={self.region!r})"

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        body = json.dumps({k: v for k, v in params.items() if v is not None}).encode()
        request = AWSRequest(method="POST", url=self.endpoint_url, data=body, headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"OpenKMSAdmin.{operation}",
        })
        SigV4Auth(self._credentials, "kms", self.region).add_auth(request)
        prepared = request.prepare()
        http_request = urllib.request.Request(prepared.url, data=body, method="POST",
                                              headers=dict(prepared.headers.items()))
        try:
            with urllib.request.urlopen(http_request, timeout=30) as response:
                return json.loads(response.read() or b"{}")  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())
            except ValueError:
                raise AdminError("HTTPError", f"HTTP {exc.code}") from None
            raise AdminError(error.get("__type", "Error"), error.get("message", "")) from None
