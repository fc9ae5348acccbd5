"""RuntimeService/CheckpointContainer: CRI request in, domain call, CRI response out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from shim.api.cri.v1 import api_pb2 as cri
from shim.checkpoint.engine import Checkpointer, Request
from shim.errors import InvalidArgument
from shim.proxy.dispatch import Call, Handler

METHOD = "/runtime.v1.RuntimeService/CheckpointContainer"


def handler(checkpointer: Checkpointer, written: Callable[[Path], Awaitable[None]] | None = None) -> Handler:
    """`written(archive)` runs after a checkpoint succeeded, before the answer (the export publishes it)."""
    async def checkpoint_container(call: Call) -> bytes:
        try:
            request = cri.CheckpointContainerRequest.FromString(call.request)
        except DecodeError as exc:
            raise InvalidArgument(f"grpc: error unmarshalling request: {exc}") from None
        if not request.container_id:
            raise InvalidArgument("container_id is required")
        # req.timeout is advisory: like containerd and CRI-O we obey the gRPC deadline.
        await checkpointer.checkpoint(Request(request.container_id, request.location, call.peer))
        if written is not None:
            await written(Path(request.location))
        return bytes(cri.CheckpointContainerResponse().SerializeToString())

    return checkpoint_container
