"""The checkpoint engine against an in-memory twin of the containerd facade.

`FakeContainerd` has the async methods of `shim.containerd.Containerd` the
engine uses, returns real CRI / containerd messages, records every call, and
plays CRIU: its `checkpoint_task` writes the files runc's CRIU would write into
the image and work directories it is given, or fails, or takes its time. The
real parts are everything else: options, location checks, the CRIU version
check (a fake `criu` script), locking, freeze/thaw pairing, the rootfs diff,
the archive and the audit log. Each test body is a coroutine run by
`asyncio.run`.
"""

from __future__ import annotations

import asyncio
import errno
import io
import itertools
import json
import os
import stat
import tarfile
import time
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf import any_pb2

from shim.api.containerd.runtime.v2.runc.options import oci_pb2 as runc_options
from shim.api.containerd.services.containers.v1 import containers_pb2
from shim.api.cri.v1 import api_pb2
from shim.checkpoint import checkpointer as checkpointer_module
from shim.checkpoint.checkpointer import Checkpointer, Request
from shim.config import CheckpointDefaults, Config
from shim.containerd import Containerd
from shim.errors import (
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShimError,
    Unknown,
)
from shim.peer import Peer
from tests.support.criu import fake_criu
from tests.support.procs import run

CONTAINER = "3f2a9c0d1e4b5a6978c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3"
OTHER = "9" * 64
SANDBOX = "5b" * 32
PEER = Peer(pid=4242, uid=0, gid=0)
SPEC = {"ociVersion": "1.1.0", "process": {"args": ["/counter"], "cwd": "/"}, "root": {"path": "rootfs"}}
RUNTIME = "io.containerd.runc.v2"
TCP_LOG = ("(00.012345) Error (criu/sk-inet.c:191): inet: Connected TCP socket, consider using "
           "--tcp-established option.\n(00.012400) Error (criu/cr-dump.c:1681): Dumping FAILED.\n")
REQUIRED_MEMBERS = ("spec.dump", "config.dump", "status.dump", "checkpoint", "checkpoint/inventory.img",
                    "checkpoint/pages-1.img", "dump.log", "stats-dump", "rootfs-diff.tar", "container.log")


class FakeContainerd:
    """In-memory twin of `shim.containerd.Containerd` (the methods the engine calls)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.states: dict[str, Any] = {CONTAINER: api_pb2.CONTAINER_RUNNING, OTHER: api_pb2.CONTAINER_RUNNING}
        self.names = {CONTAINER: "web", OTHER: "sidecar"}
        self.annotations: dict[str, str] = {}
        self.dump_error: ShimError | None = None
        self.dump_log = "(00.000100) Dumping finished successfully\n"
        self.dump_delay = 0.0
        self.resume_delay = 0.0
        # What happened, in order: ("pause", id), ("dump", id), ("resume", id), ("resumed", id).
        self.calls: list[tuple[str, str]] = []
        self.dump_options: list[runc_options.CheckpointOptions] = []
        self.dump_intervals: list[tuple[str, float, float]] = []
        self.at_resume: list[dict[str, bool]] = []  # what existed when the container was thawed
        self.resumed_at: list[float] = []  # when each resume began (monotonic)
        self.log_path = root / "container.log"
        self.log_path.write_text("2024-01-01T00:00:00Z stdout F hello\n")
        self.upper = root / "upper"
        (self.upper / "etc").mkdir(parents=True)
        (self.upper / "etc" / "motd").write_text("changed at runtime\n")
        self._last_staging: Path | None = None

    def names_of(self, kind: str) -> list[str]:
        return [cid for what, cid in self.calls if what == kind]

    async def container_status(self, container_id: str) -> tuple[api_pb2.ContainerStatus, dict[str, Any]]:
        await asyncio.sleep(0)
        if container_id not in self.states:
            raise NotFound(f"an error occurred when try to find container {container_id!r}: not found")
        status = api_pb2.ContainerStatus(
            id=container_id, state=self.states[container_id], created_at=1_700_000_000_123_456_789,
            started_at=1_700_000_001_000_000_000,
            metadata=api_pb2.ContainerMetadata(name=self.names[container_id], attempt=0),
            image=api_pb2.ImageSpec(image="docker.io/library/busybox:1.36"),
            image_ref="docker.io/library/busybox@sha256:" + "ab" * 32,
            log_path=str(self.log_path))
        return status, {"sandboxID": SANDBOX, "pid": 1234}

    async def sandbox_status(self, sandbox_id: str) -> api_pb2.PodSandboxStatus:
        await asyncio.sleep(0)
        assert sandbox_id == SANDBOX
        return api_pb2.PodSandboxStatus(
            id=sandbox_id, state=api_pb2.SANDBOX_READY,
            metadata=api_pb2.PodSandboxMetadata(name="web-0", namespace="shop", uid="uid-1"),
            annotations=self.annotations)

    async def container_record(self, container_id: str) -> containers_pb2.Container:
        await asyncio.sleep(0)
        return containers_pb2.Container(
            id=container_id, runtime=containers_pb2.Container.Runtime(name=RUNTIME),
            spec=any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec",
                             value=json.dumps(SPEC).encode()),
            snapshotter="overlayfs", snapshot_key=container_id)

    async def upperdir(self, record: containers_pb2.Container) -> Path | None:
        await asyncio.sleep(0)
        return self.upper

    async def pause(self, container_id: str) -> None:
        await asyncio.sleep(0)
        self.calls.append(("pause", container_id))

    async def cgroups_path(self, container_id: str) -> str | None:
        return None  # no cgroup of its own: the engine assumes one process

    async def task_paused(self, container_id: str) -> bool | None:
        return ("pause", container_id) in self.calls and self.calls[-1] != ("resumed", container_id)

    async def resume(self, container_id: str) -> None:
        self.calls.append(("resume", container_id))
        self.resumed_at.append(time.monotonic())
        staging = self._last_staging
        assert staging is not None
        self.at_resume.append({"rootfs-diff.tar": (staging / "rootfs-diff.tar").exists(),
                               "archive": any(not p.name.startswith(".") for p in staging.parent.iterdir())})
        await asyncio.sleep(self.resume_delay)
        self.calls.append(("resumed", container_id))

    async def checkpoint_task(self, container_id: str, options: runc_options.CheckpointOptions,
                              timeout: float | None) -> None:
        self.calls.append(("dump", container_id))
        self.dump_options.append(options)
        images, work = Path(options.image_path), Path(options.work_path)
        self._last_staging = images.parent
        started = time.monotonic()
        try:
            work.mkdir(parents=True)
            (work / "dump.log").write_text(self.dump_log)
            await asyncio.sleep(self.dump_delay)
            if self.dump_error is not None:
                raise self.dump_error
            images.mkdir(parents=True, exist_ok=True)  # the engine makes it (page stream FIFOs)
            (images / "inventory.img").write_bytes(b"\x54\x4f\x56\x15inventory")
            (images / "pages-1.img").write_bytes(bytes(range(256)) * 20)
            (work / "stats-dump").write_bytes(b"\x01\x02stats")
        finally:
            self.dump_intervals.append((container_id, started, time.monotonic()))


@pytest.fixture
def fake(tmp_path: Path) -> FakeContainerd:
    root = tmp_path / "containerd"
    root.mkdir()
    return FakeContainerd(root)


@pytest.fixture(autouse=True)
def new_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """6.18 needs CRIU >= 4.2, whatever kernel the test host runs."""
    real = os.uname()
    fake = os.uname_result((real.sysname, real.nodename, "6.18.0", real.version, real.machine))
    monkeypatch.setattr(os, "uname", lambda: fake)  # as seen by shim.checkpoint.criu


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(CheckpointDefaults(), criu=fake_criu(tmp_path, "4.2.1", name="criu-4.2.1"), audit_log=tmp_path / "audit" / "audit.log",
                  state_dir=tmp_path / "state")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def checkpointer(fake: FakeContainerd, config: Config) -> Checkpointer:
    return Checkpointer(cast(Containerd, fake), config)


def audit_lines(config: Config) -> list[dict[str, Any]]:
    if not config.audit_log.exists():
        return []
    return [json.loads(line) for line in config.audit_log.read_text().splitlines()]


def error_of(exc: ShimError) -> str:
    return f"error: {exc.code.name}: {exc.message}"


# ------------------------------------------------------------------ success


def test_checkpoint_writes_the_archive_and_thaws_after_the_dump(fake: FakeContainerd, config: Config,
                                                                out: Path) -> None:
    archive = out / "checkpoint.tar"
    run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(archive), PEER)))

    assert fake.calls == [("pause", CONTAINER), ("dump", CONTAINER), ("resume", CONTAINER),
                          ("resumed", CONTAINER)]
    # The rootfs diff was taken while frozen; the archive was written once thawed.
    assert fake.at_resume == [{"rootfs-diff.tar": True, "archive": False}]
    assert sorted(os.listdir(out)) == ["checkpoint.tar"]  # staging dir gone
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        read = {name: tar.extractfile(name).read() for name, m in members.items() if m.isfile()}  # type: ignore[union-attr]
    for name in REQUIRED_MEMBERS:
        assert name in members, name
    assert members["checkpoint"].isdir()
    assert json.loads(read["spec.dump"]) == SPEC
    config_dump = json.loads(read["config.dump"])
    assert (config_dump["id"], config_dump["name"], config_dump["runtime"]) == (CONTAINER, "web", RUNTIME)
    assert config_dump["rootfsImageName"] == "docker.io/library/busybox:1.36"
    assert json.loads(read["status.dump"])["id"] == CONTAINER
    assert read["checkpoint/pages-1.img"] == bytes(range(256)) * 20
    assert read["stats-dump"] == b"\x01\x02stats"
    assert read["container.log"] == fake.log_path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(read["rootfs-diff.tar"])) as diff:
        assert "etc/motd" in diff.getnames()


def test_dump_request_carries_the_staging_paths_and_leaves_the_container_running(
        fake: FakeContainerd, config: Config, out: Path) -> None:
    run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    (options,) = fake.dump_options
    assert options.exit is False
    images, work = Path(options.image_path), Path(options.work_path)
    assert images.parent == work.parent
    assert images.parent.parent == out  # staged on the archive's filesystem
    assert images.parent.name.startswith(f".criu-shim-{CONTAINER[:12]}-")
    assert (options.open_tcp, options.file_locks, options.external_unix_sockets) == (False, False, False)


def test_pod_annotations_reach_the_dump_options(fake: FakeContainerd, config: Config, out: Path) -> None:
    fake.annotations = {"checkpoint.criu-shim.io/tcp-established": "true",
                        "web.checkpoint.criu-shim.io/file-locks": "true",
                        "sidecar.checkpoint.criu-shim.io/ext-unix-sockets": "true"}
    run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    (options,) = fake.dump_options
    assert (options.open_tcp, options.file_locks, options.external_unix_sockets) == (True, True, False)


def test_bad_annotation_value_is_refused_before_freezing(fake: FakeContainerd, config: Config, out: Path) -> None:
    fake.annotations = {"checkpoint.criu-shim.io/tcp-established": "yes"}
    with pytest.raises(InvalidArgument, match="checkpoint.criu-shim.io/tcp-established"):
        run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    assert fake.calls == []


# ------------------------------------------------------------------ failures


def test_failing_dump_propagates_and_thaws(fake: FakeContainerd, config: Config, out: Path) -> None:
    fake.dump_error = Unknown("runc did not terminate successfully: exit status 1: criu failed: type NOTIFY")
    with pytest.raises(Unknown) as caught:
        run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    message = caught.value.message
    assert message.startswith(fake.dump_error.message + "; CRIU log ends: ")  # runc's words first, unchanged
    assert "annotation" not in message  # no advice: the log names no known cause
    assert fake.calls == [("pause", CONTAINER), ("dump", CONTAINER), ("resume", CONTAINER),
                          ("resumed", CONTAINER)]
    assert os.listdir(out) == []  # no archive, no staging dir


def test_tcp_dump_failure_names_the_annotation(fake: FakeContainerd, config: Config, out: Path) -> None:
    fake.dump_error = Unknown("runc did not terminate successfully: exit status 1")
    fake.dump_log = TCP_LOG
    with pytest.raises(Unknown) as caught:
        run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    message = caught.value.message
    assert message.startswith("runc did not terminate successfully: exit status 1; CRIU: ")
    assert "Connected TCP socket, consider using --tcp-established option" in message
    assert 'checkpoint.criu-shim.io/tcp-established: "true"' in message
    assert ("resume", CONTAINER) in fake.calls
    assert os.listdir(out) == []
    # The staging dir is gone, its dump.log is not: kept private under the state dir, named in the message.
    kept = Path(message.rsplit("full CRIU log: ", 1)[1])
    assert kept.parent == config.state_dir / "logs" / CONTAINER
    assert kept.read_text() == TCP_LOG and stat.S_IMODE(kept.stat().st_mode) == 0o600


def test_a_socket_mentioned_in_the_log_is_no_reason_for_advice(fake: FakeContainerd, config: Config,
                                                               out: Path) -> None:
    fake.dump_error = Unknown("runc did not terminate successfully: exit status 1")
    fake.dump_log = ("(00.030100) unix: Dumping unix socket at 7\n(00.030120) file lock 1 of pid 7\n"
                     "(00.044528) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted\n"
                     "(00.044752) Error (criu/cr-dump.c:1975): Dumping FAILED.\n")
    with pytest.raises(Unknown) as caught:
        run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    message = caught.value.message
    assert "CRIU: Can't get rlimit 0: Operation not permitted | Dumping FAILED." in message
    assert "annotation" not in message
    assert "non-root user" in message and "CAP_SYS_RESOURCE" in message


def test_deadline_during_the_dump_thaws_once_the_dump_has_ended(fake: FakeContainerd, config: Config,
                                                                 out: Path) -> None:
    """CRIU puts the freezer back as it found it (frozen) when it ends: a thaw before that would be undone."""
    fake.dump_delay = 0.5

    async def body() -> None:
        async with asyncio.timeout(0.1):
            await checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER))

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        run(body())
    assert 0.5 <= time.monotonic() - started < 2
    assert fake.calls == [("pause", CONTAINER), ("dump", CONTAINER), ("resume", CONTAINER),
                          ("resumed", CONTAINER)]
    [(_, _, dump_ended)] = fake.dump_intervals
    assert fake.resumed_at[0] >= dump_ended
    assert os.listdir(out) == []
    assert [line["result"] for line in audit_lines(config)] == ["error: CancelledError"]


def test_thaw_survives_a_second_cancellation(fake: FakeContainerd, config: Config, out: Path) -> None:
    """The caller gives up again while the thaw is in flight: the resume still completes."""
    fake.dump_delay = 0.3
    fake.resume_delay = 0.2

    async def body() -> None:
        task = asyncio.create_task(
            checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
        while ("dump", CONTAINER) not in fake.calls:
            await asyncio.sleep(0.01)
        task.cancel()  # deadline during the dump
        while ("resume", CONTAINER) not in fake.calls:
            await asyncio.sleep(0.01)
        task.cancel()  # and again while thawing
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.4)  # the shielded resume runs to completion

    run(body())
    assert fake.calls.count(("resume", CONTAINER)) == 1
    assert fake.calls[-1] == ("resumed", CONTAINER)
    assert os.listdir(out) == []


def test_disk_full_while_writing_the_archive(fake: FakeContainerd, config: Config, out: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    # Both ways an archive is finished: around a streamed memory image, or around CRIU's own file.
    monkeypatch.setattr(checkpointer_module, "write_archive_in_place", full)
    monkeypatch.setattr(checkpointer_module.StreamedArchive, "complete", full)
    with pytest.raises(ResourceExhausted, match=f"no space left writing checkpoint {out / 'cp.tar'}"):
        run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    assert fake.calls == [("pause", CONTAINER), ("dump", CONTAINER), ("resume", CONTAINER),
                          ("resumed", CONTAINER)]
    assert os.listdir(out) == []


def test_not_running_is_refused_without_freezing(fake: FakeContainerd, config: Config, out: Path) -> None:
    fake.states[CONTAINER] = api_pb2.CONTAINER_EXITED
    with pytest.raises(FailedPrecondition) as caught:
        run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    assert caught.value.message == (f'container "{CONTAINER}" is in CONTAINER_EXITED state. '
                                    "only RUNNING containers can be checkpointed")
    assert fake.calls == []
    assert os.listdir(out) == []


def test_unknown_container_is_not_found(fake: FakeContainerd, config: Config, out: Path) -> None:
    with pytest.raises(NotFound):
        run(checkpointer(fake, config).checkpoint(Request("f" * 64, str(out / "cp.tar"), PEER)))
    assert fake.calls == []


@pytest.mark.parametrize("location", ["", "relative/cp.tar", "/nonexistent-dir-criu-shim/cp.tar", "{out}",
                                      "{out}/../cp.tar"])
def test_bad_location_is_refused_without_freezing(fake: FakeContainerd, config: Config, out: Path,
                                                  location: str) -> None:
    with pytest.raises(InvalidArgument, match="checkpoint location"):
        run(checkpointer(fake, config).checkpoint(Request(CONTAINER, location.format(out=out), PEER)))
    assert fake.calls == []


def test_symlink_location_is_refused_without_freezing(fake: FakeContainerd, config: Config, out: Path) -> None:
    victim = out / "victim"
    victim.write_text("keep")
    (out / "cp.tar").symlink_to(victim)
    with pytest.raises(InvalidArgument, match="symlink"):
        run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    assert fake.calls == []
    assert victim.read_text() == "keep"


def test_old_criu_is_refused_without_freezing(fake: FakeContainerd, config: Config, out: Path,
                                              tmp_path: Path) -> None:
    old = Config(config.checkpoint, criu=fake_criu(tmp_path, "4.1.1", name="criu-4.1.1"), audit_log=config.audit_log)
    with pytest.raises(Unknown, match=r"^CRIU binary not found or too old .*found CRIU 4\.1\.1"):
        run(checkpointer(fake, old).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    assert fake.calls == []


# ------------------------------------------------------------------ concurrency


def test_concurrent_checkpoints_of_one_container_are_serialized(fake: FakeContainerd, config: Config,
                                                                out: Path) -> None:
    fake.dump_delay = 0.1
    engine_ = checkpointer(fake, config)

    async def body() -> None:
        await asyncio.gather(*(engine_.checkpoint(Request(CONTAINER, str(out / f"cp{i}.tar"), PEER))
                               for i in range(3)))

    run(body())
    intervals = sorted((start, end) for _, start, end in fake.dump_intervals)
    assert len(intervals) == 3
    for (_, first_end), (second_start, _) in itertools.pairwise(intervals):
        assert first_end <= second_start, "two dumps of one container overlapped"
    # Each freeze is thawed before the next one starts.
    assert [what for what, _ in fake.calls] == ["pause", "dump", "resume", "resumed"] * 3
    assert sorted(os.listdir(out)) == ["cp0.tar", "cp1.tar", "cp2.tar"]


def test_checkpoints_of_different_containers_run_in_parallel(fake: FakeContainerd, config: Config,
                                                             out: Path) -> None:
    fake.dump_delay = 0.2

    async def body() -> None:
        engine_ = checkpointer(fake, config)
        await asyncio.gather(engine_.checkpoint(Request(CONTAINER, str(out / "a.tar"), PEER)),
                             engine_.checkpoint(Request(OTHER, str(out / "b.tar"), PEER)))

    run(body())
    (_, a_start, a_end), (_, b_start, b_end) = fake.dump_intervals
    assert a_start < b_end and b_start < a_end  # the lock is per container, not global
    assert sorted(os.listdir(out)) == ["a.tar", "b.tar"]


# ------------------------------------------------------------------ audit


def test_audit_log_gets_one_line_per_attempt(fake: FakeContainerd, config: Config, out: Path) -> None:
    engine_ = checkpointer(fake, config)
    run(engine_.checkpoint(Request(CONTAINER, str(out / "ok.tar"), PEER)))
    fake.dump_error = Unknown("criu failed")
    with pytest.raises(Unknown) as dump_failure:
        run(engine_.checkpoint(Request(CONTAINER, str(out / "dump.tar"), PEER)))
    with pytest.raises(InvalidArgument) as bad_location:
        run(engine_.checkpoint(Request(CONTAINER, "relative.tar", PEER)))
    fake.states[CONTAINER] = api_pb2.CONTAINER_EXITED
    with pytest.raises(FailedPrecondition) as exited:
        run(engine_.checkpoint(Request(CONTAINER, str(out / "exited.tar"), PEER)))

    lines = audit_lines(config)
    assert [line["result"] for line in lines] == [
        "ok", error_of(dump_failure.value), error_of(bad_location.value), error_of(exited.value)]
    assert lines[1]["result"].startswith("error: UNKNOWN: criu failed; CRIU log ends: ")
    ok = lines[0]
    assert (ok["action"], ok["caller_uid"], ok["caller_pid"]) == ("checkpoint", PEER.uid, PEER.pid)
    assert (ok["pod"], ok["namespace"], ok["container"], ok["container_id"]) == ("web-0", "shop", "web", CONTAINER)
    assert ok["location"] == str(out / "ok.tar")
    assert ok["size"] == (out / "ok.tar").stat().st_size > 0
    assert ok["duration_s"] >= ok["frozen_s"] >= 0
    assert lines[1]["size"] == 0
    # Refused while inspecting: who was refused is still recorded; what was not learnt is empty.
    assert lines[3]["container_id"] == CONTAINER and lines[3]["pod"] == ""
    assert stat.S_IMODE(config.audit_log.stat().st_mode) == 0o600


def test_audit_failure_never_fails_the_checkpoint(fake: FakeContainerd, config: Config, out: Path,
                                                  tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    broken = Config(config.checkpoint, criu=config.criu, audit_log=tmp_path / "blocker" / "audit.log")
    run(checkpointer(fake, broken).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    assert (out / "cp.tar").is_file()


def test_error_codes_are_domain_codes(fake: FakeContainerd, config: Config, out: Path) -> None:
    # The engine raises only ShimError categories for expected failures: the dispatcher maps them once.
    fake.states[CONTAINER] = api_pb2.CONTAINER_EXITED
    with pytest.raises(ShimError) as caught:
        run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    assert caught.value.code is Code.FAILED_PRECONDITION
