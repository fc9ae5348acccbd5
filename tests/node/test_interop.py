"""Archives cross engines: containerd 2.x's native checkpoint restores through criu-shim on 1.7."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node.conftest import Node, node_down, node_up
from tests.node.pods import Cri, wait_for
from tests.node.test_restore import _restore

pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = tmp_path_factory.mktemp("native2x")
    try:
        yield node_up(directory, "2.x")
    finally:
        node_down(directory)


def test_containerd_2x_archive_restores_on_1_7_through_criu_shim(node: Node, native: Node, tmp_path: Path) -> None:
    archive = node.dir / "checkpoints" / "from-2x.tar"
    source = Cri(native.containerd, tmp_path / "logs-2x")  # containerd 2.x's own CRI, no proxy
    with source.pod() as pod:
        ctr = source.container(pod, ["/usr/local/bin/counter"], {"INTERVAL_MS": "50"})
        wait_for(lambda: source.count(ctr) >= 20)
        source.checkpoint(ctr, str(archive))
    source.close()
    target = Cri(node.cri, tmp_path / "logs-17")
    with target.pod() as pod:
        restored = _restore(target, pod, archive)
        assert target.count(restored) >= 20
        first = target.count(restored)
        wait_for(lambda: target.count(restored) > first)
    target.close()


def test_criu_shim_archive_restores_on_containerd_2x(node: Node, native: Node, tmp_path: Path) -> None:
    """containerd 2.x resolves the base image by the archive's rootfsImageRef, a repo digest on real
    nodes: so the image comes from a (local, loopback) registry here, as it would in a cluster."""
    from shim.api.cri.v1 import api_pb2 as cri
    from shim.node import registry

    reg = registry.start_registry(tmp_path / "registry")
    try:
        pushed = {p.name: p for p in registry.push_images(reg)}["testprogs"]
        for endpoint in (node.containerd, native.containerd):
            images = Cri(endpoint, tmp_path).channel
            from shim.api.cri.v1 import api_pb2_grpc

            api_pb2_grpc.ImageServiceStub(images).PullImage(
                cri.PullImageRequest(image=cri.ImageSpec(image=pushed.ref)), timeout=120)
        archive = tmp_path / "from-criu-shim.tar"
        source = Cri(node.cri, tmp_path / "logs-17")
        with source.pod() as pod:
            config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="counter"),
                                         image=cri.ImageSpec(image=pushed.ref), log_path="counter.log",
                                         command=["/usr/local/bin/counter"],
                                         envs=[cri.KeyValue(key="INTERVAL_MS", value="50")])
            ctr = source.runtime.CreateContainer(cri.CreateContainerRequest(
                pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config)).container_id
            source.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr))
            wait_for(lambda: source.count(ctr) >= 20)
            source.checkpoint(ctr, str(archive))
        target = Cri(native.containerd, tmp_path / "logs-2x")  # containerd 2.x's own restore
        with target.pod() as pod:
            restored = _restore(target, pod, archive)
            assert target.count(restored) >= 20
    finally:
        registry.stop_registry(tmp_path / "registry")
