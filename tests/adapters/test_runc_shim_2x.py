"""Against containerd 2.3/2.4's own containerd-shim-runc-v2 (built by `make peers`).

The facts criu-shim's restore on 2.x rests on, checked on the real shim: its `start`
answers a protobuf BootstrapResult saying version 3 (shim.runtime.bootstrap reads it and
gives it back with another address), it serves task API v3 only (a v2 call is
UNIMPLEMENTED), and the restore reconciler's Delete/Shutdown reach it all the same
(shim.restore.recovery asks again in v3). The shim is started as containerd would, with no
task, so Shutdown ends it; whatever is left is killed by pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.api.containerd.runtime.task.v2 import shim_pb2
from shim.errors import Code
from shim.node.tools import load_paths
from shim.restore.recovery import _shut_runc_shim_down
from shim.runtime.bootstrap import address_of, with_address
from shim.ttrpc import Client, TTRPCError

TIMEOUT = 20.0
VERSIONS = {"2.3": "CONTAINERD_2_3", "2.4": "CONTAINERD_2_4"}

pytestmark = [pytest.mark.node, pytest.mark.skipif(os.geteuid() != 0, reason="the runc shim needs root")]


def _runc_shim(version: str) -> Path:
    try:
        path = Path(load_paths()[VERSIONS[version]]) / "containerd-shim-runc-v2"
    except (KeyError, OSError):
        pytest.skip(f"containerd {version} is not built (make peers)")
    if not path.exists():
        pytest.skip(f"{path} is not built (make peers)")
    return path


def _pids(root: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and str(root) in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_gone(root: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _pids(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _bootstrap_params(shim_id: str, root: Path) -> bytes:
    """containerd/api runtime/bootstrap/v1 BootstrapParams; the shim's socket under `root`."""
    def text(number: int, value: str) -> bytes:
        data = value.encode()
        assert len(data) < 128
        return bytes([number << 3 | 2, len(data)]) + data
    return b"".join((text(1, shim_id), text(2, "testns"), text(4, "v2-test"),
                     text(5, str(root / "fake.sock.ttrpc")), text(6, str(root / "fake.sock")),
                     text(7, "/bin/true"), text(9, str(root / "s"))))


@pytest.fixture(params=sorted(VERSIONS))
def started(request: pytest.FixtureRequest) -> Iterator[tuple[bytes, str, Path]]:
    """The stock shim's raw `start` answer, the task id, and the bundle."""
    shim = _runc_shim(request.param)
    root = Path(tempfile.mkdtemp(prefix="runc2x-", dir="/tmp"))
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2"}))
    os.mkfifo(bundle / "log")
    log_fd = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
    shim_id = f"runc2x-{os.getpid()}"
    address: Path | None = None
    try:
        # As containerd 2.3+ run it: the flags, and BootstrapParams on stdin (2.4 insists on them).
        done = subprocess.run(
            [str(shim), "-namespace", "testns", "-address", str(root / "fake.sock"),
             "-publish-binary", "/bin/true", "-id", shim_id, "start"],
            cwd=bundle, env={**os.environ, "TTRPC_ADDRESS": str(root / "fake.sock.ttrpc")},
            input=_bootstrap_params(shim_id, root), capture_output=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        address = Path(address_of(done.stdout))
        yield done.stdout, shim_id, bundle
    finally:
        for pid in _pids(root):  # a test that shut it down has seen it go
            os.kill(pid, signal.SIGKILL)
        left = _wait_gone(root, 5.0)
        if address is not None:
            address.unlink(missing_ok=True)
        os.close(log_fd)
        shutil.rmtree(root, ignore_errors=True)
        assert left == [], f"runc shim processes left behind: {left}"


def test_start_answers_a_version_3_bootstrap_result_in_protobuf(started: tuple[bytes, str, Path]) -> None:
    answer, _, _ = started
    assert answer[:2] == bytes([0x08, 3])  # field 1 (version), varint 3: containerd joins the pod's shim
    assert address_of(answer).startswith("/")
    relay = "unix:///run/criu-shim/shims/0123456789abcdef.sock"
    swapped = with_address(answer, relay)
    assert address_of(swapped) == relay.removeprefix("unix://")
    original = f"unix://{address_of(answer)}".encode()
    assert swapped[:2] == answer[:2]  # the version
    assert swapped.split(relay.encode())[1] == answer.split(original)[1]  # the protocol and the rest


def test_the_shim_serves_task_api_v3_only_and_recovery_still_reaches_it(started: tuple[bytes, str, Path]) -> None:
    answer, shim_id, bundle = started
    address = Path(address_of(answer))

    async def body() -> str:
        async with Client.connect(address) as client:
            with pytest.raises(TTRPCError) as caught:
                await client.call("containerd.task.v2.Task", "Connect",
                                  shim_pb2.ConnectRequest(id=shim_id).SerializeToString(), timeout=TIMEOUT)
            assert caught.value.status.code == Code.UNIMPLEMENTED
            reply = shim_pb2.ConnectResponse.FromString(await client.call(
                "containerd.task.v3.Task", "Connect", shim_pb2.ConnectRequest(id=shim_id).SerializeToString(),
                timeout=TIMEOUT))
            assert reply.shim_pid > 0
        return await _shut_runc_shim_down(address, shim_id, bundle)

    said = asyncio.run(body())
    assert "UNIMPLEMENTED" not in said and "unknown service" not in said.lower(), said
    assert said.startswith("told the runc shim"), said
    assert _wait_gone(bundle.parent, TIMEOUT) == []  # Shutdown in v3 ended the shim (it had no task)
