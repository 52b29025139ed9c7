"""STS on the same endpoint, in the AWS Query protocol, so that `aws sts get-caller-identity` and
boto3's STS client work against openkms: form-encoded `Action=...&Version=2011-06-15` bodies,
SigV4 with service `sts`, XML responses. Only GetCallerIdentity so far."""

from __future__ import annotations

from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from ..errors import KMSError, ValidationException
from ..model import Caller

NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
CONTENT_TYPE = "text/xml"


class InvalidActionError(KMSError):
    code = "InvalidAction"


def is_sts_request(headers: dict[str, str]) -> bool:
    return "x-amz-target" not in headers and headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded")


def action_of(body: bytes) -> str:
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True).get("Action", [""])[0]
    except UnicodeDecodeError:
        return ""


def call(caller: Caller, body: bytes, request_id: str) -> tuple[str, bytes]:
    """(action, XML response) for a signed STS request."""
    action = action_of(body)
    if not action:
        raise ValidationException("The request must name an Action.")
    if action != "GetCallerIdentity":
        raise InvalidActionError(f"Could not find operation {action} for version 2011-06-15")
    p = caller.principal
    result = (f"<Arn>{escape(p.arn)}</Arn><UserId>{escape(p.principal_id.upper())}</UserId>"
              f"<Account>{escape(p.account_id)}</Account>")
    return action, _document(action, f"<{action}Result>{result}</{action}Result>", request_id)


def _document(action: str, inner: str, request_id: str) -> bytes:
    return (f'<{action}Response xmlns="{NAMESPACE}">{inner}'
            f"<ResponseMetadata><RequestId>{escape(request_id)}</RequestId></ResponseMetadata>"
            f"</{action}Response>").encode()


def error_document(error: KMSError, request_id: str) -> bytes:
    kind = "Receiver" if error.status >= 500 else "Sender"
    code = {"UnrecognizedClientException": "InvalidClientTokenId",
            "InvalidSignatureException": "SignatureDoesNotMatch",
            "MissingAuthenticationTokenException": "MissingAuthenticationToken"}.get(error.code, error.code)
    return (f'<ErrorResponse xmlns="{NAMESPACE}"><Error><Type>{kind}</Type><Code>{escape(code)}</Code>'
            f"<Message>{escape(error.message)}</Message></Error><RequestId>{escape(request_id)}</RequestId>"
            f"</ErrorResponse>").encode()
