"""Archives cross engines, both ways, on the matrix's full versions (issue 15).

- containerd 2.x's own CheckpointContainer (Debian's 2.1; 2.3 with its restore switch on) writes an
  archive that restores through criu-shim on containerd 1.7 and 2.4;
- an archive criu-shim wrote on 1.7 and on 2.4 restores through containerd's own restore
  (CreateContainer with the archive as its image, no proxy) on 2.1 and on 2.3 (its
  `enable_experimental_restore_via_create` on: node variant `2.3-native`).

The native nodes are the session's (`nodes`), started on first use; containerd's own endpoints
are used for the native side, so nothing of criu-shim is in that path.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc
from shim.archive_layout import FACTS
from shim.node import registry
from tests.node.conftest import FULL, Node, Nodes, on
from tests.node.pods import TESTPROGS, Cri, wait_for
from tests.node.test_restore import COUNTER, _restore

pytestmark = pytest.mark.node

NATIVE = ("2.x", "2.3-native")  # containerd's own checkpoint and restore (shim.node.tools.NATIVE)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, nodes: Nodes) -> Iterator[str]:
    """The test programs image on a loopback registry. containerd 2.x's own restore resolves the
    base image by the archive's rootfsImageRef, a repo digest on real nodes: so both sides pull it
    from a registry, as they would in a cluster."""
    directory = tmp_path_factory.mktemp("interop-registry")
    reg = registry.start_registry(directory / "registry")
    try:
        yield {p.name: p for p in registry.push_images(reg)}["testprogs"].ref
    finally:
        registry.stop_registry(directory / "registry")


def _pull(endpoint: str, ref: str) -> None:
    channel = Cri(endpoint, Path("/nonexistent")).channel
    try:
        api_pb2_grpc.ImageServiceStub(channel).PullImage(
            cri.PullImageRequest(image=cri.ImageSpec(image=ref)), timeout=120)
    finally:
        channel.close()


def _counter_from(client: Cri, pod_id: str, pod_config: cri.PodSandboxConfig, image: str) -> str:
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="counter"), image=cri.ImageSpec(image=image),
                                 log_path="counter.log", command=COUNTER,
                                 envs=[cri.KeyValue(key="INTERVAL_MS", value="50")])
    ctr = str(client.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=60).container_id)
    client.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=60)
    return ctr


def _checkpointed(endpoint: str, image: str, archive: Path, logs: Path) -> None:
    """A counter run from `image` on `endpoint`, checkpointed at 20 or more into `archive`, its pod removed."""
    source = Cri(endpoint, logs)
    try:
        with source.pod() as pod:
            ctr = _counter_from(source, pod.id, pod.config, image)
            wait_for(lambda: source.count(ctr) >= 20)
            source.checkpoint(ctr, str(archive))
            assert source.state(ctr) == "CONTAINER_RUNNING"  # both engines leave it running
    finally:
        source.close()


def _resumes(endpoint: str, archive: Path, logs: Path) -> None:
    """`archive` restored into a new pod on `endpoint` counts on from where it was checkpointed."""
    target = Cri(endpoint, logs)
    try:
        with target.pod() as pod:
            restored = _restore(target, pod, archive)
            first = target.count(restored)
            assert first >= 20, "the count restarted instead of resuming"  # a fresh start needs 1 s for 20
            wait_for(lambda: target.count(restored) > first)
            assert target.state(restored) == "CONTAINER_RUNNING"
    finally:
        target.close()


@on(*FULL)
@pytest.mark.parametrize("native", NATIVE)
def test_containerd_native_archive_restores_through_criu_shim(node: Node, native: str, nodes: Nodes,
                                                              tmp_path: Path) -> None:
    source = nodes.get(native)
    archive = node.dir / "checkpoints" / f"from-{native}.tar"  # restore.allowed_dirs of the target
    try:
        # containerd's own CRI socket: its own CheckpointContainer, no proxy
        _checkpointed(source.containerd, TESTPROGS, archive, tmp_path / "logs-native")
        assert not _ours(archive)  # containerd's own archive
        _resumes(node.cri, archive, tmp_path / "logs-target")
    finally:
        archive.unlink(missing_ok=True)


@on(*FULL)
@pytest.mark.parametrize("native", NATIVE)
def test_criu_shim_archive_restores_through_containerds_own_restore(node: Node, native: str, nodes: Nodes,
                                                                    pushed: str, tmp_path: Path) -> None:
    target = nodes.get(native)
    for endpoint in (node.containerd, target.containerd):
        _pull(endpoint, pushed)
    archive = tmp_path / "from-criu-shim.tar"
    _checkpointed(node.cri, pushed, archive, tmp_path / "logs-source")  # criu-shim's CheckpointContainer
    assert _ours(archive)
    _resumes(target.containerd, archive, tmp_path / "logs-native")  # containerd's own restore


def test_containerd_2_3_own_restore_stays_off_on_a_criu_shim_node(nodes: Nodes, tmp_path: Path) -> None:
    """The switch is what the 2.3 reference turns on: on the matrix's 2.3 node (criu-shim's handler,
    the switch at its default), containerd's own CreateContainer from the same archive is refused
    with 2.3's own words, and only criu-shim restores."""
    node = nodes.get("2.3")
    archive = node.dir / "checkpoints" / "switch-off.tar"
    try:
        _checkpointed(node.cri, TESTPROGS, archive, tmp_path / "logs-source")
        native = Cri(node.containerd, tmp_path / "logs-native")
        try:
            with native.pod() as pod, pytest.raises(grpc.RpcError) as refused:
                _restore(native, pod, archive)
        finally:
            native.close()
        assert "checkpoint restore via CreateContainer is disabled by configuration" in (refused.value.details() or "")
        _resumes(node.cri, archive, tmp_path / "logs-target")
    finally:
        archive.unlink(missing_ok=True)


def _ours(archive: Path) -> bool:
    with tarfile.open(archive) as tar:
        return FACTS in tar.getnames()

