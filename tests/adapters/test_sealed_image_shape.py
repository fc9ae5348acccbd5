"""The shape of a checkpoint image (shim.restore.build_image): a sealed archive is a blob of criu-shim's
media type beside one empty tar layer that the config's diff_ids name (so containerd 1.6, 1.7 and 2.x
pull it through CRI: tests/node/test_sealed_image.py); an unencrypted archive's image is exactly as
before (one tar layer that is the archive). The readers (the restore's, through containerd's image
store, and `criu-shim pull`'s) find the archive's blob in both shapes and in the sealed shape of before
(the sealed file as the one tar layer), and refuse anything else in words."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from shim import export
from shim.checkpoint.archive import Member, write_archive
from shim.checkpoint.sealing import SealKey, write_sealed_archive
from shim.config import EncryptionSettings
from shim.containerd_images import ContainerdImages
from shim.errors import InvalidArgument
from shim.image_reference import Reference
from shim.oci import CRIU_PREFIX, OCI_CONFIG, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_MANIFEST, SEALED_CHECKPOINT
from shim.registry import RegistryClient
from shim.restore.build_image import EMPTY_LAYER, archive_blob, build, checkpoint_image
from shim.restore.image import Layer, export_layer, read_head
from shim.restore.image import checkpoint_image as find_checkpoint_image
from shim.restore.unseal import HEADER_BYTES, check_key_opens
from shim.sealed import is_encrypted
from shim.sealed.format import KeyUnavailable, WrongKey
from tests.adapters.test_restore_image import FakeImageService, digest_of, run
from tests.adapters.test_sealed_stream import KEY, keyring
from tests.support import registries

MEMBERS = [Member("spec.dump", data=json.dumps({"annotations": {"io.kubernetes.cri.sandbox-name": "web"}}).encode()),
           Member("config.dump", data=json.dumps({"name": "app", "rootfsImageName": "busybox"}).encode()),
           Member("checkpoint", is_dir=True), Member("checkpoint/inventory.img", data=b"i")]


def sealed_archive(tmp_path: Path) -> Path:
    archive = tmp_path / "sealed.tar"
    write_sealed_archive(archive, MEMBERS, SealKey("k1", KEY), durable=False)
    return archive


def plain_archive(tmp_path: Path) -> Path:
    archive = tmp_path / "plain.tar"
    write_archive(archive, MEMBERS)
    return archive


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_sealed_archive_is_a_blob_of_our_type_beside_one_empty_layer(tmp_path: Path) -> None:
    archive = sealed_archive(tmp_path)
    image = checkpoint_image(archive, keyring(tmp_path))
    manifest = json.loads(image.manifest)
    empty = {"mediaType": OCI_LAYER_TAR, "digest": digest_of(EMPTY_LAYER), "size": 1024}
    assert manifest["layers"] == [empty, {"mediaType": SEALED_CHECKPOINT, "digest": file_digest(archive),
                                          "size": archive.stat().st_size}]
    config = json.loads(image.config)
    assert config["rootfs"] == {"type": "layers", "diff_ids": [digest_of(EMPTY_LAYER)]}  # the sealed blob is none
    assert manifest["config"] == {"mediaType": OCI_CONFIG, "digest": digest_of(image.config), "size": len(image.config)}
    assert image.small_blobs == (EMPTY_LAYER,) and image.layer_digest == file_digest(archive)
    assert manifest["annotations"][CRIU_PREFIX + "container.name"] == "app"
    empty_tar = tmp_path / "empty.tar"
    empty_tar.write_bytes(EMPTY_LAYER)
    with tarfile.open(empty_tar) as tar:  # a real (empty) tar stream: containerd's differ applies it
        assert tar.getmembers() == []
    # not a layer type to containerd's images.IsLayerType
    assert not SEALED_CHECKPOINT.startswith("application/vnd.oci.image.layer.")
    assert not SEALED_CHECKPOINT.startswith("application/vnd.docker.image.rootfs.")
    assert archive_blob(manifest["layers"], "x")["digest"] == file_digest(archive)


def test_unencrypted_archive_image_is_unchanged(tmp_path: Path) -> None:
    archive = plain_archive(tmp_path)
    assert not is_encrypted(archive)
    image = checkpoint_image(archive)
    manifest = json.loads(image.manifest)
    assert manifest["layers"] == [{"mediaType": OCI_LAYER_TAR, "digest": file_digest(archive),
                                   "size": archive.stat().st_size}]
    assert json.loads(image.config)["rootfs"]["diff_ids"] == [file_digest(archive)]
    assert image.small_blobs == ()


def test_layout_of_a_sealed_archive_holds_every_blob(tmp_path: Path) -> None:
    archive = sealed_archive(tmp_path)
    out = tmp_path / "image.tar"
    digest = build(archive, "localhost/ckpt/sealed:1", out, keyring(tmp_path))
    with tarfile.open(out) as tar:
        names = {m.name for m in tar.getmembers()}
        manifest = json.loads(tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}").read())  # type: ignore[union-attr]
    wanted = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    assert {f"blobs/sha256/{d.removeprefix('sha256:')}" for d in wanted} <= names


def _descriptor(media_type: str, data: bytes = b"x") -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


@pytest.mark.parametrize("layers", [
    [_descriptor(OCI_LAYER_TAR, EMPTY_LAYER), _descriptor(SEALED_CHECKPOINT)],  # ours
    [_descriptor(SEALED_CHECKPOINT), _descriptor(OCI_LAYER_GZIP, b"gz")],  # another order, a gzip empty layer
    [_descriptor(SEALED_CHECKPOINT)],  # the blob alone (pulls on 1.7 and 2.x only)
])
def test_the_sealed_blob_is_found(layers: list[dict[str, Any]]) -> None:
    assert archive_blob(layers, "x")["mediaType"] == SEALED_CHECKPOINT


@pytest.mark.parametrize(("layers", "match"), [
    ([_descriptor(SEALED_CHECKPOINT), _descriptor(SEALED_CHECKPOINT, b"y")], "has 2 sealed archives"),
    ([_descriptor(SEALED_CHECKPOINT), _descriptor(OCI_LAYER_TAR), _descriptor(OCI_LAYER_TAR, b"y")],
     "may have one empty tar layer, it has 2"),
    ([_descriptor(SEALED_CHECKPOINT), _descriptor("application/x-evil")], "it has 1 ('application/x-evil')"),
    ([], "has 0 layers"),
    ([_descriptor(OCI_LAYER_TAR), _descriptor(OCI_LAYER_TAR, b"y")], "has 2 layers"),
    ([_descriptor("application/vnd.criu-shim.checkpoint.sealed.v2")], "is not a tar layer (plain, gzip or zstd) "
                                                                       "nor a sealed archive"),
    (["not an object"], "a layer descriptor is not an object"),
])
def test_other_shapes_are_refused_in_words(layers: list[Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match.replace("(", r"\(").replace(")", r"\)")):
        archive_blob(layers, "x")


def _stored(fake: FakeImageService, image: Any, archive: Path, notes: dict[str, str]) -> None:
    """`image` (build_image's) in the fake containerd store under localhost/ckpt:1."""
    for blob in (image.config, *image.small_blobs, archive.read_bytes()):
        fake.add_blob(blob)
    manifest = json.loads(image.manifest)
    manifest["annotations"] = notes
    fake.add_image("localhost/ckpt:1", OCI_MANIFEST, manifest)


def test_restore_reads_the_sealed_blob_from_containerds_store(tmp_path: Path) -> None:
    archive = sealed_archive(tmp_path)
    image = checkpoint_image(archive, keyring(tmp_path))
    fake = FakeImageService()
    _stored(fake, image, archive, image.annotations)

    async def test(channel: ContainerdImages) -> Path:
        found = await find_checkpoint_image(channel, "localhost/ckpt:1")
        assert found is not None
        assert found.layer == Layer(file_digest(archive), SEALED_CHECKPOINT, archive.stat().st_size)
        return await export_layer(channel, found.layer, tmp_path / "layer")

    exported = run(tmp_path, fake, test)
    assert exported.read_bytes() == archive.read_bytes() and is_encrypted(exported)


def test_a_sealed_image_of_before_still_reads(tmp_path: Path) -> None:
    """The sealed file as the image's one tar layer (what checkpoint-image and push wrote before the
    sealed type): found as that layer; the archive reader tells it is sealed by its magic bytes."""
    archive = sealed_archive(tmp_path)
    fake = FakeImageService()
    config = b'{"architecture":"amd64","os":"linux"}'
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": fake.add_blob(config), "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER_TAR, "digest": fake.add_blob(archive.read_bytes()),
                            "size": archive.stat().st_size}],
                "annotations": {CRIU_PREFIX + "container.name": "app"}}
    fake.add_image("localhost/old:1", OCI_MANIFEST, manifest)
    found = run(tmp_path, fake, lambda ch: find_checkpoint_image(ch, "localhost/old:1", arch="amd64"))
    assert found is not None and found.layer.digest == file_digest(archive)
    assert export.checkpoint_layer(json.dumps(manifest).encode(), OCI_MANIFEST, "old") == file_digest(archive)


def test_pull_finds_the_sealed_blob(tmp_path: Path) -> None:
    archive = sealed_archive(tmp_path)
    image = checkpoint_image(archive, keyring(tmp_path))
    assert export.checkpoint_layer(image.manifest, OCI_MANIFEST, "x") == file_digest(archive)


# -- the key is checked before a sealed blob is copied out of containerd's store ----------------


def _settings(tmp_path: Path, key: bytes | None, key_id: str = "k1") -> EncryptionSettings:
    if key is None:
        return EncryptionSettings()
    path = tmp_path / f"key-{key.hex()[:8]}"
    path.write_text(key.hex())
    path.chmod(0o600)
    return EncryptionSettings(key_id=key_id, key_file=path)


def test_the_key_is_checked_from_the_header_alone(tmp_path: Path) -> None:
    archive = sealed_archive(tmp_path)
    head = archive.read_bytes()[:HEADER_BYTES]
    check_key_opens(head, "checkpoint image x", _settings(tmp_path, KEY))  # the node's key: no error
    with pytest.raises(KeyUnavailable, match="no key for key id 'k1' is configured"):
        check_key_opens(head, "checkpoint image x", _settings(tmp_path, None))
    with pytest.raises(KeyUnavailable, match="no key for key id 'k1' is configured"):
        check_key_opens(head, "checkpoint image x", _settings(tmp_path, KEY, key_id="k2"))
    with pytest.raises(WrongKey, match="checkpoint image x: wrong key"):
        check_key_opens(head, "checkpoint image x", _settings(tmp_path, bytes(32)))
    with pytest.raises(InvalidArgument, match="checkpoint image x is not an encrypted checkpoint archive"):
        check_key_opens(b"PK\x03\x04 not ours", "checkpoint image x", _settings(tmp_path, KEY))
    with pytest.raises(InvalidArgument, match="truncated inside its header"):
        check_key_opens(head[:30], "checkpoint image x", _settings(tmp_path, KEY))


def test_read_head_reads_the_beginning_only(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, in many chunks of the fake store
    fake = FakeImageService()
    layer = Layer(fake.add_blob(data), SEALED_CHECKPOINT, len(data))
    assert run(tmp_path, fake, lambda ch: read_head(ch, layer, 1000)) == data[:1000]
    assert run(tmp_path, fake, lambda ch: read_head(ch, Layer(fake.add_blob(b"abc"), SEALED_CHECKPOINT, 3), 1000)) \
        == b"abc"


@pytest.mark.skipif(not os.access(registries.REGISTRY_BIN, os.X_OK), reason=f"{registries.REGISTRY_BIN} missing")
def test_push_and_pull_of_a_sealed_archive_through_a_real_registry(tmp_path: Path) -> None:
    """distribution takes the sealed blob's media type; pull writes the sealed file back, byte for byte."""
    archive = sealed_archive(tmp_path)
    with registries.plain(tmp_path / "registry") as host:
        pushed = export.push_checkpoint(archive, f"{host}/ckpt/sealed:1", keyring=keyring(tmp_path))
        with RegistryClient(host) as client:
            body, _, digest = client.manifest(Reference.parse(f"{host}/ckpt/sealed:1"))
        assert digest == pushed.digest
        assert [layer["mediaType"] for layer in json.loads(body)["layers"]] == [OCI_LAYER_TAR, SEALED_CHECKPOINT]
        export.pull_checkpoint(f"{host}/ckpt/sealed:1", tmp_path / "back.tar")
    assert (tmp_path / "back.tar").read_bytes() == archive.read_bytes()
