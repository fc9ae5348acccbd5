"""CheckpointContainer through the proxy on a containerd 1.7 node, with real runc and CRIU."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim.node import procs
from shim.paths_env import load_paths
from tests.node.conftest import FULL, SMOKE, Node, on
from tests.node.pods import Cri, wait_for

pytestmark = pytest.mark.node

COUNTER = ["/usr/local/bin/counter"]
TCP_PAIR = ["sh", "-c", "tcpserver & sleep 0.3; exec tcpclient 127.0.0.1 7000"]


@pytest.fixture
def cri(node: Node, tmp_path: Path) -> Iterator[Cri]:
    client = Cri(node.cri, tmp_path / "pod-logs")
    yield client
    client.close()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _checkpointctl(archive: Path) -> str:
    out = subprocess.run([load_paths()["CHECKPOINTCTL_BIN"], "show", str(archive)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@on(*FULL, *SMOKE)
def test_running_container_is_checkpointed_and_keeps_running(cri: Cri, tmp_path: Path) -> None:
    with cri.pod() as pod:
        ctr = cri.container(pod, ["sh", "-c", "rm /etc/group; exec /usr/local/bin/counter"], {"MEM_MB": "16"})
        wait_for(lambda: cri.count(ctr) >= 2)
        archive = tmp_path / "out" / "checkpoint.tar"
        archive.parent.mkdir()
        cri.checkpoint(ctr, str(archive))
        info = archive.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
        with tarfile.open(archive) as tar:  # plain tar: the kubelet e2e test reads it uncompressed
            members = {m.name: m for m in tar.getmembers()}
            deleted = json.loads(tar.extractfile("deleted.files").read())  # type: ignore[union-attr]
            config = json.loads(tar.extractfile("config.dump").read())  # type: ignore[union-attr]
        for name in ("spec.dump", "config.dump", "checkpoint/inventory.img", "status.dump", "stats-dump",
                     "dump.log", "rootfs-diff.tar", "container.log"):
            assert name in members, name
        assert members["checkpoint"].isdir()
        assert "/etc/group" in deleted
        assert config["id"] == ctr and config["rootfsImageName"].endswith("testprogs:1")
        assert "main" in _checkpointctl(archive)
        assert _leftovers(archive.parent) == ["checkpoint.tar"]
        seen = cri.count(ctr)
        wait_for(lambda: cri.count(ctr) > seen)  # still counting: left running and thawed
        assert cri.state(ctr) == "CONTAINER_RUNNING"


def test_unknown_container_is_not_found(cri: Cri, tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        cri.checkpoint("f" * 64, str(tmp_path / "x.tar"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (tmp_path / "x.tar").exists()


def test_not_running_container_is_refused_with_the_kubelet_text(cri: Cri, tmp_path: Path) -> None:
    with cri.pod() as pod:
        ctr = cri.container(pod, COUNTER, start=False)
        with pytest.raises(grpc.RpcError) as caught:
            cri.checkpoint(ctr, str(tmp_path / "x.tar"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == (f'container "{ctr}" is in CONTAINER_CREATED state. '
                                      "only RUNNING containers can be checkpointed")
    assert not (tmp_path / "x.tar").exists()


@pytest.mark.parametrize("location, message", [
    ("", "checkpoint location is empty"),
    ("relative/x.tar", "is not an absolute path"),
    ("/nonexistent-dir-for-criu-shim/x.tar", "does not exist"),
    ("/tmp", "is a directory"),
])
def test_bad_location_is_invalid_argument_before_freezing(cri: Cri, location: str, message: str) -> None:
    with cri.pod() as pod:
        ctr = cri.container(pod, COUNTER)
        with pytest.raises(grpc.RpcError) as caught:
            cri.checkpoint(ctr, location)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (caught.value.details() or "")
        seen = cri.count(ctr)
        wait_for(lambda: cri.count(ctr) > seen)  # never frozen: still counting


def test_tcp_connection_needs_the_annotation_and_works_with_it(cri: Cri, tmp_path: Path) -> None:
    with cri.pod() as pod:
        ctr = cri.container(pod, TCP_PAIR)
        wait_for(lambda: "seq=" in cri.log(ctr))  # the connection is established and carrying data
        with pytest.raises(grpc.RpcError) as caught:
            cri.checkpoint(ctr, str(tmp_path / "no.tar"))
        assert 'checkpoint.criu-shim.io/tcp-established: "true"' in (caught.value.details() or "")
        assert not (tmp_path / "no.tar").exists()
        assert cri.state(ctr) == "CONTAINER_RUNNING"
    with cri.pod({"checkpoint.criu-shim.io/tcp-established": "true"}) as pod:
        ctr = cri.container(pod, TCP_PAIR)
        wait_for(lambda: "seq=" in cri.log(ctr))
        cri.checkpoint(ctr, str(tmp_path / "yes.tar"))
        assert (tmp_path / "yes.tar").stat().st_size > 0
        assert cri.state(ctr) == "CONTAINER_RUNNING"


def test_bad_annotation_value_is_invalid_argument(cri: Cri, tmp_path: Path) -> None:
    with cri.pod({"checkpoint.criu-shim.io/file-locks": "yes please"}) as pod:
        ctr = cri.container(pod, COUNTER)
        with pytest.raises(grpc.RpcError) as caught:
            cri.checkpoint(ctr, str(tmp_path / "x.tar"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "checkpoint.criu-shim.io/file-locks" in (caught.value.details() or "")


def test_deadline_leaves_container_running_and_nothing_behind(cri: Cri, tmp_path: Path) -> None:
    out = tmp_path / "deadline"
    out.mkdir()
    with cri.pod() as pod:
        ctr = cri.container(pod, COUNTER, {"MEM_MB": "256"})
        wait_for(lambda: cri.count(ctr) >= 1)
        with pytest.raises(grpc.RpcError) as caught:
            cri.checkpoint(ctr, str(out / "x.tar"), timeout=0.15)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: _leftovers(out) == [], timeout=60)
        seen = cri.count(ctr)
        wait_for(lambda: cri.count(ctr) > seen, timeout=60)  # thawed and running
        assert cri.state(ctr) == "CONTAINER_RUNNING"


def test_concurrent_checkpoints_of_one_container_both_succeed(cri: Cri, tmp_path: Path) -> None:
    with cri.pod() as pod:
        ctr = cri.container(pod, COUNTER, {"MEM_MB": "32"})
        wait_for(lambda: cri.count(ctr) >= 1)
        errors: list[BaseException] = []

        def run(name: str) -> None:
            try:
                cri.checkpoint(ctr, str(tmp_path / name))
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(f"c{i}.tar",)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        for i in range(2):
            assert "main" in _checkpointctl(tmp_path / f"c{i}.tar")
        assert cri.state(ctr) == "CONTAINER_RUNNING"


# Stop-after too: the disk fills while the pages stream, which is known before CRIU's gate opens, so
# CRIU's dump fails there and the container runs on (before, CRIU finished and ended it, no archive).
@pytest.mark.parametrize("stop_after", [False, True], ids=["leave-running", "stop-after"])
def test_disk_full_gives_an_error_and_leaves_nothing(cri: Cri, tmp_path: Path, stop_after: bool) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        with cri.pod({"checkpoint.criu-shim.io/stop-after": "true"} if stop_after else {}) as pod:
            ctr = cri.container(pod, COUNTER, {"MEM_MB": "16"})
            wait_for(lambda: cri.count(ctr) >= 1)
            with pytest.raises(grpc.RpcError) as caught:
                cri.checkpoint(ctr, str(small / "x.tar"))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
            details = caught.value.details() or ""
            # CRIU's own image write hit the full disk ("on the filesystem of DIR"), or the page stream did
            # ("writing checkpoint DIR/x.tar"): a clear error naming the place either way.
            assert "no space left" in details and str(small) in details, details
            assert _leftovers(small) == []
            seen = cri.count(ctr)
            wait_for(lambda: cri.count(ctr) > seen)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_too_old_criu_is_reported_as_the_e2e_test_expects(node: Node, tmp_path: Path) -> None:
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 4.1.1'\n")
    fake.chmod(0o755)
    config = tmp_path / "proxy.toml"
    config.write_text(f'[checkpoint]\ncriu = "{fake}"\naudit_log = "{tmp_path}/audit.log"\n')
    listen = tmp_path / "p.sock"
    proxy = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--listen", f"unix://{listen}",
                              "--runtime-endpoint", node.containerd, "--config", str(config)])
    try:
        assert procs.wait_until(listen.exists, 20)
        client = Cri(f"unix://{listen}", tmp_path / "logs")
        with client.pod() as pod:
            ctr = client.container(pod, COUNTER)
            with pytest.raises(grpc.RpcError) as caught:
                client.checkpoint(ctr, str(tmp_path / "x.tar"))
            assert caught.value.code() == grpc.StatusCode.UNKNOWN
            assert "CRIU binary not found or too old" in (caught.value.details() or "")
            assert "4.1.1" in (caught.value.details() or "")
            assert client.state(ctr) == "CONTAINER_RUNNING"
        client.close()
        audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
        assert audit[-1]["container_id"] == ctr and audit[-1]["result"].startswith("error: UNKNOWN")
        assert audit[-1]["caller_pid"] == os.getpid()
        assert stat.S_IMODE((tmp_path / "audit.log").stat().st_mode) == 0o600
    finally:
        proxy.terminate()
        assert proxy.wait(timeout=20) == 0
    assert not (tmp_path / "x.tar").exists()


def test_stop_after_ends_the_container_once_the_dump_succeeded(cri: Cri, tmp_path: Path) -> None:
    from shim.api.cri.v1 import api_pb2

    with cri.pod({"checkpoint.criu-shim.io/stop-after": "true"}) as pod:
        ctr = cri.container(pod, COUNTER, {"MEM_MB": "16"})
        wait_for(lambda: cri.count(ctr) >= 2)
        archive = tmp_path / "stopped.tar"
        cri.checkpoint(ctr, str(archive))
        wait_for(lambda: cri.state(ctr) == "CONTAINER_EXITED")
        status = cri.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=ctr)).status
        assert status.exit_code != 0 or status.reason  # ended by CRIU, not by its own exit
        assert "main" in _checkpointctl(archive)
