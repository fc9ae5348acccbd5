"""Restore through the CRI: a checkpoint archive as the image of CreateContainer, into a new pod."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import grpc
import pytest

from shim.annotations import LAZY_PAGES
from shim.api.cri.v1 import api_pb2 as cri
from shim.handoff import RESTORE_DIR
from shim.paths_env import load_paths
from tests.node.conftest import FULL, SMOKE, Node, on
from tests.node.pods import Cri, Pod, wait_for

pytestmark = pytest.mark.node

COUNTER = ["/usr/local/bin/counter"]


def _restore(client: Cri, pod: Pod, archive: Path, name: str = "restored") -> str:
    image = str(archive) if archive.is_absolute() else archive.as_posix()
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image),
                                 log_path=f"{name}.log")
    ctr = str(client.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=120).container_id)
    client.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=120)
    return ctr


def _pid(verbose_status: object) -> int:
    return int(json.loads(verbose_status.info["info"])["pid"])  # type: ignore[attr-defined]


def _checkpoint_counter(client: Cri, node: Node, at_least: int, mem_mb: int = 0) -> tuple[Path, int]:
    archive = node.dir / "checkpoints" / f"counter-{at_least}-{mem_mb}.tar"
    with client.pod() as pod_a:
        ctr = client.container(pod_a, COUNTER, {"INTERVAL_MS": "50", "MEM_MB": str(mem_mb)})
        wait_for(lambda: client.count(ctr) >= at_least)
        client.checkpoint(ctr, str(archive))
        counted = client.count(ctr)
    return archive, counted


# 0 MiB: the memory image is small and restored before the process runs; 48 MiB: a lazy restore
# (shim.restore.lazy), the process runs while its memory is filled in; and 48 MiB with lazy pages
# turned off by the new pod's annotation: all memory in place before the process runs.
@on(*FULL, *SMOKE)
@pytest.mark.parametrize(("mem_mb", "lazy"), [(0, False), (48, True), (48, False)], ids=["tiny", "lazy", "eager"])
def test_counter_resumes_its_count_in_a_new_pod(client: Cri, node: Node, mem_mb: int, lazy: bool) -> None:
    archive, _ = _checkpoint_counter(client, node, 20, mem_mb)
    with client.pod({} if lazy or not mem_mb else {LAZY_PAGES: "false"}) as pod_b:
        ctr = _restore(client, pod_b, archive)
        assert client.state(ctr) == "CONTAINER_RUNNING"
        first = client.count(ctr)
        # A fresh start would need a second to count to 20; a restore starts there.
        assert first >= 20, "the count restarted instead of resuming"
        pod_ip = client.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_b.id)).status.network.ip
        assert f"inet {pod_ip}/" in client.exec(ctr, "ip", "-4", "addr", "show", "eth0")  # pod B's network
        cgroups = client.exec(ctr, "cat", "/proc/self/cgroup")
        assert all(ctr in line for line in cgroups.splitlines() if ":memory:" in line)  # its own cgroup
        restored_pid = _pid(client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr, verbose=True)))
        sandbox_pid = _pid(client.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_b.id,
                                                                                      verbose=True)))
        for kind in ("net", "ipc", "uts"):  # pod B's namespaces, the ones its pause process holds
            assert os.readlink(f"/proc/{restored_pid}/ns/{kind}") == os.readlink(f"/proc/{sandbox_pid}/ns/{kind}")
        wait_for(lambda: client.count(ctr) > first)  # and it keeps counting
        status = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
        assert status.annotations["restored"] == "true"
        lazy_plan = Path(status.annotations[RESTORE_DIR]) / "lazy-pages.json"
        assert lazy_plan.exists() == lazy, "the 48 MiB image is restored lazily unless the pod says no"
        assert status.annotations["checkpointImage"] == str(archive)
        assert status.annotations["checkpointedAt"]
        log = client.log(ctr)
        assert "count=1" in log  # the checkpointed container's log came first
        wait_for(lambda: f"count={first + 1}" in client.log(ctr))  # new output appends
        assert client.exec(ctr, "echo", "hi").strip() == "hi"
        client.runtime.StopContainer(cri.StopContainerRequest(container_id=ctr, timeout=10))
        stopped = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
        assert cri.ContainerState.Name(stopped.state) == "CONTAINER_EXITED"
        assert stopped.exit_code == 0


def test_restore_is_refused_outside_allowed_dirs(client: Cri, node: Node, tmp_path: Path) -> None:
    archive, _ = _checkpoint_counter(client, node, 1)
    outside = tmp_path / "elsewhere.tar"
    shutil.copy(archive, outside)
    assert_restore_refused(client, node, outside, grpc.StatusCode.PERMISSION_DENIED, "restore.allowed_dirs")


def assert_restore_refused(client: Cri, node: Node, archive: Path, code: grpc.StatusCode,
                           *fragments: str) -> None:
    """Restoring `archive` into a new pod fails with `code` and messages containing `fragments`,
    and leaves nothing behind: no containerd container, no unpacked work dir."""
    before = _work_dirs(node)
    with client.pod() as pod:
        with pytest.raises(grpc.RpcError) as caught:
            _restore(client, pod, archive)
        details = caught.value.details() or ""
        assert caught.value.code() == code, details
        for fragment in fragments:
            assert fragment in details
        listed = client.runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(pod_sandbox_id=pod.id))).containers
        assert not listed  # no containerd container was made
    assert _work_dirs(node) <= before  # nothing new (an earlier test's relay may still be removing its own)


def _work_dirs(node: Node) -> set[str]:
    work = node.dir / "restore"
    return {p.name for p in work.iterdir()} if work.exists() else set()


def test_audit_records_restores(client: Cri, node: Node) -> None:
    archive, _ = _checkpoint_counter(client, node, 1)
    with client.pod() as pod:
        ctr = _restore(client, pod, archive)
    records = [json.loads(line) for line in (node.dir / "logs" / "audit.log").read_text().splitlines()]
    restores = [r for r in records if r["action"] == "restore" and r["container_id"] == ctr]
    assert restores and restores[-1]["result"] == "ok"


def _hostile_archive(node: Node, good: Path, name: str, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    """Our own good archive with one hostile member appended."""
    hostile = node.dir / "checkpoints" / name
    shutil.copy(good, hostile)
    with tarfile.open(hostile, "a") as tar:
        tar.addfile(extra, io.BytesIO(data) if data else None)
    return hostile


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "device", "truncated"])
def test_hostile_archive_is_refused_and_leaves_nothing(client: Cri, node: Node, tmp_path: Path, kind: str) -> None:
    good, _ = _checkpoint_counter(client, node, 1)
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("untouched")
    if kind == "truncated":
        archive = node.dir / "checkpoints" / "truncated.tar"
        archive.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        member = tarfile.TarInfo({"dotdot": f"../../../../../../{sentinel}", "absolute": str(sentinel),
                                  "symlink": "checkpoint/evil", "device": "checkpoint/dev"}[kind])
        if kind == "symlink":
            member.type, member.linkname = tarfile.SYMTYPE, str(sentinel)
        elif kind == "device":
            member.type, member.devmajor, member.devminor = tarfile.CHRTYPE, 1, 3
        else:
            member.size = 4
        archive = _hostile_archive(node, good, f"{kind}.tar", member, b"evil" if member.size else b"")
    assert_restore_refused(client, node, archive, grpc.StatusCode.INVALID_ARGUMENT)
    assert sentinel.read_text() == "untouched"


@pytest.mark.parametrize("ref, allowed", [("localhost/criu-shim/counter-checkpoint:1", True),
                                          ("example.com/criu-shim/counter-checkpoint:1", False)])
def test_restore_from_a_checkpoint_oci_image(client: Cri, node: Node, tmp_path: Path, ref: str,
                                             allowed: bool) -> None:
    archive, _ = _checkpoint_counter(client, node, 20)
    layout = tmp_path / "image.tar"
    build = subprocess.run([sys.executable, "-m", "shim", "checkpoint-image", str(archive), "--name", ref,
                            "--out", str(layout)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    ctr_bin = Path(load_paths()["CONTAINERD_1_7"]) / "ctr"
    socket = node.containerd.removeprefix("unix://")
    subprocess.run([str(ctr_bin), "--address", socket, "-n", "k8s.io", "images", "import", str(layout)],
                   check=True, capture_output=True)
    archive.unlink()  # the image alone must be enough
    try:
        with client.pod() as pod:
            if not allowed:
                with pytest.raises(grpc.RpcError) as caught:
                    _restore(client, pod, Path(ref))
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "restore.allowed_registries" in (caught.value.details() or "")
                return
            ctr = _restore(client, pod, Path(ref))
            assert client.count(ctr) >= 20
            status = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
            assert status.annotations["checkpointImage"].endswith("counter-checkpoint:1")
    finally:
        subprocess.run([str(ctr_bin), "--address", socket, "-n", "k8s.io", "images", "rm", ref],
                       capture_output=True)


def test_restore_survives_proxy_restarts(client: Cri, node: Node) -> None:
    """The restore relay is not the proxy's: restarts before Start and after it change nothing
    (containerd would kill a task whose shim connection dropped)."""
    from shim.node import local, procs
    from shim.node.layout import NodeLayout

    archive, _ = _checkpoint_counter(client, node, 20)
    layout = NodeLayout(node.dir.resolve())
    with client.pod() as pod:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="r"), image=cri.ImageSpec(image=str(archive)),
                                     log_path="r.log")
        ctr = client.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=120).container_id
        pid = procs.read_pid(layout.pid_dir / "proxy.pid")
        assert pid is not None
        procs.stop(pid)
        local._start_proxy(layout, layout.proxy_config_file)
        fresh = Cri(node.cri, client.log_root)
        fresh.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=120)
        assert fresh.count(ctr) >= 20
        pid = procs.read_pid(layout.pid_dir / "proxy.pid")
        assert pid is not None
        procs.stop(pid)
        local._start_proxy(layout, layout.proxy_config_file)
        seen = fresh.count(ctr)
        wait_for(lambda: fresh.count(ctr) > seen)
        assert fresh.state(ctr) == "CONTAINER_RUNNING"
        fresh.close()


def test_restored_container_survives_a_containerd_restart(client: Cri, node: Node) -> None:
    """containerd reconnects to a restored task's shim (our relay in front of runc's) after a restart."""
    from shim.node import local, procs
    from shim.node.layout import NodeLayout
    from shim.node.tools import tools_for

    archive, _ = _checkpoint_counter(client, node, 5, mem_mb=48)
    layout = NodeLayout(node.dir.resolve())
    with client.pod() as pod:
        ctr = _restore(client, pod, archive)
        pid = procs.read_pid(layout.pid_dir / "containerd.pid")
        assert pid is not None
        procs.stop(pid)
        local._start_containerd(layout, tools_for("1.7"))
        seen = client.count(ctr)
        wait_for(lambda: client.count(ctr) > seen)  # never stopped counting
        wait_for(lambda: client.state(ctr) == "CONTAINER_RUNNING", timeout=30)
        assert client.exec(ctr, "echo", "still here").strip() == "still here"
        client.runtime.StopContainer(cri.StopContainerRequest(container_id=ctr, timeout=10))
        stopped = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
        assert cri.ContainerState.Name(stopped.state) == "CONTAINER_EXITED"
        assert stopped.exit_code == 0


def test_criu_configs_of_removed_restored_containers_are_collected(client: Cri, node: Node) -> None:
    """A restored container keeps its CRIU config while it exists; once it is gone, so is the file."""
    archive, _ = _checkpoint_counter(client, node, 1)
    with client.pod() as pod:
        first = _restore(client, pod, archive)
        first_conf = Path(client.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=first)).status.annotations["org.criu.config"])
        assert first_conf.is_file()
    with client.pod() as pod:  # the next restore's StartContainer collects what is no longer named
        second = _restore(client, pod, archive)
        second_conf = Path(client.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=second)).status.annotations["org.criu.config"])
        assert second_conf.is_file()
        wait_for(lambda: not first_conf.exists(), timeout=30)  # collected once StartContainer has answered


def _checkpoint_with_volume(client: Cri, node: Node, host_dir: Path, name: str) -> Path:
    """A counter with `host_dir` bind-mounted at /data, checkpointed into the node's checkpoints."""
    archive = node.dir / "checkpoints" / name
    with client.pod() as pod:
        ctr = client.container(pod, COUNTER, name="vol", mounts={"/data": host_dir})
        wait_for(lambda: client.count(ctr) >= 1)
        client.checkpoint(ctr, str(archive))
    return archive


def test_restored_container_uses_the_new_pods_volume_paths(client: Cri, node: Node, tmp_path: Path) -> None:
    """A bind mount is re-pointed at the new request's host path, never the old pod's (containerd#12108)."""
    old, new = tmp_path / "pods" / "old-uid" / "volumes" / "data", tmp_path / "pods" / "new-uid" / "volumes" / "data"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    (old / "who").write_text("old pod\n")
    (new / "who").write_text("new pod\n")
    archive = _checkpoint_with_volume(client, node, old, "volume.tar")
    with client.pod() as pod:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="vol"), image=cri.ImageSpec(image=str(archive)),
                                     log_path="vol.log", mounts=[cri.Mount(container_path="/data", host_path=str(new))])
        ctr = client.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=120).container_id
        client.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=120)
        assert client.exec(ctr, "cat", "/data/who") == "new pod\n"
        client.exec(ctr, "sh", "-c", "echo restored > /data/mark")
    assert (new / "mark").read_text() == "restored\n" and not (old / "mark").exists()


def test_undeclared_bind_mount_is_refused(client: Cri, node: Node, tmp_path: Path) -> None:
    """A checkpoint that had a host bind mount the new request does not declare is refused (CRI-O's rule)."""
    data = tmp_path / "data"
    data.mkdir()
    archive = _checkpoint_with_volume(client, node, data, "undeclared.tar")
    assert_restore_refused(client, node, archive, grpc.StatusCode.INVALID_ARGUMENT,
                           "expects following bind mounts defined (/data)")


def test_a_restored_container_can_be_checkpointed_and_restored_again(client: Cri, node: Node) -> None:
    archive, _ = _checkpoint_counter(client, node, 20)
    again = node.dir / "checkpoints" / "again.tar"
    with client.pod() as pod:
        ctr = _restore(client, pod, archive)
        wait_for(lambda: client.count(ctr) >= 25)
        client.checkpoint(ctr, str(again))
    with client.pod() as pod:
        ctr = _restore(client, pod, again)
        assert client.count(ctr) >= 25


def test_restore_into_a_pod_not_run_by_the_criu_handler_is_refused_not_started_afresh(
        client: Cri, node: Node) -> None:
    archive, _ = _checkpoint_counter(client, node, 1)
    name = f"runc-{uuid.uuid4().hex[:6]}"
    (client.log_root / name).mkdir(parents=True, exist_ok=True)
    config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="tests", uid=name),
                                  log_directory=str(client.log_root / name))
    pod_id = client.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config, runtime_handler="runc")).pod_sandbox_id
    try:
        with pytest.raises(grpc.RpcError) as caught:
            _restore(client, Pod(pod_id, config), archive)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "started afresh instead of restored" in (caught.value.details() or "")
        listed = client.runtime.ListContainers(cri.ListContainersRequest(filter=cri.ContainerFilter(
            pod_sandbox_id=pod_id, state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING)))).containers
        assert not listed  # stopped, not left running as a fresh copy
    finally:
        client.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        client.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def test_checkpoint_from_another_architecture_is_refused(client: Cri, node: Node) -> None:
    good, _ = _checkpoint_counter(client, node, 1)
    foreign = node.dir / "checkpoints" / "foreign.tar"
    with tarfile.open(good) as src, tarfile.open(foreign, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name == "criu-shim.json":
                facts = json.loads(data or b"{}")
                facts["architecture"] = "s390x"
                data = json.dumps(facts).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    assert_restore_refused(client, node, foreign, grpc.StatusCode.INVALID_ARGUMENT, "the checkpoint was made on s390x")
