"""One thread for every call into the token, fed by the event loop.

Calls into a PKCS#11 module are serialised anyway (keystore/pkcs11.py: one lock per module), so
more threads would only wait on that lock. One thread still matters: the event loop keeps reading,
verifying and answering other requests while the token works (python-pkcs11 releases the GIL in
the module), and a token that hangs holds up only the requests waiting for it, which answer
DependencyTimeoutException when their time is up instead of stalling the whole proxy.

Jobs are taken in batches: the thread runs everything queued since it last looked and hands the
results back with one wake-up of the loop, which is what keeps a busy proxy from paying a thread
switch per request. A job whose request has already timed out (or gone away) is skipped, not run.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import DependencyTimeoutException

T = TypeVar("T")
_Job = tuple[Callable[[], Any], "asyncio.Future[Any]"]


class TokenWorker:
    def __init__(self, name: str = "xks-token") -> None:
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[[], T], timeout: float) -> T:
        """`fn()` on the worker thread; DependencyTimeoutException if it has not answered in `timeout` s."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[T] = loop.create_future()
        with self._ready:
            if self._closed:
                raise DependencyTimeoutException("The XKS proxy is shutting down.")
            self._jobs.append((fn, future))
            if len(self._jobs) == 1:
                self._ready.notify()
        timer = loop.call_later(timeout, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the jobs already queued (a call stuck in the module is left behind: the
        thread is a daemon, so it does not keep the process alive)."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._closed:
                    self._ready.wait()
                if not self._jobs:
                    return
                batch = list(self._jobs)
                self._jobs.clear()
            results: list[tuple[asyncio.Future[Any], bool, Any]] = []
            for fn, future in batch:
                if future.done():  # timed out or abandoned while queued: nobody waits for it
                    continue
                try:
                    results.append((future, True, fn()))
                except BaseException as exc:  # handed to the request, which turns it into an answer
                    results.append((future, False, exc))
            loop = self._loop
            if results and loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(_deliver, results)
                except RuntimeError:  # the loop closed meanwhile: nobody is left to answer
                    return


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(DependencyTimeoutException("The HSM did not answer in time."))


def _deliver(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
