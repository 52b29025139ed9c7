"""The XKS proxy API's errors (spec v1.0.3, "Error codes"): a name, an HTTP status, a message.

The body is `{"errorName": ..., "errorMessage": ...}`. AWS KMS reads only the name (it keeps one
message of its own per name and logs ours in the customer's CloudWatch), so messages say what was
wrong without echoing what the caller sent: no key material, no plaintext, no secrets. The spec
limits a message to fewer than 512 printable ASCII characters; `XksError` enforces that.
"""

from __future__ import annotations

from typing import ClassVar


def _printable(text: str) -> str:
    """The message as the spec allows it: printable ASCII (0x20-0x7e), under 512 characters."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return cleaned[:511]


class XksError(Exception):
    """An answer other than 200: raised anywhere under a request, turned into the error body once."""

    name: ClassVar[str] = "InternalException"
    status: ClassVar[int] = 500
    default: ClassVar[str] = "The request failed."

    def __init__(self, message: str = "") -> None:
        self.message = _printable(message or self.default)
        super().__init__(self.message)


class ValidationException(XksError):
    name, status = "ValidationException", 400
    default = "The request was rejected because one or more input parameters is invalid."


class InvalidStateException(XksError):
    name, status = "InvalidStateException", 400
    default = "The request was rejected because the specified external key is disabled."


class InvalidCiphertextException(XksError):
    name, status = "InvalidCiphertextException", 400
    default = ("The request was rejected because the specified ciphertext, initialization vector, "
               "additional authenticated data or authentication tag is corrupted, missing, or otherwise invalid.")


class InvalidKeyUsageException(XksError):
    name, status = "InvalidKeyUsageException", 400
    default = "The request was rejected because the specified key does not support the requested operation."


class AuthenticationFailedException(XksError):
    name, status = "AuthenticationFailedException", 401
    default = "The request was rejected due to an invalid AWS SigV4 signature."


class KeyNotFoundException(XksError):
    name, status = "KeyNotFoundException", 404
    default = "The request was rejected because the specified external key is not found."


class InvalidUriPathException(XksError):
    name, status = "InvalidUriPathException", 404
    default = "The request was rejected because the specified URI path is not valid."


class MethodNotAllowed(XksError):
    """GET (or anything but POST) on an API's URI: the spec requires 405. Its table names no error
    for it; the body says ValidationException, the nearest name, and the Allow header says POST."""

    name, status = "ValidationException", 405
    default = "The XKS proxy APIs accept only POST."


class ThrottlingException(XksError):
    name, status = "ThrottlingException", 429
    default = "The request was rejected because the request rate is too high."


class InternalException(XksError):
    name, status = "InternalException", 500
    default = "The request failed because of an error in the XKS proxy or its key manager."


class UnsupportedOperationException(XksError):
    name, status = "UnsupportedOperationException", 501
    default = "The request was rejected because it asks for more than this proxy supports."


class DependencyTimeoutException(XksError):
    name, status = "DependencyTimeoutException", 503
    default = "The XKS proxy timed out while waiting for its HSM."
