"""A restored task's Stats through the relay: the runc shim's answer first, the cgroup's figures only
where the shim has no cgroup. A fake runc shim upstream (a ttrpc server on a real unix socket) and a
fake cgroupfs tree; containerd's end is a ttrpc `Client` through a real `RelayServer`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from shim.api.cgroups.cgroup1.stats import metrics_pb2 as v1
from shim.api.containerd.runtime.task.v2 import shim_pb2
from shim.errors import Code
from shim.runtime.cgroup_stats import CgroupFs
from shim.runtime.task_stats import restored_task_stats
from shim.ttrpc import Client, Connection, RelayServer, RequestReceived, Role, Status, TTRPCError
from shim.ttrpc.relay import Answer

TASK = "containerd.task.v3.Task"
CTR = "restored0123"
PID = 777
NOT_LOADED = Status(Code.NOT_FOUND, "cgroup does not exist: not found")  # 2.x's runc shim, verbatim


class FakeShim:
    """Answers Stats with `status`, or with b"shim-figures" when it is OK; counts the Stats it saw."""

    def __init__(self, path: Path, status: Status) -> None:
        self.path = path
        self.status = status
        self.stats_seen = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(Role.SERVER)
        while data := await reader.read(65536):
            conn.receive_data(data)
            while (event := conn.next_event()) is not None:
                if isinstance(event, RequestReceived):
                    self.stats_seen += event.method == "Stats"
                    ok = self.status.ok or event.method != "Stats"
                    writer.write(conn.send_response(event.stream_id, b"shim-figures" if ok else b"",
                                                    status=Status() if ok else self.status))
        writer.close()


def fake_cgroup(root: Path) -> CgroupFs:
    (root / "proc" / str(PID)).mkdir(parents=True)
    (root / "proc" / str(PID) / "cgroup").write_text(f"4:memory:/kubepods/{CTR}\n2:cpuacct:/kubepods/{CTR}\n")
    memory, cpuacct = root / "cg" / "memory" / "kubepods" / CTR, root / "cg" / "cpuacct" / "kubepods" / CTR
    memory.mkdir(parents=True)
    cpuacct.mkdir(parents=True)
    (memory / "memory.stat").write_text("total_inactive_file 1000\n")
    for name in ("usage_in_bytes", "max_usage_in_bytes", "failcnt", "limit_in_bytes"):
        (memory / f"memory.{name}").write_text("5000\n")
    (memory / "memory.oom_control").write_text("oom_kill 0\n")
    (cpuacct / "cpuacct.usage").write_text("99\n")
    (cpuacct / "cpuacct.usage_percpu").write_text("99\n")
    (cpuacct / "cpuacct.stat").write_text("user 0\nsystem 0\n")
    return CgroupFs(root / "cg", root / "proc", clock_ticks=100)


def stats(id_: str = CTR) -> bytes:
    return bytes(shim_pb2.StatsRequest(id=id_).SerializeToString())


def run(tmp_path: Path, status: Status, test: Callable[[FakeShim, Path, CgroupFs], Awaitable[None]]) -> None:
    socket_dir = Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp"))  # unix socket paths are short
    shim = FakeShim(socket_dir / f"fake-shim-{os.getpid()}.sock", status)
    bundle = tmp_path / CTR
    bundle.mkdir()
    (bundle / "init.pid").write_text(f"{PID}")
    fs = fake_cgroup(tmp_path)

    async def main() -> None:
        server = await asyncio.start_unix_server(shim.serve, path=str(shim.path))
        try:
            async with asyncio.timeout(10):
                await test(shim, bundle, fs)
        finally:
            server.close()
            shim.path.unlink(missing_ok=True)

    asyncio.run(main())


def test_the_shim_s_own_figures_win_when_it_has_them(tmp_path: Path) -> None:
    async def test(shim: FakeShim, bundle: Path, fs: CgroupFs) -> None:
        assert await restored_task_stats(TASK, stats(), shim.path, bundle, fs) == Answer(b"shim-figures")

    run(tmp_path, Status(), test)


def test_the_cgroup_answers_when_the_shim_never_loaded_it(tmp_path: Path) -> None:
    async def test(shim: FakeShim, bundle: Path, fs: CgroupFs) -> None:
        answer = await restored_task_stats(TASK, stats(), shim.path, bundle, fs)
        assert isinstance(answer, Answer)
        reply = shim_pb2.StatsResponse.FromString(answer.payload)
        assert reply.stats.type_url == "io.containerd.cgroups.v1.Metrics"
        metrics = v1.Metrics.FromString(reply.stats.value)
        assert (metrics.cpu.usage.total, metrics.memory.usage.usage, metrics.memory.total_inactive_file) == (99, 5000, 1000)

    run(tmp_path, NOT_LOADED, test)


@pytest.mark.parametrize("status", [Status(Code.NOT_FOUND, "container not created: not found"),
                                    Status(Code.UNKNOWN, "cgroup does not exist: something else entirely")])
def test_any_other_answer_of_the_shim_is_left_to_the_shim(tmp_path: Path, status: Status) -> None:
    async def test(shim: FakeShim, bundle: Path, fs: CgroupFs) -> None:
        assert await restored_task_stats(TASK, stats(), shim.path, bundle, fs) == stats()

    run(tmp_path, status, test)


def test_other_tasks_unknown_pids_and_garbage_go_on_unchanged(tmp_path: Path) -> None:
    async def test(shim: FakeShim, bundle: Path, fs: CgroupFs) -> None:
        assert await restored_task_stats(TASK, stats("another"), shim.path, bundle, fs) == stats("another")
        assert await restored_task_stats(TASK, stats(), shim.path, None, fs) == stats()  # before Create
        assert await restored_task_stats(TASK, b"\x0a\xff", shim.path, bundle, fs) == b"\x0a\xff"
        assert shim.stats_seen == 0  # none of those cost the shim a call
        (bundle / "init.pid").unlink()  # created, not started: no process, the shim's NOT_FOUND stands
        assert await restored_task_stats(TASK, stats(), shim.path, bundle, fs) == stats()
        (bundle / "init.pid").write_text("778")  # a process that is not there
        assert await restored_task_stats(TASK, stats(), shim.path, bundle, fs) == stats()
        assert await restored_task_stats(TASK, stats(), shim.path.with_name("gone.sock"), bundle, fs) == stats()

    run(tmp_path, NOT_LOADED, test)


def test_containerd_gets_the_answer_through_the_relay_and_the_shim_sees_only_its_own_stats(tmp_path: Path) -> None:
    async def test(shim: FakeShim, bundle: Path, fs: CgroupFs) -> None:
        async def rewrite(service: str, method: str, payload: bytes) -> bytes | Answer:
            return await restored_task_stats(service, payload, shim.path, bundle, fs)

        listen = shim.path.with_name(f"relay-{os.getpid()}.sock")
        relay = RelayServer(listen, shim.path, rewrite, methods={(TASK, "Stats")})
        async with asyncio.TaskGroup() as tasks:
            serving = tasks.create_task(relay.serve())
            await relay.wait_ready()
            async with Client.connect(listen) as containerd:
                reply = shim_pb2.StatsResponse.FromString(await containerd.call(TASK, "Stats", stats()))
                assert v1.Metrics.FromString(reply.stats.value).cpu.usage.total == 99
                with pytest.raises(TTRPCError) as refused:  # another task: the shim's own NOT_FOUND
                    await containerd.call(TASK, "Stats", stats("another"))
                assert refused.value.status == NOT_LOADED
                assert await containerd.call(TASK, "State", b"s") == b"shim-figures"  # passes by
            relay.stop()
            await serving
        assert shim.stats_seen == 2  # our question about the restored task, and the other task's own

    run(tmp_path, NOT_LOADED, test)
