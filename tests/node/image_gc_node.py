"""The node of tests/node/test_image_gc.py, started at the start of the session (fixture `image_gc_node`).

The kubelet 1.37 runs image GC at start and then every 5 minutes (ImageGCPeriod, a constant of
pkg/kubelet/kubelet.go, not configurable), and its age rule (imageMaximumGCAge) only applies once the
kubelet has run longer than the age. The test can only check the second pass, 5 minutes after the
kubelet started. So when the session collects that test, the conftest starts this node first and does
the test's first half here (a pod restored from a published checkpoint image, then deleted): the
kubelet's clock runs while the other tests run, and the test itself (moved to the end of the session)
waits only for what is left of the 5 minutes. Run alone, it waits the whole period, as before.

Nothing is weakened by the overlap: the same node, the same steps, the same checks, in the same order.
A failure here is kept and raised by the test, never by the unrelated test that happened to start it.
The node is taken down and checked for leaks when the session ends (this fixture is set up first, so
it is torn down last, after every other node's leak check, whose snapshots all include it).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.export import kubelet_reference
from shim.paths_env import load_paths
from tests.node import kube, leaks
from tests.node.kube import KubeNode, count, pod_manifest, running, wait_for

GC_PERIOD = 300.0  # the kubelet's ImageGCPeriod
MAX_AGE = "30s"


@dataclass
class GcNode:
    directory: Path
    node: KubeNode | None = None
    started: float = 0.0  # time.monotonic() when `node up` returned: the kubelet's first GC pass
    checkpoint_ref: str = ""
    checkpoint_id: str = ""
    counter_id: str = ""
    error: BaseException | None = None  # what went wrong while preparing; the test raises it
    missing: str | None = None  # why this host cannot run a kubelet node (the test skips)


def crictl(node: KubeNode, *args: str) -> str:
    binary = Path(load_paths()["CRI_TOOLS_BIN_DIR"]) / "crictl"
    res = subprocess.run([str(binary), "--runtime-endpoint", node.cri, "--image-endpoint", node.cri, *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def image_ids(node: KubeNode) -> dict[str, str]:
    """repo tag -> image id, as the kubelet's ListImages sees them through the proxy."""
    images = json.loads(crictl(node, "images", "-o", "json"))["images"]
    return {tag: image["id"] for image in images for tag in image.get("repoTags") or []}


def gc_removals(node: KubeNode) -> int:
    text = node.run("get", "--raw", f"/api/v1/nodes/{node.name}/proxy/metrics").stdout
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("kubelet_image_garbage_collected_total{") and 'reason="age"' in line)


def _prepare(gc: GcNode) -> None:
    """The test's first half: a node with the age rule on, a checkpoint image used by a pod, then unused."""
    node = gc.node = kube.node_up(gc.directory, "1.7", "--image-gc-max-age", MAX_AGE)
    gc.started = time.monotonic()  # the kubelet's first GC pass was at about this time
    config = json.loads((gc.directory / "kubernetes" / "kubelet-config.json").read_text())
    assert config["imageMaximumGCAge"] == MAX_AGE and config["imageMinimumGCAge"] == "1s"

    node.create(pod_manifest(node, "counter", kube.TESTPROGS))
    wait_for(lambda: running(node, "counter") and count(node, "counter") >= 3, what="the counter running")
    done = node.checkpoint("counter", "counter")
    assert done.returncode == 0, done.stderr
    (archive,) = json.loads(done.stdout)["items"]
    gc.checkpoint_ref = str(kubelet_reference(Path(archive).name, node.registry))  # published by [export]
    node.create(pod_manifest(node, "restored", gc.checkpoint_ref, "IfNotPresent"))
    wait_for(lambda: running(node, "restored"), what="the restored pod running")
    node.delete_pod("restored")
    images = image_ids(node)
    assert gc.checkpoint_ref in images, images
    gc.checkpoint_id, gc.counter_id = images[gc.checkpoint_ref], images[kube.TESTPROGS]
    assert gc_removals(node) == 0  # the pass at start removed nothing: the age rule waits until 30 s after it
    # ImageFsInfo, which every GC pass asks, answers through the proxy.
    assert json.loads(crictl(node, "imagefsinfo", "-o", "json"))["status"]["imageFilesystems"]


@pytest.fixture(scope="session")
def image_gc_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcNode]:
    from tests.node.test_kubelet import _missing  # at use: test_kubelet imports the conftest, which imports us

    before = leaks.snapshot()
    gc = GcNode(tmp_path_factory.mktemp("gc") / "gc-node", missing=_missing())
    if gc.missing:
        yield gc
        return
    try:
        _prepare(gc)
    except Exception as exc:  # kept for the GC test: the session's other tests go on
        gc.error = exc
    try:
        yield gc
    finally:
        kube.node_down(gc.directory)
        leaks.assert_nothing_left(before, leaks.settled_snapshot(before), gc.directory)
