"""Key policies: GetKeyPolicy, PutKeyPolicy, ListKeyPolicies, and the checks a new policy passes."""

from __future__ import annotations

import dataclasses

from ..access import principal_arn
from ..errors import MalformedPolicyDocumentException, NotFoundException
from ..model import Caller
from ..policy import default_key_policy, parse_key_policy, would_lock_out
from .context import Context, Params, Result
from .states import check_not_pending_deletion


def checked_policy(caller: Caller, text: str | None, bypass: bool, key_arn: str = "") -> str | None:
    """Parse a new key policy (MalformedPolicyDocumentException if it is not one) and refuse one
    that would lock the caller out of PutKeyPolicy, unless the caller bypasses that check."""
    if text is None:
        return None
    compiled = parse_key_policy(text)
    if not bypass and would_lock_out(compiled, principal_arn(caller), caller.account_id, key_arn=key_arn):
        raise MalformedPolicyDocumentException(
            "The new key policy will not allow you to update the key policy in the future.")
    return text


def _policy_name(p: Params) -> str:
    name = p.get("PolicyName") or "default"
    if name != "default":
        raise NotFoundException(f"No such policy exists: {name}")
    return str(name)


def get_key_policy(ctx: Context, caller: Caller, p: Params) -> Result:
    key = ctx.keys.authorized(caller, p["KeyId"], "GetKeyPolicy", allow_alias=False)
    _policy_name(p)
    return {"Policy": key.policy or default_key_policy(key.account_id), "PolicyName": "default"}


def put_key_policy(ctx: Context, caller: Caller, p: Params) -> Result:
    bypass = bool(p.get("BypassPolicyLockoutSafetyCheck"))
    key = ctx.keys.authorized(caller, p["KeyId"], "PutKeyPolicy", allow_alias=False,
                              extra={"kms:BypassPolicyLockoutSafetyCheck": bypass})
    _policy_name(p)
    check_not_pending_deletion(key)
    ctx.save(dataclasses.replace(key, policy=checked_policy(caller, p["Policy"], bypass, key.arn)))
    return {}


def list_key_policies(ctx: Context, caller: Caller, p: Params) -> Result:
    ctx.keys.authorized(caller, p["KeyId"], "ListKeyPolicies", allow_alias=False)
    return {"PolicyNames": ["default"], "Truncated": False}
