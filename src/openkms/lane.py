"""A lane: one thread that runs the calls the event loop hands it, and wakes the loop once per batch.

An HSM token serialises its calls (keystore/pkcs11.py: one lock per module), so the requests that
use it gain nothing from many threads, and a pool's thread switch per request costs more CPU than
the token's own cryptography. The lane's thread takes every call queued since it last looked,
runs them in turn, and then hands the loop all their results with one wake-up. The server runs a
token's requests on one (keystore/pkcs11.py `Module.lane`), and `openkms xks-proxy` every call
into its token (xksproxy/worker.py).

A fast call must not wait for a slow one queued after it: while calls are outstanding the loop
looks every `POLL_S`, and once the call in progress has run for `SLOW_CALL_S` it takes the results
finished so far. A token that hangs holds up only its own lane's requests, and with a `timeout`
it must not make the process hoard memory (every request's payload and its traceback) or pile up
work it will never do:

- a call that timed out (or whose caller went away) drops its function, and with it its payload,
  at once, and is skipped, not run, when the thread reaches it; nothing that lives on in the queue
  refers to the caller (the timeout is a fresh exception raised in `call`, not one stored);
- while the call in progress has run longer than the caller's timeout, a new call fails at once
  instead of queuing behind it;
- at most `max_queued` calls wait at once; past it a call fails at once as well.

A lane serves one event loop at a time well (a process serves on one); a caller on another loop
still gets its answer, through that loop's call_soon_threadsafe.
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


class _Expired:
    """The result of a call that timed out (set by the loop; nothing to hold on to)."""


_EXPIRED = _Expired()


class _Job:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[], Any], future: asyncio.Future[Any]) -> None:
        self.fn: Callable[[], Any] | None = fn
        self.future = future


class Lane:
    # What a refused call raises, and why: subclasses give the errors their callers answer with.
    def closed_error(self) -> Exception:
        return LaneClosed(f"{self.name} is closed")

    def stuck_error(self, timeout: float) -> Exception:
        return TimeoutError(f"{self.name} has been in one call for more than {timeout:g} s")

    def full_error(self) -> Exception:
        return TimeoutError(f"more than {self.max_queued} calls are waiting for {self.name}")

    def expired_error(self) -> Exception:
        return TimeoutError(f"{self.name} did not answer in time")

    def __init__(self, name: str, max_queued: int | None = None) -> None:
        self.name = name
        self.max_queued = max_queued
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._started_at: float | None = None  # time.monotonic() when the call in progress began
        # Results for the loop, taken by `_deliver` (woken by the thread, or polled by the loop).
        self._done: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._done_lock = threading.Lock()
        self._woken = False  # a `_deliver` is on its way to the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0  # calls awaiting their result (on the loop)
        self._poll: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    async def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """`fn()` on the lane's thread; what it raises is raised here. With a `timeout`: the
        `expired_error()` if it has not answered in `timeout` s (at once the `stuck_error` if the
        call in progress has run for longer than that)."""
        if timeout is not None:
            started = self._started_at
            if started is not None and time.monotonic() - started > timeout:
                raise self.stuck_error(timeout)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._poll, self._waiting = loop, None, 0
        future: asyncio.Future[Any] = loop.create_future()
        job = _Job(fn, future)
        with self._ready:
            if self._closed:
                raise self.closed_error()
            if self.max_queued is not None and len(self._jobs) >= self.max_queued:
                raise self.full_error()
            self._jobs.append(job)
            if len(self._jobs) == 1:
                self._ready.notify()
        timer = loop.call_later(timeout, _expire, job) if timeout is not None else None
        self._waiting += 1
        if self._poll is None:
            self._poll = loop.call_later(POLL_S, self._collect)
        try:
            value = await future
        finally:
            self._waiting -= 1
            if timer is not None:
                timer.cancel()
            job.fn = None  # answered, timed out or abandoned: the thread has nothing more to run
        if value is _EXPIRED:
            raise self.expired_error()
        return cast(T, value)

    def close(self, timeout: float | None = None) -> None:
        """Stop once the calls already queued have run; with `timeout`, wait that long for the
        thread (a daemon: a call stuck in a module does not keep the process alive)."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        if timeout is not None:
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
            while batch:  # popped one by one: nothing of a call stays referenced once it is done
                self._run_one(batch.popleft())
            self._wake()

    def _run_one(self, job: _Job) -> None:
        """Run one call and leave its result for the loop."""
        fn, job.fn = job.fn, None
        future = job.future
        if fn is None or future.done():  # timed out or abandoned while queued: nobody waits for it
            return
        self._started_at = time.monotonic()
        try:
            result: tuple[asyncio.Future[Any], bool, Any] = (future, True, fn())
        except BaseException as exc:  # handed to the caller
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
            except RuntimeError:  # that loop has closed: each result goes to its own caller's loop
                with self._done_lock:
                    done, self._done = self._done, []
                    self._woken = False
                for future, ok, value in done:
                    with contextlib.suppress(RuntimeError):  # closed as well: nobody waits
                        future.get_loop().call_soon_threadsafe(_settle, future, ok, value)

    # -- the loop -----------------------------------------------------------------------------
    def _collect(self) -> None:
        """The poll, while calls are outstanding: the results finished so far if the call in
        progress is a slow one (otherwise they come with the batch's wake-up, a moment later)."""
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
        """On the loop: every result the thread has left since the last delivery."""
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
    if future.done():  # the caller went away, or its call timed out
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _expire(job: _Job) -> None:
    job.fn = None  # the caller's payload is let go now, not when the token is free
    if not job.future.done():
        job.future.set_result(_EXPIRED)
