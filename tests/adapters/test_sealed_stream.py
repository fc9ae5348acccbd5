"""The page stream sealing as it writes (a writer process stands in for CRIU): the file is no tar,
its plaintext is the same checkpoint tar, and the fallback writer (no FIFOs) agrees."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from shim.checkpoint.archive import Member
from shim.checkpoint.sealing import SealKey, write_sealed_archive
from shim.checkpoint.stream_archive import StreamedArchive
from shim.sealed import Keyring, is_encrypted, open_decrypted, read_header
from tests.adapters.test_pagestream import INTERLEAVED, WRITER, content

KEY = bytes(range(32))


def keyring(tmp_path: Path) -> Keyring:
    key = tmp_path / "key"
    key.write_text(KEY.hex())
    key.chmod(0o600)
    return Keyring({"k1": key})


def plaintext(path: Path, tmp_path: Path) -> tarfile.TarFile:
    with open_decrypted(path, keyring(tmp_path)) as reader:
        data = io.BufferedReader(reader).read()
    return tarfile.open(fileobj=io.BytesIO(data))


@pytest.mark.parametrize("script,interleaved", [(WRITER, False), (INTERLEAVED, True)])
def test_pages_sealed_while_streamed(tmp_path: Path, script: str, interleaved: bool) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    images = staging / "checkpoint"
    streamed = StreamedArchive.open(staging, 3, SealKey("k1", KEY))
    assert streamed is not None
    sizes = {1: 3 * 1024 * 1024 + 77, 2: 0, 3: 4096}
    args = ([str(images / "pages-1.img"), str(images / "pages-2.img")] if interleaved
            else [f"{images / f'pages-{i}.img'}:{n}" for i, n in sizes.items()])
    subprocess.run([sys.executable, "-c", script, *args], check=True, timeout=60)
    streamed.dump_ended()
    (images / "inventory.img").write_bytes(b"inv")
    location = tmp_path / "out.tar"
    size = streamed.complete(location, [Member("checkpoint", is_dir=True),
                                        Member("checkpoint/inventory.img", source=images / "inventory.img"),
                                        Member("spec.dump", data=b"{}")], durable=False)
    streamed.close()
    assert location.stat().st_size == size and stat.S_IMODE(location.stat().st_mode) == 0o600
    assert is_encrypted(location) and read_header(location).key_id == "k1"
    with pytest.raises(tarfile.TarError):
        tarfile.open(location)
    raw = location.read_bytes()
    tar = plaintext(location, tmp_path)
    if interleaved:
        assert tar.extractfile("checkpoint/pages-1.img").read() == b"A" * 200000  # type: ignore[union-attr]
        assert tar.extractfile("checkpoint/pages-2.img").read() == b"B" * 300000  # type: ignore[union-attr]
        assert b"B" * 1000 not in raw
    else:
        for index, expected in sizes.items():
            data = tar.extractfile(f"checkpoint/pages-{index}.img").read()  # type: ignore[union-attr]
            assert data == content(images / f"pages-{index}.img", expected)
        assert content(images / "pages-1.img", 4096) not in raw
    assert tar.getnames()[0] == "checkpoint"
    assert tar.extractfile("checkpoint/inventory.img").read() == b"inv"  # type: ignore[union-attr]


def test_sealed_archive_without_fifos(tmp_path: Path) -> None:
    source = tmp_path / "pages-1.img"
    source.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    location = tmp_path / "out.tar"
    write_sealed_archive(location, [Member("checkpoint", is_dir=True), Member("checkpoint/pages-1.img", source=source),
                                    Member("spec.dump", data=b"{}")], SealKey("k1", KEY), durable=False)
    assert stat.S_IMODE(location.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["out.tar", "pages-1.img"]  # no temp file left
    tar = plaintext(location, tmp_path)
    assert tar.extractfile("checkpoint/pages-1.img").read() == source.read_bytes()  # type: ignore[union-attr]


def test_seal_key_never_shows() -> None:
    assert KEY.hex() not in repr(SealKey("k1", KEY)) and str(KEY) not in repr(SealKey("k1", KEY))


def test_checkpoint_image_of_a_sealed_archive(tmp_path: Path) -> None:
    """The layer is the sealed archive as it is; its names (for the annotations) need the keys."""
    import hashlib
    import json

    from shim.errors import InvalidArgument
    from shim.restore.build_image import checkpoint_image

    archive = tmp_path / "sealed.tar"
    spec = {"annotations": {"io.kubernetes.cri.sandbox-name": "web", "io.kubernetes.cri.sandbox-namespace": "shop"}}
    write_sealed_archive(archive, [Member("spec.dump", data=json.dumps(spec).encode()),
                                   Member("config.dump", data=json.dumps({"name": "app",
                                                                          "rootfsImageName": "busybox"}).encode()),
                                   Member("checkpoint", is_dir=True), Member("checkpoint/inventory.img", data=b"i")],
                         SealKey("k1", KEY), durable=False)
    with pytest.raises(InvalidArgument, match="is encrypted \\(key id 'k1'\\): building its image needs the key"):
        checkpoint_image(archive)
    image = checkpoint_image(archive, keyring(tmp_path))
    assert image.layer_digest == "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    assert image.annotations["org.criu.checkpoint.container.name"] == "app"
    assert image.annotations["org.criu.checkpoint.pod.namespace"] == "shop"
