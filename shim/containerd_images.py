"""containerd's image and content services, for the checkpoint images a restore reads.

The image records (Images.Get, Images.List) and blobs (Content.Read) of the CRI
namespace, with gRPC errors translated at this seam, as shim.containerd does
for the rest. What the records and blobs mean (OCI indexes, manifests,
checkpoint annotations) is shim.restore.image's business, not this module's.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import grpc
import grpc.aio

from shim.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from shim.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from shim.containerd import NAMESPACE, translate

_META = (("containerd-namespace", NAMESPACE),)


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


def _record(image: images_pb2.Image) -> ImageRecord:
    target = image.target
    return ImageRecord(str(image.name), str(target.media_type), str(target.digest), int(target.size),
                       dict(target.annotations))
