"""A small checkpoint archive as criu-shim writes one, with real CRIU image encodings (pycriu).

Its process tree (pstree.img, core-<pid>.img) is encoded by pycriu, so readers (criu-shim
inspect, checkpointctl) parse it as they parse CRIU's own; the memory image is zeros.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pycriu.images  # type: ignore[import-untyped, unused-ignore]

from shim.checkpoint.archive import Member, directory_members, write_archive
from shim.checkpoint.metadata import config_dump

ANNOTATIONS = {
    "io.kubernetes.cri.container-name": "web",
    "io.kubernetes.cri.sandbox-name": "pod-1",
    "io.kubernetes.cri.sandbox-namespace": "ns-1",
}
PAGES = 3 * 4096 * 256  # 3 MiB of "memory"
ROOTFS_DIFF = 6 * 1024
CHECKPOINTED = datetime(2026, 12, 5, 1, 2, 3, tzinfo=UTC)


def _core(comm: str, state: int = 1) -> bytes:
    return bytes(pycriu.images.dumps({"magic": "CORE", "entries": [{"mtype": "X86_64", "tc": {
        "task_state": state, "exit_code": 0, "personality": 0, "flags": 0, "blk_sigset": 0, "comm": comm}}]}))


def _pstree(*tasks: tuple[int, int]) -> bytes:
    return bytes(pycriu.images.dumps({"magic": "PSTREE", "entries": [
        {"pid": pid, "ppid": ppid, "pgid": 1, "sid": 1, "threads": [pid]} for pid, ppid in tasks]}))


def write_checkpoint(path: Path, *, pstree: bytes | None = None) -> Path:
    """A checkpoint archive at `path`: container `web` of pod ns-1/pod-1, tasks sh (1) > sleep (7)."""
    images = path.parent / f".{path.name}.images"
    images.mkdir()
    (images / "inventory.img").write_bytes(b"inventory")
    (images / "pstree.img").write_bytes(pstree if pstree is not None else _pstree((1, 0), (7, 1)))
    (images / "core-1.img").write_bytes(_core("sh"))
    (images / "core-7.img").write_bytes(_core("sleep"))
    (images / "pages-1.img").write_bytes(bytes(PAGES))
    spec = {"ociVersion": "1.1.0", "annotations": ANNOTATIONS,
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/data", "type": "bind", "source": "/var/lib/data"}]}
    created = datetime(2026, 12, 5, 0, 0, 0, tzinfo=UTC)
    config = config_dump("c0ffee", "web", "docker.io/library/busybox:latest", "docker.io/library/busybox@sha256:00",
                         "io.containerd.runc.v2", created, CHECKPOINTED)
    try:
        write_archive(path, [
            Member("spec.dump", data=json.dumps(spec).encode()),
            Member("config.dump", data=config),
            *directory_members("checkpoint", images),
            Member("rootfs-diff.tar", data=bytes(ROOTFS_DIFF)),
        ])
    finally:
        for image in images.iterdir():
            image.unlink()
        images.rmdir()
    return path
