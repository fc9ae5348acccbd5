"""Checkpoint OCI images through containerd's native API (shim.containerd_images), against an in-process fake.

The fake serves Images.Get/List and Content.Read (in chunks, honouring the
`containerd-namespace` header) over an in-memory blob store on a unix socket;
the images in it are real OCI JSON indexes and manifests built here. Each test
body is a coroutine run with `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import stat
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

from shim.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from shim.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from shim.api.containerd.services.introspection.v1 import introspection_pb2, introspection_pb2_grpc
from shim.api.containerd.types import descriptor_pb2
from shim.checkpoint.metadata import config_dump
from shim.containerd_images import ContainerdImages
from shim.errors import AlreadyExists, InvalidArgument, NotFound
from shim.restore.checkpoint_unpack import open_checkpoint
from shim.restore.image import (
    CheckpointImage,
    Layer,
    checkpoint_image,
    export_layer,
    normalize,
)

T = TypeVar("T")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 1000  # small, so that every blob arrives in several messages


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the fake containerd -----------------------------------------------------------------


class FakeImageService:
    """containerd's Images and Content gRPC services, in memory (served on a real socket by `run`)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.images: dict[str, images_pb2.Image] = {}
        self.reads: list[str] = []
        # The content plugin as Introspection.Plugins tells it (None: no Introspection service at all).
        self.content_plugin: introspection_pb2.Plugin | None = None

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_image(self, name: str, media_type: str, document: dict[str, Any] | bytes,
                  annotations: dict[str, str] | None = None) -> descriptor_pb2.Descriptor:
        data = document if isinstance(document, bytes) else json.dumps(document).encode()
        target = descriptor_pb2.Descriptor(media_type=media_type, digest=self.add_blob(data), size=len(data),
                                           annotations=annotations or {})
        self.images[name] = images_pb2.Image(name=name, target=target)
        return target

    @staticmethod
    def _check_namespace(context: grpc.aio.ServicerContext) -> None:
        if ("containerd-namespace", "k8s.io") not in tuple(context.invocation_metadata() or ()):
            raise AssertionError("call without the k8s.io namespace")

    async def get(self, request: images_pb2.GetImageRequest,
                  context: grpc.aio.ServicerContext) -> images_pb2.GetImageResponse:
        self._check_namespace(context)
        if request.name not in self.images:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"image \"{request.name}\": not found")
        return images_pb2.GetImageResponse(image=self.images[request.name])

    async def list(self, request: images_pb2.ListImagesRequest,
                   context: grpc.aio.ServicerContext) -> images_pb2.ListImagesResponse:
        self._check_namespace(context)
        assert not request.filters
        return images_pb2.ListImagesResponse(images=list(self.images.values()))

    async def read(self, request: content_pb2.ReadContentRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[content_pb2.ReadContentResponse]:
        self._check_namespace(context)
        self.reads.append(request.digest)
        if request.digest not in self.blobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: not found")
        data = self.blobs[request.digest]
        for offset in range(request.offset, len(data), CHUNK):
            yield content_pb2.ReadContentResponse(offset=offset, data=data[offset:offset + CHUNK])


    async def plugins(self, request: introspection_pb2.PluginsRequest,
                      context: grpc.aio.ServicerContext) -> introspection_pb2.PluginsResponse:
        assert list(request.filters) == ['type=="io.containerd.content.v1",id=="content"']
        return introspection_pb2.PluginsResponse(plugins=[self.content_plugin] if self.content_plugin else [])

    def local_store(self, root: Path) -> None:
        """The blobs on disk too, as containerd's local content store keeps them (0444, root's)."""
        self.content_plugin = introspection_pb2.Plugin(type="io.containerd.content.v1", id="content",
                                                       exports={"root": str(root)})
        for digest, data in self.blobs.items():
            path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o444)


class Images(images_pb2_grpc.ImagesServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeImageService) -> None:
        self.Get, self.List = fake.get, fake.list


class Content(content_pb2_grpc.ContentServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeImageService) -> None:
        self.Read = fake.read


class Introspection(introspection_pb2_grpc.IntrospectionServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeImageService) -> None:
        self.Plugins = fake.plugins


def run(tmp_path: Path, fake: FakeImageService, test: Callable[[ContainerdImages], Awaitable[T]]) -> T:
    async def main() -> T:
        socket = tmp_path / "containerd.sock"
        server = grpc.aio.server()
        images_pb2_grpc.add_ImagesServicer_to_server(Images(fake), server)
        content_pb2_grpc.add_ContentServicer_to_server(Content(fake), server)
        if fake.content_plugin is not None:
            introspection_pb2_grpc.add_IntrospectionServicer_to_server(Introspection(fake), server)
        server.add_insecure_port(f"unix://{socket}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
                return await asyncio.wait_for(test(ContainerdImages(channel)), 10)
        finally:
            await server.stop(None)

    return asyncio.run(main())


# -- images ---------------------------------------------------------------------------------

SPEC = {"ociVersion": "1.0.2", "process": {"args": ["/counter"], "cwd": "/"},
        "annotations": {"io.kubernetes.cri.container-name": "counter"}}
CONFIG = config_dump("0123abcd", "counter", "docker.io/library/busybox:1.36",
                     "docker.io/library/busybox@sha256:" + "a" * 64, "io.containerd.runc.v2",
                     1_700_000_000_000_000_000, 1_700_000_100_500_000_000)


def layer_tar(compress: bool = True) -> bytes:
    """A checkpoint archive's contents, as buildah's `add` leaves them: at the layer's root."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (("spec.dump", json.dumps(SPEC).encode()), ("config.dump", CONFIG),
                           ("checkpoint/inventory.img", b"\x00" * 4096), ("checkpoint/pages-1.img", b"p" * 5000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = out.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def manifest(fake: FakeImageService, annotations: dict[str, str] | None = None, layers: int = 1,
             layer_type: str = LAYER_GZIP, config: bytes = b'{"architecture":"amd64","os":"linux"}',
             ) -> dict[str, Any]:
    blobs = [layer_tar(layer_type.endswith("gzip")) + bytes(i) for i in range(layers)]
    document: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": fake.add_blob(config), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": fake.add_blob(b), "size": len(b)} for b in blobs],
    }
    if annotations is not None:
        document["annotations"] = annotations
    return document


def add_manifest_blob(fake: FakeImageService, document: dict[str, Any], platform: dict[str, str] | None = None,
                      annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """The index entry for `document`."""
    data = json.dumps(document).encode()
    entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": fake.add_blob(data), "size": len(data)}
    if platform is not None:
        entry["platform"] = platform
    if annotations:
        entry["annotations"] = annotations
    return entry


FAMILIES = [
    ("org.criu", {"org.criu.checkpoint.container.name": "counter", "org.criu.checkpoint.engine.name": "containerd"}),
    ("io.kubernetes.cri-o", {"io.kubernetes.cri-o.annotations.checkpoint.name": "counter"}),
    ("io.podman", {"io.podman.annotations.checkpoint.name": "counter"}),
    ("io.podman", {"io.podman.annotations.checkpoint.runtime.name": "crun"}),
]


@pytest.mark.parametrize(("family", "annotations"), FAMILIES)
def test_each_annotation_family_is_recognised(tmp_path: Path, family: str, annotations: dict[str, str]) -> None:
    fake = FakeImageService()
    document = manifest(fake, {**annotations, "org.opencontainers.image.created": "2024-01-01T00:00:00Z"})
    target = fake.add_image("localhost/checkpoints/counter:1", OCI_MANIFEST, document)
    found = run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/checkpoints/counter:1"))
    assert found == CheckpointImage(
        name="localhost/checkpoints/counter:1", family=family,  # type: ignore[arg-type]
        annotations={**annotations, "org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
        layer=Layer(document["layers"][0]["digest"], LAYER_GZIP, document["layers"][0]["size"]),
        manifest_digest=target.digest)


def test_marker_on_the_target_descriptor_counts(tmp_path: Path) -> None:
    fake = FakeImageService()
    fake.add_image("localhost/cp:1", OCI_MANIFEST, manifest(fake),
                   annotations={"org.criu.checkpoint.container.name": "counter"})
    found = run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:1"))
    assert found is not None and found.family == "org.criu"


def test_plain_image_is_not_a_checkpoint(tmp_path: Path) -> None:
    fake = FakeImageService()
    fake.add_image("docker.io/library/busybox:1.36", OCI_MANIFEST,
                   manifest(fake, {"org.opencontainers.image.title": "busybox"}, layers=3))
    assert run(tmp_path, fake, lambda ch: checkpoint_image(ch, "docker.io/library/busybox:1.36")) is None
    assert run(tmp_path, fake, lambda ch: checkpoint_image(ch, "busybox:1.36")) is None  # normalised, found, plain


def test_unknown_image_is_none(tmp_path: Path) -> None:
    fake = FakeImageService()
    assert run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/nothing:here")) is None
    assert run(tmp_path, fake, lambda ch: checkpoint_image(ch, "sha256:" + "b" * 64)) is None


def test_short_name_is_normalised(tmp_path: Path) -> None:
    fake = FakeImageService()
    fake.add_image("docker.io/library/counter-cp:latest", OCI_MANIFEST, manifest(fake, FAMILIES[0][1]))
    found = run(tmp_path, fake, lambda ch: checkpoint_image(ch, "counter-cp"))
    assert found is not None and found.name == "docker.io/library/counter-cp:latest"


@pytest.mark.parametrize(("ref", "expected"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("user/app", "docker.io/user/app:latest"),
    ("localhost/cp", "localhost/cp:latest"),
    ("127.0.0.1:5000/cp:v1", "127.0.0.1:5000/cp:v1"),
    ("quay.io/a/b@sha256:" + "c" * 64, "quay.io/a/b@sha256:" + "c" * 64),
    ("sha256:" + "d" * 64, "sha256:" + "d" * 64),
])
def test_normalize(ref: str, expected: str) -> None:
    assert normalize(ref) == expected


def test_index_is_followed_to_the_amd64_manifest(tmp_path: Path) -> None:
    fake = FakeImageService()
    arm = manifest(fake, {"org.criu.checkpoint.container.name": "arm"})
    amd = manifest(fake, {"org.criu.checkpoint.container.name": "amd", "org.criu.checkpoint.pod.name": "pod-a"})
    attestation = manifest(fake, {})
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "annotations": {"org.criu.checkpoint.container.name": "from-index", "index.only": "yes"},
             "manifests": [
                 add_manifest_blob(fake, attestation, {"os": "unknown", "architecture": "unknown"},
                                   {"vnd.docker.reference.type": "attestation-manifest"}),
                 add_manifest_blob(fake, arm, {"os": "linux", "architecture": "arm64"}),
                 add_manifest_blob(fake, amd, {"os": "linux", "architecture": "amd64"}, {"entry.only": "yes"}),
             ]}
    fake.add_image("localhost/cp:multi", OCI_INDEX, index)
    found = run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:multi", arch="amd64"))
    assert found is not None
    assert found.layer.digest == amd["layers"][0]["digest"]
    assert found.manifest_digest == index["manifests"][2]["digest"]
    # index, then the entry's descriptor, then the manifest (which wins)
    assert dict(found.annotations) == {"org.criu.checkpoint.container.name": "amd", "index.only": "yes",
                                       "entry.only": "yes", "org.criu.checkpoint.pod.name": "pod-a"}
    found_arm = run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:multi", arch="arm64"))
    assert found_arm is not None and found_arm.layer.digest == arm["layers"][0]["digest"]


def test_marker_only_on_the_index(tmp_path: Path) -> None:
    fake = FakeImageService()
    only = manifest(fake)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "annotations": {"io.kubernetes.cri-o.annotations.checkpoint.name": "counter"},
             "manifests": [add_manifest_blob(fake, only)]}  # the only manifest, no platform
    fake.add_image("localhost/cp:index", OCI_INDEX, index)
    found = run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:index"))
    assert found is not None and found.family == "io.kubernetes.cri-o"
    assert found.layer.digest == only["layers"][0]["digest"]


def test_checkpoint_index_without_our_platform_is_refused(tmp_path: Path) -> None:
    fake = FakeImageService()
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "annotations": {"org.criu.checkpoint.container.name": "counter"},
             "manifests": [add_manifest_blob(fake, manifest(fake), {"os": "linux", "architecture": "arm64"})]}
    fake.add_image("localhost/cp:arm", OCI_INDEX, index)
    with pytest.raises(InvalidArgument, match="linux/amd64"):
        run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:arm", arch="amd64"))
    plain = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [add_manifest_blob(fake, manifest(fake), {"os": "linux", "architecture": "arm64"})]}
    fake.add_image("localhost/plain:arm", OCI_INDEX, plain)
    assert run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/plain:arm", arch="amd64")) is None


def test_lookup_by_image_id(tmp_path: Path) -> None:
    fake = FakeImageService()
    fake.add_image("docker.io/library/busybox:1.36", OCI_MANIFEST, manifest(fake, config=b'{"os":"linux"}'))
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}'
    document = manifest(fake, FAMILIES[1][1], config=config)
    target = fake.add_image("localhost/cp:1", OCI_MANIFEST, document)
    image_id = digest_of(config)  # what CRI calls the image ID
    by_config = run(tmp_path, fake, lambda ch: checkpoint_image(ch, image_id))
    assert by_config is not None and by_config.name == "localhost/cp:1"
    by_bare_hex = run(tmp_path, fake, lambda ch: checkpoint_image(ch, image_id.removeprefix("sha256:")))
    assert by_bare_hex == by_config
    by_target = run(tmp_path, fake, lambda ch: checkpoint_image(ch, target.digest))
    assert by_target == by_config


def test_record_named_by_id_is_used_directly(tmp_path: Path) -> None:
    # The CRI plugin records pulled images under their ID too: one Get, no List.
    fake = FakeImageService()
    image_id = "sha256:" + "e" * 64
    fake.add_image(image_id, OCI_MANIFEST, manifest(fake, FAMILIES[0][1]))
    found = run(tmp_path, fake, lambda ch: checkpoint_image(ch, image_id))
    assert found is not None and found.name == image_id
    assert len(fake.reads) == 1  # the manifest only


def test_record_named_by_id_gives_way_to_its_reference(tmp_path: Path) -> None:
    # The kubelet creates by image ID; the registry to admit is the pulled reference's.
    fake = FakeImageService()
    document = manifest(fake, FAMILIES[0][1])
    target = fake.add_image("127.0.0.1:5000/ckpt/app:1", OCI_MANIFEST, document)
    image_id = "sha256:" + "e" * 64
    fake.add_image(image_id, OCI_MANIFEST, document)
    fake.add_image("127.0.0.1:5000/other:1", OCI_MANIFEST, manifest(fake, FAMILIES[0][1], config=b"{}"))
    found = run(tmp_path, fake, lambda ch: checkpoint_image(ch, image_id))
    assert found is not None and found.name == "127.0.0.1:5000/ckpt/app:1"
    assert found.manifest_digest == target.digest


@pytest.mark.parametrize("corrupt", [b"{not json", b"[1, 2]", b"\xff\xfe",
                                     json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode(),
                                     json.dumps({"mediaType": OCI_INDEX, "layers": []}).encode()])
def test_corrupt_manifest_is_invalid(tmp_path: Path, corrupt: bytes) -> None:
    fake = FakeImageService()
    fake.add_image("localhost/cp:bad", OCI_MANIFEST, corrupt)
    with pytest.raises(InvalidArgument):
        run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:bad"))


def test_corrupt_index_is_invalid(tmp_path: Path) -> None:
    fake = FakeImageService()
    fake.add_image("localhost/cp:bad", OCI_INDEX, {"mediaType": OCI_INDEX, "manifests": [{"mediaType": 3}]})
    with pytest.raises(InvalidArgument, match="not a descriptor"):
        run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:bad"))


def test_manifest_not_matching_its_digest_is_invalid(tmp_path: Path) -> None:
    fake = FakeImageService()
    target = fake.add_image("localhost/cp:1", OCI_MANIFEST, manifest(fake, FAMILIES[0][1]))
    fake.blobs[target.digest] = fake.blobs[target.digest].replace(b"counter", b"Counter")
    with pytest.raises(InvalidArgument, match="does not match"):
        run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:1"))


def test_oversized_manifest_is_refused_before_reading(tmp_path: Path) -> None:
    fake = FakeImageService()
    fake.images["localhost/cp:big"] = images_pb2.Image(name="localhost/cp:big", target=descriptor_pb2.Descriptor(
        media_type=OCI_MANIFEST, digest="sha256:" + "f" * 64, size=5 << 20))
    with pytest.raises(InvalidArgument, match="allowed"):
        run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:big"))
    assert fake.reads == []


def test_missing_manifest_blob_is_none(tmp_path: Path) -> None:
    fake = FakeImageService()
    target = fake.add_image("localhost/cp:gone", OCI_MANIFEST, manifest(fake, FAMILIES[0][1]))
    del fake.blobs[target.digest]
    assert run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:gone")) is None


@pytest.mark.parametrize(("layers", "layer_type", "match"), [
    (2, LAYER_GZIP, "has 2 layers"),
    (0, LAYER_GZIP, "has 0 layers"),
    (1, "application/vnd.oci.image.layer.v1.tar+lz4", "not a tar layer"),
])
def test_unusable_checkpoint_image_is_invalid(tmp_path: Path, layers: int, layer_type: str, match: str) -> None:
    fake = FakeImageService()
    fake.add_image("localhost/cp:1", OCI_MANIFEST, manifest(fake, FAMILIES[0][1], layers=layers,
                                                               layer_type=layer_type))
    with pytest.raises(InvalidArgument, match=match):
        run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/cp:1"))


def test_other_target_media_type_is_none(tmp_path: Path) -> None:
    fake = FakeImageService()
    fake.add_image("localhost/old:1", "application/vnd.docker.distribution.manifest.v1+prettyjws", b"{}")
    assert run(tmp_path, fake, lambda ch: checkpoint_image(ch, "localhost/old:1")) is None


# -- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_type", [LAYER_GZIP, LAYER_TAR])
def test_export_writes_the_layer_and_it_opens_as_a_checkpoint(tmp_path: Path, layer_type: str) -> None:
    fake = FakeImageService()
    fake.add_image("localhost/cp:1", OCI_MANIFEST, manifest(fake, FAMILIES[0][1], layer_type=layer_type))

    async def test(channel: ContainerdImages) -> Path:
        found = await checkpoint_image(channel, "localhost/cp:1")
        assert found is not None and found.layer.media_type == layer_type
        return await export_layer(channel, found.layer, tmp_path / "layer")

    path = run(tmp_path, fake, test)
    assert path == tmp_path / "layer"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert digest_of(path.read_bytes()) in fake.blobs
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir(mode=0o700)
    archive = open_checkpoint(path, unpacked)
    assert archive.spec == SPEC and archive.config["name"] == "counter"


def test_export_links_the_blob_of_a_local_content_store_without_reading_it_through_containerd(
        tmp_path: Path) -> None:
    fake = FakeImageService()
    fake.add_image("localhost/cp:1", OCI_MANIFEST, manifest(fake, FAMILIES[0][1], layer_type=LAYER_TAR))
    fake.local_store(tmp_path / "content")

    async def test(channel: ContainerdImages) -> tuple[Layer, Path]:
        found = await checkpoint_image(channel, "localhost/cp:1")
        assert found is not None
        return found.layer, await export_layer(channel, found.layer, tmp_path / "layer")

    layer, path = run(tmp_path, fake, test)
    blob = tmp_path / "content" / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")
    assert path.stat().st_ino == blob.stat().st_ino  # the same file: nothing was copied
    assert layer.digest not in fake.reads
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir(mode=0o700)
    assert open_checkpoint(path, unpacked).config["name"] == "counter"


def _local_layer(tmp_path: Path) -> tuple[FakeImageService, Layer, Path]:
    """A layer blob in a local content store: the fake, its descriptor, and the blob's file."""
    fake = FakeImageService()
    data = layer_tar()
    digest = fake.add_blob(data)
    fake.local_store(tmp_path / "content")
    return fake, Layer(digest, LAYER_TAR, len(data)), tmp_path / "content" / "blobs" / "sha256" / digest[7:]


def test_export_of_a_corrupt_local_blob_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    fake, layer, blob = _local_layer(tmp_path)
    data = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off: the disk, not the stream
    blob.chmod(0o444)
    dest = tmp_path / "layer"
    with pytest.raises(InvalidArgument, match="does not match its digest"):
        run(tmp_path, fake, lambda ch: export_layer(ch, layer, dest))
    assert not dest.exists() and blob.stat().st_nlink == 1


@pytest.mark.parametrize("blob_is", ["missing", "a symlink", "group-writable", "a directory"])
def test_export_reads_through_containerd_when_the_local_blob_is_not_a_plain_file_of_roots(
        tmp_path: Path, blob_is: str) -> None:
    fake, layer, blob = _local_layer(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(blob.read_bytes())
    blob.unlink()
    if blob_is == "a symlink":
        blob.symlink_to(elsewhere)
    elif blob_is == "group-writable":
        blob.write_bytes(elsewhere.read_bytes())
        blob.chmod(0o664)
    elif blob_is == "a directory":
        blob.mkdir()
    dest = tmp_path / "layer"
    run(tmp_path, fake, lambda ch: export_layer(ch, layer, dest))
    assert fake.reads == [layer.digest]  # streamed through the content API
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600 and dest.stat().st_nlink == 1
    assert elsewhere.stat().st_nlink == 1


@pytest.mark.parametrize("plugin", [
    introspection_pb2.Plugin(type="io.containerd.content.v1", id="content", exports={}),
    introspection_pb2.Plugin(type="io.containerd.content.v1", id="content", exports={"root": "relative/dir"}),
])
def test_export_reads_through_containerd_when_its_content_plugin_names_no_root(
        tmp_path: Path, plugin: introspection_pb2.Plugin) -> None:
    fake, layer, _ = _local_layer(tmp_path)
    fake.content_plugin = plugin
    run(tmp_path, fake, lambda ch: export_layer(ch, layer, tmp_path / "layer"))
    assert fake.reads == [layer.digest]


def test_export_digest_mismatch_leaves_no_file(tmp_path: Path) -> None:
    fake = FakeImageService()
    good = layer_tar()
    digest = fake.add_blob(good)
    fake.blobs[digest] = good[:-1] + bytes([good[-1] ^ 1])  # same size, one bit off
    dest = tmp_path / "layer"
    with pytest.raises(InvalidArgument, match="does not match its digest"):
        run(tmp_path, fake, lambda ch: export_layer(ch, Layer(digest, LAYER_GZIP, len(good)), dest))
    assert not dest.exists()


@pytest.mark.parametrize("size_delta", [-1, 1])
def test_export_size_mismatch_leaves_no_file(tmp_path: Path, size_delta: int) -> None:
    fake = FakeImageService()
    data = layer_tar()
    digest = fake.add_blob(data)
    dest = tmp_path / "layer"
    with pytest.raises(InvalidArgument, match="descriptor"):
        run(tmp_path, fake, lambda ch: export_layer(ch, Layer(digest, LAYER_GZIP, len(data) + size_delta), dest))
    assert not dest.exists()


def test_export_missing_blob_is_not_found_and_leaves_no_file(tmp_path: Path) -> None:
    fake = FakeImageService()
    dest = tmp_path / "layer"
    with pytest.raises(NotFound):
        run(tmp_path, fake, lambda ch: export_layer(ch, Layer("sha256:" + "0" * 64, LAYER_GZIP, 10), dest))
    assert not dest.exists()


def test_export_never_overwrites(tmp_path: Path) -> None:
    fake = FakeImageService()
    data = layer_tar()
    digest = fake.add_blob(data)
    dest = tmp_path / "layer"
    dest.write_text("someone else's")
    with pytest.raises(AlreadyExists):
        run(tmp_path, fake, lambda ch: export_layer(ch, Layer(digest, LAYER_GZIP, len(data)), dest))
    assert dest.read_text() == "someone else's"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    with pytest.raises(AlreadyExists):
        run(tmp_path, fake, lambda ch: export_layer(ch, Layer(digest, LAYER_GZIP, len(data)), link))
    assert not (tmp_path / "target").exists()


def test_export_refuses_a_bad_digest(tmp_path: Path) -> None:
    fake = FakeImageService()
    with pytest.raises(InvalidArgument, match="not a sha256"):
        run(tmp_path, fake, lambda ch: export_layer(ch, Layer("md5:abc", LAYER_GZIP, 1), tmp_path / "layer"))
    assert not (tmp_path / "layer").exists()
