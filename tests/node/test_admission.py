"""The admission policy on a real node: restores refused by namespace and RuntimeClass handler, checkpoints
refused for excluded namespaces and opted-out pods; PERMISSION_DENIED naming the rule, nothing created."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.policy import EXCLUDE_ANNOTATION
from tests.node.conftest import Node
from tests.node.pods import Cri, wait_for
from tests.node.proxy_config import proxy_with
from tests.node.test_restore import COUNTER, _checkpoint_counter, _restore, assert_restore_refused

pytestmark = pytest.mark.node


def _audit(node: Node, action: str) -> list[dict[str, object]]:
    lines = (node.dir / "logs" / "audit.log").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["action"] == action]


def test_restore_refused_by_namespace_then_admitted(client: Cri, node: Node) -> None:
    archive, counted = _checkpoint_counter(client, node, 5)
    with proxy_with(node, "admission", 'restore_namespaces = ["prod-*"]\n'):
        assert_restore_refused(client, node, archive, grpc.StatusCode.PERMISSION_DENIED,
                               "refused by rule admission.restore_namespaces", "namespace 'tests'", '"prod-*"')
        assert _audit(node, "restore")[-1]["result"].startswith(  # type: ignore[union-attr]
            "error: PERMISSION_DENIED: restore from checkpoint")
    # The pods here run without a RuntimeClass: their handler is "".
    with proxy_with(node, "admission", 'restore_namespaces = ["tests"]\nrestore_runtime_handlers = [""]\n'), client.pod() as pod:
        ctr = _restore(client, pod, archive)
        assert client.count(ctr) >= counted - 1


def test_restore_refused_by_runtime_handler(client: Cri, node: Node) -> None:
    archive, _ = _checkpoint_counter(client, node, 1)
    with proxy_with(node, "admission", 'restore_runtime_handlers = ["kata*"]\n'):
        assert_restore_refused(client, node, archive, grpc.StatusCode.PERMISSION_DENIED,
                               "refused by rule admission.restore_runtime_handlers", "runtime handler ''")


def _refused_checkpoint(client: Cri, ctr: str, archive: Path) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        client.checkpoint(ctr, str(archive))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not archive.exists() and not list(archive.parent.glob(".criu-shim-*"))
    assert client.state(ctr) == "CONTAINER_RUNNING"  # never frozen: it keeps counting
    seen = client.count(ctr)
    wait_for(lambda: client.count(ctr) > seen)
    return caught.value.details() or ""


def test_checkpoint_refused_for_an_excluded_namespace(client: Cri, node: Node) -> None:
    archive = node.dir / "checkpoints" / "excluded-namespace.tar"
    with proxy_with(node, "admission", 'checkpoint_excluded_namespaces = ["te*"]\n'), client.pod() as pod:
        ctr = client.container(pod, COUNTER, {"INTERVAL_MS": "50"})
        wait_for(lambda: client.count(ctr) >= 1)
        details = _refused_checkpoint(client, ctr, archive)
        assert "refused by rule admission.checkpoint_excluded_namespaces" in details
        assert f"in pod tests/{pod.config.metadata.name}" in details


def test_checkpoint_refused_for_a_pod_that_opted_out(client: Cri, node: Node) -> None:
    archive = node.dir / "checkpoints" / "opted-out.tar"
    with client.pod({EXCLUDE_ANNOTATION: "true"}) as pod:
        ctr = client.container(pod, COUNTER, {"INTERVAL_MS": "50"})
        wait_for(lambda: client.count(ctr) >= 1)
        details = _refused_checkpoint(client, ctr, archive)
        assert f"refused by the pod annotation {EXCLUDE_ANNOTATION}: the pod opted out" in details
        status = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
        assert status.state == cri.CONTAINER_RUNNING


def _work_dirs(node: Node) -> set[str]:
    work = node.dir / "restore"
    return {p.name for p in work.iterdir()} if work.exists() else set()


def test_a_checkpoint_goes_back_into_its_own_namespace_only(client: Cri, node: Node) -> None:
    archive, counted = _checkpoint_counter(client, node, 5)  # taken in namespace "tests"
    before = _work_dirs(node)
    with client.pod(namespace="tenant-b") as pod:
        # The request claims the checkpoint's namespace; the pod's real one is containerd's.
        claimed = cri.PodSandboxConfig()
        claimed.CopyFrom(pod.config)
        claimed.metadata.namespace = "tests"
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="r"), image=cri.ImageSpec(image=str(archive)),
                                     log_path="r.log")
        with pytest.raises(grpc.RpcError) as caught:
            client.runtime.CreateContainer(cri.CreateContainerRequest(
                pod_sandbox_id=pod.id, config=config, sandbox_config=claimed), timeout=120)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        details = caught.value.details() or ""
        assert "refused by rule admission.restore_from_other_namespaces" in details
        assert "taken in namespace 'tests', not 'tenant-b'" in details
        assert not client.runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(pod_sandbox_id=pod.id))).containers
    assert _work_dirs(node) == before  # the unpacked archive is gone again
    with proxy_with(node, "admission", "restore_from_other_namespaces = true\n"), client.pod(namespace="tenant-b") as pod:
        ctr = _restore(client, pod, archive)
        assert client.count(ctr) >= counted - 1
