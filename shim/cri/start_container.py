"""RuntimeService/StartContainer: containerd's, then a check that a restore really restored.

A container created for restore must be started by criu-shim's runtime
handler; on a node whose containerd does not use it, the container would
silently start afresh from its command. That is refused, not hidden.
For a restored container, containerd's StartContainer is CRIU's restore
(runc restore through the relay): its time is the `criu_restore` stage. When it
fails, the error quotes CRIU's reason and names its log, which the relay kept.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from google.protobuf.message import DecodeError

from shim.api.cri.v1 import api_pb2 as cri
from shim.containerd import Containerd
from shim.errors import ShimError
from shim.metrics import record_failure, record_restore_stage
from shim.proxy.dispatch import Call, Handler
from shim.restore import criulogs
from shim.restore.engine import Restorer

METHOD = "/runtime.v1.RuntimeService/StartContainer"


def handler(containerd: Containerd, restorer: Restorer, logs: Path | None = None) -> Handler:
    """`logs`: where a failed restore's CRIU logs are kept (shim.restore.criulogs), to quote them."""
    async def start_container(call: Call) -> bytes:
        try:
            container_id: str | None = cri.StartContainerRequest.FromString(call.request).container_id
        except DecodeError:
            container_id = None  # containerd will say what is wrong with it; nothing of ours to check
        restoring = container_id is not None and restorer.is_pending(container_id)
        started, since = time.monotonic(), criulogs.now()
        try:
            reply = await containerd.forward(METHOD, call.request, call.metadata, call.timeout)
            if container_id is not None:
                await restorer.after_start(container_id)  # refuses a restore that was started afresh
        except ShimError as exc:
            if restoring:
                assert container_id is not None
                record_failure("restore", exc)
                if logs is not None:
                    explained = await asyncio.to_thread(criulogs.explain_start_failure, exc, logs, container_id,
                                                        since - 1.0)
                    restorer.start_ended(container_id, explained)
                    raise explained from None
                restorer.start_ended(container_id, exc)
            raise
        except BaseException as exc:  # cancelled: the attempt ends all the same
            if restoring:
                assert container_id is not None
                restorer.start_ended(container_id, exc)
            raise
        if restoring:
            assert container_id is not None
            record_restore_stage("criu_restore", time.monotonic() - started)
            restorer.start_ended(container_id, None)  # the restore's audit line: Create and Start
        return reply

    return start_container
