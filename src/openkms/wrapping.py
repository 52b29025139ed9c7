"""The BYOK wrapping algorithms, which the client (wraps) and the server (unwraps) both know.

Standard library only and nothing from the rest of openkms, so that `client/` can import it without
the server's dependencies and the server can import it without importing `client/`.
"""

from __future__ import annotations

from typing import NamedTuple


class WrappingAlgorithm(NamedTuple):
    """A BYOK wrapping algorithm (GetParametersForImport's WrappingAlgorithm), as AWS KMS defines it.

    Each side maps ``oaep_hash`` to its own hash class: the server's ``crypto.wrap`` unwraps, the
    client's ``byok`` wraps.
    """

    oaep_hash: str  # "SHA_1" or "SHA_256": the hash of RSA-OAEP and of its MGF1
    aes_key_wrap: bool  # OAEP wraps an ephemeral AES-256 key, which wraps the material (AES-KWP, RFC 5649)


WRAPPING_ALGORITHMS: dict[str, WrappingAlgorithm] = {
    "RSAES_OAEP_SHA_1": WrappingAlgorithm("SHA_1", aes_key_wrap=False),
    "RSAES_OAEP_SHA_256": WrappingAlgorithm("SHA_256", aes_key_wrap=False),
    "RSA_AES_KEY_WRAP_SHA_1": WrappingAlgorithm("SHA_1", aes_key_wrap=True),
    "RSA_AES_KEY_WRAP_SHA_256": WrappingAlgorithm("SHA_256", aes_key_wrap=True),
}
