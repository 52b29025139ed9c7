"""Key policies, identity policies and grants: pure functions, default deny.

Compile a policy once when it changes, then evaluate requests against the compiled object::

    key_policy = parse_key_policy(text)                 # MalformedPolicyDocumentException if bad
    request = RequestContext(principal_arn, principal_account, "kms:Decrypt", key_arn,
                             context={"aws:SourceIp": ip}, encryption_context=ec)
    decision = evaluate(request, key_policy, identity_policies, grants)
    decision.raise_if_denied()                          # AccessDeniedException, AWS's message

Modules: :mod:`.document` (grammar, compilation), :mod:`.conditions` (condition operators),
:mod:`.request` (the request context), :mod:`.grants`, :mod:`.evaluate` (the decision rules,
lockout check, default key policy), :mod:`.wildcard` (``*``/``?`` matching without regex
backtracking). Imports only :mod:`openkms.errors` from the rest of openkms.
"""

from __future__ import annotations

from ..errors import MalformedPolicyDocumentException
from .conditions import Condition, SetOperator
from .document import (
    MAX_POLICY_BYTES,
    Effect,
    Policy,
    PolicyKind,
    Principals,
    Statement,
    parse_identity_policy,
    parse_key_policy,
    parse_policy,
)
from .evaluate import Basis, Decision, default_key_policy, evaluate, evaluate_resource, would_lock_out
from .grants import GRANT_OPERATIONS, Grant, grant_allows, is_narrower_grant
from .request import ContextValue, RequestContext, root_arn

__all__ = [
    "GRANT_OPERATIONS",
    "MAX_POLICY_BYTES",
    "Basis",
    "Condition",
    "ContextValue",
    "Decision",
    "Effect",
    "Grant",
    "MalformedPolicyDocumentException",
    "Policy",
    "PolicyKind",
    "Principals",
    "RequestContext",
    "SetOperator",
    "Statement",
    "default_key_policy",
    "evaluate",
    "evaluate_resource",
    "grant_allows",
    "is_narrower_grant",
    "parse_identity_policy",
    "parse_key_policy",
    "parse_policy",
    "root_arn",
    "would_lock_out",
]
