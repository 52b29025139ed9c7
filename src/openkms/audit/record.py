"""The audit record of one API call, shaped like a CloudTrail event for KMS.

Only non-secret values go in: request parameters and response elements pass through a redactor
derived from botocore's model that drops every blob (plaintexts, ciphertexts, signatures, MACs,
wrapped key material, import tokens) and every member the model marks sensitive.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

EVENT_SOURCE = "kms.amazonaws.com"


_second: list[Any] = [0, ""]


def event_time_text(now: float) -> str:
    """CloudTrail's second-precision UTC time; formatted once per second, not once per call."""
    second = int(now)
    if _second[0] != second:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
    return str(_second[1])


_random: list[Any] = [b"", 0]
_random_lock = threading.Lock()
_RANDOM_CHUNK = 16 * 512


def new_id() -> str:
    """A random (version 4) UUID string, without the cost of the uuid module. The random bytes are
    read from the OS 512 ids at a time: each os.urandom is a system call that releases the GIL, and
    with other threads about, the event loop's thread may then wait to get it back."""
    with _random_lock:  # handlers also run on worker threads: no two may take the same bytes
        buf, pos = _random
        if pos >= len(buf):
            buf, pos = os.urandom(_RANDOM_CHUNK), 0
        _random[0], _random[1] = buf, pos + 16
    raw = bytearray(buf[pos:pos + 16])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def build_event(*, request_id: str, event_id: str, event_time: float, event_name: str, region: str,
                source_ip: str, user_agent: str, principal: Any | None, access_key_id: str | None,
                request_parameters: dict[str, Any] | None, response_elements: dict[str, Any] | None,
                error_code: str | None, error_message: str | None,
                resources: list[tuple[str, str]], read_only: bool,
                event_source: str | None = None) -> dict[str, Any]:
    identity: dict[str, Any]
    if principal is not None:
        identity = {"type": "IAMUser", "principalId": principal.principal_id, "arn": principal.arn,
                    "accountId": principal.account_id, "accessKeyId": access_key_id, "userName": principal.name}
    else:
        identity = {"type": "Unknown"}
        if access_key_id:
            identity["accessKeyId"] = access_key_id
    recipient = resources[0][1] if resources else (principal.account_id if principal is not None else None)
    event: dict[str, Any] = {
        "eventVersion": "1.08",
        "eventTime": event_time_text(event_time),
        "eventSource": event_source or EVENT_SOURCE,
        "eventName": event_name,
        "awsRegion": region,
        "sourceIPAddress": source_ip,
        "userAgent": user_agent,
        "userIdentity": identity,
        "requestParameters": request_parameters,
        "responseElements": response_elements,
        "requestID": request_id,
        "eventID": event_id,
        "readOnly": read_only,
        "resources": [{"accountId": account, "type": "AWS::KMS::Key", "ARN": arn} for arn, account in resources],
        "eventType": "AwsApiCall",
        "managementEvent": True,
        "eventCategory": "Management",
        "recipientAccountId": recipient,
    }
    if error_code is not None:
        event["errorCode"] = error_code
        event["errorMessage"] = error_message
    return event
