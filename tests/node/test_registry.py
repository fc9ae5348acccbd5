"""A real docker-registry on loopback: start, push the busybox OCI archive, pull its manifest
back by tag and by digest, stop; no process and no listening port left. Starts no containerd."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shim.node import procs
from shim.node import registry as reg
from shim.node.tools import REPO_ROOT
from shim.oci import OCI_MANIFEST
from shim.paths_env import load_paths

pytestmark = pytest.mark.node

BUSYBOX_TAR = REPO_ROOT / "build" / "images" / "busybox.tar"
REGISTRY_BIN = Path(load_paths().get("REGISTRY_BIN", "/usr/bin/docker-registry"))


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "registry node tests run as root, like every node test"
    if not os.access(REGISTRY_BIN, os.X_OK):
        return f"{REGISTRY_BIN} (REGISTRY_BIN in scripts/paths.env) is missing: run scripts/setup-host.sh"
    return None


@pytest.fixture(scope="module")
def busybox_tar() -> Path:
    if reason := _skip_reason():
        pytest.skip(reason)
    if not BUSYBOX_TAR.exists():
        res = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "build-images.py")],
                             capture_output=True, text=True, timeout=600, check=False)
        if res.returncode == 3:
            pytest.skip(f"no static busybox to build {BUSYBOX_TAR}: {res.stderr.strip()[-300:]}")
        assert res.returncode == 0, res.stderr
    return BUSYBOX_TAR


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _layout_manifest_digest(tar: Path) -> str:
    import tarfile

    with tarfile.open(tar) as t:
        f = t.extractfile("index.json")
        assert f is not None
        return str(json.load(f)["manifests"][0]["digest"])


def test_push_busybox_and_pull_manifest_back(tmp_path: Path, busybox_tar: Path) -> None:
    registry = reg.start_registry(tmp_path / "registry")
    try:
        assert procs.alive(registry.pid) and _port_open(registry.port)
        assert (tmp_path / "registry" / reg.PID_NAME).read_text().strip() == str(registry.pid)
        assert reg.start_registry(tmp_path / "registry") == registry  # already running: same one

        digest = reg.push_layout(registry, busybox_tar, "criu-shim/busybox", "1")
        assert digest == _layout_manifest_digest(busybox_tar)  # the archive's own bytes, unchanged
        assert reg.push_layout(registry, busybox_tar, "criu-shim/busybox", "1") == digest  # idempotent

        by_tag = reg.get_manifest(registry, "criu-shim/busybox", "1")
        by_digest = reg.get_manifest(registry, "criu-shim/busybox", digest)
        for body, media_type, served in (by_tag, by_digest):
            assert served == digest
            assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
            assert media_type == OCI_MANIFEST
        for layer in json.loads(by_tag[0])["layers"]:
            assert reg.blob_exists(registry, "criu-shim/busybox", layer["digest"])
        with pytest.raises(reg.RegistryError, match="HTTP 404"):
            reg.get_manifest(registry, "criu-shim/busybox", "2")
    finally:
        stopped = reg.stop_registry(tmp_path / "registry")
    assert stopped
    assert not Path(f"/proc/{registry.pid}").exists()
    assert not (tmp_path / "registry" / reg.PID_NAME).exists()
    assert not _port_open(registry.port)
    assert reg.stop_registry(tmp_path / "registry") is False  # idempotent
    assert reg.running_registry(tmp_path / "registry") is None
    assert not procs.processes_mentioning(str(tmp_path / "registry" / reg.CONFIG_NAME))


def test_push_images_gives_every_built_image_a_repo_digest(tmp_path: Path, busybox_tar: Path) -> None:
    index = json.loads((REPO_ROOT / "build" / "images" / "images.json").read_text())
    registry = reg.start_registry(tmp_path)
    try:
        pushed = reg.push_images(registry)
        assert [p.name for p in pushed] == [i["name"] for i in index]
        for image, p in zip(index, pushed, strict=True):
            assert p.digest == image["digest"]
            assert p.ref == f"127.0.0.1:{registry.port}/criu-shim/{image['name']}:1"
            assert p.repo_digest == f"127.0.0.1:{registry.port}/criu-shim/{image['name']}@{image['digest']}"
            assert reg.get_manifest(registry, f"criu-shim/{image['name']}", "1")[2] == image["digest"]
    finally:
        reg.stop_registry(tmp_path)
    assert not Path(f"/proc/{registry.pid}").exists()
    assert not _port_open(registry.port)
