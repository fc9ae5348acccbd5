"""The pod's /dev/shm travels with a checkpointed container (POSIX shared memory, mapped MAP_SHARED)."""

from __future__ import annotations

import io
import re
import stat
import tarfile
from pathlib import Path

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.checkpoint.devshm import MEMBER
from tests.node.conftest import Node
from tests.node.pods import Cri, Pod, wait_for

pytestmark = pytest.mark.node

SHMCOUNTER = ["/usr/local/bin/shmcounter"]
NAME = "travel"


def restore(client: Cri, pod: Pod, archive: Path, name: str = "restored") -> str:
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=str(archive)),
                                 log_path=f"{name}.log")
    ctr = str(client.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=120).container_id)
    client.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=120)
    return ctr


def shm_count(client: Cri, ctr: str) -> int:
    """The count the program keeps in its segment, read from the file in /dev/shm, not from the process."""
    return int(client.exec(ctr, "od", "-An", "-tu8", "-N8", f"/dev/shm/{NAME}").strip() or 0)


def checkpoint_shmcounter(client: Cri, node: Node, archive: Path, at_least: int = 20) -> int:
    """Checkpoint a shmcounter whose pod also has a sibling's file in /dev/shm; return the count reached."""
    with client.pod() as pod:
        client.container(pod, ["sh", "-c", "echo sibling > /dev/shm/sibling && exec sleep 3600"], name="sibling")
        ctr = client.container(pod, SHMCOUNTER, {"SHM_NAME": NAME, "INTERVAL_MS": "50"})
        wait_for(lambda: shm_count(client, ctr) >= at_least)
        client.checkpoint(ctr, str(archive))
        return shm_count(client, ctr)


def test_dev_shm_content_and_mapping_come_back_in_a_new_pod(client: Cri, node: Node) -> None:
    archive = node.dir / "checkpoints" / "shmcounter.tar"
    checkpoint_shmcounter(client, node, archive)
    with tarfile.open(archive) as outer:
        inner = outer.extractfile(MEMBER)
        assert inner is not None, f"no {MEMBER} in the archive"
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as shm:
            names = set(shm.getnames())
    # The whole pod /dev/shm: the mapped segment, the note nobody maps, and the sibling container's file.
    assert {".", NAME, f"{NAME}.d", f"{NAME}.d/note", "sibling"} <= names

    with client.pod() as pod:
        ctr = restore(client, pod, archive)
        resumed = shm_count(client, ctr)
        # A fresh start would begin at 1; a restore without /dev/shm would not start at all (CRIU:
        # "Can't open file dev/shm/travel on restore").
        assert resumed >= 20, "the count restarted instead of resuming"
        # The restored process still writes through its MAP_SHARED mapping into the very file in /dev/shm.
        wait_for(lambda: shm_count(client, ctr) > resumed)
        maps = client.exec(ctr, "sh", "-c", "cat /proc/$(pidof shmcounter)/maps")
        assert f"/dev/shm/{NAME}" in maps
        assert client.exec(ctr, "cat", f"/dev/shm/{NAME}.d/note") == f"note of {NAME}\n"
        assert client.exec(ctr, "cat", "/dev/shm/sibling") == "sibling\n"
        mode = client.exec(ctr, "stat", "-c", "%a %u", f"/dev/shm/{NAME}").split()
        assert mode == ["600", "0"]
        assert client.state(ctr) == "CONTAINER_RUNNING"


def test_a_failed_restore_quotes_criu_and_names_a_kept_log(client: Cri, node: Node) -> None:
    """Without the pod's /dev/shm CRIU cannot restore; the error says why and where CRIU's whole log is."""
    full = node.dir / "checkpoints" / "shmcounter-full.tar"
    checkpoint_shmcounter(client, node, full, at_least=5)
    stripped = node.dir / "checkpoints" / "shmcounter-without-devshm.tar"
    with tarfile.open(full) as source, tarfile.open(stripped, "w") as target:
        for member in source:
            if member.name != MEMBER:
                target.addfile(member, source.extractfile(member) if member.isfile() else None)
    with client.pod() as pod:
        with pytest.raises(grpc.RpcError) as caught:
            restore(client, pod, stripped)
    details = caught.value.details() or ""
    assert "Can't open file dev/shm/travel on restore" in details  # CRIU's reason, quoted
    assert "maps /dev/shm/travel, which is not in the new pod's /dev/shm" in details  # and what it means
    found = re.search(r"full CRIU restore log: (\S+)", details)
    assert found, details
    kept = Path(found.group(1).rstrip(";"))
    assert kept.is_relative_to(node.dir / "state" / "logs")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert "Can't open file dev/shm/travel on restore" in kept.read_text()  # the whole log, still there
