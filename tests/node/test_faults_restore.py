"""Fault injection on the restore path: criu-shim or the restore relay killed mid-way.

Each case checks the fault really hit (a journal record, an unpacked work dir,
a loop device, a relay) before it checks the recovery: nothing left on disk or
in the kernel (work dir, CRIU config, loop device, relay and its files, page
daemon, stock runc shim), no journal record, an audit line saying what was
undone, and the next restore works.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from shim import faults
from shim.api.cri.v1 import api_pb2 as cri
from shim.handoff import RESTORE_DIR
from shim.node import procs
from shim.node.layout import NodeLayout
from shim.node.tools import load_paths
from shim.restore import lazy, loopdev
from shim.restore.relay_processes import SHIM_DIR
from tests.node.conftest import Node
from tests.node.pods import Cri, Pod, wait_for
from tests.node.test_faults_checkpoint import PrivateProxy
from tests.node.test_lazy_restore import _page_daemons
from tests.node.test_restore import _checkpoint_counter, _restore, assert_restore_refused

pytestmark = pytest.mark.node


class RestoringProxy(PrivateProxy):
    """A private criu-shim that restores, with its own work dir (and so its own loop-device tags)."""

    def __init__(self, node: Node, directory: Path) -> None:
        super().__init__(node, directory)
        self.work_root = directory / "restore"
        self.config.write_text(
            f'state_dir = "{self.state}"\n[checkpoint]\ncriu = "{load_paths()["CRIU_BIN"]}"\n'
            f'audit_log = "{self.audit}"\n[restore]\nenabled = true\n'
            f'allowed_dirs = ["{node.dir / "checkpoints"}"]\nwork_dir = "{self.work_root}"\n')

    def client(self) -> Cri:
        return Cri(f"unix://{self.listen}", self.dir / "client-logs")

    def work_dirs(self) -> list[str]:
        return sorted(p.name for p in self.work_root.iterdir() if p.is_dir()) if self.work_root.is_dir() else []

    def loop_devices(self) -> list[str]:
        prefix = lazy.tag_prefix(self.work_root)
        return [f"/dev/{d.name}" for d in Path("/sys/block").glob("loop*")
                if (loopdev.tag_of(f"/dev/{d.name}") or "").startswith(prefix)]

    def recoveries(self) -> list[dict[str, object]]:
        return [a for a in self.audit_lines() if a["action"] == "recover-restore"]


@pytest.fixture
def proxy(node: Node, tmp_path: Path) -> Iterator[RestoringProxy]:
    own = RestoringProxy(node, tmp_path)
    yield own
    own.stop()


@pytest.fixture
def direct(node: Node, tmp_path: Path) -> Iterator[Cri]:
    client = Cri(node.cri, tmp_path / "pod-logs")
    yield client
    client.close()


def _create(proxy: RestoringProxy, pod: Pod, archive: Path) -> str:
    client = proxy.client()
    try:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="restored"),
                                     image=cri.ImageSpec(image=str(archive)), log_path="restored.log")
        return str(client.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=120).container_id)
    finally:
        client.close()


def _create_dies(proxy: RestoringProxy, pod: Pod, archive: Path) -> None:
    """CreateContainer through a proxy that kills itself at its fault point."""
    errors: list[grpc.RpcError] = []

    def run() -> None:
        try:
            _create(proxy, pod, archive)
        except grpc.RpcError as exc:
            errors.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert proxy.process is not None and proxy.process.wait(30) == -signal.SIGKILL
    assert errors, "CreateContainer should have died with its proxy"


def _relay_keys() -> set[str]:
    return {p.name.split(".")[0] for p in SHIM_DIR.iterdir()} if SHIM_DIR.is_dir() else set()


def _assert_nothing_left(proxy: RestoringProxy, keys: list[str]) -> None:
    wait_for(lambda: proxy.journal() == [] and proxy.work_dirs() == [] and proxy.loop_devices() == [], timeout=45)
    wait_for(lambda: not _relay_keys() & set(keys), timeout=10)
    for key in keys:
        assert procs.processes_mentioning(key) == [], f"a process of restore {key} is left"
        assert _page_daemons(proxy.work_root / key) == [], f"the page daemon of restore {key} is left"


def test_proxy_killed_after_unpacking_is_undone_at_restart(node: Node, direct: Cri,
                                                            proxy: RestoringProxy) -> None:
    archive, counted = _checkpoint_counter(direct, node, 5, mem_mb=48)
    with direct.pod() as pod:
        proxy.start(faults.Point.RESTORE_UNPACKED)
        _create_dies(proxy, pod, archive)
        # It hit: the restore was unpacked, journaled, its page daemon started (ours, the default: it
        # maps the archive itself; CRIU's would read it through a loop device).
        keys = proxy.work_dirs()
        assert len(keys) == 1 and proxy.journal()
        wait_for(lambda: bool(_page_daemons(proxy.work_root / keys[0])))
        proxy.start()
        _assert_nothing_left(proxy, keys)
        recovery = [str(r["result"]) for r in proxy.recoveries() if "deleted work dir" in str(r["result"])]
        assert len(recovery) == 1 and recovery[0].startswith("interrupted"), proxy.recoveries()
        assert "stopped relay" in recovery[0]
        # The next restore works.
        ctr = _create(proxy, pod, archive)
        client = proxy.client()
        try:
            client.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=120)
            wait_for(lambda: client.count(ctr) > counted)
        finally:
            client.close()


def test_proxy_killed_once_containerd_has_the_container_leaves_it_to_its_relay(
        node: Node, direct: Cri, proxy: RestoringProxy) -> None:
    archive, counted = _checkpoint_counter(direct, node, 5, mem_mb=48)
    with direct.pod() as pod:
        proxy.start(faults.Point.RESTORE_CREATED)
        _create_dies(proxy, pod, archive)
        created = [c.id for c in direct.runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(pod_sandbox_id=pod.id))).containers]
        assert len(created) == 1
        proxy.start()
        wait_for(lambda: proxy.recoveries() != [], timeout=45)
        assert "its relay owns it" in str(proxy.recoveries()[-1]["result"])
        assert len(proxy.journal()) == 1  # the relay's own record: it is alive and holds the restore
        # The relay kept it: the container starts as a restore and counts on.
        direct.runtime.StartContainer(cri.StartContainerRequest(container_id=created[0]), timeout=120)
        wait_for(lambda: direct.count(created[0]) > counted)
        keys = proxy.work_dirs()
    _assert_nothing_left(proxy, keys)  # the pod is gone: the relay cleaned up after itself


def test_killed_relay_leaves_nothing_once_the_reconciler_passed(node: Node, direct: Cri,
                                                                proxy: RestoringProxy) -> None:
    archive, _ = _checkpoint_counter(direct, node, 5, mem_mb=256)
    proxy.start()
    with direct.pod() as pod:
        ctr = _create(proxy, pod, archive)
        direct.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=120)
        keys = proxy.work_dirs()
        relay = int((SHIM_DIR / f"{keys[0]}.pid").read_text())
        os.kill(relay, signal.SIGKILL)  # no clean-up of its own
        assert procs.wait_until(lambda: not procs.alive(relay), 5)
        # Undone by the periodic pass (no restart): the record of a dead relay whose container is gone.
        _assert_nothing_left(proxy, keys)
        recovery = proxy.recoveries()
        assert recovery and recovery[-1]["container_id"] == ctr, recovery
        assert recovery[-1]["pod"] == pod.config.metadata.name and recovery[-1]["container"] == "restored"
        assert "told the runc shim" in str(recovery[-1]["result"]), recovery
        assert direct.state(ctr) == "CONTAINER_EXITED"  # it never ran on missing pages
    # The pod's runc shim served the restored task too: told the task is gone, it ends with the pod.
    wait_for(lambda: not _runc_shims_of(pod.id), timeout=30)


def _runc_shims_of(sandbox: str) -> list[int]:
    return [p for p in procs.processes_mentioning(sandbox) if b"containerd-shim" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_relay_of_a_container_removed_before_it_started_is_stopped(node: Node, direct: Cri,
                                                                   proxy: RestoringProxy) -> None:
    archive, _ = _checkpoint_counter(direct, node, 5, mem_mb=48)
    proxy.start()
    with direct.pod() as pod:
        _create(proxy, pod, archive)
        keys = proxy.work_dirs()
        relay = int((SHIM_DIR / f"{keys[0]}.pid").read_text())
    # The pod and its never started container are gone: the relay would wait for containerd in vain.
    assert procs.alive(relay)
    _assert_nothing_left(proxy, keys)  # by the periodic pass
    assert "no container restores from" in str(proxy.recoveries()[-1]["result"])


def test_corrupt_memory_image_of_an_eager_restore_is_refused_before_criu(node: Node, direct: Cri) -> None:
    """A pages-1.img one page shorter than its pagemap made CRIU spin until StartContainer's deadline."""
    archive, _ = _checkpoint_counter(direct, node, 3)  # a small memory image: restored eagerly
    broken = node.dir / "checkpoints" / "eager-broken.tar"
    with tarfile.open(archive) as src, tarfile.open(broken, "w") as dst:
        for member in src:
            data = src.extractfile(member) if member.isreg() else None
            if member.name == "checkpoint/pages-1.img":
                assert member.size < lazy.DEFER_MIN_SIZE  # copied whole: no lazy path involved
                member.size -= 4096
            dst.addfile(member, data)
    try:
        assert_restore_refused(direct, node, broken, grpc.StatusCode.INVALID_ARGUMENT, "pages-1.img",
                               "inconsistent")
    finally:
        broken.unlink()


def _rewritten(archive: Path, out: Path, change: Callable[[tarfile.TarInfo, bytes | None], bytes | None]) -> Path:
    """A copy of `archive` with each member passed through `change` (None drops it)."""
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for member in src:
            reader = src.extractfile(member) if member.isreg() else None
            data = change(member, reader.read() if reader is not None else None)
            if data is not None or not member.isreg():
                if member.isreg():
                    assert data is not None
                    member.size = len(data)
                dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out


def test_base_image_from_a_registry_not_allowed_is_refused_uncontacted(node: Node, direct: Cri) -> None:
    archive, _ = _checkpoint_counter(direct, node, 3)

    def elsewhere(member: tarfile.TarInfo, data: bytes | None) -> bytes | None:
        if member.name != "config.dump" or data is None:
            return data
        config = json.loads(data)
        for key in ("rootfsImageRef", "rootfsImageName", "rootfsImage"):
            config[key] = "registry.invalid:5000/crafted@sha256:" + "1" * 64
        return json.dumps(config).encode()

    crafted = _rewritten(archive, node.dir / "checkpoints" / "crafted-base.tar", elsewhere)
    try:
        assert_restore_refused(direct, node, crafted, grpc.StatusCode.PERMISSION_DENIED,
                               "rule restore.allowed_registries", "registry.invalid:5000", "not contacted")
    finally:
        crafted.unlink()


def test_a_restore_whose_start_fails_is_audited_as_failed(node: Node, direct: Cri) -> None:
    archive, _ = _checkpoint_counter(direct, node, 3)
    # Without the task's core image CRIU cannot restore it: Create succeeds, Start fails.
    coreless = _rewritten(archive, node.dir / "checkpoints" / "coreless.tar",
                          lambda m, data: None if m.name.startswith("checkpoint/core-") else data)
    log = NodeLayout(node.dir.resolve()).log_dir / "audit.log"
    keys: list[str] = []
    try:
        with direct.pod() as pod:
            with pytest.raises(grpc.RpcError):
                _restore(direct, pod, coreless)
            created = [c.id for c in direct.runtime.ListContainers(cri.ListContainersRequest(
                filter=cri.ContainerFilter(pod_sandbox_id=pod.id))).containers]
            keys = [Path(direct.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=c)).status
                         .annotations[RESTORE_DIR]).name for c in created]
    finally:
        coreless.unlink()
    for key in keys:  # the relay keeps its log when the restore failed (for the operator); ours to remove
        _remove_kept_log(key)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    mine = [r for r in lines if r["action"] == "restore" and r["container_id"] in created]
    assert len(mine) == 1, mine  # one line per attempt, written when it ended
    assert str(mine[0]["result"]).startswith("error: StartContainer: "), mine


def _remove_kept_log(key: str) -> None:
    wait_for(lambda: not (SHIM_DIR / f"{key}.sock").exists(), timeout=30)  # the relay has ended
    (SHIM_DIR / f"{key}.log").unlink(missing_ok=True)


def test_a_member_name_over_the_kernels_limit_is_invalid_argument(node: Node, direct: Cri) -> None:
    """A 4000-character member name gave INTERNAL (ENAMETOOLONG escaped)."""
    archive, _ = _checkpoint_counter(direct, node, 3)
    long_name = node.dir / "checkpoints" / "long-name.tar"
    with tarfile.open(archive) as src, tarfile.open(long_name, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
        extra = tarfile.TarInfo("checkpoint/" + "n" * 4000)
        extra.size = 1
        dst.addfile(extra, io.BytesIO(b"x"))
    try:
        assert_restore_refused(direct, node, long_name, grpc.StatusCode.INVALID_ARGUMENT, "name limit (255 bytes)")
    finally:
        long_name.unlink()
