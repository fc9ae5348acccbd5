"""`criu-shim checkpoint-image`: an OCI layout from an archive; garbage refused cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from shim.checkpoint.archive import Member, write_archive


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim", "checkpoint-image", *args], capture_output=True, text=True)


def test_builds_an_oci_layout_with_both_annotation_families(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    write_archive(archive, [Member("spec.dump", data=b'{"ociVersion": "1.0.2", "annotations": {}}'),
                            Member("config.dump", data=json.dumps({"name": "counter",
                                                                   "rootfsImageName": "x/y:1"}).encode()),
                            Member("checkpoint", is_dir=True), Member("checkpoint/inventory.img", data=b"i")])
    out = tmp_path / "image.tar"
    done = _run(str(archive), "--name", "localhost/app:ckpt", "--out", str(out))
    assert done.returncode == 0, done.stderr
    with tarfile.open(out) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest_name = "blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]
        manifest = json.loads(tar.extractfile(manifest_name).read())  # type: ignore[union-attr]
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "localhost/app:ckpt"
    assert manifest["annotations"]["org.criu.checkpoint.container.name"] == "counter"
    assert manifest["annotations"]["io.kubernetes.cri-o.annotations.checkpoint.name"] == "counter"
    assert done.stdout.strip() == index["manifests"][0]["digest"]


def test_garbage_and_missing_input_are_refused_without_output(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00\xffnot a tar" * 100)
    out = tmp_path / "image.tar"
    refused = _run(str(garbage), "--name", "localhost/app:ckpt", "--out", str(out))
    assert refused.returncode == 1 and "is not a readable checkpoint archive" in refused.stderr
    assert "Traceback" not in refused.stderr and not out.exists()
    missing = _run(str(tmp_path / "nope.tar"), "--name", "x", "--out", str(out))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and not out.exists()
    assert "nope.tar: no such checkpoint archive" in missing.stderr
    directory = _run(str(tmp_path), "--name", "x", "--out", str(out))
    assert directory.returncode == 1 and "is not a checkpoint archive: not a regular file" in directory.stderr
    assert not out.exists()
