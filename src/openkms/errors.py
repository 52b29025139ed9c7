"""The one error tree of openkms, named after the AWS KMS error codes.

Every error the service raises on purpose is a subclass of :class:`KMSError`. Each class knows the
``__type`` code a client sees and the HTTP status AWS uses for it, so the API layer renders any of
them without a lookup table::

    KMSError
     +-- client errors (HTTP 400 unless noted)
     |    ValidationException, SerializationException, UnknownOperationException,
     |    UnrecognizedClientException, InvalidSignatureException,
     |    MissingAuthenticationTokenException (403), IncompleteSignatureException,
     |    AccessDeniedException, NotFoundException, AlreadyExistsException,
     |    DeleteConflictException (409, admin API: an account that still holds keys),
     |    DisabledException, KMSInvalidStateException, InvalidCiphertextException,
     |    KMSInvalidSignatureException, KMSInvalidMacException, IncorrectKeyMaterialException,
     |    ExpiredImportTokenException, InvalidImportTokenException, MalformedPolicyDocumentException,
     |    IncorrectKeyException, InvalidKeyUsageException, InvalidAliasNameException,
     |    InvalidMarkerException, InvalidGrantTokenException, LimitExceededException, TagException,
     |    UnsupportedOperationException, DryRunOperationException, RequestEntityTooLarge (413),
     |    KeyStoreUnavailable (a KMSInvalidStateException: a key store's backend cannot answer),
     |    CustomKeyStoreNotFoundException, CustomKeyStoreNameInUseException,
     |    CustomKeyStoreInvalidStateException, CustomKeyStoreHasCMKsException,
     |    CloudHsmClusterNotFoundException, CloudHsmClusterInUseException,
     |    CloudHsmClusterNotRelatedException, IncorrectTrustAnchorException
     |    XksProxy*Exception, XksKey*Exception (external key stores), ThrottlingException
     |    Secrets Manager: ResourceNotFoundException, ResourceExistsException,
     |    InvalidRequestException, InvalidParameterException, InvalidNextTokenException,
     |    EncryptionFailure, DecryptionFailure, PreconditionNotMetException, PublicPolicyException
     +-- server errors
          KMSInternalException (500), DependencyTimeoutException (503), InternalServiceError (500)

Messages are written for the caller and never carry key material, plaintext or secrets.
Errors of libraries are translated into this tree where those libraries are called.
"""

from __future__ import annotations


class KMSError(Exception):
    """Base of every error openkms raises on purpose."""

    code: str = "KMSInternalException"
    status: int = 400

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ValidationException(KMSError):
    code = "ValidationException"

    @classmethod
    def detected(cls, violations: list[str]) -> ValidationException:
        """AWS's message: `2 validation errors detected: <violation>; <violation>`."""
        n = len(violations)
        return cls(f"{n} validation error{'s' if n > 1 else ''} detected: " + "; ".join(violations))

    @classmethod
    def null_members(cls, members: list[str]) -> ValidationException:
        """Members that must not be null, by their names in the request (`KeyId`)."""
        return cls.detected([f"Value null at '{m[0].lower() + m[1:]}' failed to satisfy constraint: "
                             "Member must not be null" for m in members])


class SerializationException(KMSError):
    code = "SerializationException"


class UnknownOperationException(KMSError):
    code = "UnknownOperationException"


class UnrecognizedClientException(KMSError):
    code = "UnrecognizedClientException"


class InvalidSignatureException(KMSError):
    code = "InvalidSignatureException"


class IncompleteSignatureException(KMSError):
    code = "IncompleteSignatureException"


class MissingAuthenticationTokenException(KMSError):
    code = "MissingAuthenticationTokenException"
    status = 403


class AccessDeniedException(KMSError):
    code = "AccessDeniedException"


class NotFoundException(KMSError):
    code = "NotFoundException"


class AlreadyExistsException(KMSError):
    code = "AlreadyExistsException"


class DeleteConflictException(KMSError):
    """IAM's code for deleting an entity something still depends on (an account holding keys)."""

    code = "DeleteConflictException"
    status = 409


class DisabledException(KMSError):
    code = "DisabledException"


class KMSInvalidStateException(KMSError):
    code = "KMSInvalidStateException"


class InvalidCiphertextException(KMSError):
    """Any failure to decrypt a blob. Deliberately says nothing about which check failed."""

    code = "InvalidCiphertextException"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or "The ciphertext is invalid.")


class KMSInvalidSignatureException(KMSError):
    code = "KMSInvalidSignatureException"


class KMSInvalidMacException(KMSError):
    code = "KMSInvalidMacException"


class MalformedPolicyDocumentException(KMSError):
    """A policy that is not valid JSON or breaks the policy grammar."""

    code = "MalformedPolicyDocumentException"


class IncorrectKeyMaterialException(KMSError):
    code = "IncorrectKeyMaterialException"


class ExpiredImportTokenException(KMSError):
    code = "ExpiredImportTokenException"


class InvalidImportTokenException(KMSError):
    code = "InvalidImportTokenException"


class IncorrectKeyException(KMSError):
    code = "IncorrectKeyException"


class InvalidKeyUsageException(KMSError):
    code = "InvalidKeyUsageException"


class InvalidAliasNameException(KMSError):
    code = "InvalidAliasNameException"


class InvalidMarkerException(KMSError):
    code = "InvalidMarkerException"


class InvalidGrantTokenException(KMSError):
    code = "InvalidGrantTokenException"


class LimitExceededException(KMSError):
    code = "LimitExceededException"


class TagException(KMSError):
    code = "TagException"


class UnsupportedOperationException(KMSError):
    code = "UnsupportedOperationException"


class DryRunOperationException(KMSError):
    code = "DryRunOperationException"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or "The request would have succeeded, but the DryRun option is set.")


class RequestEntityTooLarge(KMSError):
    code = "RequestEntityTooLargeException"
    status = 413


class KMSInternalException(KMSError):
    code = "KMSInternalException"
    status = 500


# -- custom key stores (AWS's codes for CloudHSM key stores) ---------------------------------------
class CustomKeyStoreNotFoundException(KMSError):
    code = "CustomKeyStoreNotFoundException"


class CustomKeyStoreNameInUseException(KMSError):
    code = "CustomKeyStoreNameInUseException"


class CustomKeyStoreInvalidStateException(KMSError):
    code = "CustomKeyStoreInvalidStateException"


class CustomKeyStoreHasCMKsException(KMSError):
    code = "CustomKeyStoreHasCMKsException"


class CloudHsmClusterNotFoundException(KMSError):
    code = "CloudHsmClusterNotFoundException"


class CloudHsmClusterInUseException(KMSError):
    code = "CloudHsmClusterInUseException"


class CloudHsmClusterNotRelatedException(KMSError):
    code = "CloudHsmClusterNotRelatedException"


class IncorrectTrustAnchorException(KMSError):
    code = "IncorrectTrustAnchorException"


# -- external key stores (AWS's codes) -----------------------------------------------------------
class XksProxyUriInUseException(KMSError):
    code = "XksProxyUriInUseException"


class XksProxyUriEndpointInUseException(KMSError):
    code = "XksProxyUriEndpointInUseException"


class XksProxyUriUnreachableException(KMSError):
    code = "XksProxyUriUnreachableException"


class XksProxyIncorrectAuthenticationCredentialException(KMSError):
    code = "XksProxyIncorrectAuthenticationCredentialException"


class XksProxyInvalidConfigurationException(KMSError):
    code = "XksProxyInvalidConfigurationException"


class XksProxyInvalidResponseException(KMSError):
    code = "XksProxyInvalidResponseException"


class XksKeyNotFoundException(KMSError):
    code = "XksKeyNotFoundException"


class XksKeyInvalidConfigurationException(KMSError):
    code = "XksKeyInvalidConfigurationException"


class XksKeyAlreadyInUseException(KMSError):
    code = "XksKeyAlreadyInUseException"


class ThrottlingException(KMSError):
    """A request rate above a quota (an external key store's): clients back off and retry."""

    code = "ThrottlingException"


# -- Secrets Manager (AWS's codes; every client error is HTTP 400) -------------------------------------
class ResourceNotFoundException(KMSError):
    code = "ResourceNotFoundException"


class ResourceExistsException(KMSError):
    code = "ResourceExistsException"


class InvalidRequestException(KMSError):
    code = "InvalidRequestException"


class InvalidParameterException(KMSError):
    code = "InvalidParameterException"


class InvalidNextTokenException(KMSError):
    code = "InvalidNextTokenException"


class EncryptionFailure(KMSError):
    code = "EncryptionFailure"


class DecryptionFailure(KMSError):
    code = "DecryptionFailure"


class PreconditionNotMetException(KMSError):
    code = "PreconditionNotMetException"


class PublicPolicyException(KMSError):
    code = "PublicPolicyException"


class InternalServiceError(KMSError):
    code = "InternalServiceError"
    status = 500


class KeyStoreUnavailable(KMSInvalidStateException):
    """A key store's backend (an HSM, an external key manager) cannot answer now. Clients see
    KMSInvalidStateException, as AWS answers when a custom key store cannot be reached."""


class DependencyTimeoutException(KMSError):
    code = "DependencyTimeoutException"
    status = 503


class ConfigurationError(Exception):
    """The server cannot start as configured (wrong root key, unreadable data dir, ...).

    Not a KMSError: it never reaches a client; `openkms serve` prints it and exits non-zero.
    """
