"""A lane: one thread that runs the calls the event loop hands it, and wakes the loop once per batch.

An HSM token serialises its calls (keystore/pkcs11.py), so the requests that use it gain nothing
from many threads, and a pool's thread switch per request costs more CPU than the token's own
cryptography. The lane's thread takes every call queued since it last looked, runs them in turn,
and then hands the loop all their results with one wake-up (like `openkms xks-proxy`'s worker).
A fast call must not wait for a slow one queued after it: while calls are outstanding the loop
looks every `POLL_S`, and once the call in progress has run for `SLOW_CALL_S` it takes the results
finished so far. A token that hangs holds up only its own lane's requests. A lane serves one
event loop at a time well (a server worker has one); a caller on another loop still gets its
answer, through that loop's call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")
POLL_S = 0.001  # while calls are outstanding, the loop looks for results this often
SLOW_CALL_S = 0.001  # a call running longer than this does not hold up the results before it


class LaneClosed(RuntimeError):
    """The lane was closed (the process is finalising its modules before it forks)."""


class Lane:
    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: deque[tuple[Callable[[], Any], asyncio.Future[Any]]] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._started_at: float | None = None  # time.monotonic() when the call in progress began
        self._done: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._done_lock = threading.Lock()
        self._woken = False  # a `_deliver` is on its way to the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0  # calls awaiting their result (on the loop)
        self._poll: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Lane({self.name!r})"

    async def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the lane's thread; what it raises is raised here."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._poll, self._waiting = loop, None, 0
        future: asyncio.Future[Any] = loop.create_future()
        with self._ready:
            if self._closed:
                raise LaneClosed(f"{self.name} is closed")
            self._jobs.append((fn, future))
            if len(self._jobs) == 1:
                self._ready.notify()
        self._waiting += 1
        if self._poll is None:
            self._poll = loop.call_later(POLL_S, self._collect)
        try:
            return cast(T, await future)
        finally:
            self._waiting -= 1

    def close(self) -> None:
        """Stop once the calls already queued have run (the thread is a daemon: a call stuck in a
        module does not keep the process alive)."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._closed:
                    self._ready.wait()
                if not self._jobs:
                    return
                batch, self._jobs = self._jobs, deque()
            while batch:  # popped one by one: nothing of a call stays referenced once it is done
                fn, future = batch.popleft()
                self._started_at = time.monotonic()
                try:
                    result: tuple[asyncio.Future[Any], bool, Any] = (future, True, fn())
                except BaseException as exc:  # handed to the caller
                    result = (future, False, exc)
                finally:
                    self._started_at = None
                del fn, future
                with self._done_lock:
                    self._done.append(result)
                del result
            self._wake()

    def _wake(self) -> None:
        with self._done_lock:
            wake = bool(self._done) and not self._woken
            self._woken = self._woken or wake
        loop = self._loop
        if wake and loop is not None:
            try:
                loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # that loop has closed: each result goes to its own caller's loop
                with self._done_lock:
                    done, self._done = self._done, []
                    self._woken = False
                for future, ok, value in done:
                    with contextlib.suppress(RuntimeError):  # closed as well: nobody waits
                        future.get_loop().call_soon_threadsafe(_settle, future, ok, value)

    # -- the loop -----------------------------------------------------------------------------
    def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # another loop has called since: its own poll looks
            return
        self._poll = None
        started = self._started_at
        if started is not None and time.monotonic() - started > SLOW_CALL_S:
            self._deliver()
        if self._waiting:
            self._poll = loop.call_later(POLL_S, self._collect)

    def _deliver(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
            self._woken = False
        loop = asyncio.get_running_loop()
        for future, ok, value in done:
            theirs = future.get_loop()
            if theirs is loop:
                _settle(future, ok, value)
            else:  # a caller on another event loop (a server runs one; a test may run more)
                with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
                    theirs.call_soon_threadsafe(_settle, future, ok, value)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the request went away
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
