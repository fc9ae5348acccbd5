"""zstd archives written while CRIU dumps (a writer process stands in for CRIU): the file is one zstd
stream whose decompression is the same checkpoint tar; `zstd -d` reads it; with a key it is compressed,
then sealed; the fallback writer (no FIFOs) agrees; restore unpacks each."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from shim.checkpoint.archive import Member
from shim.checkpoint.compression import ZSTD_MAGIC, Compression
from shim.checkpoint.sealing import SealKey, write_sealed_archive
from shim.checkpoint.stream_archive import StreamedArchive
from shim.restore.checkpoint_unpack import open_checkpoint
from shim.sealed import CONTENT_TAR_ZSTD, decrypt_to, is_encrypted, read_header
from tests.adapters.test_pagestream import INTERLEAVED, WRITER, content
from tests.adapters.test_sealed_stream import KEY, keyring

ZSTD = Compression(level=3)


def decompressed(path: Path) -> tarfile.TarFile:
    data = zstandard.ZstdDecompressor().stream_reader(path.read_bytes(), read_across_frames=True).read()
    return tarfile.open(fileobj=io.BytesIO(data))


def dump(tmp_path: Path, script: str, args: list[str], seal: SealKey | None) -> Path:
    staging = tmp_path / "staging"
    images = staging / "checkpoint"
    streamed = StreamedArchive.open(staging, 3, seal, ZSTD)
    assert streamed is not None
    subprocess.run([sys.executable, "-c", script, *args], check=True, timeout=60)
    streamed.dump_ended()
    (images / "inventory.img").write_bytes(b"inv")
    location = tmp_path / "out.tar"
    spec = b'{"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "root": {"path": "rootfs"}}'
    size = streamed.complete(location, [Member("checkpoint", is_dir=True),
                                        Member("checkpoint/inventory.img", source=images / "inventory.img"),
                                        Member("spec.dump", data=spec), Member("config.dump", data=b"{}")],
                             durable=False)
    streamed.close()
    assert location.stat().st_size == size and stat.S_IMODE(location.stat().st_mode) == 0o600
    return location


@pytest.mark.parametrize("script,interleaved", [(WRITER, False), (INTERLEAVED, True)])
def test_pages_compressed_while_streamed(tmp_path: Path, script: str, interleaved: bool) -> None:
    (tmp_path / "staging").mkdir()
    images = tmp_path / "staging" / "checkpoint"
    sizes = {1: 3 * 1024 * 1024 + 77, 2: 0, 3: 4096}
    args = ([str(images / "pages-1.img"), str(images / "pages-2.img")] if interleaved
            else [f"{images / f'pages-{i}.img'}:{n}" for i, n in sizes.items()])
    location = dump(tmp_path, script, args, None)
    raw = location.read_bytes()
    assert raw.startswith(ZSTD_MAGIC)
    tar = decompressed(location)
    if interleaved:
        assert tar.extractfile("checkpoint/pages-1.img").read() == b"A" * 200000  # type: ignore[union-attr]
        assert tar.extractfile("checkpoint/pages-2.img").read() == b"B" * 300000  # type: ignore[union-attr]
    else:
        for index, expected in sizes.items():
            data = tar.extractfile(f"checkpoint/pages-{index}.img").read()  # type: ignore[union-attr]
            assert data == content(images / f"pages-{index}.img", expected)
        assert len(raw) < sizes[1] // 20  # the writer's pattern compresses: the pages went through zstd
    assert tar.getnames()[0] == "checkpoint"
    assert tar.extractfile("checkpoint/inventory.img").read() == b"inv"  # type: ignore[union-attr]
    if shutil.which("zstd"):  # the reference decoder takes it too (skippable frames included)
        plain = subprocess.run(["zstd", "-dc", str(location)], capture_output=True, check=True).stdout
        assert tarfile.open(fileobj=io.BytesIO(plain)).getnames() == tar.getnames()
    dest = tmp_path / "unpacked"
    dest.mkdir(mode=0o700)
    archive = open_checkpoint(location, dest, defer=lambda name, size: True)
    assert archive.compression == "zstd" and archive.deferred == ()  # nothing stays in a compressed archive
    assert (dest / "checkpoint" / "inventory.img").read_bytes() == b"inv"


def test_compressed_then_sealed(tmp_path: Path) -> None:
    (tmp_path / "staging").mkdir()
    images = tmp_path / "staging" / "checkpoint"
    location = dump(tmp_path, WRITER, [f"{images / 'pages-1.img'}:{2 * 1024 * 1024 + 3}"], SealKey("k1", KEY))
    assert is_encrypted(location) and read_header(location).content == CONTENT_TAR_ZSTD
    plain = tmp_path / "plain"
    fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        decrypt_to(location, keyring(tmp_path), fd)
    finally:
        os.close(fd)
    assert plain.read_bytes().startswith(ZSTD_MAGIC)
    assert location.stat().st_size < 1024 * 1024  # compressed before it was sealed
    data = decompressed(plain).extractfile("checkpoint/pages-1.img").read()  # type: ignore[union-attr]
    assert data == content(images / "pages-1.img", 2 * 1024 * 1024 + 3)


@pytest.mark.parametrize("sealed", [False, True])
def test_compressed_archive_without_fifos(tmp_path: Path, sealed: bool) -> None:
    source = tmp_path / "pages-1.img"
    source.write_bytes(os.urandom(1024 * 1024) + bytes(4 * 1024 * 1024))
    location = tmp_path / "out.tar"
    seal = SealKey("k1", KEY) if sealed else None
    write_sealed_archive(location, [Member("checkpoint", is_dir=True), Member("checkpoint/pages-1.img", source=source),
                                    Member("spec.dump", data=b"{}")], seal, durable=False, compression=ZSTD)
    assert stat.S_IMODE(location.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["out.tar", "pages-1.img"]  # no temp file left
    assert location.stat().st_size < 2 * 1024 * 1024
    if sealed:
        plain = tmp_path / "plain"
        with open(plain, "wb") as out:
            decrypt_to(location, keyring(tmp_path), out.fileno())
        location = plain
    tar = decompressed(location)
    assert tar.extractfile("checkpoint/pages-1.img").read() == source.read_bytes()  # type: ignore[union-attr]


def test_failed_compressed_write_leaves_nothing(tmp_path: Path) -> None:
    location = tmp_path / "out.tar"
    with pytest.raises(FileNotFoundError):
        write_sealed_archive(location, [Member("spec.dump", data=b"{}" * 100000),
                                        Member("checkpoint/pages-1.img", source=tmp_path / "gone")],
                             None, durable=False, compression=ZSTD)
    assert os.listdir(tmp_path) == []


def test_a_zstd_archive_is_a_zstd_layer(tmp_path: Path) -> None:
    from shim import oci
    from shim.restore.build_image import checkpoint_image

    spec = {"annotations": {oci.CRI_SANDBOX_NAME: "web", oci.CRI_SANDBOX_NAMESPACE: "shop"}}
    members = [Member("spec.dump", data=json.dumps(spec).encode()),
               Member("config.dump", data=json.dumps({"name": "app", "rootfsImageName": "img:1"}).encode()),
               Member("checkpoint", is_dir=True), Member("checkpoint/inventory.img", data=b"inv" * 1000)]
    location = tmp_path / "out.tar"
    write_sealed_archive(location, members, None, durable=False, compression=ZSTD)
    image = checkpoint_image(location)
    manifest, config = json.loads(image.manifest), json.loads(image.config)
    assert [layer["mediaType"] for layer in manifest["layers"]] == [oci.OCI_LAYER_ZSTD]
    tar = zstandard.ZstdDecompressor().stream_reader(location.read_bytes(), read_across_frames=True).read()
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(tar).hexdigest()]
    assert manifest["layers"][0]["digest"] == "sha256:" + hashlib.sha256(location.read_bytes()).hexdigest()
    assert image.annotations[oci.CRIU_PREFIX + "pod.name"] == "web"
