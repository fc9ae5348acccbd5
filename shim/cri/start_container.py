"""RuntimeService/StartContainer: containerd's, then a check that a restore really restored.

A container created for restore must be started by criu-shim's runtime
handler; on a node whose containerd does not use it, the container would
silently start afresh from its command. That is refused, not hidden.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from shim.api.cri.v1 import api_pb2 as cri
from shim.containerd import Containerd
from shim.proxy.dispatch import Call, Handler
from shim.restore.engine import Restorer

METHOD = "/runtime.v1.RuntimeService/StartContainer"


def handler(containerd: Containerd, restorer: Restorer) -> Handler:
    async def start_container(call: Call) -> bytes:
        reply = await containerd.forward(METHOD, call.request, call.metadata, call.timeout)
        try:
            container_id = cri.StartContainerRequest.FromString(call.request).container_id
        except DecodeError:
            return reply  # containerd accepted it, so it decoded there; nothing of ours to check
        await restorer.after_start(container_id)
        return reply

    return start_container
