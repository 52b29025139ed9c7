"""Blocking code run on the event loop, suspended wherever it waits on the network.

`await run(fn)` calls `fn()` in a greenlet on the event loop's own thread. Code below it that would
block on a socket asks `suspendable()` and, if so, calls `wait(coroutine)` instead: the greenlet
switches back to `run`, which awaits the coroutine on the loop (other requests are served
meanwhile) and switches back in with its result, or throws its exception in. A request that waits
on an XKS proxy is served this way (keystore/xks.py): no hop to a pool thread and back, and no
thread per waiting call to contend for the interpreter. SQLAlchemy's asyncio layer bridges
blocking code to asyncio the same way.

Code run under `run` shares the loop's thread with every other request: it must not hold a lock
or a store transaction across a `wait` (another request on the loop would find it held), and what
it does between waits must not block (the work a default-store request does on the loop is the
measure). Each call runs in a copy of the caller's context (contextvars), as a task does.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import greenlet

T = TypeVar("T")


class OnLoop:
    """The answer of an API's `blocking` that says: on the loop, through `run`."""

    def __repr__(self) -> str:
        return "ON_LOOP"


ON_LOOP = OnLoop()


class _Suspendable(greenlet.greenlet):
    """A greenlet `run` started: `wait` may switch from it to its parent (the loop's)."""


def suspendable() -> bool:
    """Whether the code running now is under `run`, so that it may `wait` instead of blocking."""
    return isinstance(greenlet.getcurrent(), _Suspendable)


def wait(awaitable: Awaitable[T]) -> T:
    """The result of `awaitable`, awaited on the event loop by the `run` this code is under (its
    exception raised here). Only where `suspendable()`."""
    current = greenlet.getcurrent()
    if not isinstance(current, _Suspendable) or current.parent is None:
        raise RuntimeError("onloop.wait outside onloop.run")
    return cast(T, current.parent.switch(awaitable))


async def run(fn: Callable[[], T]) -> T:
    """`fn()`, on this thread, suspended at each `wait` while the loop serves other work."""
    runner = _Suspendable(fn, greenlet.getcurrent())
    runner.gr_context = contextvars.copy_context()
    result: Any = runner.switch()
    while not runner.dead:
        try:
            value = await result
        except BaseException as exc:  # thrown in: the code that waits decides (a cancellation too)
            result = runner.throw(exc)
        else:
            result = runner.switch(value)
    return cast(T, result)
