"""One thread for every call into the token, fed by the event loop.

Calls into a PKCS#11 module are serialised anyway (keystore/pkcs11.py: one lock per module), so
more threads would only wait on that lock. One thread still matters: the event loop keeps reading,
verifying and answering other requests while the token works (python-pkcs11 releases the GIL in
the module), and a token that hangs holds up only the requests waiting for it, which answer
DependencyTimeoutException when their time is up instead of stalling the whole proxy.

The thread takes every job queued since it last looked and runs them in turn, and wakes the loop
once the batch is done: the loop then hands out all its results at once, which is what keeps a
busy proxy from paying a thread switch per request (measured: a tenth of its Encrypt/s).
A fast call must not wait for a slow one queued after it, though: while calls are outstanding the
loop looks every DELIVERY_POLL_S, and once the call in progress has run for SLOW_CALL_S it takes
the results finished so far without waiting for the rest of the batch.

A token that hangs must not make the proxy hoard memory (every request's body and its traceback)
or pile up work it will never do:

- a job whose call timed out (or whose request went away) drops its payload at once, and is
  skipped, not run, when the thread reaches it; nothing that lives on in the queue refers to the
  request (the timeout is a fresh exception raised in `call`, not one stored in the job);
- while the call in progress has run longer than the caller's timeout, a new call fails at once
  with DependencyTimeoutException instead of queuing behind it;
- at most `max_queued` jobs wait at once (the app sets it to about its request rate times the call
  timeout: more could not be answered in time anyway); past it a call fails at once as well.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar, cast

from .errors import DependencyTimeoutException

T = TypeVar("T")
DELIVERY_POLL_S = 0.001  # while calls are outstanding, the loop looks for a slow call this often
SLOW_CALL_S = 0.001  # a call running longer than this does not hold up the results before it


class _Expired:
    """The result of a job whose call timed out (set by the loop; nothing to hold on to)."""


_EXPIRED = _Expired()


class _Job:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[], Any], future: asyncio.Future[Any]) -> None:
        self.fn: Callable[[], Any] | None = fn
        self.future = future


class TokenWorker:
    def __init__(self, name: str = "xks-token", max_queued: int = 100_000) -> None:
        self.max_queued = max_queued
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at: float | None = None  # time.monotonic() when the call in progress began
        # Results for the loop, taken by `_deliver` (woken by the thread, or polled by the loop).
        self._done: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._done_lock = threading.Lock()
        self._woken = False  # a `_deliver` is on its way to the loop
        self._waiting = 0  # calls awaiting their result (on the loop)
        self._poll: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[[], T], timeout: float) -> T:
        """`fn()` on the worker thread; DependencyTimeoutException if it has not answered in `timeout` s
        (at once if the token has been stuck in a call for longer than that, or too much is queued)."""
        started = self._started_at
        if started is not None and time.monotonic() - started > timeout:
            raise DependencyTimeoutException("The HSM has not answered its current call for more than "
                                             f"{timeout:g} s.")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._poll, self._waiting = loop, None, 0
        future: asyncio.Future[Any] = loop.create_future()
        job = _Job(fn, future)
        with self._ready:
            if self._closed:
                raise DependencyTimeoutException("The XKS proxy is shutting down.")
            if len(self._jobs) >= self.max_queued:
                raise DependencyTimeoutException(f"More than {self.max_queued} calls are waiting for the HSM.")
            self._jobs.append(job)
            if len(self._jobs) == 1:
                self._ready.notify()
        timer = loop.call_later(timeout, _expire, job)
        self._waiting += 1
        if self._poll is None:
            self._poll = loop.call_later(DELIVERY_POLL_S, self._collect)
        try:
            value = await future
        finally:
            self._waiting -= 1
            timer.cancel()
            job.fn = None  # answered, timed out or abandoned: the thread has nothing more to run
        if value is _EXPIRED:
            raise DependencyTimeoutException("The HSM did not answer in time.")
        return cast(T, value)

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the jobs already queued (a call stuck in the module is left behind: the
        thread is a daemon, so it does not keep the process alive)."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout)

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._closed:
                    self._ready.wait()
                if not self._jobs:
                    return
                batch, self._jobs = self._jobs, deque()
            while batch:  # popped one by one: nothing of a job stays referenced once it is done
                self._run_one(batch.popleft())
            self._wake()

    def _run_one(self, job: _Job) -> None:
        """Run one job and leave its result for the loop."""
        fn, job.fn = job.fn, None
        future = job.future
        if fn is None or future.done():  # timed out or abandoned while queued: nobody waits for it
            return
        self._started_at = time.monotonic()
        try:
            result: tuple[asyncio.Future[Any], bool, Any] = (future, True, fn())
        except BaseException as exc:  # handed to the request, which turns it into an answer
            result = (future, False, exc)
        finally:
            self._started_at = None
        del fn
        with self._done_lock:
            self._done.append(result)
        del result

    def _wake(self) -> None:
        """At the end of a batch: have the loop take the results now rather than at its next poll."""
        with self._done_lock:
            wake = bool(self._done) and not self._woken
            self._woken = self._woken or wake
        loop = self._loop
        if wake and loop is not None:
            try:
                loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop closed meanwhile: nobody is left to answer
                with self._done_lock:
                    self._done.clear()
                    self._woken = False

    # -- the loop -----------------------------------------------------------------------------
    def _collect(self) -> None:
        """The poll, while calls are outstanding: the results finished so far if the call in
        progress is a slow one (otherwise they come with the batch's wake-up, a moment later)."""
        self._poll = None
        started = self._started_at
        if started is not None and time.monotonic() - started > SLOW_CALL_S:
            self._deliver()
        if self._waiting and self._loop is not None:
            self._poll = self._loop.call_later(DELIVERY_POLL_S, self._collect)

    def _deliver(self) -> None:
        """On the loop: every result the thread has left since the last delivery."""
        with self._done_lock:
            done, self._done = self._done, []
            self._woken = False
        for future, ok, value in done:
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


def _expire(job: _Job) -> None:
    job.fn = None  # the request's payload (plaintext, AAD) is let go now, not when the token is free
    if not job.future.done():
        job.future.set_result(_EXPIRED)
