"""The one error the policy engine adds to the tree in :mod:`openkms.errors`.

``MalformedPolicyDocumentException`` is the AWS error code for a policy that is not syntactically
or semantically correct (KMS CreateKey/PutKeyPolicy). It lives here until it moves into
``openkms/errors.py`` next to its siblings; callers should import it from ``openkms.policy``.
"""

from __future__ import annotations

from ..errors import KMSError


class MalformedPolicyDocumentException(KMSError):
    """The policy document is not valid JSON or breaks the policy grammar (HTTP 400)."""

    code = "MalformedPolicyDocumentException"
