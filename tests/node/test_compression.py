"""zstd checkpoint archives on a real node: written compressed while CRIU dumps (a pod annotation),
read by `zstd` and `criu-shim inspect`, restored into a new pod (eagerly, said in the audit line), also
compressed and sealed; a damaged zstd archive is refused before anything is created."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from shim.annotations import COMPRESSION
from shim.api.cri.v1 import api_pb2 as cri
from shim.handoff import RESTORE_DIR
from shim.sealed import CONTENT_TAR_ZSTD, is_encrypted, read_header
from tests.node.conftest import Node, on
from tests.node.pods import Cri, wait_for
from tests.node.proxy_config import proxy_with
from tests.node.test_checkpoint import _checkpointctl
from tests.node.test_encryption import KEY_ID, _enabled, keys  # noqa: F401
from tests.node.test_restore import COUNTER, _restore, _work_dirs, assert_restore_refused

pytestmark = pytest.mark.node

ZSTD = {COMPRESSION: "zstd"}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _checkpoint(client: Cri, node: Node, name: str, annotations: dict[str, str]) -> tuple[Path, int]:
    archive = node.dir / "checkpoints" / f"{name}.tar"
    with client.pod(annotations) as pod:
        ctr = client.container(pod, COUNTER, {"INTERVAL_MS": "50", "MEM_MB": "48"})
        wait_for(lambda: client.count(ctr) >= 20)
        counted = client.count(ctr)
        client.checkpoint(ctr, str(archive))
        assert client.state(ctr) == "CONTAINER_RUNNING"
    return archive, counted


def _audit(node: Node) -> list[dict[str, object]]:
    return [json.loads(line) for line in (node.dir / "logs" / "audit.log").read_text().splitlines()]


def _leftovers(node: Node) -> list[str]:
    return [p.name for p in (node.dir / "checkpoints").iterdir() if p.name.startswith(".")]


def _restores_and_counts_on(client: Cri, node: Node, archive: Path, counted: int) -> None:
    with client.pod() as pod:  # lazy pages asked for (the node's default): a compressed archive is eager
        ctr = _restore(client, pod, archive)
        first = client.count(ctr)
        assert first >= counted >= 20, "the count restarted instead of resuming"
        wait_for(lambda: client.count(ctr) > first)
        status = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
        assert not (Path(status.annotations[RESTORE_DIR]) / "lazy-pages.json").exists()
    restores = [r for r in _audit(node) if r["action"] == "restore" and r["container_id"] == ctr]
    assert restores and restores[-1]["result"] == "ok"
    assert restores[-1]["compression"] == "zstd (eager: lazy pages need an uncompressed archive)"


@on("1.7", "2.4")
def test_zstd_checkpoint_restores_into_a_new_pod(client: Cri, node: Node) -> None:
    archive, counted = _checkpoint(client, node, "zstd", ZSTD)
    try:
        assert archive.read_bytes()[:4] == ZSTD_MAGIC
        assert (archive.stat().st_mode & 0o777) == 0o600 and archive.stat().st_uid == 0
        checkpoints = [r for r in _audit(node) if r["action"] == "checkpoint" and r["location"] == str(archive)]
        assert [r["compression"] for r in checkpoints] == ["zstd"]
        if shutil.which("zstd"):
            subprocess.run(["zstd", "-tq", str(archive)], check=True)  # the reference decoder agrees
        shown = subprocess.run([sys.executable, "-m", "shim", "inspect", str(archive)], capture_output=True,
                               text=True, check=True).stdout
        assert "zstd" in shown and "counter" in shown
        assert "main" in _checkpointctl(archive)  # checkpointctl decompresses it too (the container name)
        _restores_and_counts_on(client, node, archive, counted)
        assert not _leftovers(node)
    finally:
        archive.unlink(missing_ok=True)


@on("1.7")
def test_zstd_and_sealed(client: Cri, node: Node, keys: Path) -> None:  # noqa: F811
    with proxy_with(node, "encryption", _enabled(keys)):
        archive, counted = _checkpoint(client, node, "zstd-sealed", ZSTD)
        try:
            assert is_encrypted(archive) and read_header(archive).content == CONTENT_TAR_ZSTD
            _restores_and_counts_on(client, node, archive, counted)
            assert not _leftovers(node) and not [p for p in _work_dirs(node) if p.endswith(".plain")]
        finally:
            archive.unlink(missing_ok=True)


@on("1.7")
def test_damaged_zstd_archive_refused(client: Cri, node: Node) -> None:
    archive, _ = _checkpoint(client, node, "zstd-damaged", ZSTD)
    damaged = [archive.with_name("cut.tar"), archive.with_name("flipped.tar")]
    try:
        data = archive.read_bytes()
        damaged[0].write_bytes(data[:len(data) // 2])
        flipped = bytearray(data)
        flipped[len(data) // 3] ^= 0x40
        damaged[1].write_bytes(flipped)
        for path in damaged:
            path.chmod(0o600)
            assert_restore_refused(client, node, path, grpc.StatusCode.INVALID_ARGUMENT, str(path),
                                   "is truncated or corrupt")
    finally:
        for path in (archive, *damaged):
            path.unlink(missing_ok=True)
