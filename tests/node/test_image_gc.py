"""The kubelet's image garbage collection removes an unused checkpoint image through criu-shim (issue 14).

The kubelet 1.37 runs image GC at start and then every 5 minutes (ImageGCPeriod, a constant of
pkg/kubelet/kubelet.go, not configurable), and its age rule (imageMaximumGCAge, GA in 1.35) only
applies once the kubelet has run longer than the age. So this test starts a node of its own with
`--image-gc-max-age 30s`, restores a pod from a published checkpoint image, deletes that pod and
waits for the second GC pass (about 5 minutes after the kubelet started): the kubelet lists images
and containers, asks ImageFsInfo and removes the unused checkpoint image with RemoveImage, all
through the proxy; the image the running pod uses stays.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shim.export import kubelet_reference
from shim.paths_env import load_paths
from tests.node import kube, leaks
from tests.node.kube import KubeNode, count, pod_manifest, running, wait_for
from tests.node.test_kubelet import _missing

pytestmark = pytest.mark.node

GC_PERIOD = 300.0  # the kubelet's ImageGCPeriod


def _crictl(node: KubeNode, *args: str) -> str:
    crictl = Path(load_paths()["CRI_TOOLS_BIN_DIR"]) / "crictl"
    res = subprocess.run([str(crictl), "--runtime-endpoint", node.cri, "--image-endpoint", node.cri, *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _image_ids(node: KubeNode) -> dict[str, str]:
    """repo tag -> image id, as the kubelet's ListImages sees them through the proxy."""
    images = json.loads(_crictl(node, "images", "-o", "json"))["images"]
    return {tag: image["id"] for image in images for tag in image.get("repoTags") or []}


def _gc_removals(node: KubeNode) -> int:
    text = node.run("get", "--raw", f"/api/v1/nodes/{node.name}/proxy/metrics").stdout
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("kubelet_image_garbage_collected_total{") and 'reason="age"' in line)


@pytest.mark.timeout(GC_PERIOD + 300)
def test_kubelet_image_gc_removes_an_unused_checkpoint_image(tmp_path: Path) -> None:
    if reason := _missing():
        pytest.skip(reason)
    before = leaks.snapshot()
    directory = tmp_path / "gc-node"
    up = subprocess.run([sys.executable, "-m", "shim", "node", "up", "--dir", str(directory), "--kubernetes",
                         "--image-gc-max-age", "30s"], capture_output=True, text=True, timeout=300)
    started = time.monotonic()
    try:
        assert up.returncode == 0, up.stderr
        values = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
        node = KubeNode(directory, values["CRI_ENDPOINT"], Path(values["KUBECONFIG"]), Path(values["KUBECTL"]),
                        values["NODE_NAME"], values["REGISTRY"], "1.7")
        config = json.loads((directory / "kubernetes" / "kubelet-config.json").read_text())
        assert config["imageMaximumGCAge"] == "30s" and config["imageMinimumGCAge"] == "1s"

        node.create(pod_manifest(node, "counter", kube.TESTPROGS))
        wait_for(lambda: running(node, "counter") and count(node, "counter") >= 3, what="the counter running")
        done = node.checkpoint("counter", "counter")
        assert done.returncode == 0, done.stderr
        (archive,) = json.loads(done.stdout)["items"]
        ref = str(kubelet_reference(Path(archive).name, node.registry))  # published by criu-shim's [export]
        node.create(pod_manifest(node, "restored", ref, "IfNotPresent"))
        wait_for(lambda: running(node, "restored"), what="the restored pod running")
        node.delete_pod("restored")
        images = _image_ids(node)
        assert ref in images, images
        checkpoint_id, counter_id = images[ref], images[kube.TESTPROGS]
        assert _gc_removals(node) == 0  # the pass at start removed nothing: the age rule waits until 30 s after it
        # ImageFsInfo, which every GC pass asks, answers through the proxy.
        assert json.loads(_crictl(node, "imagefsinfo", "-o", "json"))["status"]["imageFilesystems"]

        remaining = GC_PERIOD + 90 - (time.monotonic() - started)
        wait_for(lambda: checkpoint_id not in _image_ids(node).values(), timeout=remaining,
                 what="the kubelet's second image GC pass to remove the checkpoint image")
        log = (directory / "logs" / "kubelet.log").read_text(errors="replace")
        assert f'"Removing image to free bytes" imageID="{checkpoint_id}"' in log
        assert _gc_removals(node) >= 1
        # What a running container uses is never collected, and the pod runs on.
        assert counter_id in _image_ids(node).values()
        assert running(node, "counter")
        node.delete_pod("counter")
    finally:
        down = subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(directory), "--purge"],
                              capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr
    leaks.assert_nothing_left(before, leaks.settled_snapshot(before), directory)
