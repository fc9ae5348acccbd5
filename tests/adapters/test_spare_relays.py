"""Restore relays started ahead of need (`SparePool`), and `run_spare`, with real processes.

Every relay here is a real `python -m shim.runtime relay-spare|relay-for`
process, under a unique temporary directory (short: the relay's unix socket
path must fit in 108 bytes) that holds both the relays' directory and the
restores' work root, so every process a test starts names it in its command
line. A relay "works" when a ttrpc call made through its socket reaches a fake
upstream (the runc shim's place; the test writes the `.upstream` mark the
launcher script would) and its answer comes back. Each test ends its own
processes; the fixture then kills by pid whatever names the directory still,
and fails the test if there was any.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shim.api.containerd.runtime.task.v2 import shim_pb2
from shim.restore.relay_processes import Relay, SparePool, stop_relay, wait_ready
from shim.ttrpc import Client, Connection, RequestReceived, Role
from tests.support.procs import alive, cmdline, parent, poll, processes, run

TASK = "containerd.task.v2.Task"
TIMEOUT = 10.0


# -- processes ----------------------------------------------------------------------


# -- the fixture ----------------------------------------------------------------------


@dataclass
class SpareRelayEnv:
    root: Path
    pools: list[SparePool] = field(default_factory=list)

    @property
    def mark(self) -> str:
        """In the command line of every process of this test, and of no other."""
        return f"{self.root}/"

    @property
    def directory(self) -> Path:
        """Where the relays listen (/run/criu-shim/shims in real life)."""
        return self.root / "shims"

    @property
    def work_root(self) -> Path:
        return self.root / "restore"

    @property
    def spare_log(self) -> Path:
        return self.directory / "spare.log"

    def work(self) -> Path:
        """A new restore work dir, as the proxy makes one."""
        work = self.work_root / uuid.uuid4().hex
        work.mkdir(mode=0o700, parents=True)
        (work / "checkpoint").mkdir()
        return work

    def pool(self) -> SparePool:
        made = SparePool(self.work_root, self.directory)
        self.pools.append(made)
        return made

    def processes(self, *texts: str) -> list[int]:
        return processes(self.mark, *texts)

    def spares(self) -> list[int]:
        """The waiting spares: relay-spare processes not a launcher (our child), nor serving (with a pid file)."""
        serving = {int(p.read_text()) for p in self.directory.glob("*.pid")} if self.directory.exists() else set()
        return [pid for pid in self.processes("shim.runtime relay-spare")
                if parent(pid) != os.getpid() and pid not in serving]

    def wait_gone(self, pid: int) -> None:
        poll(lambda: not alive(pid), f"process {pid} exited")


@pytest.fixture
def env() -> Iterator[SpareRelayEnv]:
    made = SpareRelayEnv(Path(tempfile.mkdtemp(prefix="spare-", dir="/tmp")))
    made.work_root.mkdir()
    try:
        yield made
    finally:
        for pool in made.pools:
            pool.close()
        deadline = time.monotonic() + 5  # a spare let go by close() needs a moment to see its EOF
        while (left := made.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while (still := made.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(made.root, ignore_errors=True)
        assert left == [], f"processes left behind (killed): {left}"
        assert still == [], f"processes that would not die: {still}"


# -- a relay at work -------------------------------------------------------------------


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The fake runc shim: answers every request with its service, method and payload."""
    conn = Connection(Role.SERVER)
    try:
        while data := await reader.read(65536):
            conn.receive_data(data)
            while (event := conn.next_event()) is not None:
                if isinstance(event, RequestReceived):
                    writer.write(conn.send_response(
                        event.stream_id, f"{event.service}/{event.method}:".encode() + event.payload))
            writer.write(conn.data_to_send())
            await writer.drain()
    finally:
        writer.close()


async def _call_through(relay: Relay, upstream: Path) -> bytes:
    server = await asyncio.start_unix_server(_answer, path=str(upstream))
    async with server:
        relay.upstream_file.write_text(f"{upstream}\n")  # the launcher script's mark
        async with Client.connect(relay.socket) as client:
            return await client.call(TASK, "State", shim_pb2.StateRequest(id="ctr-1").SerializeToString(),
                                     timeout=5)


def check_works_then_ends(env: SpareRelayEnv, relay: Relay, pid: int) -> None:
    """A call goes through; once containerd's (our) connection closes the relay ends and cleans up."""
    payload = shim_pb2.StateRequest(id="ctr-1").SerializeToString()
    assert run(_call_through(relay, env.root / "runc.sock")) == f"{TASK}/State:".encode() + payload
    env.wait_gone(pid)
    check_cleaned_up(relay)


def check_cleaned_up(relay: Relay) -> None:
    paths = (relay.socket, relay.pid_file, relay.upstream_file, relay.log_file, relay.work)
    poll(lambda: not any(path.exists() for path in paths), f"{[str(p) for p in paths]} are removed")


def stop_and_wait(env: SpareRelayEnv, relay: Relay, pid: int) -> None:
    stop_relay(relay)
    env.wait_gone(pid)
    check_cleaned_up(relay)


def spare_ready(env: SpareRelayEnv, pool: SparePool) -> int:
    """Refill `pool`; the spare's pid once it waits (its launcher gone)."""
    pool.refill()
    poll(lambda: len(env.spares()) == 1, "the spare is up")
    poll(lambda: all(parent(p) != os.getpid() for p in env.processes()), "the spare's launcher has exited")
    [pid] = env.spares()
    return pid


# -- SparePool ----------------------------------------------------------------------------


def test_a_taken_spare_serves_the_restore(env: SpareRelayEnv) -> None:
    pool = env.pool()
    spare = spare_ready(env, pool)
    work = env.work()
    relay = pool.take(work)
    assert relay.work == work and relay.directory == env.directory
    pid = run(wait_ready(relay))
    assert pid == spare  # the very process started ahead of need
    line = cmdline(pid)
    assert "-m shim.runtime relay-spare" in line and str(env.directory) in line and str(env.work_root) in line
    assert relay.socket == env.directory / f"{work.name}.sock" and relay.socket.is_socket()
    assert relay.pid_file.read_text() == f"{pid}\n"
    # From the restore on, its output goes to the restore's own log; nothing went to the spares' log.
    assert relay.log_file == env.directory / f"{work.name}.log"
    for fd in (1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == str(relay.log_file)
    poll(lambda: f"relaying ttrpc from {relay.socket}" in relay.log_file.read_text(), "the relay logs")
    assert not env.spare_log.exists()  # a spare writes no file of its own
    check_works_then_ends(env, relay, pid)
    assert env.processes() == []


def test_stop_relay_ends_a_taken_spare_which_cleans_up(env: SpareRelayEnv) -> None:
    pool = env.pool()
    spare_ready(env, pool)
    work = env.work()
    relay = pool.take(work)
    pid = run(wait_ready(relay))
    relay.upstream_file.write_text("/nonexistent/runc.sock\n")
    assert relay.socket.exists() and relay.pid_file.exists() and work.is_dir()
    stop_and_wait(env, relay, pid)
    assert list(env.directory.iterdir()) == []
    assert list(env.work_root.iterdir()) == []


def test_close_lets_an_unused_spare_go_quietly(env: SpareRelayEnv) -> None:
    pool = env.pool()
    spare = spare_ready(env, pool)
    pool.close()
    env.wait_gone(spare)
    poll(lambda: env.processes() == [], "no process of the test is left")
    assert not env.spare_log.exists()  # a spare writes no file of its own
    assert list(env.directory.iterdir()) == []
    pool.close()  # again: nothing to do


def test_close_right_after_refill(env: SpareRelayEnv) -> None:
    # The pipe closes before the spare even reads it (it may not have forked yet).
    pool = env.pool()
    pool.refill()
    pool.close()
    poll(lambda: env.processes() == [], "no process of the test is left")
    assert not env.spare_log.exists()  # a spare writes no file of its own


def test_take_without_a_spare_starts_a_fresh_relay(env: SpareRelayEnv) -> None:
    pool = env.pool()
    work = env.work()
    relay = pool.take(work)
    assert relay.launcher is not None and "relay-for" in list(relay.launcher.args)  # type: ignore[arg-type]
    pid = run(wait_ready(relay))
    line = cmdline(pid)
    assert "-m shim.runtime relay-for" in line and str(relay.socket) in line and str(work) in line
    assert env.spares() == [] and not env.spare_log.exists()  # none was started behind our back
    check_works_then_ends(env, relay, pid)


def test_take_after_the_spare_died_falls_back_to_a_fresh_relay(env: SpareRelayEnv) -> None:
    pool = env.pool()
    spare = spare_ready(env, pool)
    os.kill(spare, signal.SIGKILL)
    env.wait_gone(spare)
    work = env.work()
    relay = pool.take(work)  # the write to the spare's pipe breaks
    pid = run(wait_ready(relay))
    assert pid != spare
    assert "-m shim.runtime relay-for" in cmdline(pid) and str(work) in cmdline(pid)
    check_works_then_ends(env, relay, pid)
    # The dead spare is gone from the pool: the next restore starts its relay at once.
    other = env.work()
    fresh = pool.start_unless_spare(other)
    assert fresh is not None
    stop_and_wait(env, fresh, run(wait_ready(fresh)))


def test_start_unless_spare_is_none_exactly_while_a_spare_waits(env: SpareRelayEnv) -> None:
    pool = env.pool()
    first = env.work()
    fresh = pool.start_unless_spare(first)
    assert fresh is not None and fresh.work == first
    pid = run(wait_ready(fresh))
    assert "relay-for" in cmdline(pid) and str(first) in cmdline(pid)
    stop_and_wait(env, fresh, pid)

    spare = spare_ready(env, pool)
    second = env.work()
    assert pool.start_unless_spare(second) is None
    assert pool.start_unless_spare(second) is None  # asking does not use the spare up
    assert env.processes("relay-for") == [] and env.spares() == [spare]
    taken = pool.take(second)
    assert run(wait_ready(taken)) == spare

    third = env.work()
    fresh = pool.start_unless_spare(third)  # the spare went to the second restore
    assert fresh is not None and fresh.work == third
    pid = run(wait_ready(fresh))
    assert "relay-for" in cmdline(pid)
    stop_and_wait(env, fresh, pid)
    stop_and_wait(env, taken, spare)


def test_refill_keeps_one_spare_and_again_after_a_take(env: SpareRelayEnv) -> None:
    pool = env.pool()
    first = spare_ready(env, pool)
    pool.refill()
    poll(lambda: all(parent(p) != os.getpid() for p in env.processes()), "no launcher is left")
    assert env.spares() == [first]  # a second refill started nothing
    work = env.work()
    relay = pool.take(work)
    assert run(wait_ready(relay)) == first
    second = spare_ready(env, pool)
    assert second != first
    assert env.spares() == [second]  # the taken relay no longer waits: it is not a spare
    stop_and_wait(env, relay, first)
    pool.close()
    env.wait_gone(second)


def test_a_spare_refill_after_close_starts_again(env: SpareRelayEnv) -> None:
    pool = env.pool()
    first = spare_ready(env, pool)
    pool.close()
    env.wait_gone(first)
    second = spare_ready(env, pool)
    assert second != first
    work = env.work()
    relay = pool.take(work)
    assert run(wait_ready(relay)) == second
    stop_and_wait(env, relay, second)


# -- run_spare, started by hand -------------------------------------------------------------


@dataclass
class HandStarted:
    launcher: subprocess.Popen[bytes]
    output: Path  # the spare's stdout and stderr until it has its restore


def start_spare(env: SpareRelayEnv) -> HandStarted:
    env.directory.mkdir()
    output = env.root / "spare.out"
    with open(output, "wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "shim.runtime", "relay-spare", str(env.directory), str(env.work_root)],
            stdin=subprocess.PIPE, stdout=out, stderr=out, start_new_session=True)
    # The launcher forks the spare and exits at once, whatever comes later.
    assert launcher.wait(timeout=TIMEOUT) == 0
    poll(lambda: len(env.spares()) == 1, "the spare is up")
    return HandStarted(launcher, output)


def give(started: HandStarted, line: bytes) -> None:
    assert started.launcher.stdin is not None
    started.launcher.stdin.write(line)
    started.launcher.stdin.close()


BAD_WORK_DIRS: dict[str, Callable[[SpareRelayEnv], Path]] = {
    "outside the work root": lambda env: (env.root / "elsewhere" / uuid.uuid4().hex),
    "nested in the work root": lambda env: env.work_root / "nested" / uuid.uuid4().hex,
    "the work root itself": lambda env: env.work_root,
    "a dotted way out": lambda env: env.work_root / ".." / uuid.uuid4().hex,
    "relative": lambda env: Path(uuid.uuid4().hex),
}


@pytest.mark.parametrize("case", sorted(BAD_WORK_DIRS))
def test_run_spare_refuses_a_work_dir_not_directly_under_the_root(env: SpareRelayEnv, case: str) -> None:
    bad = BAD_WORK_DIRS[case](env)
    if bad.is_absolute():
        bad.mkdir(parents=True, exist_ok=True)
        (bad / "keep").write_text("mine")
    spare = start_spare(env)
    [pid] = env.spares()
    give(spare, f"{bad}\n".encode())
    env.wait_gone(pid)
    assert spare.output.read_text() == f"criu-shim relay: {bad} is not a restore directory under {env.work_root}\n"
    assert list(env.directory.iterdir()) == []  # no socket, pid file or log
    if bad.is_absolute():
        assert (bad / "keep").read_text() == "mine"  # not taken over, not removed


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_run_spare_refuses_a_work_dir_that_is_not_a_directory(env: SpareRelayEnv, kind: str) -> None:
    bad = env.work_root / uuid.uuid4().hex
    if kind == "a file":
        bad.write_text("not a restore")
    spare = start_spare(env)
    [pid] = env.spares()
    give(spare, f"{bad}\n".encode())
    env.wait_gone(pid)
    assert spare.output.read_text() == f"criu-shim relay: {bad} is not a restore directory under {env.work_root}\n"
    assert list(env.directory.iterdir()) == []
    assert bad.exists() == (kind == "a file")
    if kind == "a file":
        assert bad.read_text() == "not a restore"


@pytest.mark.parametrize("line", [b"", b"\n", b"   \n"])
def test_run_spare_ends_quietly_without_a_restore(env: SpareRelayEnv, line: bytes) -> None:
    spare = start_spare(env)
    [pid] = env.spares()
    give(spare, line)  # then end of input: the proxy is gone
    env.wait_gone(pid)
    assert env.processes() == []
    assert spare.output.read_text() == ""
    assert list(env.directory.iterdir()) == []


def test_run_spare_serves_a_good_work_dir(env: SpareRelayEnv) -> None:
    spare = start_spare(env)
    [pid] = env.spares()
    work = env.work()
    give(spare, f"{work}\n".encode())
    relay = Relay(work, env.directory)
    assert run(wait_ready(relay)) == pid
    assert spare.output.read_text() == ""  # its output went to the restore's log from then on
    assert "relaying ttrpc from" in relay.log_file.read_text()
    check_works_then_ends(env, relay, pid)


def test_a_spare_whose_page_daemon_cannot_start_still_serves_and_logs_why(env: SpareRelayEnv) -> None:
    pool = env.pool()
    spare = spare_ready(env, pool)
    work = env.work()
    (work / "checkpoint" / "inventory.img").write_bytes(b"inventory")
    (work / "lazy-pages.json").write_text('{"criu": "/nonexistent/criu", "pages": []}')
    relay = pool.take(work)
    # It listens (the failure is reported to containerd at task Create) rather than dying with a stale pid file.
    poll(lambda: relay.socket.exists() and relay.pid_file.exists(), "the relay listens", timeout=5)
    poll(lambda: "cannot start CRIU's lazy-pages daemon /nonexistent/criu" in relay.log_file.read_text(),
         "the relay logs why the page daemon did not start")
    stop_relay(relay)
    env.wait_gone(spare)
    # Everything goes but the log: it holds a warning, so it is kept for whoever looks into it.
    assert relay.log_file.exists() and not relay.socket.exists() and not relay.pid_file.exists()
    assert not work.exists()


def test_a_spare_starts_at_idle_priority(env: SpareRelayEnv) -> None:
    # Its interpreter's start-up runs beside the restore that took the last spare: at idle
    # priority from the start, not only once the spare's own code runs.
    pool = env.pool()
    pool.refill()
    launchers = [pid for pid in env.processes("shim.runtime relay-spare") if parent(pid) == os.getpid()]
    assert launchers and all(os.sched_getscheduler(pid) == os.SCHED_IDLE for pid in launchers)
    spare = spare_ready(env, pool)
    assert os.sched_getscheduler(spare) == os.SCHED_IDLE
    pool.close()
    env.wait_gone(spare)
