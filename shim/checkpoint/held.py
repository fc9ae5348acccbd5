"""The dump with the rootfs diff taken inside CRIU's own hold of the container (no pause of ours).

The engine's alternative to pausing the container around the whole dump
(runc's and CRIU's start-up included): the container is stopped only while
CRIU holds it, and the filesystem side of the checkpoint (rootfs diff, the
pod's /dev/shm) is taken in that window, kept open by the gate (see
`dumpgate`). The pause remains for what the gate cannot serve: a node where
the image directory takes no FIFO, or a container whose cgroup is not found.

A stop-after dump goes through the gate too: for its diff inside CRIU's hold,
and for the workload. Until the gate opens, every failure of ours (the diff,
a cancelled request, criu-shim killed) makes CRIU's dump fail, so the
container runs on; a dump that CRIU finished would have ended it with no
archive written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

from shim.archive_layout import IMAGES_DIR
from shim.checkpoint import dumpgate, options, recovery
from shim.checkpoint.prefreeze import PreFreeze
from shim.containerd import Containerd
from shim.errors import Internal
from shim.faults import Point, armed, reached

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long CRIU may take to seize the container after the dump was asked for (runc's and CRIU's
# start-up on a loaded node); past it the gate is let go unopened (CRIU's dump fails there) and the checkpoint
# fails, the container running.
HOLD_TIMEOUT = 60.0
THAW_TIMEOUT = 30.0
STATS_DUMP = "stats-dump"  # CRIU's statistics, in its work directory


async def make_gate(staging: Path, opts: options.CheckpointOptions, cgroup: Path | None,
                    stack: AsyncExitStack) -> dumpgate.Gate | None:
    """The gate for this dump, released with `stack`; None where the engine must pause instead."""
    if cgroup is None:
        return None
    images = staging / IMAGES_DIR
    images.mkdir(mode=0o700, exist_ok=True)
    gate = await asyncio.to_thread(dumpgate.Gate.make, images)
    if gate is not None:
        stack.push_async_callback(asyncio.to_thread, gate.close)
    return gate


async def dump_holding(gate: dumpgate.Gate, cgroup: Path, dump: Coroutine[Any, Any, None],
                       snapshot: Callable[[], Awaitable[T]], committing: Callable[[], None] = lambda: None,
                       settle: Callable[[], Awaitable[None]] | None = None,
                       prefreeze: PreFreeze | None = None,
                       prepare: Callable[[T, int], Awaitable[None]] | None = None) -> T:
    """Run `dump`; take `snapshot()` while CRIU holds the container; return the snapshot.

    The holder opens the gate only after a good snapshot, and only if the
    request was not cancelled meanwhile (the dump itself outlives a
    cancellation: checkpointer's `_outlive_cancellation`); on every other path
    it fails the dump at the gate (`Gate.abort`), so CRIU is never left holding
    the container for us and lets it run on, a stop-after one too. The failed
    snapshot's own error is raised, not CRIU's broken pipe. `committing()` is
    called on the event loop the moment the gate is decided to open, so that
    `complete_once_committed` can never see a cancellation race that decision.

    `settle` (a stop-after dump: opening the gate ends the container) is
    awaited once CRIU waits at the gate, every page written, before the gate
    opens: the page stream's outcome (a full disk) is known then, and its
    error fails the dump at the gate, the container running.

    `prefreeze` (a stop-after dump) freezes the cgroup the moment CRIU starts,
    so that CRIU skips its own, slow, freeze (see `prefreeze`).

    `prepare(snapshot, criu_pid)` (a stop-after dump) is awaited after
    `settle`, before the gate opens: the archive written but for what CRIU
    writes last, and the roll-forward marker (`rollforward`); its error fails
    the dump at the gate too. Whenever the gate opens, CRIU's inventory is
    taken out of the pipe into its file at once (before CRIU ends), so that a
    criu-shim dying from then on leaves a dump recovery can complete.
    """
    stop = threading.Event()
    task = asyncio.current_task()

    def cancelled() -> bool:
        return task is not None and task.cancelling() > 0

    failed: list[BaseException] = []  # our error (snapshot, settle), for which the dump was made to fail
    holder = asyncio.ensure_future(
        _while_held(gate, cgroup, stop, snapshot, cancelled, committing, settle, failed, prefreeze, prepare))
    try:
        await dump
    except BaseException as exc:
        stop.set()
        await asyncio.wait([holder])  # it has opened or failed the gate on its way out
        ours = None if holder.cancelled() else holder.exception()  # retrieved, whichever error is raised
        if failed and not isinstance(exc, asyncio.CancelledError):
            log.info("CRIU's dump was failed at the gate after our part failed; CRIU said: %s", exc)
            raise failed[0] from None
        if ours is not None:
            log.info("the snapshot beside a failed dump ended with: %s", ours)
        raise
    stop.set()
    result = await holder  # done, or about to be: CRIU could not finish before the gate opened
    try:
        await asyncio.to_thread(gate.finish)
    except (OSError, dumpgate.GateError) as exc:
        raise Internal(f"checkpoint failed: CRIU's inventory image could not be kept: {exc}") from None
    return result


async def _while_held(gate: dumpgate.Gate, cgroup: Path, stop: threading.Event,
                      snapshot: Callable[[], Awaitable[T]], cancelled: Callable[[], bool],
                      committing: Callable[[], None], settle: Callable[[], Awaitable[None]] | None,
                      failed: list[BaseException], prefreeze: PreFreeze | None = None,
                      prepare: Callable[[T, int], Awaitable[None]] | None = None) -> T:
    taken = False
    try:
        if prefreeze is not None:
            await asyncio.to_thread(prefreeze.freeze_at_start, stop, HOLD_TIMEOUT)
        try:
            criu_pid = await asyncio.to_thread(dumpgate.wait_held, cgroup, stop, HOLD_TIMEOUT)
        except dumpgate.GateError as exc:
            raise Internal(f"checkpoint failed: {exc}") from None
        reached(Point.CHECKPOINT_FROZEN)
        try:
            result = await snapshot()
        except Exception as exc:
            failed.append(exc)
            raise
        if settle is not None:
            await _settle_at_gate(gate, criu_pid, stop, settle, failed)
        if prepare is not None:
            try:
                await prepare(result, criu_pid)
            except Exception as exc:
                failed.append(exc)
                raise
        if armed(Point.CHECKPOINT_DUMPED):  # the point means: every page written, CRIU waiting at the gate
            await asyncio.to_thread(dumpgate.wait_at_gate, criu_pid, HOLD_TIMEOUT)
        reached(Point.CHECKPOINT_DUMPED)
        taken = not cancelled()
        if taken:
            committing()  # same loop step as the check: no cancellation can come in between
        return result
    finally:
        if taken:
            await asyncio.shield(asyncio.to_thread(_open_and_keep, gate))
            reached(Point.CHECKPOINT_COMMITTED)
        else:
            await asyncio.shield(asyncio.to_thread(gate.abort, stop.is_set))


def _open_and_keep(gate: dumpgate.Gate) -> None:
    """Open the gate and keep CRIU's inventory in a file as soon as CRIU has written it.

    A failure to keep it is left for `Gate.finish` after the dump to report (it tries again)."""
    gate.open()
    try:
        gate.finish()
    except (OSError, dumpgate.GateError) as exc:
        log.warning("CRIU's inventory could not be kept at once: %s", exc)


async def _settle_at_gate(gate: dumpgate.Gate, criu_pid: int, stop: threading.Event,
                          settle: Callable[[], Awaitable[None]], failed: list[BaseException]) -> None:
    """Wait for CRIU at the gate, then `settle()`; a failure of ours goes to `failed` (the cause to raise)."""
    try:
        # No deadline of ours: CRIU writes every page first (minutes for a big container); the dump's
        # own end (`stop`) ends the wait.
        await asyncio.to_thread(dumpgate.wait_arrival, gate, criu_pid, stop, math.inf)
    except dumpgate.GateError as exc:
        error = Internal(f"checkpoint failed: {exc}")
        if not stop.is_set():  # else the dump ended on its own, and its error is the one to raise
            failed.append(error)
        raise error from None
    try:
        await settle()
    except Exception as exc:
        failed.append(exc)
        raise


async def complete_once_committed(call: Coroutine[Any, Any, None], committed: Callable[[], bool]) -> None:
    """Run the checkpoint `call`; cancelled once `committed()`, let it reach its archive first.

    Committed: the gate opened for a stop-after dump, so CRIU ends the
    container and the archive is all that will be left of the workload; a
    deadline or a client gone then must not delete the staging directory
    half-way (the archive is written, then the cancellation is raised). Before
    that, the cancellation goes through at once, and the gate fails CRIU's dump
    with the container running.
    """
    task = asyncio.ensure_future(call)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():
            raise
        if not committed():
            task.cancel()
        else:
            log.warning("checkpoint cancelled after CRIU's stop-after dump went through: writing the archive first")
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("the cancelled checkpoint ended with: %s", task.exception())
        raise


def keep_running_on_failure(containerd: Containerd, container_id: str, stack: AsyncExitStack) -> None:
    """A dump that failed may have left the cgroup frozen (CRIU killed between its freeze and its thaw)."""
    async def check(exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None:
            try:
                done = await asyncio.shield(asyncio.wait_for(recovery.ensure_running(containerd, container_id),
                                                             THAW_TIMEOUT))
                log.info("container %s after a failed dump: %s", container_id, done)
            except Exception:
                log.exception("could not make sure container %s runs after: %s", container_id, exc)
        return False

    stack.push_async_exit(check)


def criu_frozen_s(work: Path) -> float:
    """How long CRIU held the container (its own `frozen_time`, which includes any wait at the gate)."""
    import pycriu.images  # Debian's pycriu, in the venv; imported here only, as the other readers do

    try:
        with open(work / STATS_DUMP, "rb") as f:
            entry = pycriu.images.load(f)["entries"][0]["dump"]
        return float(entry["frozen_time"]) / 1e6
    except Exception:  # a statistics file we cannot read costs the figure, never the checkpoint
        return 0.0
