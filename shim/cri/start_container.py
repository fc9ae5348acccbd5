"""RuntimeService/StartContainer: containerd's, then a check that a restore really restored.

A container created for restore must be started by criu-shim's runtime
handler; on a node whose containerd does not use it, the container would
silently start afresh from its command. That is refused, not hidden.
For a restored container, containerd's StartContainer is CRIU's restore
(runc restore through the relay): its time is the `criu_restore` stage. When it
fails, the error quotes CRIU's reason and names its log, which the relay kept.
On containerd 2.x the pod's shim is opened to our handler for the restored task's creation
(shim.restore.pod_shim): else containerd would create it over the pod's shim, past our launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from google.protobuf.message import DecodeError

from shim.api.cri.v1 import api_pb2 as cri
from shim.containerd import NAMESPACE, Containerd
from shim.errors import ShimError
from shim.metrics import record_failure, record_restore_stage
from shim.proxy.dispatch import Call, Handler
from shim.restore import criulogs
from shim.restore.pod_shim import PodShims, pod_bootstrap
from shim.restore.restorer import Restorer

METHOD = "/runtime.v1.RuntimeService/StartContainer"


def handler(containerd: Containerd, restorer: Restorer, logs: Path | None = None) -> Handler:
    """`logs`: where a failed restore's CRIU logs are kept (shim.restore.criulogs), to quote them."""
    pod_shims = PodShims()
    state_dirs: list[Path | None] = []  # containerd's state dir, asked at the first restore

    async def pod_bootstrap_of(container_id: str) -> Path | None:
        """The `bootstrap.json` of the container's pod task, where containerd keeps one (2.x)."""
        if not state_dirs:
            state_dirs.append(await containerd.state_dir())
        if state_dirs[0] is None:
            return None
        sandbox = restorer.sandbox_of(container_id)  # the restore's CreateContainer named it
        if sandbox is None:
            _, info = await containerd.container_status(container_id)
            sandbox = info.get("sandboxID")
        try:
            return pod_bootstrap(state_dirs[0], NAMESPACE, sandbox) if isinstance(sandbox, str) else None
        except ValueError:
            return None

    async def start_container(call: Call) -> bytes:
        try:
            container_id: str | None = cri.StartContainerRequest.FromString(call.request).container_id
        except DecodeError:
            container_id = None  # containerd will say what is wrong with it; nothing of ours to check
        restoring = container_id is not None and restorer.is_pending(container_id)
        started, since = time.monotonic(), criulogs.now()
        try:
            if restoring and container_id:
                await restorer.complete(container_id)  # CRIU's images of a restore created from its first part
            async with contextlib.AsyncExitStack() as opened:
                bootstrap = await pod_bootstrap_of(container_id) if restoring and container_id else None
                if bootstrap is not None:
                    assert container_id is not None
                    restored = container_id
                    await opened.enter_async_context(
                        pod_shims.through_handler(bootstrap, lambda: restorer.handed_over(restored)))
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
