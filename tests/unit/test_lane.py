"""openkms/lane.py: calls handed to a lane run on its one thread, in order, and their results and
errors come back to each caller; a slow call does not hold up the results finished before it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from openkms.lane import Lane, LaneClosed


def test_calls_run_on_the_lane_thread_and_answer_each_caller() -> None:
    lane = Lane("test-lane")
    seen: list[int] = []

    def job(i: int) -> tuple[int, str]:
        seen.append(i)
        return i, threading.current_thread().name

    async def main() -> list[tuple[int, str]]:
        return await asyncio.gather(*(lane.call(lambda i=i: job(i)) for i in range(200)))

    try:
        answers = asyncio.run(main())
        assert answers == [(i, "test-lane") for i in range(200)]
        assert seen == list(range(200))  # in the order they were handed over
        assert asyncio.run(lane.call(lambda: 7)) == 7  # a second event loop is served too
    finally:
        lane.close()


def test_an_error_is_raised_to_its_caller_only() -> None:
    lane = Lane("test-lane")

    def fail() -> None:
        raise KeyError("boom")

    async def main() -> tuple[object, object]:
        return tuple(await asyncio.gather(lane.call(fail), lane.call(lambda: "ok"), return_exceptions=True))

    try:
        failed, ok = asyncio.run(main())
        assert isinstance(failed, KeyError) and ok == "ok"
    finally:
        lane.close()


def test_a_slow_call_does_not_hold_up_the_answers_before_it() -> None:
    lane = Lane("test-lane")
    release = threading.Event()

    async def main() -> None:
        fast = asyncio.ensure_future(lane.call(lambda: "fast"))
        slow = asyncio.ensure_future(lane.call(lambda: release.wait(30)))
        assert await asyncio.wait_for(fast, 10) == "fast"
        release.set()
        assert await slow is True

    try:
        asyncio.run(main())
    finally:
        release.set()
        lane.close()


def test_a_closed_lane_takes_no_more_calls() -> None:
    lane = Lane("test-lane")
    lane.close()
    time.sleep(0)
    with pytest.raises(LaneClosed):
        asyncio.run(lane.call(lambda: 1))


def test_callers_on_two_event_loops_each_get_their_answers() -> None:
    lane = Lane("test-lane")
    answers: dict[str, list[int]] = {}

    def caller(name: str) -> None:
        async def main() -> list[int]:
            return list(await asyncio.gather(*(lane.call(lambda i=i: i) for i in range(300))))
        answers[name] = asyncio.run(main())

    try:
        threads = [threading.Thread(target=caller, args=(n,)) for n in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert answers == {"a": list(range(300)), "b": list(range(300))}
    finally:
        lane.close()
