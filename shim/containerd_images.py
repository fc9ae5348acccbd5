"""containerd's image and content services, for the checkpoint images a restore reads.

The image records (Images.Get, Images.List) and blobs (Content.Read) of the CRI
namespace, with gRPC errors translated at this seam, as shim.containerd does
for the rest; and where a blob lies on this node's disk, when containerd's
content store is the local one (its plugin says where: Introspection.Plugins). What the records and blobs mean (OCI indexes, manifests,
checkpoint annotations) is shim.restore.image's business, not this module's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from shim.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from shim.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from shim.api.containerd.services.introspection.v1 import introspection_pb2, introspection_pb2_grpc
from shim.containerd import NAMESPACE, translate

_META = (("containerd-namespace", NAMESPACE),)
# containerd's local content store (1.6 to 2.4): the plugin, and its layout under the root it exports.
CONTENT_PLUGIN = ("io.containerd.content.v1", "content")
_BLOB_DIGEST = re.compile(r"(sha256|sha512):([a-f0-9]{64}|[a-f0-9]{128})")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """An image as containerd records it: its name and its target descriptor, as stored (unchecked)."""

    name: str
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


class ContainerdImages:
    """The image store of containerd's CRI namespace, over the proxy's connection."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._images = images_pb2_grpc.ImagesStub(channel)
        self._content = content_pb2_grpc.ContentStub(channel)
        self._introspection = introspection_pb2_grpc.IntrospectionStub(channel)
        self._content_root: Path | None | bool = False  # False: not asked yet

    async def get(self, name: str) -> ImageRecord | None:
        """The record named `name`, or None if there is none."""
        try:
            reply = await self._images.Get(images_pb2.GetImageRequest(name=name), metadata=_META)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise translate(exc) from None
        return _record(reply.image)

    async def list(self) -> list[ImageRecord]:
        try:
            reply = await self._images.List(images_pb2.ListImagesRequest(), metadata=_META)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc) from None
        return [_record(image) for image in reply.images]

    async def read(self, digest: str) -> AsyncGenerator[tuple[int, bytes], None]:
        """The blob `digest` as it arrives: (offset, data) pieces, unchecked; the stream is cancelled on exit."""
        call = self._content.Read(content_pb2.ReadContentRequest(digest=digest), metadata=_META)
        try:
            async for reply in call:
                yield int(reply.offset), bytes(reply.data)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc) from None
        finally:
            call.cancel()


    async def local_blob(self, digest: str) -> Path | None:
        """Where containerd's local content store keeps the blob `digest` (`<root>/blobs/<alg>/<hex>`),
        or None when its content store is not a local one it names (a proxy plugin, an error).

        Only a path: whether a file is there, and what it holds, is for the caller to check.
        """
        match = _BLOB_DIGEST.fullmatch(digest)
        root = await self._local_content_root()
        if match is None or root is None:
            return None
        return root / "blobs" / match.group(1) / match.group(2)

    async def _local_content_root(self) -> Path | None:
        if self._content_root is False:
            kind, name = CONTENT_PLUGIN
            request = introspection_pb2.PluginsRequest(filters=[f'type=="{kind}",id=="{name}"'])
            try:
                reply = await self._introspection.Plugins(request, metadata=_META)
            except grpc.aio.AioRpcError as exc:
                log.info("containerd does not say where its content store is (%s): blobs are read through it",
                         exc.details())
                self._content_root = None
                return None
            roots = [str(p.exports.get("root", "")) for p in reply.plugins if not p.HasField("init_err")]
            self._content_root = Path(roots[0]) if len(roots) == 1 and roots[0].startswith("/") else None
        return self._content_root if isinstance(self._content_root, Path) else None


def _record(image: images_pb2.Image) -> ImageRecord:
    target = image.target
    return ImageRecord(str(image.name), str(target.media_type), str(target.digest), int(target.size),
                       dict(target.annotations))
