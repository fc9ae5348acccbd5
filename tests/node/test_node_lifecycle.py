"""`criu-shim node up/down`: two nodes side by side, nothing left behind, bad input refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc
from shim.node import cleanup
from shim.node.layout import RUN_ROOT, NodeLayout
from tests.node import leaks
from tests.node.conftest import criu_shim, node_down, node_up

pytestmark = pytest.mark.node

BUSYBOX = "localhost/criu-shim/busybox:1"


def _run_pod(endpoint: str, name: str, log_dir: Path) -> str:
    log_dir.mkdir(parents=True, exist_ok=True)
    stub = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(endpoint))
    config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="t", uid=name),
                                  log_directory=str(log_dir))
    pod = stub.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    ctr = stub.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod, sandbox_config=config, config=(
        cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image=BUSYBOX),
                            command=["sleep", "3600"], log_path="c.log")))).container_id
    stub.StartContainer(cri.StartContainerRequest(container_id=ctr))
    return str(stub.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status.network.ip)


def test_two_nodes_side_by_side_and_nothing_left(tmp_path: Path) -> None:
    before = leaks.snapshot()
    dirs = [tmp_path / "a", tmp_path / "b"]
    try:
        nodes = [node_up(d) for d in dirs]
        assert len({n.cri for n in nodes}) == 2
        ips = [_run_pod(n.cri, f"pod-{i}", n.dir / "logs-pods") for i, n in enumerate(nodes)]
        subnets = [NodeLayout(d.resolve()).subnet.rsplit(".", 1)[0] for d in dirs]
        assert [ip.rsplit(".", 1)[0] for ip in ips] == subnets  # each pod on its own node's bridge
        assert node_up(dirs[0]).cri == nodes[0].cri  # idempotent: a running node is reused
        mode = os.stat(nodes[0].cri.removeprefix("unix://")).st_mode & 0o777
        assert mode == 0o660
    finally:
        reports = [node_down(d) for d in dirs]
    assert all("removed 1 pods" in r for r in reports), reports
    leaks.assert_nothing_left(before, leaks.settled_snapshot(before), tmp_path)
    assert not any(d.exists() for d in dirs)  # --purge
    assert node_down(dirs[0]) == ""  # idempotent: nothing left to do


def test_two_nodes_whose_tags_pick_one_subnet_get_two(tmp_path: Path) -> None:
    """A test session keeps a dozen nodes up: the second of two nodes whose tags pick the same /24 takes
    the next free one (it failed at up, or its pods later, before)."""
    # The first node's own /24 must be free now: another node of the session may hold that of "a".
    first = next(d for d in (tmp_path / f"a{i}" for i in range(10_000))
                 if _free_now(NodeLayout(d.resolve()).subnet_candidates()[0]))
    preferred = NodeLayout(first.resolve()).subnet_candidates()[0]
    second = next(d for d in (tmp_path / f"b{i}" for i in range(10_000))
                  if NodeLayout(d.resolve()).subnet_candidates()[0] == preferred)
    before = leaks.snapshot()
    try:
        nodes = [node_up(d) for d in (first, second)]
        subnets = [NodeLayout(d.resolve()).subnet for d in (first, second)]
        assert subnets[0] == preferred and subnets[1] != preferred
        ips = [_run_pod(n.cri, f"pod-{i}", n.dir / "logs-pods") for i, n in enumerate(nodes)]
        assert [ip.rsplit(".", 1)[0] for ip in ips] == [s.rsplit(".", 1)[0] for s in subnets]
    finally:
        for d in (first, second):
            node_down(d)
    leaks.assert_nothing_left(before, leaks.settled_snapshot(before), tmp_path)


def _free_now(subnet: str) -> bool:
    """Neither claimed by a node that is up (its run dir's `subnet`) nor routed on this host."""
    claimed = {claim.read_text().strip() for claim in RUN_ROOT.glob("*/subnet")}
    return subnet not in claimed and cleanup.subnet_in_use(subnet, own_bridge="") is None


def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    bad_version = criu_shim("node", "up", "--dir", str(tmp_path / "x"), "--containerd", "9.9", check=False)
    assert bad_version.returncode == 2 and "invalid choice: '9.9'" in bad_version.stderr
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    refused = criu_shim("node", "up", "--dir", str(not_a_dir), check=False)
    assert refused.returncode != 0 and "criu-shim:" in refused.stderr + refused.stdout
    assert not (tmp_path / "x").exists()
    assert not NodeLayout(not_a_dir.resolve()).run_dir.exists()
    bad_endpoint = criu_shim("serve", "--listen", "relative.sock", "--runtime-endpoint", "unix:///x", check=False)
    assert bad_endpoint.returncode == 2 and "expected unix:///absolute/path" in bad_endpoint.stderr


def test_containerd_restart_gives_unavailable_then_recovers(tmp_path: Path) -> None:
    node = node_up(tmp_path / "n")
    layout = NodeLayout((tmp_path / "n").resolve())
    try:
        stub = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(node.cri))
        assert stub.Version(cri.VersionRequest(), timeout=5).runtime_name == "containerd"
        pid = int((layout.pid_dir / "containerd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in range(200):  # until the proxy notices containerd is gone
                stub.Version(cri.VersionRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        _restart_containerd(layout)
        reply = _poll(lambda: stub.Version(cri.VersionRequest(), timeout=5))
        assert reply.runtime_name == "containerd"
    finally:
        node_down(tmp_path / "n")


def _restart_containerd(layout: NodeLayout) -> None:
    from shim.node import local, procs
    from shim.node.tools import tools_for

    procs.wait_until(lambda: not layout.containerd_socket.exists() or not procs.alive(
        int((layout.pid_dir / "containerd.pid").read_text())), 15)
    local._start_containerd(layout, tools_for("1.7"))


def _poll(call, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    from shim.node import procs

    result = []

    def attempt() -> bool:
        try:
            result.append(call())
            return True
        except grpc.RpcError:
            return False

    assert procs.wait_until(attempt, timeout, interval=0.1)
    return result[0]


def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    listen = tmp_path / "p.sock"
    proc = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--listen", f"unix://{listen}",
                             "--runtime-endpoint", f"unix://{tmp_path}/nothing.sock"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        from shim.node import procs

        assert procs.wait_until(listen.exists, 20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not listen.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_down_stops_a_spare_its_relay_forked_and_never_saw_exec(tmp_path: Path) -> None:
    """A spare relay starts its spare page daemon at idle priority; stopped at that moment, it leaves a
    child that may still bear the relay's command line (forked, not yet exec'd) when `node down` looks,
    and runs its own orphan check only once it gets CPU (CI found one left three runs in a row). `node
    down` finds it by where it works, the node's restore root, whatever its command line says."""
    node_up(tmp_path / "n")
    restores = NodeLayout((tmp_path / "n").resolve()).dir / "restore"
    restores.mkdir(exist_ok=True)
    # the relay's command line, not the node's directory in it, in the restore root
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "-m", "shim.runtime",
                              "relay-spare"], cwd=restores, start_new_session=True)
    try:
        said = node_down(tmp_path / "n")
        assert child.wait(timeout=30) in (-signal.SIGTERM, -signal.SIGKILL)
        assert f"stopped leftover lazy-pages daemon {child.pid}" in said, said
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
