"""A token bucket: the request quotas of accounts (quotas.py) and of a custom key store
(keystore/xks.py, keystore/pkcs11.py), per node, and of an XKS proxy's key stores (xksproxy/app.py,
per URI path prefix)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """`rate` calls a second, in bursts of up to one second's worth (at least one call, so that a
    rate below one a second admits one call every 1/rate seconds); safe to share between threads."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._capacity = max(rate, 1.0)
        self._clock = clock
        self._tokens = self._capacity
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._capacity, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True
