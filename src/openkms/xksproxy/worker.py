"""One thread for every call into the token, fed by the event loop: a lane (openkms/lane.py).

Calls into a PKCS#11 module are serialised anyway (keystore/pkcs11.py: one lock per module), so
more threads would only wait on that lock. One thread still matters: the event loop keeps reading,
verifying and answering other requests while the token works (python-pkcs11 releases the GIL in
the module), and a token that hangs holds up only the requests waiting for it, which answer
DependencyTimeoutException when their time is up instead of stalling the whole proxy. The lane
takes every job queued since it last looked and wakes the loop once per batch (measured: a thread
switch per request cost a tenth of the proxy's Encrypt/s); a timed-out call lets go of its
payload at once; a call fails at once while the token is stuck past the caller's timeout, or when
`max_queued` calls wait (the app sets it to about its request rate times the call timeout: more
could not be answered in time anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..lane import Lane
from .errors import DependencyTimeoutException

T = TypeVar("T")


class TokenWorker(Lane):
    def __init__(self, name: str = "xks-token", max_queued: int = 100_000) -> None:
        super().__init__(name, max_queued)

    async def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        if timeout is None:
            raise ValueError("a call into the token needs a timeout")
        return await super().call(fn, timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        super().close(timeout)

    def closed_error(self) -> Exception:
        return DependencyTimeoutException("The XKS proxy is shutting down.")

    def stuck_error(self, timeout: float) -> Exception:
        return DependencyTimeoutException(f"The HSM has not answered its current call for more than {timeout:g} s.")

    def full_error(self) -> Exception:
        return DependencyTimeoutException(f"More than {self.max_queued} calls are waiting for the HSM.")

    def expired_error(self) -> Exception:
        return DependencyTimeoutException("The HSM did not answer in time.")
