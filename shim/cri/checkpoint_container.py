"""RuntimeService/CheckpointContainer: CRI request in, domain call, CRI response out."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from shim.api.cri.v1 import api_pb2 as cri
from shim.checkpoint.checkpointer import Checkpointer, Request
from shim.errors import InvalidArgument
from shim.proxy.dispatch import Call, Handler

METHOD = "/runtime.v1.RuntimeService/CheckpointContainer"


# Kept from the call's deadline for the answer itself, when `written` runs after the checkpoint.
ANSWER_MARGIN = 1.0


def handler(checkpointer: Checkpointer,
            written: Callable[[Path, float | None], Awaitable[None]] | None = None) -> Handler:
    """`written(archive, seconds left)` runs after a checkpoint succeeded, before the answer (the export
    publishes it); it must return within the seconds left, so the deadline never fails a good checkpoint."""
    async def checkpoint_container(call: Call) -> bytes:
        started = time.monotonic()
        try:
            request = cri.CheckpointContainerRequest.FromString(call.request)
        except DecodeError as exc:
            raise InvalidArgument(f"grpc: error unmarshalling request: {exc}") from None
        if not request.container_id:
            raise InvalidArgument("container_id is required")
        # req.timeout is advisory: like containerd and CRI-O we obey the gRPC deadline.
        await checkpointer.checkpoint(Request(request.container_id, request.location, call.peer))
        if written is not None:
            left = None if call.timeout is None else call.timeout - (time.monotonic() - started) - ANSWER_MARGIN
            await written(Path(request.location), left)
        return bytes(cri.CheckpointContainerResponse().SerializeToString())

    return checkpoint_container
