"""RuntimeService/CreateContainer: a restore when the image is a checkpoint, else containerd's.

Every CreateContainer passes through here so that a checkpoint can be
recognised from the request body; an ordinary one is sent on to containerd
byte for byte (garbage included, so its errors stay containerd's own).
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from shim.api.cri.v1 import api_pb2 as cri
from shim.containerd import Containerd
from shim.proxy.dispatch import Call, Handler
from shim.restore.restorer import Restorer

METHOD = "/runtime.v1.RuntimeService/CreateContainer"


def handler(containerd: Containerd, restorer: Restorer) -> Handler:
    async def create_container(call: Call) -> bytes:
        try:
            request = cri.CreateContainerRequest.FromString(call.request)
        except DecodeError:
            request = None
        source = await restorer.source(request) if request is not None else None
        if source is None:
            return await containerd.forward(METHOD, call.request, call.metadata, call.timeout)
        reply = await restorer.create(request, source, call.peer, call.metadata, call.timeout)
        return bytes(reply.SerializeToString())

    return create_container
