"""A cancelled checkpoint lets runc's dump end before the thaw (shim.checkpoint.checkpointer._outlive_cancellation)."""

from __future__ import annotations

import asyncio

import pytest

from shim.checkpoint.checkpointer import _outlive_cancellation


class Dump:
    """A stand-in for the task Checkpoint call: ends when released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.finished = False
        self.cancelled = False

    async def run(self) -> None:
        try:
            await self.release.wait()
            self.finished = True
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def _cancel_twice_then_release(dump: Dump, caller: asyncio.Task[None]) -> None:
    await asyncio.sleep(0)
    caller.cancel()  # the CRI deadline
    await asyncio.sleep(0.01)
    caller.cancel()  # the client's connection going away
    await asyncio.sleep(0.01)
    assert not caller.done(), "the caller gave up before the dump ended"
    dump.release.set()


def test_cancelled_caller_waits_for_the_dump_then_is_cancelled() -> None:
    async def main() -> Dump:
        dump = Dump()
        caller = asyncio.create_task(_outlive_cancellation(dump.run()))
        await _cancel_twice_then_release(dump, caller)
        with pytest.raises(asyncio.CancelledError):
            await caller
        return dump

    dump = asyncio.run(main())
    assert dump.finished and not dump.cancelled


def test_a_dump_that_never_ends_is_abandoned_after_the_grace() -> None:
    async def main() -> Dump:
        dump = Dump()
        caller = asyncio.create_task(_outlive_cancellation(dump.run(), grace=0.05))
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0)
        return dump

    dump = asyncio.run(main())
    assert dump.cancelled and not dump.finished


def test_without_cancellation_errors_pass_through() -> None:
    async def failing() -> None:
        raise RuntimeError("dump failed")

    with pytest.raises(RuntimeError, match="dump failed"):
        asyncio.run(_outlive_cancellation(failing()))
