"""The dump with the snapshot inside CRIU's hold (shim.checkpoint.held), a thread playing CRIU at the gate."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from pathlib import Path

import pytest

from shim.checkpoint import dumpgate, held
from shim.errors import Internal, ResourceExhausted


class FakeCriu:
    """Holds the container (sets `holding`), then writes its inventory at the gate (blocks until it
    opens) and lets go; a write that fails with EPIPE fails the dump, the tasks running on."""

    def __init__(self, gate: dumpgate.Gate, fail_before_hold: bool = False) -> None:
        self.gate = gate
        self.fail_before_hold = fail_before_hold
        self.holding = threading.Event()
        self.at_gate = threading.Event()  # its open of the gate returned
        self.released = threading.Event()
        self.failed = threading.Event()

    def _run(self) -> None:
        self.holding.set()
        fd = os.open(self.gate.path, os.O_WRONLY)  # never waits: the gate's reader is there
        self.at_gate.set()
        try:
            os.write(fd, b"inventory")  # waits on the full pipe until the gate opens
        except BrokenPipeError:  # the gate was failed: CRIU's dump fails, the tasks run on
            self.failed.set()
            raise Internal("runc: criu failed: type NOTIFY errno 0 (Broken pipe)") from None
        finally:
            os.close(fd)
            self.holding.clear()
        self.released.set()

    async def dump(self) -> None:
        if self.fail_before_hold:
            raise Internal("runc: criu failed: type NOTIFY errno 0")
        await asyncio.to_thread(self._run)


class Proc:
    """What /proc shows the holder: the fake CRIU of the test."""

    criu: FakeCriu | None = None

    def wait_held(self, cgroup: Path, stop: threading.Event, timeout: float) -> int:
        assert self.criu is not None
        while not self.criu.holding.wait(0.01):
            if stop.is_set():
                raise dumpgate.GateError("the dump ended before CRIU held the container")
        return 4242

    def wait_arrival(self, gate: dumpgate.Gate, criu_pid: int, stop: threading.Event, timeout: float) -> None:
        assert self.criu is not None
        while not self.criu.at_gate.wait(0.01):
            if stop.is_set():
                raise dumpgate.GateError("the dump ended before CRIU reached the gate")

    def criu_for(self, gate: dumpgate.Gate, fail_before_hold: bool = False) -> FakeCriu:
        self.criu = FakeCriu(gate, fail_before_hold)
        return self.criu


@pytest.fixture
def proc(monkeypatch: pytest.MonkeyPatch) -> Proc:
    seen = Proc()
    monkeypatch.setattr(dumpgate, "wait_held", seen.wait_held)
    monkeypatch.setattr(dumpgate, "wait_arrival", seen.wait_arrival)
    # The fake CRIU is a thread of this process, not a process named criu.
    monkeypatch.setattr(dumpgate, "criu_holds", lambda fifo: seen.criu is not None and seen.criu.at_gate.is_set())
    return seen


def test_the_snapshot_is_taken_while_criu_holds_the_container(tmp_path: Path, proc: Proc) -> None:
    gate = dumpgate.Gate.make(tmp_path)
    assert gate is not None
    criu = proc.criu_for(gate)
    seen: list[bool] = []

    async def snapshot() -> str:
        await asyncio.sleep(0.05)  # CRIU must still be waiting at the gate after this
        seen.append(criu.holding.is_set() and not criu.released.is_set())
        return "diff"

    assert asyncio.run(held.dump_holding(gate, tmp_path, criu.dump(), snapshot)) == "diff"
    assert seen == [True] and criu.released.is_set()
    inventory = tmp_path / dumpgate.GATE
    assert stat.S_ISREG(os.lstat(inventory).st_mode) and inventory.read_bytes() == b"inventory"


def test_a_failed_snapshot_still_lets_criu_go_and_fails_the_checkpoint(tmp_path: Path, proc: Proc) -> None:
    gate = dumpgate.Gate.make(tmp_path)
    assert gate is not None
    criu = proc.criu_for(gate)

    async def snapshot() -> str:
        raise ResourceExhausted("no space left writing checkpoint /x.tar")

    with pytest.raises(ResourceExhausted, match="no space left"):  # the cause, not CRIU's broken pipe
        asyncio.run(held.dump_holding(gate, tmp_path, criu.dump(), snapshot))
    # CRIU's dump failed at the gate: it lets the tasks run on (a stop-after dump would otherwise end the
    # container with no archive written), and it is never left held for a reader that is gone.
    assert criu.failed.is_set() and not criu.released.is_set() and not criu.holding.is_set()


def test_a_cancelled_checkpoint_fails_the_dump_at_the_gate(tmp_path: Path, proc: Proc) -> None:
    gate = dumpgate.Gate.make(tmp_path)
    assert gate is not None
    criu = proc.criu_for(gate)

    async def cancelled_while_held() -> None:
        async def snapshot() -> str:
            assert me is not None
            me.cancel()  # the deadline passes while the diff is taken; the dump outlives it
            return "diff"

        async def dump() -> None:  # as checkpointer's _outlive_cancellation: the dump runs on, then re-raises
            task = asyncio.ensure_future(criu.dump())
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                with contextlib.suppress(Internal):
                    await task
                raise

        me = asyncio.current_task()
        await held.dump_holding(gate, tmp_path, dump(), snapshot)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled_while_held())
    assert criu.failed.is_set() and not criu.released.is_set()  # the gate never opened for a cancelled request


def test_a_dump_that_fails_before_the_hold_ends_the_wait(tmp_path: Path, proc: Proc) -> None:
    gate = dumpgate.Gate.make(tmp_path)
    assert gate is not None
    criu = proc.criu_for(gate, fail_before_hold=True)
    taken: list[str] = []

    async def snapshot() -> str:
        taken.append("diff")
        return "diff"

    with pytest.raises(Internal, match="criu failed"):
        asyncio.run(held.dump_holding(gate, tmp_path, criu.dump(), snapshot))
    assert taken == []  # nothing is taken outside CRIU's hold


def test_a_gate_for_stop_after_too_none_without_a_cgroup(tmp_path: Path) -> None:
    from contextlib import AsyncExitStack

    from shim.checkpoint.options import CheckpointOptions

    async def make(opts: CheckpointOptions, cgroup: Path | None) -> dumpgate.Gate | None:
        staging = tmp_path / f"staging-{len(list(tmp_path.iterdir()))}"
        staging.mkdir()
        async with AsyncExitStack() as stack:
            return await held.make_gate(staging, opts, cgroup, stack)

    assert asyncio.run(make(CheckpointOptions(stop_after=True), tmp_path)) is not None
    assert asyncio.run(make(CheckpointOptions(), None)) is None
    assert asyncio.run(make(CheckpointOptions(), tmp_path)) is not None


@pytest.mark.parametrize("committed", [True, False])
def test_a_cancellation_after_the_gate_committed_lets_the_archive_be_written_first(committed: bool) -> None:
    """Stop-after: once the gate opened, CRIU ends the container and only the archive keeps the workload."""
    archive: list[str] = []
    seen_cancel: list[bool] = []

    async def run() -> None:
        writing = asyncio.Event()
        proceed = asyncio.Event()

        async def checkpoint() -> None:
            writing.set()
            try:
                await proceed.wait()  # the archive being written
            except asyncio.CancelledError:
                seen_cancel.append(True)
                raise
            archive.append("written")

        consulted = asyncio.Event()  # the cancellation has reached the decision

        def is_committed() -> bool:
            consulted.set()
            return committed

        outer = asyncio.ensure_future(held.complete_once_committed(checkpoint(), is_committed))
        await writing.wait()
        outer.cancel()  # the deadline passes
        await consulted.wait()
        proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await outer

    asyncio.run(run())
    assert archive == (["written"] if committed else [])
    assert seen_cancel == ([] if committed else [True])


@pytest.mark.parametrize("disk_full", [False, True])
def test_stop_after_settles_the_page_stream_with_criu_at_the_gate_before_it_opens(
        tmp_path: Path, proc: Proc, disk_full: bool) -> None:
    gate = dumpgate.Gate.make(tmp_path)
    assert gate is not None
    criu = proc.criu_for(gate)
    seen: list[bool] = []

    async def snapshot() -> str:
        return "diff"

    async def settle() -> None:  # the page stream's end, known only once CRIU has written every page
        seen.append(criu.at_gate.is_set() and not criu.released.is_set())
        if disk_full:
            raise ResourceExhausted("no space left on the filesystem of /x for the checkpoint images")

    run = held.dump_holding(gate, tmp_path, criu.dump(), snapshot, settle=settle)
    if disk_full:
        with pytest.raises(ResourceExhausted, match="no space left"):
            asyncio.run(run)
        # A stop-after dump must not finish: it would end the container with no archive written.
        assert criu.failed.is_set() and not criu.released.is_set()
    else:
        assert asyncio.run(run) == "diff" and criu.released.is_set()
    assert seen == [True]


class LingeringCriu(FakeCriu):
    """CRIU after its inventory: its last images, the tasks ended, its log; `go_on` lets it end."""

    def __init__(self, gate: dumpgate.Gate) -> None:
        super().__init__(gate)
        self.go_on = threading.Event()
        self.inventory_kept_before_the_end: list[bool] = []

    def _run(self) -> None:
        super()._run()
        self.go_on.wait(10)
        path = self.gate.path
        self.inventory_kept_before_the_end.append(stat.S_ISREG(os.lstat(path).st_mode) and
                                                  path.read_bytes() == b"inventory")


@pytest.mark.parametrize("fails", [False, True])
def test_stop_after_prepares_the_archive_before_the_gate_and_keeps_the_inventory_at_once(
        tmp_path: Path, proc: Proc, fails: bool) -> None:
    gate = dumpgate.Gate.make(tmp_path)
    assert gate is not None
    criu = LingeringCriu(gate)
    proc.criu = criu
    prepared: list[tuple[str, int, bool]] = []

    async def snapshot() -> str:
        return "diff"

    async def settle() -> None:
        pass

    async def prepare(diff: str, criu_pid: int) -> None:  # CRIU waits at the gate while the archive is written
        prepared.append((diff, criu_pid, criu.at_gate.is_set() and not criu.released.is_set()))
        if fails:
            raise ResourceExhausted("no space left writing checkpoint /x.tar")

    async def run() -> str:
        task = asyncio.ensure_future(held.dump_holding(gate, tmp_path, criu.dump(), snapshot, settle=settle,
                                                       prepare=prepare))
        if not fails:  # the inventory is a file while CRIU still has its end to go
            while not criu.released.is_set():
                await asyncio.sleep(0.005)
            for _ in range(400):
                if stat.S_ISREG(os.lstat(gate.path).st_mode):
                    break
                await asyncio.sleep(0.005)
        criu.go_on.set()
        return await task

    if fails:
        with pytest.raises(ResourceExhausted, match="no space left writing checkpoint"):
            asyncio.run(run())
        assert criu.failed.is_set() and not criu.released.is_set()  # the container runs on
    else:
        assert asyncio.run(run()) == "diff"
        assert criu.inventory_kept_before_the_end == [True]
    assert prepared == [("diff", 4242, True)]
