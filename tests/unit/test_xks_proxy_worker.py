"""The XKS proxy's token worker (src/openkms/xksproxy/worker.py) with a token that hangs.

A hung token is a call that does not return: here a function that waits on an Event the test sets
at the end, on the worker's real thread. What is checked is what the proxy's requests see (their
answers and how soon) and what the worker keeps alive meanwhile (weak references to a request's
payload, its frames, a call's result), which a real proxy process cannot show precisely.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from openkms.xksproxy.errors import DependencyTimeoutException
from openkms.xksproxy.worker import TokenWorker


class Payload:
    """Stands for what a request holds (its body, plaintext, AAD): weakly referenceable."""

    def __init__(self) -> None:
        self.data = bytes(50_000)


@pytest.fixture
def worker() -> Iterator[TokenWorker]:
    w = TokenWorker(name="xks-token-test")
    yield w
    w.close(timeout=2)


@pytest.fixture
def hang() -> Iterator[tuple[Callable[[], None], threading.Event]]:
    """A token call that hangs until the event is set (set at the latest when the test ends)."""
    release = threading.Event()

    def stuck() -> None:
        release.wait(10)

    yield stuck, release
    release.set()


def collected(ref: weakref.ref[Any]) -> bool:
    for _ in range(3):
        gc.collect()
    return ref() is None


def test_a_timed_out_call_lets_go_of_its_payload_while_the_token_hangs(worker: TokenWorker, hang: Any) -> None:
    stuck, release = hang

    async def run() -> None:
        blocker = asyncio.ensure_future(worker.call(stuck, timeout=30))
        await asyncio.sleep(0.02)
        payload = Payload()
        ref = weakref.ref(payload)

        def use(p: Payload = payload) -> int:
            return len(p.data)

        with pytest.raises(DependencyTimeoutException):
            await worker.call(use, timeout=0.2)  # queued behind the hung call, then timed out
        del use, payload
        assert collected(ref), "a timed-out job still holds its request's payload while the token hangs"
        release.set()
        await blocker

    asyncio.run(run())


def test_a_timed_out_request_is_not_kept_alive_by_its_exception(worker: TokenWorker, hang: Any) -> None:
    """The exception a request catches must not be one stored in a job that stays queued: its
    traceback would keep the request's frames, and so its body, alive."""
    stuck, release = hang
    refs: list[weakref.ref[Any]] = []

    async def request() -> str:
        body = Payload()  # a local of the request's frame, as the request's body is
        refs.append(weakref.ref(body))
        try:
            await worker.call(lambda: None, timeout=0.2)
        except DependencyTimeoutException as exc:
            return exc.name
        return "answered"

    async def run() -> None:
        blocker = asyncio.ensure_future(worker.call(stuck, timeout=30))
        await asyncio.sleep(0.02)
        assert await asyncio.gather(*(request() for _ in range(20))) == ["DependencyTimeoutException"] * 20
        alive = sum(not collected(ref) for ref in refs)
        assert alive == 0, f"{alive} finished requests are still alive while the token hangs"
        release.set()
        await blocker

    asyncio.run(run())


def test_calls_fail_at_once_while_the_token_is_stuck_past_the_timeout(worker: TokenWorker, hang: Any) -> None:
    stuck, release = hang

    async def run() -> None:
        blocker = asyncio.ensure_future(worker.call(stuck, timeout=30))
        await asyncio.sleep(2.0)  # the hung call has run longer than the next calls' timeout
        for _ in range(50):
            started = time.monotonic()
            with pytest.raises(DependencyTimeoutException) as raised:
                await worker.call(lambda: None, timeout=1.0)
            assert time.monotonic() - started < 0.5, "a call waited its whole timeout behind a stuck token"
        assert "has not answered its current call" in raised.value.message
        release.set()
        await blocker
        assert await worker.call(lambda: 42, timeout=2) == 42  # the token answers again: so does the worker

    asyncio.run(run())


def test_the_queue_is_bounded(hang: Any) -> None:
    stuck, release = hang
    worker = TokenWorker(name="xks-token-test", max_queued=3)

    async def run() -> None:
        blocker = asyncio.ensure_future(worker.call(stuck, timeout=30))
        await asyncio.sleep(0.02)
        queued = [asyncio.ensure_future(worker.call(lambda i=i: i, timeout=30)) for i in range(3)]
        await asyncio.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(DependencyTimeoutException) as raised:
            await worker.call(lambda: None, timeout=30)
        assert time.monotonic() - started < 5 and "calls are waiting for the HSM" in raised.value.message
        release.set()
        await blocker
        assert await asyncio.gather(*queued) == [0, 1, 2]

    try:
        asyncio.run(run())
    finally:
        worker.close(timeout=2)


def test_each_result_is_delivered_as_soon_as_its_call_returns(worker: TokenWorker) -> None:
    """A fast call taken in the same batch as a slow one after it answers at once, not when the
    batch is done (which was past its timeout)."""

    async def run() -> None:
        first = asyncio.ensure_future(worker.call(lambda: time.sleep(0.1), timeout=5))  # the worker is busy
        await asyncio.sleep(0.01)
        fast = asyncio.ensure_future(worker.call(lambda: "fast", timeout=0.5))  # both queued meanwhile:
        slow = asyncio.ensure_future(worker.call(lambda: time.sleep(1.0), timeout=5))  # one batch
        assert await fast == "fast"
        assert not slow.done()
        await asyncio.gather(first, slow)

    asyncio.run(run())


def test_nothing_of_a_finished_call_is_held(worker: TokenWorker) -> None:
    """Once its request has its answer, neither the call, its result nor its error stays
    referenced by the worker while it waits for the next job."""
    refs: list[weakref.ref[Any]] = []

    async def run() -> None:
        payload = Payload()
        refs.append(weakref.ref(payload))
        result = await worker.call(lambda p=payload: p, timeout=2)
        assert result is payload
        error = Payload()
        refs.append(weakref.ref(error))

        def fails(e: Payload = error) -> None:
            raise RuntimeError(e)

        del payload, result, error
        with pytest.raises(RuntimeError):
            await worker.call(fails, timeout=2)
        del fails
        await asyncio.sleep(0.05)  # the worker is idle, waiting for a job

    asyncio.run(run())
    alive = sum(not collected(ref) for ref in refs)
    assert alive == 0, f"the idle worker still holds {alive} of its last calls' objects"
