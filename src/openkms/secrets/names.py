"""Secret names and ARNs, and finding the secret a SecretId means, as Secrets Manager does.

A secret's ARN is `arn:aws:secretsmanager:<region>:<account>:secret:<name>-<6 random characters>`;
the suffix is new each time a name is used again, so an ARN never names a later secret of the same
name. A SecretId is the name (in the caller's account), the full ARN, or the ARN without its suffix
(a "partial ARN"); another account's secret can only be named by an ARN.
"""

from __future__ import annotations

import re
import secrets as random

from ..model import Secret
from ..storage import Tx

NAME_RE = re.compile(r"^[A-Za-z0-9/_+=.@-]{1,512}$")
ARN_RE = re.compile(r"^arn:aws[a-z-]*:secretsmanager:([a-z0-9-]+):(\d{12}):secret:(.+)$")
_SUFFIX_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
SERVICE = "secretsmanager"


def new_arn(region: str, account_id: str, name: str) -> str:
    suffix = "".join(random.choice(_SUFFIX_CHARS) for _ in range(6))
    return f"arn:aws:secretsmanager:{region}:{account_id}:secret:{name}-{suffix}"


def partial_arn(region: str, account_id: str, name: str) -> str:
    """The ARN a policy sees for a secret not found (or not made yet): without the suffix."""
    return f"arn:aws:secretsmanager:{region}:{account_id}:secret:{name}"


def find(tx: Tx, account_id: str, secret_id: str) -> Secret | None:
    """The secret `secret_id` names for a caller of `account_id`, or None."""
    found = ARN_RE.match(secret_id)
    if found is None:
        return tx.secrets.by_name(account_id, secret_id)
    exact = tx.secrets.by_arn(secret_id)
    if exact is not None:
        return exact
    # A partial ARN: the name without the suffix, in the ARN's account.
    return tx.secrets.by_name(found.group(2), found.group(3))


def account_of(secret_id: str, caller_account: str) -> str:
    """The account a SecretId points into (an ARN's, else the caller's)."""
    found = ARN_RE.match(secret_id)
    return found.group(2) if found is not None else caller_account
