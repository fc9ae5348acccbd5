"""The kubelet's image garbage collection removes an unused checkpoint image through criu-shim (issue 14).

A node of its own with `--image-gc-max-age 30s` restores a pod from a published checkpoint image and
deletes that pod (tests/node/image_gc_node.py, started at the start of the session, since the kubelet's
GC period is a fixed 5 minutes); this test, run last, waits for the kubelet's second GC pass: the
kubelet lists images and containers, asks ImageFsInfo and removes the unused checkpoint image with
RemoveImage, all through the proxy; the image the running pod uses stays.
"""

from __future__ import annotations

import time

import pytest

from tests.node.image_gc_node import GC_PERIOD, GcNode, gc_removals, image_ids
from tests.node.kube import running, wait_for

pytestmark = pytest.mark.node


@pytest.mark.timeout(GC_PERIOD + 300)
def test_kubelet_image_gc_removes_an_unused_checkpoint_image(image_gc_node: GcNode) -> None:
    gc = image_gc_node
    if gc.missing:
        pytest.skip(gc.missing)
    if gc.error is not None:
        raise gc.error
    node = gc.node
    assert node is not None
    # In a long session the second pass is long past: then one look decides.
    remaining = max(GC_PERIOD + 90 - (time.monotonic() - gc.started), 1.0)
    wait_for(lambda: gc.checkpoint_id not in image_ids(node).values(), timeout=remaining,
             what="the kubelet's second image GC pass to remove the checkpoint image")
    log = (gc.directory / "logs" / "kubelet.log").read_text(errors="replace")
    assert f'"Removing image to free bytes" imageID="{gc.checkpoint_id}"' in log
    assert gc_removals(node) >= 1
    # What a running container uses is never collected, and the pod runs on.
    assert gc.counter_id in image_ids(node).values()
    assert running(node, "counter")
    node.delete_pod("counter")
