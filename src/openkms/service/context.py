"""What every operation needs: the store, the key lookup, the key stores, access control, the clock.

Operations are plain functions `operation(ctx, caller, params) -> result`; they take everything
from here and keep nothing between calls. `node.py` builds the one Context of a node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..access import AccessControl
from ..audit.usage import UsageTracker
from ..keystore.registry import KeyStores
from ..model import Key
from ..storage import Store
from .lookup import KeyLookup

Params = Mapping[str, Any]
Result = dict[str, Any]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Context:
    store: Store
    region: str
    keys: KeyLookup
    keystores: KeyStores
    access: AccessControl
    usage: UsageTracker | None = None  # GetKeyLastUsage; None in contexts that record no uses
    # The secrets package's rotation runner (secrets.rotation.Rotation) on a serving node; None
    # elsewhere (RotateSecret then answers that rotation is not available).
    secrets_rotation: Any = None
    # The secrets package's cache of what GetSecretValue reads (secrets.cache.SecretCache); None:
    # every read goes to the store.
    secrets_cache: Any = None
    clock: Callable[[], datetime] = field(default=_utc_now)

    def now(self) -> datetime:
        return self.clock()

    def save(self, key: Key) -> Key:
        """Write a changed key (the lookup drops its cached copy when the write commits)."""
        with self.store.begin() as tx:
            tx.keys.update(key)
        return key
