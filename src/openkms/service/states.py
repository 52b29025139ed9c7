"""Checks every operation makes on a key before using it: state, usage, algorithm, request members."""

from __future__ import annotations

from datetime import datetime

from ..errors import (
    DisabledException,
    DryRunOperationException,
    InvalidKeyUsageException,
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from ..model import Key, KeyState, KeyUsage
from .context import Params

STATE_WORDS = {
    KeyState.PENDING_DELETION: "pending deletion",
    KeyState.PENDING_IMPORT: "pending import",
    KeyState.DISABLED: "disabled",
    KeyState.UNAVAILABLE: "unavailable",
    KeyState.ENABLED: "enabled",
}


def check_usable(key: Key, now: datetime) -> None:
    """The key may do cryptography now: enabled, and its imported material (if any) not expired."""
    state = key.effective_state
    if state is KeyState.ENABLED:
        if key.valid_to is not None and now >= key.valid_to:
            # Imported material past its ValidTo is unusable at once, before the scheduler gets
            # round to deleting it.
            raise KMSInvalidStateException(f"{key.arn} is pending import.")
        return
    if state is KeyState.DISABLED:
        raise DisabledException(f"{key.arn} is disabled.")
    if state is KeyState.UNAVAILABLE:
        raise KMSInvalidStateException(f"{key.arn} is unavailable: its custom key store is not connected.")
    raise KMSInvalidStateException(f"{key.arn} is {STATE_WORDS[state]}.")


def check_not_pending_deletion(key: Key) -> None:
    if key.state is KeyState.PENDING_DELETION:
        raise KMSInvalidStateException(f"{key.arn} is pending deletion.")


def check_algorithm(key: Key, algorithm: str) -> None:
    if algorithm not in key.spec.allowed(key.key_usage):
        raise InvalidKeyUsageException(
            f"The operation failed because {key.arn} does not support the {algorithm} algorithm.")


def check_for_use(key: Key, usage: KeyUsage, algorithm: str | None, now: datetime) -> None:
    """The key is for this purpose, in a state to be used, and allows the algorithm."""
    if key.key_usage is not usage:
        raise InvalidKeyUsageException(
            f"{key.arn} key usage is {key.key_usage.value} which is not valid for this operation.")
    check_usable(key, now)
    if algorithm is not None:
        check_algorithm(key, algorithm)


def dry_run(p: Params) -> None:
    if p.get("DryRun"):
        raise DryRunOperationException()


def no_recipient(p: Params) -> None:
    if p.get("Recipient"):
        raise UnsupportedOperationException("Recipient (Nitro Enclaves attestation) is not supported.")


def require(p: Params, member: str) -> None:
    """For members the model leaves optional but the operation cannot do without."""
    if p.get(member) is None:
        raise ValidationException.null_members([member])
