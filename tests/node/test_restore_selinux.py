"""SELinux end to end: a restored process carries the new container's label, not the checkpointed one.

Runs only where SELinux is enforcing (and containerd's CRI plugin has
`enable_selinux = true`); the machines this project is built on have no
SELinux, so here it is skipped and the decision and the CRIU options are
unit-tested instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.restore.selinux import selinux_enforcing
from tests.node.conftest import Node
from tests.node.pods import Cri, wait_for

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(not selinux_enforcing(), reason=(
        "SELinux is not enabled on this machine (node-facts: no SELinux); the decision and CRIU options are "
        "unit-tested in tests/unit/test_restore_selinux.py")),
]

COUNTER = ["/usr/local/bin/counter"]
LEVEL = "s0:c123,c456"


def _pid(client: Cri, ctr: str) -> int:
    reply = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr, verbose=True), timeout=30)
    return int(json.loads(reply.info["info"])["pid"])


def _label(pid: int) -> str:
    return Path(f"/proc/{pid}/attr/current").read_bytes().rstrip(b"\0\n").decode()


def test_restored_process_carries_the_new_containers_label(client: Cri, node: Node) -> None:
    archive = node.dir / "checkpoints" / "selinux-counter.tar"
    with client.pod() as pod_a:
        old = client.container(pod_a, COUNTER, {"INTERVAL_MS": "50"})
        wait_for(lambda: client.count(old) >= 5)
        old_label = _label(_pid(client, old))
        client.checkpoint(old, str(archive))
    assert not old_label.endswith(LEVEL)  # containerd gave it a random level of its own

    with client.pod() as pod_b:
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="restored"), image=cri.ImageSpec(image=str(archive)),
            log_path="restored.log", linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                selinux_options=cri.SELinuxOption(level=LEVEL))))
        ctr = str(client.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_b.id, config=config, sandbox_config=pod_b.config), timeout=120).container_id)
        client.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=120)
        pid = _pid(client, ctr)
        # what `ps -Z` shows for the restored process
        assert _label(pid) == f"system_u:system_r:container_t:{LEVEL}"
        first = client.count(ctr)
        assert first >= 5, "the count restarted instead of resuming"
        wait_for(lambda: client.count(ctr) > first)  # it can still write its rootfs under the new label
        written = os.getxattr(f"/proc/{pid}/root/tmp/count", "security.selinux").rstrip(b"\0").decode()
        assert written == f"system_u:object_r:container_file_t:{LEVEL}"
