"""The real kubelet 1.37 and API server drive criu-shim (`node up --kubernetes`, containerd 1.7 and 1.6).

One control plane per module. Pods are bound by nodeName (no scheduler). A checkpoint is taken
the way users take one (the kubelet checkpoint API through the API server), turned into a
checkpoint image, pushed to the node's registry and restored by a pod whose image it is.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.node import registry as reg
from shim.paths_env import load_paths
from tests.node import kube, leaks
from tests.node.conftest import node_down, node_up
from tests.node.kube import KubeNode, container_status, count, pod_manifest, running, wait_for

pytestmark = pytest.mark.node

# The kubelet names archives checkpoint-<pod>_<namespace>-<container>-<RFC 3339 time>.tar
KUBELET_NAME = re.compile(r"checkpoint-(?P<pod>[^_]+)_(?P<ns>[^-]+)-(?P<ctr>.+)-\d{4}-\d\d-\d\dT[\d:]+Z\.tar")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "node tests need root"
    paths = load_paths()
    for key, binary in (("KUBERNETES_BIN_DIR", "kubelet"), ("KUBERNETES_BIN_DIR", "kube-apiserver"),
                        ("ETCD_BIN_DIR", "etcd")):
        if not (Path(paths[key]) / binary).exists():
            return f"{Path(paths[key]) / binary} is missing: run `make peers`"
    return None


@pytest.fixture(scope="module", params=["1.7", "1.6"])
def knode(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeNode]:
    if reason := _missing():
        pytest.skip(reason)
    before = leaks.snapshot()
    directory = tmp_path_factory.mktemp(f"kube-{request.param}")
    try:
        yield kube.node_up(directory, request.param)
    finally:
        down = subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(directory), "--purge"],
                              capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr
    leaks.assert_nothing_left(before, leaks.settled_snapshot(before), directory)


@pytest.fixture
def pods(knode: KubeNode) -> Iterator[list[str]]:
    """Names of pods a test creates: deleted afterwards, pass or fail."""
    names: list[str] = []
    yield names
    for name in names:
        knode.delete_pod(name)


def _counter_pod(knode: KubeNode, pods: list[str], name: str, image: str = kube.TESTPROGS,
                 pull: str = "Never", liveness: bool = False) -> None:
    pods.append(name)
    knode.create(pod_manifest(knode, name, image, pull, liveness=liveness))
    wait_for(lambda: running(knode, name), what=f"pod {name} running")


def _checkpoint(knode: KubeNode, pod: str, at_least: int) -> tuple[Path, int]:
    wait_for(lambda: count(knode, pod) >= at_least, what=f"count {at_least} in {pod}")
    res = knode.checkpoint(pod, "counter")
    assert res.returncode == 0, res.stderr
    (path,) = json.loads(res.stdout)["items"]
    return Path(path), count(knode, pod)


def test_node_is_registered_ready_untainted_and_uses_criu_shim(knode: KubeNode) -> None:
    node = knode.get("node", knode.name)
    assert not node["spec"].get("taints")
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
    config = json.loads((knode.dir / "kubernetes" / "kubelet-config.json").read_text())
    assert config["containerRuntimeEndpoint"] == config["imageServiceEndpoint"] == knode.cri
    assert config["featureGates"] == {"ContainerCheckpoint": True} and config["failCgroupV1"] is False
    kubelet_log = (knode.dir / "logs" / "kubelet.log").read_text(errors="replace")
    # The driver comes from the RuntimeConfig call criu-shim answers for containerd 1.7.
    assert 'Using cgroup driver setting received from the CRI runtime" cgroupDriver="cgroupfs"' in kubelet_log
    assert not [line for line in kubelet_log.splitlines() if "RuntimeConfig" in line and "mplemented" in line]


def test_kubelet_checkpoint_and_restore_from_a_pushed_checkpoint_image(knode: KubeNode, pods: list[str],
                                                                       tmp_path: Path) -> None:
    _counter_pod(knode, pods, "counter")
    archive, counted = _checkpoint(knode, "counter", 10)
    # The kubelet's own file name, under its own checkpoints directory, root-only.
    assert archive.parent.resolve() == knode.checkpoints_dir
    match = KUBELET_NAME.fullmatch(archive.name)
    assert match and match["pod"] == "counter" and match["ns"] == "default" and match["ctr"] == "counter"
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    show = subprocess.run([load_paths()["CHECKPOINTCTL_BIN"], "show", str(archive)], capture_output=True, text=True)
    assert show.returncode == 0 and "counter" in show.stdout, show.stderr
    assert running(knode, "counter")  # checkpointing leaves the workload running

    ref = f"{knode.registry}/ckpt/counter:1"
    layout = tmp_path / "image.tar"
    build = subprocess.run([sys.executable, "-m", "shim", "checkpoint-image", str(archive), "--name", ref,
                            "--out", str(layout)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    registry = reg.running_registry(knode.dir / "kubernetes" / "registry")
    assert registry is not None and registry.host == knode.registry
    reg.push_layout(registry, layout, "ckpt/counter", "1")

    _counter_pod(knode, pods, "restored", image=ref, pull="IfNotPresent", liveness=True)
    assert any("Pulled" in line for line in knode.events("restored").splitlines())
    # A fresh counter would be near 1: the restored one carries on from the checkpoint (kubectl exec).
    first = count(knode, "restored")
    assert first >= counted
    wait_for(lambda: count(knode, "restored") > first, what="the restored count to go on")
    logs = knode.run("logs", "restored").stdout
    assert f"count={first + 1}" in logs
    # The liveness probe (an exec every second) passes on the restored container; the kubelet leaves it be.
    wait_for(lambda: kube.probes(knode, "restored") >= 3, what="three successful liveness probes")
    assert kube.probes(knode, "restored", "failed") == 0
    status = container_status(knode, "restored")
    assert status["restartCount"] == 0 and status["ready"] and status["started"]
    assert status["containerID"].startswith("containerd://") and status["imageID"]
    assert "running" in status["state"]
    knode.delete_pod("restored")
    assert knode.run("get", "pod", "restored", check=False).returncode != 0


def test_checkpoint_of_a_missing_container_is_the_kubelets_error(knode: KubeNode, pods: list[str]) -> None:
    _counter_pod(knode, pods, "present")
    res = knode.checkpoint("present", "no-such-container")
    assert res.returncode != 0
    assert "no-such-container" in res.stderr or "NotFound" in res.stderr or "not found" in res.stderr


def test_checkpoint_image_from_a_registry_not_allowed_is_refused_in_the_pods_events(
        knode: KubeNode, pods: list[str], tmp_path: Path) -> None:
    _counter_pod(knode, pods, "source")
    archive, _ = _checkpoint(knode, "source", 3)
    other = reg.start_registry(tmp_path / "other-registry")
    try:
        ref = f"{other.host}/ckpt/counter:1"
        layout = tmp_path / "image.tar"
        subprocess.run([sys.executable, "-m", "shim", "checkpoint-image", str(archive), "--name", ref,
                        "--out", str(layout)], check=True, capture_output=True)
        reg.push_layout(other, layout, "ckpt/counter", "1")
        pods.append("refused")
        knode.create(pod_manifest(knode, "refused", ref, "IfNotPresent"))
        wait_for(lambda: "refused by rule restore.allowed_registries" in _waiting_message(knode, "refused"),
                 what="the refusal in the container's status")
        assert not running(knode, "refused")
        assert "refused by rule restore.allowed_registries" in knode.events("refused")
    finally:
        reg.stop_registry(tmp_path / "other-registry")


def _waiting_message(knode: KubeNode, pod: str) -> str:
    return str(container_status(knode, pod).get("state", {}).get("waiting", {}).get("message", ""))


def test_a_joined_node_restores_a_checkpoint_taken_on_the_first(knode: KubeNode, pods: list[str],
                                                                tmp_path: Path) -> None:
    second_dir = tmp_path / "second"
    up = subprocess.run([sys.executable, "-m", "shim", "node", "up", "--dir", str(second_dir), "--containerd",
                         knode.containerd, "--join", str(knode.dir)], capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        values = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
        second = values["NODE_NAME"]
        assert second != knode.name
        ready = knode.get("node", second)["status"]["conditions"]
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in ready)

        _counter_pod(knode, pods, "origin")
        archive, counted = _checkpoint(knode, "origin", 10)
        ref = f"{knode.registry}/ckpt/migrated:1"  # the first node's registry: the joined node allows it
        layout = tmp_path / "image.tar"
        subprocess.run([sys.executable, "-m", "shim", "checkpoint-image", str(archive), "--name", ref,
                        "--out", str(layout)], check=True, capture_output=True)
        registry = reg.running_registry(knode.dir / "kubernetes" / "registry")
        assert registry is not None
        reg.push_layout(registry, layout, "ckpt/migrated", "1")
        manifest = pod_manifest(knode, "migrated", ref, "IfNotPresent")
        manifest["spec"]["nodeName"] = second
        pods.append("migrated")
        knode.create(manifest)
        wait_for(lambda: running(knode, "migrated"), what="the migrated pod running on the joined node")
        assert count(knode, "migrated") >= counted
    finally:
        knode.delete_pod("migrated")  # while its kubelet still runs
        down = subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(second_dir), "--purge"],
                              capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr
    assert knode.run("get", "node", second, check=False).returncode != 0  # deregistered at down


def test_the_kubelet_restarts_a_restored_container_that_exits(knode: KubeNode, pods: list[str],
                                                              tmp_path: Path) -> None:
    # The counter exits 0 at MAX_COUNT; its environment travels in the checkpoint.
    pods.append("finite")
    knode.create(pod_manifest(knode, "finite", kube.TESTPROGS, env={"MAX_COUNT": "60"}))
    wait_for(lambda: running(knode, "finite"), what="pod finite running")
    archive, counted = _checkpoint(knode, "finite", 10)
    ref = f"{knode.registry}/ckpt/finite:1"
    layout = tmp_path / "image.tar"
    subprocess.run([sys.executable, "-m", "shim", "checkpoint-image", str(archive), "--name", ref,
                    "--out", str(layout)], check=True, capture_output=True)
    registry = reg.running_registry(knode.dir / "kubernetes" / "registry")
    assert registry is not None
    reg.push_layout(registry, layout, "ckpt/finite", "1")
    _counter_pod(knode, pods, "finite-restored", image=ref, pull="IfNotPresent")
    assert count(knode, "finite-restored") >= counted
    # It reaches 60 and exits; the kubelet starts it again, from its image: the checkpoint, once more.
    wait_for(lambda: container_status(knode, "finite-restored").get("restartCount", 0) >= 1
             and running(knode, "finite-restored"), timeout=90, what="the kubelet's restart")
    status = container_status(knode, "finite-restored")
    assert status["lastState"]["terminated"]["exitCode"] == 0
    assert count(knode, "finite-restored") >= counted


def test_checkpoint_of_a_container_that_is_not_running_is_refused(knode: KubeNode, pods: list[str]) -> None:
    pods.append("exited")
    knode.create(pod_manifest(knode, "exited", kube.TESTPROGS, env={"MAX_COUNT": "2"}, restart="Never"))
    wait_for(lambda: "terminated" in container_status(knode, "exited").get("state", {}),
             what="the counter to exit")
    res = knode.checkpoint("exited", "counter")
    assert res.returncode != 0
    # The kubelet looks among running containers only and answers 500 itself; criu-shim is never asked.
    assert "checkpointing of default/exited/counter failed (container counter not found)" in res.stderr
    assert "InternalError" in res.stderr
    assert not list(knode.checkpoints_dir.glob("checkpoint-exited_*"))


@pytest.mark.parametrize("join", ["missing", "self"])
def test_join_without_a_control_plane_is_refused_and_creates_nothing(tmp_path: Path, join: str) -> None:
    if reason := _missing():
        pytest.skip(reason)
    directory = tmp_path / "node"
    target = directory if join == "self" else tmp_path / "no-such-node"
    res = subprocess.run([sys.executable, "-m", "shim", "node", "up", "--dir", str(directory), "--join", str(target)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    expected = "a node cannot join itself" if join == "self" else "no control plane there"
    assert expected in res.stderr
    assert not directory.exists()


def test_kubernetes_on_a_node_already_running_without_it_is_refused(tmp_path: Path) -> None:
    if reason := _missing():
        pytest.skip(reason)
    before = leaks.snapshot()
    directory = tmp_path / "plain"
    try:
        node_up(directory)
        config = (directory / "criu-shim.toml").read_text()
        res = subprocess.run([sys.executable, "-m", "shim", "node", "up", "--dir", str(directory), "--kubernetes"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1
        assert "already runs without Kubernetes; `node down` it first" in res.stderr
        assert not (directory / "kubernetes").exists() and (directory / "criu-shim.toml").read_text() == config
    finally:
        node_down(directory)
    leaks.assert_nothing_left(before, leaks.settled_snapshot(before), directory)


def test_checkpoint_while_criu_shim_is_down_is_an_error_and_the_pod_keeps_running(
        knode: KubeNode, pods: list[str]) -> None:
    from shim.node import local, procs
    from shim.node.layout import NodeLayout

    _counter_pod(knode, pods, "steady")
    wait_for(lambda: count(knode, "steady") >= 3, what="the counter counting")
    layout = NodeLayout(knode.dir)
    pid = procs.read_pid(layout.pid_dir / "proxy.pid")
    assert pid is not None
    procs.stop(pid)
    try:
        res = knode.checkpoint("steady", "counter")
        assert res.returncode != 0
        # The kubelet's 500 carrying the CRI client's error: it cannot reach the runtime socket.
        assert "checkpointing of default/steady/counter failed" in res.stderr
        assert "rpc error: code = Unavailable" in res.stderr and str(layout.cri_socket) in res.stderr
    finally:
        local._start_proxy(layout, layout.proxy_config_file)
    # The container ran on in containerd all along; once criu-shim is back, the kubelet's calls work again.
    wait_for(lambda: knode.checkpoint("steady", "counter").returncode == 0, what="a checkpoint after the restart")
    status = container_status(knode, "steady")
    assert status["restartCount"] == 0 and "running" in status["state"]


MIGRATE = {"checkpoint.criu-shim.io/tcp-established": "true", "checkpoint.criu-shim.io/stop-after": "true"}


def _program_pod(knode: KubeNode, name: str, image: str, command: str, env: dict[str, str],
                 annotations: dict[str, str] | None = None, pull: str = "Never") -> dict[str, Any]:
    manifest = pod_manifest(knode, name, image, pull, env=env, restart="Never")
    manifest["metadata"]["annotations"] = dict(annotations or {})
    manifest["spec"]["containers"][0]["command"] = [command]
    return manifest


def _seqs(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"seq=(\d+)", log)]


def test_a_tcp_client_keeps_its_connection_to_a_server_moved_by_the_kubelet(
        knode: KubeNode, pods: list[str], tmp_path: Path) -> None:
    pods += ["server-a", "tcp-client"]
    knode.create(_program_pod(knode, "server-a", kube.TESTPROGS, "/usr/local/bin/tcpserver", {"PORT": "7000"},
                              MIGRATE))
    wait_for(lambda: running(knode, "server-a"), what="the server running")
    ip_a = knode.get("pod", "server-a")["status"]["podIP"]
    knode.create(_program_pod(knode, "tcp-client", kube.TESTPROGS, "/usr/local/bin/tcpclient",
                              {"HOST": ip_a, "PORT": "7000", "INTERVAL_MS": "100"}))
    client_log = lambda: knode.run("logs", "tcp-client", check=False).stdout  # noqa: E731
    wait_for(lambda: len(_seqs(client_log())) >= 5, what="the client talking to the server")
    res = knode.checkpoint("server-a", "counter")
    assert res.returncode == 0, res.stderr
    (archive,) = json.loads(res.stdout)["items"]
    before = _seqs(client_log())[-1]
    knode.delete_pod("server-a")  # its IP is free again
    ref = f"{knode.registry}/ckpt/tcpserver:1"
    layout = tmp_path / "image.tar"
    subprocess.run([sys.executable, "-m", "shim", "checkpoint-image", archive, "--name", ref, "--out", str(layout)],
                   check=True, capture_output=True)
    registry = reg.running_registry(knode.dir / "kubernetes" / "registry")
    assert registry is not None
    reg.push_layout(registry, layout, "ckpt/tcpserver", "1")
    pods.append("server-b")
    knode.create(_program_pod(knode, "server-b", ref, "/usr/local/bin/tcpserver", {"PORT": "7000"}, MIGRATE,
                              pull="IfNotPresent"))
    wait_for(lambda: running(knode, "server-b"), what="the restored server running")
    wait_for(lambda: _seqs(client_log())[-1] >= before + 5, what="the client's requests answered again")
    log = client_log()
    assert log.count("connected ") == 1 and "error" not in log and "reconnect" not in log
    assert running(knode, "tcp-client") and container_status(knode, "tcp-client")["restartCount"] == 0


def test_run_as_non_root_refuses_a_checkpoint_of_a_root_process(knode: KubeNode, pods: list[str],
                                                                 tmp_path: Path) -> None:
    # The kubelet decides runAsNonRoot from ImageStatus's uid; a checkpoint image must report the
    # user its processes run as (CRIU restores them as they were), or the check would pass blindly.
    _counter_pod(knode, pods, "rooted")
    archive, _ = _checkpoint(knode, "rooted", 3)
    ref = f"{knode.registry}/ckpt/rooted:1"
    layout = tmp_path / "image.tar"
    subprocess.run([sys.executable, "-m", "shim", "checkpoint-image", str(archive), "--name", ref,
                    "--out", str(layout)], check=True, capture_output=True)
    registry = reg.running_registry(knode.dir / "kubernetes" / "registry")
    assert registry is not None
    reg.push_layout(registry, layout, "ckpt/rooted", "1")
    manifest = pod_manifest(knode, "nonroot", ref, "IfNotPresent")
    manifest["spec"]["securityContext"] = {"runAsNonRoot": True}
    pods.append("nonroot")
    knode.create(manifest)
    wait_for(lambda: "runAsNonRoot and image will run as root" in _waiting_message(knode, "nonroot"),
             what="the kubelet's runAsNonRoot refusal")
    assert not running(knode, "nonroot")
