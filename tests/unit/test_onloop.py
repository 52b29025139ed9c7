"""onloop: blocking code run on the event loop, suspended at each `wait` while the loop serves other
work; results, exceptions and cancellations cross the switch both ways; each call has its own
context."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from openkms import onloop

var: contextvars.ContextVar[str] = contextvars.ContextVar("onloop_test_var", default="unset")


async def value_later(value: str) -> str:
    await asyncio.sleep(0)
    return value


async def fail_later() -> None:
    await asyncio.sleep(0)
    raise ConnectionResetError("gone")


def test_a_call_runs_on_the_loops_thread_and_returns_what_it_returns() -> None:
    async def main() -> tuple[str, int, int]:
        def fn() -> tuple[str, int]:
            assert onloop.suspendable()
            return onloop.wait(value_later("answer")), threading.get_ident()

        answer, ident = await onloop.run(fn)
        return answer, ident, threading.get_ident()

    answer, inside, outside = asyncio.run(main())
    assert answer == "answer" and inside == outside
    assert not onloop.suspendable()


def test_exceptions_cross_both_ways() -> None:
    def catches() -> str:
        try:
            onloop.wait(fail_later())
        except ConnectionResetError as exc:
            return f"caught {exc}"
        return "not raised"

    def raises() -> None:
        raise ValueError("from the blocking code")

    assert asyncio.run(onloop.run(catches)) == "caught gone"
    with pytest.raises(ValueError, match="from the blocking code"):
        asyncio.run(onloop.run(raises))


def test_calls_interleave_on_one_loop() -> None:
    # The first waits for what only the second sets: it completes only if the loop ran the second
    # while the first was suspended.
    async def main() -> list[str]:
        ready = asyncio.Event()
        order: list[str] = []

        def first() -> str:
            order.append("first waits")
            onloop.wait(ready.wait())
            order.append("first resumed")
            return "first"

        def second() -> str:
            order.append("second sets")
            ready.set()
            return "second"

        results = await asyncio.wait_for(asyncio.gather(onloop.run(first), onloop.run(second)), 5)
        assert results == ["first", "second"]
        return order

    assert asyncio.run(main()) == ["first waits", "second sets", "first resumed"]


def test_each_call_has_its_own_context() -> None:
    async def main() -> tuple[str, str, str]:
        var.set("outside")
        gate = asyncio.Event()
        seen: dict[str, str] = {}

        def setter() -> None:
            var.set("set by the first")
            onloop.wait(gate.wait())
            seen["first after"] = var.get()

        def reader() -> None:
            seen["second"] = var.get()
            gate.set()

        await asyncio.gather(onloop.run(setter), onloop.run(reader))
        return seen["second"], seen["first after"], var.get()

    assert asyncio.run(main()) == ("outside", "set by the first", "outside")


def test_a_cancelled_call_unwinds_the_blocking_code() -> None:
    unwound: list[str] = []

    async def main() -> None:
        def fn() -> None:
            try:
                onloop.wait(asyncio.sleep(30))
            finally:
                unwound.append("finally ran")

        task = asyncio.ensure_future(onloop.run(fn))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert unwound == ["finally ran"]


def test_wait_outside_run_is_refused() -> None:
    coroutine = value_later("x")
    with pytest.raises(RuntimeError, match=r"outside onloop\.run"):
        onloop.wait(coroutine)
    coroutine.close()
