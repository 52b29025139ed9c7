"""What GetSecretValue reads, kept in memory: a secret, its tags, its staging labels and its versions.

A read of a secret is three or four queries; a hot secret (a service reading its database password
on every connection) would pay them on every call. A node keeps each secret it has read as one
`Snapshot`, found by the SecretId it was asked for (name, ARN or partial ARN, in the caller's
account) and dropped the moment a transaction of this node that changed the secret commits (the
store's commit listener), or the moment this node hears of another node's change (on PostgreSQL:
storage/notify.py), with `ttl` seconds (OPENKMS_CACHE_TTL) as the backstop, as for keys.
Nothing is decrypted here: values stay sealed, and every read still asks KMS to open the version's
data key, so a disabled key is refused as before.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..model import Secret, SecretVersion
from ..storage import Store
from ..storage.repos import Changes

MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class Snapshot:
    secret: Secret
    tags: tuple[tuple[str, str], ...]
    stages: dict[str, str]  # stage -> version id
    versions: dict[str, SecretVersion]  # version id -> version


class SecretCache:
    def __init__(self, store: Store, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[tuple[str, str], tuple[float, Snapshot]] = {}  # (account, SecretId) -> (expiry, it)
        self._dropped_at: dict[str, float] = {}  # secret id -> when a commit of this node last changed it
        self._keys_of: dict[str, set[tuple[str, str]]] = {}  # secret id -> its entries' keys
        self._dropped_all_at = 0.0  # when everything was last dropped
        self._lock = threading.Lock()
        store.on_commit(self._committed)

    def get(self, account_id: str, secret_id: str) -> Snapshot | None:
        entry = self._entries.get((account_id, secret_id))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, account_id: str, secret_id: str, snapshot: Snapshot, read_at: float) -> None:
        """Keep `snapshot`, read at `read_at` (time.monotonic() before its transaction began): one
        that a commit of this node has overtaken since is not kept."""
        with self._lock:
            if read_at < max(self._dropped_at.get(snapshot.secret.secret_id, 0.0), self._dropped_all_at):
                return
            if len(self._entries) >= MAX_ENTRIES:  # the oldest tenth goes, not every tenant's entries
                for key in list(self._entries)[:MAX_ENTRIES // 10]:
                    _, dropped = self._entries.pop(key)
                    self._keys_of.get(dropped.secret.secret_id, set()).discard(key)
            self._entries[(account_id, secret_id)] = (time.monotonic() + self.ttl, snapshot)
            self._keys_of.setdefault(snapshot.secret.secret_id, set()).add((account_id, secret_id))

    def _committed(self, changes: Changes) -> None:
        now = time.monotonic()
        if changes.everything:
            with self._lock:
                self._entries.clear()
                self._keys_of.clear()
                self._dropped_all_at = now
            return
        if not changes.secrets:
            return
        with self._lock:
            for secret_id in changes.secrets:
                self._dropped_at[secret_id] = now
                for key in self._keys_of.pop(secret_id, ()):
                    self._entries.pop(key, None)
            if len(self._dropped_at) > MAX_ENTRIES:
                self._dropped_at = {k: v for k, v in self._dropped_at.items() if v > now - self.ttl}
