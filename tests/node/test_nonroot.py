"""A container whose process runs as a non-root user: checkpointed where the node allows, explained where not.

CRIU reads every process's resource limits with prlimit(), which for another
user's process needs CAP_SYS_RESOURCE. Where containerd has it (real nodes) the
container is checkpointed and restored; where it does not (these VMs withhold it
even from root) the dump fails, and the error must say so in plain words, with
the container left running.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from tests.node.conftest import Node
from tests.node.pods import TESTPROGS, Cri, Pod, wait_for
from tests.node.test_check import prlimit_on_another_user

pytestmark = pytest.mark.node

UID = 1000


def non_root_counter(client: Cri, pod: Pod) -> str:
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="nonroot"), image=cri.ImageSpec(image=TESTPROGS),
        command=["/usr/local/bin/counter"], log_path="nonroot.log",
        envs=[cri.KeyValue(key="INTERVAL_MS", value="50"), cri.KeyValue(key="COUNT_FILE", value="/tmp/count")],
        linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
            run_as_user=cri.Int64Value(value=UID))))
    ctr = str(client.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=60).container_id)
    client.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=60)
    return ctr


def test_a_non_root_process_is_checkpointed_or_the_error_says_why(client: Cri, node: Node) -> None:
    archive = node.dir / "checkpoints" / "nonroot.tar"
    with client.pod() as pod:
        ctr = non_root_counter(client, pod)
        assert client.exec(ctr, "id", "-u").strip() == str(UID)
        wait_for(lambda: client.count(ctr) >= 5)
        if prlimit_on_another_user():  # a node with CAP_SYS_RESOURCE: the ordinary path
            client.checkpoint(ctr, str(archive))
            assert archive.is_file()
            return
        with pytest.raises(grpc.RpcError) as caught:
            client.checkpoint(ctr, str(archive))
        details = caught.value.details() or ""
        assert "CRIU: Can't get rlimit 0: Operation not permitted" in details  # CRIU's reason, quoted
        assert "runs as a non-root user" in details and "CAP_SYS_RESOURCE" in details  # in plain words
        assert "annotation" not in details  # no unrelated advice
        found = re.search(r"full CRIU log: (\S+)", details)
        assert found, details
        kept = Path(found.group(1))
        assert kept.is_relative_to(node.dir / "state" / "logs") and stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert "Can't get rlimit 0" in kept.read_text()
        assert not archive.exists()
        # The workload comes first: still running, still counting.
        counted = client.count(ctr)
        wait_for(lambda: client.count(ctr) > counted)
        assert client.state(ctr) == "CONTAINER_RUNNING"
