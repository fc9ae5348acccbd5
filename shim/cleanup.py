"""Clean-up that a cancellation cannot interrupt: shielded undo steps and owned background tasks.

A CRI call is cancelled when its deadline passes or its client goes away. What it
acquired must still be released, and released once: each undo step runs shielded,
so a cancellation arriving meanwhile does not cut it short, and a task started
alongside the call is joined (not left running unowned) on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


async def undo(step: Awaitable[None], failure: BaseException | None, what: str) -> None:
    """Run a clean-up step shielded: a cancelled call (deadline, client gone) must still undo its work.

    If the step fails while another failure is already on its way out, that one is
    reported and this one only logged.
    """
    try:
        await asyncio.shield(step)
    except BaseException:
        if failure is None:
            raise
        log.exception("could not %s after: %s", what, failure)


def release_at_exit(stack: AsyncExitStack, what: str, step: Callable[[], Awaitable[None]]) -> None:
    """Run `step` (made when needed) shielded when `stack` unwinds; under another failure its own is only logged."""
    async def release(kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        await undo(step(), exc, what)
        return False

    stack.push_async_exit(release)


async def join(task: asyncio.Future[Any], what: str) -> None:
    """Wait for a task started alongside the call, shielded; its failure is logged, never raised.

    Used for work whose outcome the call does not depend on (a spare started for the
    next call): the call owns it until it ends, but does not fail because of it.
    """
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            raise  # we were cancelled again while waiting: the task still ends on its own
        log.warning("%s was cancelled", what)
    except Exception:
        log.exception("could not %s", what)


async def to_thread_to_end(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`asyncio.to_thread`, except that a cancellation waits for the thread to end before it is raised.

    A worker thread cannot be stopped. If the call were cancelled while the thread
    still wrote (say, unpacked an archive), the undo that follows would race it and
    leave whatever it wrote after the undo. So the cancellation is held until the
    thread returns; the thread's own outcome is then dropped.
    """
    task = asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.debug("a cancelled call's worker ended with: %r", task.exception())
        raise
