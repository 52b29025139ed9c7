"""The calling thread's OpenSSL error queue, cleared.

PKCS#11 modules that use OpenSSL (SoftHSM2 does, when it initialises and looks for engines) can
leave errors in the queue of the thread that called them. Python's ssl module reads that queue
after its own calls, so a stale error makes a later TLS handshake on the same thread fail with an
error that has nothing to do with it ("[ENGINE: NO_SUCH_ENGINE] no such engine"). The HSM store
clears the queue after it calls into a module, and the XKS client before each request.
"""

from __future__ import annotations

import ctypes
import ssl  # loads the libcrypto the ssl module uses
from collections.abc import Callable


def _loader() -> Callable[[], None]:
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libcrypto" in line and "/" in line), None)
        if path is None:
            return lambda: None
        function = ctypes.CDLL(path).ERR_clear_error
        function.restype = None
        function.argtypes = []
        return function
    except (OSError, AttributeError):  # not Linux, or no such symbol: nothing to clear there
        return lambda: None


clear_error_queue: Callable[[], None] = _loader()
assert ssl.OPENSSL_VERSION  # the import above is needed for its effect
