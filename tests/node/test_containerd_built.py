"""Smoke set on containerd 2.3 (LTS) and 2.4 built from the Go module proxy (`make peers`).

Pass-through, checkpoint and restore through criu-shim, with the node's v3 config registering
criu-shim's handler as on 1.7 (containerd's own restore through CreateContainer stays off).
Restore does not work on 2.3/2.4 yet: see test_restore_through_criu_shim.
"""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.node.tools import load_paths
from tests.node.conftest import Node, node_down, node_up
from tests.node.pods import Cri, wait_for
from tests.node.test_restore import COUNTER, _checkpoint_counter, _restore
from tests.node.test_runtime_config import crictl, squeezed

pytestmark = pytest.mark.node

LOCKED = {"2.3": "v2.3.", "2.4": "v2.4."}  # scripts/peers.lock pins the patch release


@pytest.fixture(scope="module", params=["2.3", "2.4"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Node]]:
    version: str = request.param
    directory = tmp_path_factory.mktemp(f"containerd{version}")
    try:
        yield version, node_up(directory, version)
    finally:
        node_down(directory)


@pytest.fixture
def client(built: tuple[str, Node], tmp_path: Path) -> Iterator[Cri]:
    c = Cri(built[1].cri, tmp_path / "pod-logs")
    yield c
    c.close()


def test_pass_through_reaches_the_built_containerd(built: tuple[str, Node], client: Cri) -> None:
    version, node = built
    reply = client.runtime.Version(cri.VersionRequest(), timeout=10)
    assert (reply.runtime_name, reply.runtime_version[:5]) == ("containerd", LOCKED[version])
    with client.pod() as pod:
        ctr = client.container(pod, COUNTER, {"INTERVAL_MS": "50"})
        assert client.state(ctr) == "CONTAINER_RUNNING"
        assert client.exec(ctr, "echo", "hello") == "hello\n"
    # containerd 2.x answers RuntimeConfig itself: relayed unchanged
    direct, through = crictl(node.containerd, "runtime-config"), crictl(node.cri, "runtime-config")
    assert (through.returncode, through.stdout) == (0, direct.stdout)
    assert squeezed(through.stdout) == "cgroup driver: CGROUPFS"


def test_checkpoint_through_criu_shim(built: tuple[str, Node], client: Cri) -> None:
    _, node = built
    with client.pod() as pod:
        ctr = client.container(pod, COUNTER, {"INTERVAL_MS": "50"})
        wait_for(lambda: client.count(ctr) >= 10)
        archive = node.dir / "checkpoints" / "smoke.tar"
        client.checkpoint(ctr, str(archive))
        assert client.state(ctr) == "CONTAINER_RUNNING"  # checkpointed, left running
        counted = client.count(ctr)
        wait_for(lambda: client.count(ctr) > counted)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600  # criu-shim's archive, not containerd's
    shown = subprocess.run([load_paths()["CHECKPOINTCTL_BIN"], "show", str(archive)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "main" in shown.stdout, shown.stderr  # the container's name
    records = [json.loads(line) for line in (node.dir / "logs" / "audit.log").read_text().splitlines()]
    assert ("checkpoint", str(archive), "ok") in {(r["action"], r["location"], r["result"]) for r in records}


# Known gap, kept visible (strict: it fails loudly once restore works here). containerd 2.x starts
# a shim per pod and, for a shim that advertises bootstrap version 3 (the runc shim of 2.x does),
# creates the pod's containers over that shim's connection without running the shim binary's
# `start` again (core/runtime/v2/shim_manager.go), so containerd-shim-criu-v2 never sees the
# restored container; and 2.4's `start` speaks a binary BootstrapResult on stdout, not the
# address the launcher relays. The container is then started afresh, which criu-shim refuses.
@pytest.mark.xfail(strict=True, reason="restore through criu-shim's handler on containerd 2.3/2.4: "
                   "containerd 2.x reuses the pod's shim without `start` (see comment)")
def test_restore_through_criu_shim(built: tuple[str, Node], client: Cri) -> None:
    _, node = built
    archive, counted = _checkpoint_counter(client, node, 20)
    with client.pod() as pod:
        ctr = _restore(client, pod, archive)
        assert client.state(ctr) == "CONTAINER_RUNNING"
        assert client.count(ctr) >= counted, "the count restarted instead of resuming"
