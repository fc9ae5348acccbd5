"""The gate CRIU's last image waits at (shim.checkpoint.dumpgate, orphandump): real FIFOs, a real
process named criu playing CRIU's side (open for writing, write the inventory, exit 41 on EPIPE)."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.checkpoint import dumpgate, orphandump
from tests.support.procs import owned_processes

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = b"inventory-bytes"
WROTE, BROKEN_PIPE = 0, 41
# The racy cases run this often; GATE_REPEAT=200 for a long local run.
REPEAT = int(os.environ.get("GATE_REPEAT", "3"))

# CRIU's side: the image directory held open (runc hands CRIU a descriptor of it), then, once told
# (a line on stdin) or at once, open(O_WRONLY) of the FIFO, say so, write the inventory (CRIU's bfd
# flush at close), exit 0; CRIU's "Error flushing image: Broken pipe" is exit 41.
_CRIU = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, b"criu", 0, 0, 0)  # PR_SET_NAME: the gate looks for a process named criu
images = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
if sys.argv[3] == "wait":
    sys.stdin.readline()
fd = os.open(sys.argv[2], os.O_WRONLY)
print("opened", flush=True)
try:
    os.write(fd, sys.argv[4].encode())
except BrokenPipeError:
    sys.exit(41)
sys.exit(0)
"""

# criu-shim's side in a process of its own, to be killed: the gate made and held until stdin ends.
_HOLDER = """
import sys
from pathlib import Path
from shim.checkpoint import dumpgate
gate = dumpgate.Gate.make(Path(sys.argv[1]))
print("ready" if gate else "no gate", flush=True)
sys.stdin.read()
"""


def _criu(images: Path, fifo: Path, wait: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CRIU, str(images), str(fifo), "wait" if wait else "now",
                             INVENTORY.decode()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    with owned_processes() as started:
        yield started


def _line(proc: subprocess.Popen[str], timeout: float = 10) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _until(condition: object, timeout: float = 10) -> bool:
    return orphandump._until(condition, timeout)  # type: ignore[arg-type]


def _gate(images: Path) -> dumpgate.Gate:
    gate = dumpgate.Gate.make(images)
    assert gate is not None
    return gate


def test_criu_never_waits_to_open_the_gate_and_its_write_waits_until_it_opens(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    gate = _gate(tmp_path)
    assert stat.S_ISFIFO(os.lstat(gate.path).st_mode)
    criu = _criu(tmp_path, gate.path)
    processes.append(criu)
    assert _line(criu) == "opened"  # a reader is there before the dump: the open returns at once
    # Held: the write sleeps on the full pipe, so CRIU cannot release (or end) the tasks.
    assert dumpgate.wait_at_gate(criu.pid, 10) and criu.poll() is None
    gate.open()
    assert criu.wait(10) == WROTE
    gate.finish()
    assert stat.S_ISREG(os.lstat(gate.path).st_mode) and gate.path.read_bytes() == INVENTORY  # no filler in it
    assert stat.S_IMODE(os.lstat(gate.path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [dumpgate.GATE]  # no temporary left
    gate.close()  # idempotent after finish


@pytest.mark.parametrize("run", range(REPEAT))
def test_closed_without_opening_criu_s_write_fails_with_epipe(
        tmp_path: Path, processes: list[subprocess.Popen[str]], run: int) -> None:
    gate = _gate(tmp_path)
    criu = _criu(tmp_path, gate.path)
    processes.append(criu)
    assert _line(criu) == "opened"
    if run % 2:  # blocked in its write, or between its open and its write: EPIPE either way
        assert dumpgate.wait_at_gate(criu.pid, 10)
    gate.close()
    assert criu.wait(10) == BROKEN_PIPE  # never written: CRIU's dump fails, the tasks run on
    with pytest.raises(dumpgate.GateError, match="closed before it opened"):
        gate.open()


@pytest.mark.parametrize("run", range(REPEAT))
def test_abort_waits_for_criu_still_on_its_pages_then_fails_its_write(
        tmp_path: Path, processes: list[subprocess.Popen[str]], run: int) -> None:
    gate = _gate(tmp_path)
    criu = _criu(tmp_path, gate.path, wait=True)  # not at the gate yet
    processes.append(criu)
    aborted = threading.Thread(target=gate.abort, args=(lambda: criu.poll() is not None, 20))
    aborted.start()
    assert criu.stdin is not None
    criu.stdin.write("go\n")
    criu.stdin.flush()
    assert criu.wait(20) == BROKEN_PIPE  # a gate let go before CRIU came would leave it asleep in its open
    aborted.join(20)
    assert not aborted.is_alive()
    assert stat.S_ISFIFO(os.lstat(gate.path).st_mode)  # no inventory kept: no checkpoint


def test_wait_arrival_returns_once_criu_has_the_gate_open_and_ends_with_the_dump(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    gate = _gate(tmp_path)
    criu = _criu(tmp_path, gate.path, wait=True)  # still on its pages
    processes.append(criu)
    ended = threading.Event()
    ended.set()
    with pytest.raises(dumpgate.GateError, match="ended before CRIU reached the gate"):
        dumpgate.wait_arrival(gate, criu.pid, ended, 10)
    with pytest.raises(dumpgate.GateError, match="did not reach the gate"):
        dumpgate.wait_arrival(gate, criu.pid, threading.Event(), 0.05)
    assert criu.stdin is not None
    criu.stdin.write("go\n")
    criu.stdin.flush()
    dumpgate.wait_arrival(gate, criu.pid, threading.Event(), 10)
    assert criu.poll() is None  # there, and held
    gate.open()
    assert criu.wait(10) == WROTE


def test_abort_lets_go_at_once_once_the_dump_has_ended(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    gate.abort(lambda: True, timeout=600)  # returns: nothing to wait for
    gate.abort(lambda: True)  # idempotent


@pytest.mark.parametrize("run", range(REPEAT))
def test_criu_shim_killed_fails_criu_s_write_with_no_recovery_step(
        tmp_path: Path, processes: list[subprocess.Popen[str]], run: int) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    processes.append(holder)
    assert _line(holder, 30) == "ready"
    criu = _criu(tmp_path, tmp_path / dumpgate.GATE)
    processes.append(criu)
    assert _line(criu) == "opened"
    if run % 2:
        assert dumpgate.wait_at_gate(criu.pid, 10)
    holder.send_signal(signal.SIGKILL)
    assert criu.wait(10) == BROKEN_PIPE  # the kernel closed the dead holder's descriptors


@pytest.mark.parametrize("fifo", [dumpgate.GATE, "pages-1.img"])
@pytest.mark.parametrize("run", range(REPEAT))
def test_recovery_fails_a_criu_asleep_in_its_open_and_never_lets_it_write(
        tmp_path: Path, processes: list[subprocess.Popen[str]], fifo: str, run: int) -> None:
    # What a dead criu-shim leaves: FIFOs with no reader; CRIU reached one of them afterwards.
    for name in (dumpgate.GATE, "pages-1.img", "pages-2.img"):
        os.mkfifo(tmp_path / name, 0o600)
    criu = _criu(tmp_path, tmp_path / fifo)
    processes.append(criu)
    assert _until(lambda: dumpgate.wait_channel(criu.pid) == orphandump.WAITING_FOR_READER)
    assert orphandump.fail_waiting(tmp_path) == [criu.pid]
    assert criu.wait(10) == BROKEN_PIPE  # its open returned (a reader was there), its write found none
    assert _line(criu) == "opened"
    assert orphandump.fail_waiting(tmp_path) == []  # nothing left waiting


def test_recovery_lets_go_on_a_criu_a_dead_recovery_left_stopped(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    os.mkfifo(tmp_path / dumpgate.GATE, 0o600)
    criu = _criu(tmp_path, tmp_path / dumpgate.GATE)
    processes.append(criu)
    assert _until(lambda: dumpgate.wait_channel(criu.pid) == orphandump.WAITING_FOR_READER)
    os.kill(criu.pid, signal.SIGSTOP)
    assert _until(lambda: orphandump._state(criu.pid) == "T")
    assert orphandump.fail_waiting(tmp_path) == []  # continued, to be failed on the next pass
    assert _until(lambda: dumpgate.wait_channel(criu.pid) == orphandump.WAITING_FOR_READER)
    assert orphandump.fail_waiting(tmp_path) == [criu.pid]
    assert criu.wait(10) == BROKEN_PIPE


def test_recovery_leaves_alone_a_criu_of_another_directory_and_one_not_waiting(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    for images in (mine, other):
        images.mkdir()
        os.mkfifo(images / dumpgate.GATE, 0o600)
    stranger = _criu(other, other / dumpgate.GATE)
    busy = _criu(mine, mine / dumpgate.GATE, wait=True)  # working elsewhere, not at a FIFO
    processes += [stranger, busy]
    assert _until(lambda: dumpgate.wait_channel(stranger.pid) == orphandump.WAITING_FOR_READER)
    assert orphandump.fail_waiting(mine) == []
    assert stranger.poll() is None and busy.poll() is None
    assert orphandump.fail_waiting(tmp_path / "missing") == []


def test_finish_refuses_an_empty_inventory(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    gate.open()
    fd = os.open(gate.path, os.O_WRONLY)  # a writer that leaves without writing
    os.close(fd)
    with pytest.raises(dumpgate.GateError, match="empty"):
        gate.finish(timeout=2)
    gate.close()


def test_open_is_idempotent_and_close_too(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    gate.open()
    gate.open()
    gate.close()
    gate.close()


def test_the_pipe_is_full_so_a_small_write_cannot_land(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    fd = os.open(gate.path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.write(fd, b"x")
    finally:
        os.close(fd)
        gate.close()


def test_no_gate_where_a_fifo_cannot_be_made(tmp_path: Path) -> None:
    assert dumpgate.Gate.make(tmp_path / "missing") is None


def test_wait_held_never_sees_untraced_tasks_as_held_and_ends_when_told(tmp_path: Path) -> None:
    (tmp_path / "tasks").write_text(f"{os.getpid()}\n")  # this test process: not traced
    stop = threading.Event()
    stop.set()
    with pytest.raises(dumpgate.GateError, match="ended before CRIU held"):
        dumpgate.wait_held(tmp_path, stop, timeout=5)
    with pytest.raises(dumpgate.GateError, match="did not take hold"):
        dumpgate.wait_held(tmp_path, threading.Event(), timeout=0.05)


def test_an_empty_cgroup_is_never_held(tmp_path: Path) -> None:
    (tmp_path / "tasks").write_text("")
    with pytest.raises(dumpgate.GateError):
        dumpgate.wait_held(tmp_path, threading.Event(), timeout=0.02)


def test_held_open_names_the_images_a_process_still_writes(tmp_path: Path) -> None:
    """CRIU at its gate still holds its global images open (buffered): those, and only those, are late."""
    images = tmp_path / "checkpoint"
    (images / "sub").mkdir(parents=True)
    for name in ("files.img", "core-1.img", "sub/inner.img"):
        (images / name).write_bytes(b"x")
    (tmp_path / "checkpoint-other").mkdir()
    (tmp_path / "checkpoint-other" / "x.img").write_bytes(b"x")
    held = [os.open(images / "files.img", os.O_RDONLY), os.open(images / "sub" / "inner.img", os.O_RDONLY),
            os.open(tmp_path / "checkpoint-other" / "x.img", os.O_RDONLY)]
    try:
        assert dumpgate.held_open(os.getpid(), images) == {"files.img"}
    finally:
        for fd in held:
            os.close(fd)
    assert dumpgate.held_open(os.getpid(), images) == set()
    assert dumpgate.held_open(2**22 + 1, images) == set()  # a process gone: nothing
