"""Smoke set on containerd 2.3 (LTS) and 2.4 built from the Go module proxy (`make peers`).

Pass-through, checkpoint and restore through criu-shim, with the node's v3 config registering
criu-shim's handler as on 1.7 (containerd's own restore through CreateContainer stays off).
"""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.containerd import NAMESPACE
from shim.handoff import SHIM_DIR
from shim.node.layout import NodeLayout
from shim.node.tools import load_paths
from shim.restore.pod_shim import BOOTSTRAP, TASK_RUNTIME
from tests.node.conftest import Node, Nodes
from tests.node.pods import Cri, wait_for
from tests.node.test_restore import COUNTER, _checkpoint_counter, _restore, _work_dirs
from tests.node.test_runtime_config import crictl, squeezed

pytestmark = pytest.mark.node

LOCKED = {"2.3": "v2.3.", "2.4": "v2.4."}  # scripts/peers.lock pins the patch release


@pytest.fixture(scope="module", params=["2.3", "2.4"])
def built(request: pytest.FixtureRequest, nodes: Nodes) -> tuple[str, Node]:
    version: str = request.param
    return version, nodes.get(version)  # the session's node of that version, shared with the matrix


@pytest.fixture
def client(built: tuple[str, Node], tmp_path: Path) -> Iterator[Cri]:
    c = Cri(built[1].cri, tmp_path / "pod-logs")
    yield c
    c.close()


def test_pass_through_reaches_the_built_containerd(built: tuple[str, Node], client: Cri) -> None:
    version, node = built
    reply = client.runtime.Version(cri.VersionRequest(), timeout=10)
    assert (reply.runtime_name, reply.runtime_version[:5]) == ("containerd", LOCKED[version])
    with client.pod() as pod:
        ctr = client.container(pod, COUNTER, {"INTERVAL_MS": "50"})
        assert client.state(ctr) == "CONTAINER_RUNNING"
        assert client.exec(ctr, "echo", "hello") == "hello\n"
    # containerd 2.x answers RuntimeConfig itself: relayed unchanged
    direct, through = crictl(node.containerd, "runtime-config"), crictl(node.cri, "runtime-config")
    assert (through.returncode, through.stdout) == (0, direct.stdout)
    assert squeezed(through.stdout) == "cgroup driver: CGROUPFS"


def test_checkpoint_through_criu_shim(built: tuple[str, Node], client: Cri) -> None:
    _, node = built
    with client.pod() as pod:
        ctr = client.container(pod, COUNTER, {"INTERVAL_MS": "50"})
        wait_for(lambda: client.count(ctr) >= 10)
        archive = node.dir / "checkpoints" / "smoke.tar"
        client.checkpoint(ctr, str(archive))
        assert client.state(ctr) == "CONTAINER_RUNNING"  # checkpointed, left running
        counted = client.count(ctr)
        wait_for(lambda: client.count(ctr) > counted)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600  # criu-shim's archive, not containerd's
    shown = subprocess.run([load_paths()["CHECKPOINTCTL_BIN"], "show", str(archive)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "main" in shown.stdout, shown.stderr  # the container's name
    records = [json.loads(line) for line in (node.dir / "logs" / "audit.log").read_text().splitlines()]
    assert ("checkpoint", str(archive), "ok") in {(r["action"], r["location"], r["result"]) for r in records}


# containerd 2.x create a pod's later containers over the pod's shim without running the handler
# binary; criu-shim opens the pod's shim to its handler for the restored task (shim.restore.pod_shim),
# and the launcher answers 2.3+'s protobuf BootstrapResult in kind. Without either, the container
# would be started afresh and criu-shim would refuse it.
# 0 MiB: memory restored before the process runs; 48 MiB: a lazy restore (the relay holds a Pause
# or Checkpoint until memory is complete, on the task API v3 calls of containerd 2.x).
@pytest.mark.parametrize("mem_mb", [0, 48])
def test_restore_through_criu_shim(built: tuple[str, Node], client: Cri, mem_mb: int) -> None:
    _, node = built
    archive, _ = _checkpoint_counter(client, node, 20, mem_mb)
    with client.pod() as pod:
        bundles = NodeLayout(node.dir).state / TASK_RUNTIME / NAMESPACE
        pod_bootstrap = bundles / pod.id / BOOTSTRAP
        before = pod_bootstrap.read_bytes()
        assert json.loads(before)["version"] == 3  # containerd joins new containers to the pod's shim
        ctr = _restore(client, pod, archive)
        assert client.state(ctr) == "CONTAINER_RUNNING"
        first = client.count(ctr)
        # At least 20 when checkpointed (the original counted on after it); a fresh start needs 1 s for 20.
        assert first >= 20, "the count restarted instead of resuming"
        wait_for(lambda: client.count(ctr) > first)  # and it goes on
        assert pod_bootstrap.read_bytes() == before  # the pod's shim version is put back
        # The restored task went through our handler (no `sandbox` file: containerd ran the launcher),
        # into the pod's own shim (the relay's upstream is the address the pod's bootstrap names).
        assert not (bundles / ctr / "sandbox").exists()
        relay = json.loads((bundles / ctr / BOOTSTRAP).read_bytes())["address"]
        assert relay.startswith(f"unix://{SHIM_DIR}/")
        again = node.dir / "checkpoints" / f"again-{mem_mb}.tar"
        client.checkpoint(ctr, str(again))  # a restored container is checkpointed again, through the relay
        assert again.stat().st_size > 0
        # A container started after it joins the pod's shim the way containerd does it by itself.
        later = client.container(pod, COUNTER, {"INTERVAL_MS": "50"}, name="later")
        assert (bundles / later / "sandbox").read_text() == pod.id
        assert client.exec(ctr, "echo", "restored") == "restored\n"
        client.runtime.StopContainer(cri.StopContainerRequest(container_id=ctr, timeout=10), timeout=60)
        assert client.state(ctr) == "CONTAINER_EXITED"
        assert client.state(later) == "CONTAINER_RUNNING"  # the pod's shim serves on
        assert client.exec(later, "echo", "later") == "later\n"
    wait_for(lambda: not Path(relay.removeprefix("unix://")).exists())  # the relay went with the pod


def test_restore_into_a_stopped_pod_gets_containerds_answer(built: tuple[str, Node], client: Cri) -> None:
    """containerd 2.3/2.4 refuse CreateContainer into a sandbox that is not running
    (containerd#13654): a restore into one gets that very answer, and leaves nothing behind."""
    _, node = built
    archive, _ = _checkpoint_counter(client, node, 1)
    before = _work_dirs(node)
    with client.pod() as pod:
        client.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
        with pytest.raises(grpc.RpcError) as plain:
            client.container(pod, COUNTER, name="plain", start=False)
        with pytest.raises(grpc.RpcError) as restored:
            _restore(client, pod, archive)
        assert f'sandbox container "{pod.id}" is not running' in (plain.value.details() or "")
        assert (restored.value.code(), restored.value.details()) == (plain.value.code(), plain.value.details())
        listed = client.runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(pod_sandbox_id=pod.id))).containers
        assert not listed
    assert _work_dirs(node) <= before  # nothing new (the failed create may collect an earlier restore's config)


def test_restored_container_survives_a_containerd_restart(built: tuple[str, Node], client: Cri) -> None:
    """containerd 2.x reload the restored task from its bundle's bootstrap.json, which names our
    relay; the pod's own task from the pod's bootstrap.json, put back to version 3."""
    from shim.node import local, procs
    from shim.node.tools import tools_for

    version, node = built
    archive, _ = _checkpoint_counter(client, node, 5, mem_mb=48)
    layout = NodeLayout(node.dir.resolve())
    with client.pod() as pod:
        ctr = _restore(client, pod, archive)
        pid = procs.read_pid(layout.pid_dir / "containerd.pid")
        assert pid is not None
        procs.stop(pid)
        local._start_containerd(layout, tools_for(version))
        seen = client.count(ctr)
        wait_for(lambda: client.count(ctr) > seen)  # never stopped counting
        assert client.exec(ctr, "echo", "still here").strip() == "still here"
        ready = client.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id)).status
        assert cri.PodSandboxState.Name(ready.state) == "SANDBOX_READY"  # the pod's own task came back
        later = client.container(pod, COUNTER, {"INTERVAL_MS": "50"}, name="later")
        assert client.state(later) == "CONTAINER_RUNNING"
        client.runtime.StopContainer(cri.StopContainerRequest(container_id=ctr, timeout=10), timeout=60)
        stopped = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
        assert cri.ContainerState.Name(stopped.state) == "CONTAINER_EXITED"
        assert stopped.exit_code == 0


# The runc shim of containerd 2.x loads a container's cgroup only when its init has a pid at Create
# (cmd/containerd-shim-runc-v2/runc/container.go, NewContainer); a task created from a checkpoint gets
# its pid at Start and 2.x's shim never loads it later, so its Stats says NOT_FOUND "cgroup does not
# exist" and CRI's ContainerStats fails ("unexpected metrics response: []"). The restore relay answers
# that Stats from the task's cgroup (shim.runtime.task_stats): real figures, and they move (48 MiB
# restored lazily: the working set climbs past them as the page daemon fills memory in). On 1.7 the
# shim has the cgroup and its own answer is relayed; 2.1 (Debian's) has 2.x's shim.
@pytest.mark.parametrize("version", ["2.3", "2.4", "2.1", "1.7"])
def test_container_stats_of_a_restored_container(nodes: Nodes, version: str, tmp_path: Path) -> None:
    node = nodes.get(version)
    client = Cri(node.cri, tmp_path / "pod-logs")
    try:
        _stats_of_a_restored_container(client, node)
    finally:
        client.close()


def _stats_of_a_restored_container(client: Cri, node: Node) -> None:
    archive, _ = _checkpoint_counter(client, node, 1, mem_mb=48)
    with client.pod() as pod:
        ctr = _restore(client, pod, archive)

        def stats() -> cri.ContainerStats:
            return client.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=ctr), timeout=30).stats

        first = stats()
        assert first.attributes.id == ctr
        assert first.cpu.usage_core_nano_seconds.value > 0
        assert first.memory.usage_bytes.value > 0
        assert 0 < first.memory.working_set_bytes.value <= first.memory.usage_bytes.value
        # The counter keeps running: its CPU time grows (read from its cgroup at each call, not cached),
        # and its 48 MiB, filled in behind it, are counted as its own.
        wait_for(lambda: stats().cpu.usage_core_nano_seconds.value > first.cpu.usage_core_nano_seconds.value)
        wait_for(lambda: stats().memory.working_set_bytes.value >= 48 << 20, timeout=60)
        filled = stats().memory
        assert filled.usage_bytes.value >= filled.working_set_bytes.value >= 48 << 20
        listed = client.runtime.ListContainerStats(cri.ListContainerStatsRequest(
            filter=cri.ContainerStatsFilter(pod_sandbox_id=pod.id)), timeout=30).stats
        [mine] = [s for s in listed if s.attributes.id == ctr]
        assert mine.cpu.usage_core_nano_seconds.value >= first.cpu.usage_core_nano_seconds.value
        assert mine.memory.working_set_bytes.value > 0
