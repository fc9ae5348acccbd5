"""The freeze at CRIU's start and its guard (shim.checkpoint.prefreeze): a real process named criu that
creates its log, a real guard shell, and a v1-style freezer.state file standing in for the cgroup."""

from __future__ import annotations

import asyncio
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from shim.checkpoint import orphandump
from shim.checkpoint.prefreeze import PreFreeze
from tests.support.procs import owned_processes

ROOT = Path(__file__).resolve().parents[2]

# CRIU's side: named criu, creates and holds its log (as CRIU's log_init), exits when stdin ends.
_CRIU = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, b"criu", 0, 0, 0)  # PR_SET_NAME
log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
print("started", flush=True)
sys.stdin.read()
"""

# criu-shim's side in a process of its own, to be killed once it has frozen the cgroup.
_SHIM = """
import asyncio, sys, threading
from contextlib import AsyncExitStack
from pathlib import Path
from shim.checkpoint.prefreeze import PreFreeze

async def main() -> None:
    stack = AsyncExitStack()
    early = await PreFreeze.start(Path(sys.argv[1]), Path(sys.argv[2]), stack)
    assert early is not None
    froze = await asyncio.to_thread(early.freeze_at_start, threading.Event(), 10)
    print(early._guard.pid if froze else "no", flush=True)
    await asyncio.to_thread(sys.stdin.read)

asyncio.run(main())
"""


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    with owned_processes() as started:
        yield started


def _cgroup(tmp_path: Path, state: str = "THAWED") -> Path:
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "freezer.state").write_text(state)
    return cgroup


def _state(cgroup: Path) -> str:
    return (cgroup / "freezer.state").read_text().strip()


def _line(proc: subprocess.Popen[str], timeout: float = 10) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _criu(log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CRIU, str(log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_frozen_once_criu_started_and_left_frozen_with_keep(tmp_path: Path,
                                                            processes: list[subprocess.Popen[str]]) -> None:
    cgroup, log = _cgroup(tmp_path), tmp_path / "dump.log"

    async def run() -> bool:
        async with AsyncExitStack() as stack:
            early = await PreFreeze.start(cgroup, log, stack)
            assert early is not None
            assert _state(cgroup) == "THAWED"  # nothing frozen before CRIU runs
            criu = _criu(log)
            processes.append(criu)
            froze = await asyncio.to_thread(early.freeze_at_start, threading.Event(), 10)
            assert _state(cgroup) == "FROZEN"
            assert criu.stdin is not None
            criu.stdin.close()
            criu.wait(10)
            return froze
        # the stack let the guard go with `keep`: it thaws nothing (our own paths own the freezer)

    assert asyncio.run(run())
    assert _state(cgroup) == "FROZEN"


def test_no_criu_start_no_freeze(tmp_path: Path) -> None:
    cgroup = _cgroup(tmp_path)

    async def run() -> bool:
        async with AsyncExitStack() as stack:
            early = await PreFreeze.start(cgroup, tmp_path / "dump.log", stack)
            assert early is not None
            ended = threading.Event()
            ended.set()  # the dump ended before CRIU ever wrote its log
            return await asyncio.to_thread(early.freeze_at_start, ended, 10)

    assert not asyncio.run(run())
    assert _state(cgroup) == "THAWED"


def test_a_cgroup_not_thawed_is_left_alone(tmp_path: Path) -> None:
    cgroup = _cgroup(tmp_path, "FROZEN")  # paused by its user

    async def run() -> PreFreeze | None:
        async with AsyncExitStack() as stack:
            return await PreFreeze.start(cgroup, tmp_path / "dump.log", stack)

    assert asyncio.run(run()) is None
    assert _state(cgroup) == "FROZEN"


def test_criu_shim_killed_the_guard_thaws_once_criu_has_ended(tmp_path: Path,
                                                              processes: list[subprocess.Popen[str]]) -> None:
    cgroup, log = _cgroup(tmp_path), tmp_path / "dump.log"
    criu = _criu(log)
    processes.append(criu)
    assert _line(criu) == "started"
    shim = subprocess.Popen([sys.executable, "-c", _SHIM, str(cgroup), str(log)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    processes.append(shim)
    guard = _line(shim)
    assert guard.isdigit()
    assert _state(cgroup) == "FROZEN"
    shim.send_signal(signal.SIGKILL)
    shim.wait(10)
    # CRIU still runs (it puts the freezer back as it found it when its dump fails): no thaw yet.
    assert not orphandump._until(lambda: _state(cgroup) == "THAWED", 0.5)
    assert criu.stdin is not None
    criu.stdin.close()
    assert orphandump._until(lambda: _state(cgroup) == "THAWED", 10)  # CRIU gone: the guard thawed
    assert orphandump._until(lambda: _gone(int(guard)), 10)


# CRIU's own freeze, raced: its log says it found the cgroup THAWED (it looked just before our write),
# our FROZEN has landed after its own thaw (the cgroup file says FROZEN), and it seizes its task
# (PTRACE_SEIZE) a moment later, as CRIU does before it thaws; it never thaws itself here.
_CRIU_FIRST = """
import ctypes, os, subprocess, sys, time
from pathlib import Path
ctypes.CDLL(None).prctl(15, b"criu", 0, 0, 0)  # PR_SET_NAME
cgroup, log = Path(sys.argv[1]), sys.argv[2]
task = subprocess.Popen(["sleep", "60"])
(cgroup / "tasks").write_text(f"{task.pid}\\n")
fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
os.write(fd, f"(00.001) freezing cgroup {cgroup}: 100 x 100ms attempts, timeout: 10s\\n".encode())
os.write(fd, b"(00.001) freezer.state=THAWED\\n(00.002) freezer.state=FROZEN\\n")
print("started", flush=True)
sys.stdin.readline()
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
assert libc.ptrace(0x4206, task.pid, None, None) == 0, ctypes.get_errno()  # PTRACE_SEIZE
print("seized", flush=True)
sys.stdin.read()
task.kill()
"""


def test_a_freeze_of_ours_after_criu_froze_itself_is_undone_once_criu_has_seized(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    cgroup, log = _cgroup(tmp_path), tmp_path / "dump.log"

    async def run() -> None:
        async with AsyncExitStack() as stack:
            early = await PreFreeze.start(cgroup, log, stack)
            assert early is not None
            criu = subprocess.Popen([sys.executable, "-c", _CRIU_FIRST, str(cgroup), str(log)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            processes.append(criu)
            assert _line(criu) == "started"
            (cgroup / "freezer.state").write_text("FROZEN")  # ours, landed after CRIU's thaw
            undo = asyncio.create_task(asyncio.to_thread(early._undo_after_criu, criu.pid, threading.Event()))
            await asyncio.sleep(0.2)
            assert _state(cgroup) == "FROZEN"  # not before CRIU holds its tasks: it lists them frozen
            assert criu.stdin is not None
            criu.stdin.write("seize\n")
            criu.stdin.flush()
            assert _line(criu) == "seized"
            await asyncio.wait_for(undo, 10)
            assert _state(cgroup) == "THAWED"  # else the seized task stays frozen and CRIU waits forever
            criu.stdin.close()
            criu.wait(10)

    asyncio.run(run())


def test_criu_already_at_its_freezer_is_left_to_freeze_alone(tmp_path: Path,
                                                             processes: list[subprocess.Popen[str]]) -> None:
    cgroup, log = _cgroup(tmp_path), tmp_path / "dump.log"
    log.write_text(f"(00.001) freezing cgroup {cgroup}: 100 x 100ms attempts, timeout: 10s\n")

    async def run() -> bool:
        async with AsyncExitStack() as stack:
            early = await PreFreeze.start(cgroup, log, stack)
            assert early is not None
            criu = _criu(log)
            processes.append(criu)
            assert _line(criu) == "started"
            froze = await asyncio.to_thread(early.freeze_at_start, threading.Event(), 10)
            assert criu.stdin is not None
            criu.stdin.close()
            criu.wait(10)
            return froze

    assert not asyncio.run(run())
    assert _state(cgroup) == "THAWED"  # never written by us


@pytest.mark.parametrize(("text", "found_thawed"), [
    ("(00.1) freezing cgroup /x: 100 x 100ms\n(00.1) freezer.state=THAWED\n(00.2) freezer.state=FROZEN\n", True),
    ("(00.1) freezing cgroup /x: 100 x 100ms\n(00.1) cgroup.freeze=0\n(00.2) cgroup.freeze=1\n", True),
    ("(00.1) freezing cgroup /x: 100 x 100ms\n(00.1) freezer.state=FROZEN\n", False),
    ("(00.1) freezing cgroup /x: 100 x 100ms\n(00.1) freezer.state=FREEZING\n", False),
    ("(00.1) freezing cgroup /x: 100 x 100ms\n", False),  # not looked yet
    ("(00.0) freezer.state=THAWED\n", False),  # not CRIU's look at its freezer
    ("", False),
])
def test_what_criu_found_at_its_first_look(text: str, found_thawed: bool) -> None:
    from shim.checkpoint.prefreeze import criu_at_freezer, criu_found_thawed
    assert criu_found_thawed(text) is found_thawed
    assert criu_at_freezer(text) is ("freezing cgroup" in text)
