"""`kubectl checkpoint` (the kubectl-checkpoint plugin, run by the real kubectl 1.37) against two real kubelets
of one cluster (`node up --kubernetes`, then `--join`, containerd 1.7): checkpoint through the API server's
node proxy, the archive published by criu-shim's [export], restore into a new pod, migrate to the other
node; RBAC (403), missing pods and containers (404), the kubelet's own 500, bad flags. Pods are bound by
nodeName (no scheduler runs)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.export import kubelet_reference
from shim.image_reference import Reference
from shim.registry import RegistryClient
from shim.restore.build_image import checkpoint_image
from tests.node import kube, leaks
from tests.node.kube import KubeNode, container_status, count, pod_manifest, running, wait_for
from tests.node.test_kubelet import _missing

pytestmark = pytest.mark.node

PLUGIN = Path(sys.executable).parent / "kubectl-checkpoint"


@dataclass(frozen=True)
class Cluster:
    first: KubeNode
    second: str  # the joined node's name
    second_dir: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if reason := _missing():
        pytest.skip(reason)
    if not PLUGIN.exists():
        pytest.skip(f"{PLUGIN} is missing: reinstall the project (`make venv`)")
    before = leaks.snapshot()
    first_dir = tmp_path_factory.mktemp("kube-first")
    second_dir = tmp_path_factory.mktemp("kube-second")
    dirs: list[Path] = []
    try:
        dirs.append(first_dir)
        first = kube.node_up(first_dir)
        dirs.append(second_dir)
        up = subprocess.run([sys.executable, "-m", "shim", "node", "up", "--dir", str(second_dir), "--join",
                             str(first_dir)], capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr
        values = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
        yield Cluster(first, values["NODE_NAME"], second_dir)
    finally:
        for directory in reversed(dirs):  # the joined kubelet first, while the API server still runs
            kube.node_down(directory)
    leaks.assert_nothing_left(before, leaks.settled_snapshot(before, directory=dirs), dirs)


@pytest.fixture
def pods(cluster: Cluster) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        cluster.first.delete_pod(name)


def _kubectl_checkpoint(cluster: Cluster, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The user's way: `kubectl checkpoint ...`, kubectl finding the plugin on PATH."""
    environ = {**os.environ, "KUBECONFIG": str(cluster.first.kubeconfig),
               "PATH": f"{PLUGIN.parent}:{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run([str(cluster.first.kubectl), "checkpoint", *args], capture_output=True, text=True,
                          timeout=300, env=environ)


def _counter(cluster: Cluster, pods: list[str], name: str, annotations: dict[str, str] | None = None) -> None:
    pods.append(name)
    manifest = pod_manifest(cluster.first, name, kube.TESTPROGS)
    manifest["metadata"]["annotations"] = annotations or {}
    manifest["metadata"]["labels"] = {"app": name}
    cluster.first.create(manifest)
    wait_for(lambda: running(cluster.first, name), what=f"pod {name} running")


def _published_digest(ref: Reference) -> str:
    with RegistryClient(ref.registry) as client:
        return client.manifest(ref)[2]


def test_checkpoint_prints_the_archive_and_the_node_publishes_it(cluster: Cluster, pods: list[str]) -> None:
    node = cluster.first
    _counter(cluster, pods, "plain")
    wait_for(lambda: count(node, "plain") >= 3, what="count 3")
    done = _kubectl_checkpoint(cluster, "plain")
    assert done.returncode == 0, done.stderr
    archive = Path(done.stdout.strip())
    assert archive.parent.resolve() == node.checkpoints_dir and archive.name.startswith("checkpoint-plain_default-counter-")
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert running(node, "plain")
    # criu-shim's [export] pushed it before the kubelet answered, under the name the plugin derives.
    ref = kubelet_reference(archive.name, node.registry)
    assert _published_digest(ref) == checkpoint_image(archive).digest


def test_restore_into_a_new_pod_carries_the_count_on(cluster: Cluster, pods: list[str]) -> None:
    node = cluster.first
    _counter(cluster, pods, "source", {"checkpoint.criu-shim.io/file-locks": "false"})
    wait_for(lambda: count(node, "source") >= 5, what="count 5")
    pods.append("copy")
    done = _kubectl_checkpoint(cluster, "restore", "pod/source", "-c", "counter", "--name", "copy",
                               "--registry", node.registry)
    assert done.returncode == 0, done.stderr
    assert "pod/copy running" in done.stdout
    counted = count(node, "source")
    pod = node.get("pod", "copy")
    image = pod["spec"]["containers"][0]["image"]
    assert "@sha256:" in image and image.startswith(f"{node.registry}/criu-shim/checkpoints/source_default-counter:")
    assert pod["spec"]["nodeName"] == node.name
    assert pod["metadata"]["annotations"]["checkpoint.criu-shim.io/file-locks"] == "false"
    assert "labels" not in pod["metadata"]  # not matched by the source's selectors unless asked
    first = count(node, "copy")
    assert first >= 5 and first <= counted + 5  # from the checkpoint, not a fresh start at 1
    wait_for(lambda: count(node, "copy") > first, what="the restored count to go on")
    assert container_status(node, "copy")["restartCount"] == 0
    assert running(node, "source")  # restore leaves the source alone


def test_migrate_to_the_joined_node_deletes_the_source_once_the_copy_runs(cluster: Cluster, pods: list[str]) -> None:
    node = cluster.first
    _counter(cluster, pods, "mover")
    wait_for(lambda: count(node, "mover") >= 5, what="count 5")
    done = _kubectl_checkpoint(cluster, "migrate", "mover", "--to-node", cluster.second, "--copy-labels",
                               env={"KUBECTL_CHECKPOINT_REGISTRY": node.registry})
    assert done.returncode == 0, done.stderr
    created = [line.split()[0].removeprefix("pod/") for line in done.stdout.splitlines() if line.endswith(
        f"created on node {cluster.second}")]
    assert len(created) == 1 and created[0].startswith("mover-"), done.stdout
    moved = created[0]
    pods.append(moved)
    assert "pod/mover deleted" in done.stdout
    wait_for(lambda: node.run("get", "pod", "mover", check=False).returncode != 0, what="the source gone")
    pod = node.get("pod", moved)
    assert pod["spec"]["nodeName"] == cluster.second and pod["metadata"]["labels"] == {"app": "mover"}
    first = count(node, moved)
    assert first >= 5
    wait_for(lambda: count(node, moved) > first, what="the migrated count to go on")


def test_a_migration_that_cannot_start_deletes_the_copy_and_keeps_the_source(cluster: Cluster,
                                                                              pods: list[str]) -> None:
    node = cluster.first
    _counter(cluster, pods, "stayer")
    # A registry the plugin cannot find the published image in: refused before any pod is made.
    unpublished = _kubectl_checkpoint(cluster, "migrate", "stayer", "--to-node", cluster.second, "--registry",
                                      "127.0.0.1:1")
    assert unpublished.returncode == 1 and "is not available" in unpublished.stderr, unpublished.stderr
    assert "[export] registry" in unpublished.stderr and "Traceback" not in unpublished.stderr
    # Told not to look (--no-verify), the copy is made, the target's kubelet cannot pull it: the plugin
    # reports the kubelet's reason, deletes the copy and leaves the source running.
    failed = _kubectl_checkpoint(cluster, "migrate", "stayer", "--to-node", cluster.second, "--registry",
                                 "127.0.0.1:1", "--no-verify", "--wait-timeout", "90")
    assert failed.returncode == 1, failed.stdout
    assert "ErrImagePull" in failed.stderr or "ImagePullBackOff" in failed.stderr, failed.stderr
    assert "left running" in failed.stderr
    copies = [line.split()[0].removeprefix("pod/") for line in failed.stdout.splitlines() if " created on node " in line]
    assert len(copies) == 1
    pods.extend(copies)
    wait_for(lambda: node.run("get", "pod", copies[0], check=False).returncode != 0, what="the copy deleted")
    assert running(node, "stayer")


def test_errors_say_what_the_cluster_said(cluster: Cluster, pods: list[str]) -> None:
    node = cluster.first
    missing = _kubectl_checkpoint(cluster, "no-such-pod")
    assert missing.returncode == 1 and "pod no-such-pod in namespace default: not found (HTTP 404)" in missing.stderr
    _counter(cluster, pods, "errs")
    wrong = _kubectl_checkpoint(cluster, "errs", "-c", "nope")
    assert wrong.returncode == 1 and "container nope is not valid for pod errs: choose one of: [counter]" in wrong.stderr
    bad_node = _kubectl_checkpoint(cluster, "migrate", "errs", "--to-node", "no-such-node", "--registry", node.registry)
    assert bad_node.returncode == 1 and "node no-such-node: not found (HTTP 404)" in bad_node.stderr
    no_registry = _kubectl_checkpoint(cluster, "restore", "errs", env={"KUBECTL_CHECKPOINT_REGISTRY": ""})
    assert no_registry.returncode == 1 and "Pass --registry" in no_registry.stderr
    bad_registry = _kubectl_checkpoint(cluster, "restore", "errs", "--registry", "bad host!")
    assert bad_registry.returncode == 1 and "invalid registry 'bad host!'" in bad_registry.stderr
    taken = _kubectl_checkpoint(cluster, "restore", "errs", "--registry", node.registry, "--name", "errs")
    assert taken.returncode == 1 and "pod errs already exists in namespace default" in taken.stderr
    before = sorted(node.checkpoints_dir.glob("checkpoint-errs_*"))
    assert before == [], "refusals before the kubelet call checkpoint nothing"
    names = node.run("get", "pods", "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    assert [n for n in names if n.startswith("errs")] == ["errs"], names  # and create no pod

    # The kubelet's own 500, with its message: a container that has exited.
    pods.append("gone")
    node.create(pod_manifest(node, "gone", kube.TESTPROGS, env={"MAX_COUNT": "2"}, restart="Never"))
    wait_for(lambda: "terminated" in container_status(node, "gone").get("state", {}), what="the counter to exit")
    failed = _kubectl_checkpoint(cluster, "gone")
    assert failed.returncode == 1
    assert f"the kubelet on node {node.name} answered HTTP 500" in failed.stderr
    assert "checkpointing of default/gone/counter failed (container counter not found)" in failed.stderr


def test_rbac_refusal_and_contexts(cluster: Cluster, pods: list[str], tmp_path: Path) -> None:
    """A context whose user may read pods but not use nodes/proxy: 403, with the permission to ask for."""
    node = cluster.first
    _counter(cluster, pods, "guarded")
    node.run("create", "serviceaccount", "viewer")
    try:
        node.run("create", "role", "pod-reader", "--verb=get,list", "--resource=pods")
        node.run("create", "rolebinding", "viewer-reads", "--role=pod-reader", "--serviceaccount=default:viewer")
        token = node.run("create", "token", "viewer").stdout.strip()
        config = json.loads(node.run("config", "view", "--raw", "-o", "json").stdout)
        cluster_name = config["clusters"][0]["name"]
        config["users"].append({"name": "viewer", "user": {"token": token}})
        config["contexts"].append({"name": "viewer", "context": {"cluster": cluster_name, "user": "viewer",
                                                                  "namespace": "default"}})
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps(config))
        denied = _kubectl_checkpoint(cluster, "guarded", "--context", "viewer", env={"KUBECONFIG": str(kubeconfig)})
        assert denied.returncode == 1
        assert "forbidden by RBAC (HTTP 403)" in denied.stderr and 'cannot create resource "nodes/proxy"' in denied.stderr
        assert "`create` verb on `nodes/proxy`" in denied.stderr
        # The same kubeconfig's admin context (its current one) may.
        allowed = _kubectl_checkpoint(cluster, "guarded", env={"KUBECONFIG": str(kubeconfig)})
        assert allowed.returncode == 0, allowed.stderr
    finally:
        node.run("delete", "rolebinding", "viewer-reads", "--ignore-not-found", check=False)
        node.run("delete", "role", "pod-reader", "--ignore-not-found", check=False)
        node.run("delete", "serviceaccount", "viewer", "--ignore-not-found", check=False)
