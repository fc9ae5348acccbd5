"""`Restorer` driven with in-memory twins: containerd, the relay processes and the archive reader.

What is checked is the resource discipline of a restore's CreateContainer: every
step that acquires something (journal record, work dir, relay, exported layer,
spare refill) is released on every path that does not hand it on, a cancellation
at any point leaves nothing, and restores created and never started do not pile
up. The twins record what they were asked, so "nothing left" is a fact about the
work root, the journal, the relays and the audit log, not about the restorer's
own bookkeeping. Real containerd, runc and CRIU drive it in tests/node/test_restore.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shim import archive_layout as layout
from shim import oci
from shim.annotations import IMAGES_FROM
from shim.api.cri.v1 import api_pb2 as cri
from shim.config import Config, RestoreSettings
from shim.errors import (
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ShimError,
    Unavailable,
    Upstream,
)
from shim.handoff import criu_config
from shim.journal import Journal
from shim.peer import Peer
from shim.restore.checkpoint_unpack import CheckpointArchive
from shim.restore.pending import PendingRestores
from shim.restore.relay_processes import Relay, SparePool
from shim.restore.restorer import Restorer

CONTAINER = "c0ffee"
NAMESPACE = "default"
PEER = Peer(pid=4242, uid=0, gid=0)


class Steps:
    """Where the twins fail or block, and what happened in which order."""

    def __init__(self) -> None:
        self.fail: dict[str, BaseException] = {}
        self.block: dict[str, asyncio.Event] = {}
        self.reached: dict[str, asyncio.Event] = {}
        self.events: list[str] = []

    def fail_at(self, step: str, error: BaseException) -> None:
        self.fail[step] = error

    def block_at(self, step: str) -> asyncio.Event:
        """A step that waits, the first time it is reached (see `wait_reached`), until the returned event is set."""
        self.block[step] = asyncio.Event()
        return self.block[step]

    def wait_reached(self, step: str) -> asyncio.Event:
        return self.reached.setdefault(step, asyncio.Event())

    async def at(self, step: str) -> None:
        self.events.append(step)
        self.wait_reached(step).set()
        if step in self.block:  # once: the undo's own wait for a relay is not the call that was cancelled
            await self.block.pop(step).wait()
        if step in self.fail:
            raise self.fail[step]


class FakeContainerd:
    """The parts of shim.containerd.Containerd a restore's CreateContainer uses."""

    def __init__(self, steps: Steps, namespace: str = NAMESPACE) -> None:
        self.steps = steps
        self.namespace = namespace
        self.forwarded: list[cri.CreateContainerRequest] = []
        self.stopped: list[str] = []

    async def sandbox_status(self, sandbox_id: str) -> cri.PodSandboxStatus:
        await self.steps.at("sandbox_status")
        status = cri.PodSandboxStatus(id=sandbox_id, runtime_handler="criu")
        status.metadata.name, status.metadata.namespace = "pod", self.namespace
        return status

    async def container_annotation_values(self, key: str) -> set[str]:
        return set()

    async def image_status(self, image: str) -> cri.Image | None:
        await self.steps.at("image_status")
        return cri.Image(id="sha256:" + "b" * 64)

    async def pull_image(self, image: str) -> None:
        raise AssertionError("the base image is on the node: nothing to pull")

    async def live_pod_ips(self) -> dict[str, str]:
        return {}

    async def sandbox_process_label(self, sandbox_id: str) -> str | None:
        return None

    async def forward(self, method: str, request: bytes, metadata: tuple[tuple[str, str], ...],
                      timeout: float | None) -> bytes:
        await self.steps.at("forward")
        self.forwarded.append(cri.CreateContainerRequest.FromString(request))
        reply: bytes = cri.CreateContainerResponse(container_id=f"{CONTAINER}{len(self.forwarded)}").SerializeToString()
        return reply

    async def stop_container(self, container_id: str) -> None:
        self.stopped.append(container_id)


@dataclass
class FakeRelays:
    """The twin of SparePool: relays are records, not processes; a spare is a flag."""

    steps: Steps
    directory: Path
    spare: bool = False
    started: list[Path] = field(default_factory=list)
    stopped: list[Path] = field(default_factory=list)
    refills: int = 0
    closed: bool = False

    def start_unless_spare(self, work: Path) -> Relay | None:
        return None if self.spare else self._start(work)

    def take(self, work: Path) -> Relay:
        if self.spare:
            self.spare = False
            self.started.append(work)
            return Relay(work, self.directory)
        return self._start(work)

    def _start(self, work: Path) -> Relay:
        if "start_relay" in self.steps.fail:
            raise self.steps.fail["start_relay"]
        self.started.append(work)
        return Relay(work, self.directory)

    async def wait_ready(self, relay: Relay) -> int:
        await self.steps.at("relay_ready")
        return 1000 + self.started.index(relay.work)

    def stop(self, relay: Relay) -> None:
        self.steps.events.append("stop_relay")
        self.stopped.append(relay.work)

    def refill(self) -> None:
        self.refills += 1
        self.spare = True

    def close(self) -> None:
        self.closed = True


class FakeReader:
    """The twin of open_checkpoint: writes a small checkpoint into `work` and reads nothing."""

    def __init__(self, steps: Steps, origin: str = NAMESPACE, arch: str | None = None) -> None:
        self.steps = steps
        self.origin = origin
        self.arch = arch
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, path: Path, work: Path, *, defer: object = None, images_follow: bool = False) -> CheckpointArchive:
        if not images_follow:
            (work / layout.IMAGES_DIR).mkdir()
        self.entered.set()
        self.release.wait(10)  # a worker thread the cancelled call must wait for
        (work / layout.SPEC_DUMP).write_text("{}")
        self.steps.events.append("unpacked")
        if "unpack" in self.steps.fail:
            raise self.steps.fail["unpack"]
        if self.arch is not None:
            (work / layout.FACTS).write_text(json.dumps({"architecture": self.arch}))
        spec = {"process": {"args": ["/counter"], "env": ["A=1"], "cwd": "/"},
                "annotations": {oci.CRI_SANDBOX_NAMESPACE: self.origin}}
        return CheckpointArchive(dir=work, spec=spec, config={"rootfsImageRef": "sha256:" + "b" * 64},
                                 status=None, images_dir=work / layout.IMAGES_DIR, rootfs_diff=None,
                                 deleted_files=[], log=None, producer="containerd")


@dataclass
class Env:
    root: Path
    steps: Steps
    containerd: FakeContainerd
    relays: FakeRelays
    reader: FakeReader
    archive: Path
    clock: list[float]
    restorer: Restorer

    @property
    def work_root(self) -> Path:
        return self.root / "restore"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    def audit_results(self) -> list[str]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line)["result"] for line in self.audit_log.read_text().splitlines()]

    async def create(self, images_from: Path | None = None) -> str:
        request = _request(self.archive)
        if images_from is not None:
            request.config.annotations[IMAGES_FROM] = str(images_from)
        reply = await self.restorer.create(request, self.archive, PEER, (), None)
        return reply.container_id

    def assert_nothing_left(self) -> None:
        leftovers = sorted(p.name for p in self.work_root.iterdir()) if self.work_root.exists() else []
        assert leftovers == [], f"left in the work root: {leftovers}"
        assert sorted(self.relays.stopped) == sorted(self.relays.started), "a relay was left running"
        assert Journal.in_state_dir(self.root / "state").records() == []
        assert self.restorer.archives_in_use() == set()
        assert not any(self.restorer.is_pending(f"{CONTAINER}{i}") for i in range(1, 4))


def _request(archive: Path) -> cri.CreateContainerRequest:
    request = cri.CreateContainerRequest(pod_sandbox_id="sandbox-1")
    request.config.metadata.name = "counter"
    request.config.image.image = str(archive)
    request.sandbox_config.metadata.name, request.sandbox_config.metadata.namespace = "pod", NAMESPACE
    return request


def _env(tmp_path: Path, *, spare: bool = False, pending: Callable[[list[float]], PendingRestores] | None = None,
         namespace: str = NAMESPACE, arch: str | None = None) -> Env:
    steps = Steps()
    archives = tmp_path / "archives"
    archives.mkdir()
    archive = archives / "checkpoint.tar"
    archive.write_bytes(b"not read: the reader is a twin")
    config = replace(Config(state_dir=tmp_path / "state", audit_log=tmp_path / "audit.log", criu=None),
                     restore=RestoreSettings(enabled=True, allowed_dirs=(archives,), work_dir=tmp_path / "restore",
                                             lazy_pages=False))
    clock = [0.0]
    containerd = FakeContainerd(steps, namespace)
    relays = FakeRelays(steps, tmp_path / "shims", spare=spare)
    (tmp_path / "shims").mkdir()
    reader = FakeReader(steps, arch=arch)
    restorer = Restorer(containerd, config, relays=relays, unpack=reader,  # type: ignore[arg-type]
                        pending=pending(clock) if pending else None)
    return Env(tmp_path, steps, containerd, relays, reader, archive, clock, restorer)


@pytest.fixture(params=[False, True], ids=["new relay", "spare relay"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    yield _env(tmp_path, spare=request.param)


def test_create_and_start_hand_everything_to_the_relay(env: Env) -> None:
    async def scenario() -> None:
        container_id = await env.create()
        assert env.restorer.is_pending(container_id)
        work = env.relays.started[0]
        assert work.is_dir() and work.parent == env.work_root
        forwarded = env.containerd.forwarded[0].config
        assert list(forwarded.command) == ["/counter"] and forwarded.annotations["restored"] == "true"
        assert env.relays.stopped == []
        assert env.relays.refills == 0  # not inside the call: after the start (after_restores)
        assert Journal.in_state_dir(env.root / "state").records() == []  # the relay's record covers it now
        # The launcher handed the task to the relay: StartContainer went through our handler.
        Relay(work, env.relays.directory).upstream_file.write_text("unix:///run/containerd/s/x")
        assert env.restorer.handed_over(container_id)
        await env.restorer.after_start(container_id)
        env.restorer.start_ended(container_id, None)
        assert not env.restorer.is_pending(container_id)
        assert not Relay(work, env.relays.directory).upstream_file.exists()
        assert env.audit_results() == ["ok"]
        await env.restorer.close()
        assert env.relays.closed

    asyncio.run(scenario())


def test_old_criu_configs_go_after_a_start_has_answered_not_inside_it(env: Env) -> None:
    """StartContainer of a restore is inside a migration's pause: collecting the configs of removed
    containers (a containerd listing) comes after it, from after_restores."""
    async def scenario() -> None:
        stale = criu_config(env.work_root / "0123abcd")
        container_id = await env.create()
        assert env.restorer.sandbox_of(container_id) == "sandbox-1"  # StartContainer need not ask containerd
        stale.write_text("tcp-established\n")
        Relay(env.relays.started[0], env.relays.directory).upstream_file.write_text("unix:///run/containerd/s/x")
        await env.restorer.after_start(container_id)
        assert stale.exists()  # not within the call
        assert env.restorer.sandbox_of(container_id) is None
        collecting = asyncio.create_task(env.restorer.after_restores())
        try:
            async with asyncio.timeout(10):
                while stale.exists():
                    await asyncio.sleep(0.01)
            assert env.relays.refills == 1  # the next restore's spare, after the start
        finally:
            collecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collecting

    asyncio.run(scenario())


def test_a_restore_created_from_its_first_part_gets_its_images_at_start(env: Env) -> None:
    """A migration's restore: created without CRIU's images, which the second part brings at StartContainer
    (shim.restore.second_part, tested on real archives in tests/unit/test_restore_second_part.py)."""
    async def scenario() -> None:
        part = env.archive.with_name("second.tar")
        container_id = await env.create(images_from=part)
        work = env.relays.started[0]
        assert not (work / layout.IMAGES_DIR).exists()
        # Kept: a created container with it and never started is a receiver's leftover (its start-up sweep).
        assert env.containerd.forwarded[0].config.annotations[IMAGES_FROM] == str(part)
        with pytest.raises(FailedPrecondition, match="not at .*second.tar .*nothing to restore yet"):
            await env.restorer.complete(container_id)
        part.write_bytes(b"the reader is a twin")
        await env.restorer.complete(container_id)
        assert (work / layout.IMAGES_DIR).is_dir() and not (work / "second-part").exists()
        await env.restorer.complete(container_id)  # once only: a start tried again finds it done
        assert env.restorer.archives_in_use() == set()

    asyncio.run(scenario())


def test_a_second_part_outside_the_allowed_directories_is_refused_before_anything_is_made(env: Env) -> None:
    async def scenario() -> None:
        with pytest.raises(PermissionDenied, match="restore.allowed_dirs"):
            await env.create(images_from=env.root / "elsewhere" / "second.tar")
        env.assert_nothing_left()
        assert env.containerd.forwarded == []

    asyncio.run(scenario())


def test_a_restore_started_afresh_is_refused_and_stopped(env: Env) -> None:
    async def scenario() -> None:
        container_id = await env.create()
        with pytest.raises(FailedPrecondition, match="started afresh instead of restored"):
            await env.restorer.after_start(container_id)
        assert env.containerd.stopped == [container_id]

    asyncio.run(scenario())


FAILURES: list[tuple[str, Callable[[], BaseException], type[ShimError]]] = [
    ("start_relay", lambda: Unavailable("no relay"), Unavailable),
    ("unpack", lambda: InvalidArgument("checkpoint archive x is truncated or corrupt"), InvalidArgument),
    ("image_status", lambda: NotFound("no such image"), NotFound),
    ("forward", lambda: Upstream(Code.INVALID_ARGUMENT, "containerd says no"), Upstream),
    ("relay_ready", lambda: Unavailable("the restore relay did not start"), Unavailable),
]


@pytest.mark.parametrize("step, error, kind", FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failure_at_any_step_undoes_what_was_acquired(env: Env, step: str, error: Callable[[], BaseException],
                                                        kind: type[ShimError]) -> None:
    env.steps.fail_at(step, error())
    if step == "start_relay" and env.relays.spare:
        env.relays.spare = False  # no spare: the relay is started, and fails to
    with pytest.raises(kind):
        asyncio.run(env.create())
    env.assert_nothing_left()
    assert len(env.audit_results()) == 1 and env.audit_results()[0].startswith("error: ")
    # A spare is taken only once the archive is unpacked; a new relay starts before.
    if step != "start_relay" and not (env.relays.spare and step == "unpack"):
        assert env.relays.started, "the step failed after a relay was acquired: its undo is what is tested"


def test_a_checkpoint_of_another_architecture_is_refused_with_nothing_left(tmp_path: Path) -> None:
    env = _env(tmp_path, arch="s390x")
    with pytest.raises(InvalidArgument, match="made on s390x"):
        asyncio.run(env.create())
    env.assert_nothing_left()


def test_a_checkpoint_from_another_namespace_is_refused_with_nothing_left(tmp_path: Path) -> None:
    env = _env(tmp_path, namespace="other")
    with pytest.raises(PermissionDenied, match="restore_from_other_namespaces"):
        asyncio.run(env.create())
    env.assert_nothing_left()
    assert env.containerd.forwarded == []


@pytest.mark.parametrize("step", ["forward", "relay_ready", "image_status"])
def test_cancelled_mid_create_leaves_nothing(env: Env, step: str) -> None:
    async def scenario() -> None:
        env.steps.block_at(step)
        creating = asyncio.ensure_future(env.create())
        await asyncio.wait_for(env.steps.wait_reached(step).wait(), 10)
        creating.cancel()
        with pytest.raises(asyncio.CancelledError):
            await creating

    asyncio.run(scenario())
    env.assert_nothing_left()
    assert env.audit_results() == ["error: CancelledError"]


def test_cancelled_while_unpacking_waits_for_the_worker_before_undoing(env: Env) -> None:
    """The unpacking thread cannot be stopped: the undo runs only once it has returned, never beside it."""
    async def scenario() -> None:
        env.reader.release.clear()
        creating = asyncio.ensure_future(env.create())
        assert await asyncio.to_thread(env.reader.entered.wait, 10)
        creating.cancel()
        await asyncio.sleep(0.05)  # the cancellation is delivered; the worker still holds on
        assert not creating.done(), "the cancelled create returned while its worker still wrote"
        env.reader.release.set()
        with pytest.raises(asyncio.CancelledError):
            await creating

    asyncio.run(scenario())
    env.assert_nothing_left()
    events = env.steps.events
    assert "unpacked" in events
    if env.relays.started:  # a new relay (a spare is only taken after the unpacking)
        assert events.index("unpacked") < events.index("stop_relay")


def test_restores_never_started_are_collected_after_the_relays_wait(tmp_path: Path) -> None:
    env = _env(tmp_path, pending=lambda clock: PendingRestores(ttl=900.0, clock=lambda: clock[0]))

    async def scenario() -> None:
        first = await env.create()
        env.clock[0] = 899.0
        second = await env.create()
        assert env.restorer.is_pending(first) and env.restorer.is_pending(second)
        env.clock[0] = 900.5  # the first relay has given up by now; the second has not
        third = await env.create()
        assert not env.restorer.is_pending(first)
        assert env.restorer.is_pending(second) and env.restorer.is_pending(third)
        assert env.audit_results() == ["ok: created; not started within 900 s"]

    asyncio.run(scenario())


def test_too_many_restores_not_started_are_refused_before_anything_is_acquired(tmp_path: Path) -> None:
    env = _env(tmp_path, pending=lambda clock: PendingRestores(limit=2, clock=lambda: clock[0]))

    async def scenario() -> None:
        first = await env.create()
        await env.create()
        started, files = list(env.relays.started), sorted(env.work_root.iterdir())
        with pytest.raises(ResourceExhausted, match="the limit is 2"):
            await env.create()
        assert env.relays.started == started and sorted(env.work_root.iterdir()) == files
        assert len(env.containerd.forwarded) == 2
        # A start frees a place.
        Relay(started[0], env.relays.directory).upstream_file.write_text("unix:///x")
        await env.restorer.after_start(first)
        await env.create()

    asyncio.run(scenario())


# -- the spare relay pool, locked on every side -------------------------------------------------


class _BlockingSpawnPool(SparePool):
    """A pool whose spawn waits for the test: a refill caught half-way."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / "restore", root / "shims")
        self.spawning = threading.Event()
        self.go = threading.Event()
        self.let_go: list[Any] = []

    def _spawn(self) -> Any:
        self.spawning.set()
        self.go.wait(10)
        spare = SimpleNamespace(stdin=io.BytesIO())
        spare.wait = lambda: self.let_go.append(spare)
        return spare


def test_a_refill_under_way_when_the_pool_closes_keeps_no_spare(tmp_path: Path) -> None:
    pool = _BlockingSpawnPool(tmp_path)
    refill = threading.Thread(target=pool.refill)
    refill.start()
    assert pool.spawning.wait(10)
    pool.close()  # not blocked by the refill's spawn
    pool.go.set()
    refill.join(10)
    assert not pool.has_spare()
    assert len(pool.let_go) == 1 and pool.let_go[0].stdin.closed  # the late spare was let go and reaped


def test_refills_racing_start_one_spare(tmp_path: Path) -> None:
    pool = _BlockingSpawnPool(tmp_path)
    threads = [threading.Thread(target=pool.refill) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert pool.spawning.wait(10)
    pool.go.set()
    for thread in threads:
        thread.join(10)
    assert pool.has_spare() and pool.let_go == []
    pool.close()
    assert len(pool.let_go) == 1
