"""An async facade over the containerd APIs the proxy itself uses.

containerd serves CRI and its native API on one socket. The proxy reads CRI
status (what the kubelet sees) and drives the native task API (pause, resume,
checkpoint), always in the CRI namespace `k8s.io`. gRPC errors are translated
into domain errors here, at this one seam.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2

from shim.api.containerd.runtime.v2.runc.options import oci_pb2 as runc_options
from shim.api.containerd.services.containers.v1 import (
    containers_pb2,
    containers_pb2_grpc,
)
from shim.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from shim.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from shim.api.containerd.types.task import task_pb2
from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc as cri_grpc
from shim.errors import (
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShimError,
    Unavailable,
    Unknown,
    Upstream,
)
from shim.local_channel import local_channel

NAMESPACE = "k8s.io"
_ERRORS: dict[grpc.StatusCode, Callable[[str], ShimError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}
T = TypeVar("T")


class Containerd:
    def __init__(self, socket: Path) -> None:
        self._channel = local_channel(socket)
        self._meta = (("containerd-namespace", NAMESPACE),)
        self._cri = cri_grpc.RuntimeServiceStub(self._channel)
        self._cri_images = cri_grpc.ImageServiceStub(self._channel)
        self._tasks = tasks_pb2_grpc.TasksStub(self._channel)
        self._containers = containers_pb2_grpc.ContainersStub(self._channel)
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        """For modules that speak other containerd services over the same connection."""
        return self._channel

    async def close(self) -> None:
        await self._channel.close()

    async def container_status(self, container_id: str) -> tuple[cri.ContainerStatus, dict[str, Any]]:
        """CRI status and the verbose info (pid, sandbox id, runtime spec)."""
        reply = await _call(self._cri.ContainerStatus(
            cri.ContainerStatusRequest(container_id=container_id, verbose=True)))
        return reply.status, json.loads(reply.info.get("info", "{}") or "{}")

    async def container_annotation_values(self, key: str) -> set[str]:
        """The values of annotation `key` over every container containerd knows (any state)."""
        reply = await _call(self._cri.ListContainers(cri.ListContainersRequest()))
        return {str(c.annotations[key]) for c in reply.containers if key in c.annotations}

    async def live_pod_ips(self) -> dict[str, str]:
        """IP -> "namespace/name" of every ready pod (an address must not be taken from one)."""
        ready = cri.PodSandboxFilter(state=cri.PodSandboxStateValue(state=cri.SANDBOX_READY))
        pods = await _call(self._cri.ListPodSandbox(cri.ListPodSandboxRequest(filter=ready)))
        # Asked all at once: a restore of TCP connections asks inside CreateContainer, which a lazy
        # migration's pause waits for, and one round trip after another grows with the node's pods.
        try:
            async with asyncio.TaskGroup() as asking:
                statuses = [(pod, asking.create_task(self.sandbox_status(pod.id))) for pod in pods.items]
        except* ShimError as failed:  # as one by one would: the first failure, as itself
            raise failed.exceptions[0] from None
        owners: dict[str, str] = {}
        for pod, asked in statuses:
            status = asked.result()
            for ip in (status.network.ip, *(i.ip for i in status.network.additional_ips)):
                if ip:
                    owners[ip] = f"{pod.metadata.namespace}/{pod.metadata.name}"
        return owners

    async def sandbox_process_label(self, sandbox_id: str) -> str | None:
        """The pod's SELinux process label, from its runtime spec (verbose status)."""
        reply = await _call(self._cri.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True)))
        info = json.loads(reply.info.get("info", "{}") or "{}")
        label = info.get("runtimeSpec", {}).get("process", {}).get("selinuxLabel")
        return str(label) if label else None

    async def sandbox_status(self, sandbox_id: str) -> cri.PodSandboxStatus:
        reply = await _call(self._cri.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)))
        status: cri.PodSandboxStatus = reply.status
        return status

    async def state_dir(self) -> Path | None:
        """containerd's own state directory (its `state`), from the CRI plugin's verbose status.

        The CRI plugin keeps its volatile files in <state>/io.containerd.grpc.v1.cri (1.6 to 2.4)
        and says so as `stateDir` in its config; None if this containerd does not say.
        """
        reply = await _call(self._cri.Status(cri.StatusRequest(verbose=True)))
        try:
            cri_state = json.loads(reply.info.get("config", "{}") or "{}").get("stateDir")
        except (ValueError, AttributeError):
            return None
        return Path(cri_state).parent if isinstance(cri_state, str) and cri_state.startswith("/") else None

    async def container_record(self, container_id: str) -> containers_pb2.Container:
        reply = await _call(self._containers.Get(containers_pb2.GetContainerRequest(id=container_id),
                                                 metadata=self._meta))
        record: containers_pb2.Container = reply.container
        return record

    async def upperdir(self, record: containers_pb2.Container) -> Path | None:
        """The overlayfs upper directory holding the container's rootfs changes."""
        reply = await _call(self._snapshots.Mounts(
            snapshots_pb2.MountsRequest(snapshotter=record.snapshotter, key=record.snapshot_key),
            metadata=self._meta))
        for mount in reply.mounts:
            for option in mount.options:
                if option.startswith("upperdir="):
                    return Path(option.removeprefix("upperdir="))
        return None

    async def pause(self, container_id: str) -> None:
        await _call(self._tasks.Pause(tasks_pb2.PauseTaskRequest(container_id=container_id), metadata=self._meta))

    async def resume(self, container_id: str) -> None:
        await _call(self._tasks.Resume(tasks_pb2.ResumeTaskRequest(container_id=container_id), metadata=self._meta))

    async def task_paused(self, container_id: str) -> bool | None:
        """Whether the task is PAUSED (or PAUSING) in containerd's view; None when there is no task."""
        try:
            reply = await _call(self._tasks.Get(tasks_pb2.GetRequest(container_id=container_id),
                                                metadata=self._meta))
        except NotFound:
            return None
        return reply.process.status in (task_pb2.PAUSED, task_pb2.PAUSING)

    async def cgroups_path(self, container_id: str) -> str | None:
        """The task's `linux.cgroupsPath` from its OCI spec (None if the container is gone)."""
        try:
            record = await self.container_record(container_id)
        except NotFound:
            return None
        path = json.loads(record.spec.value or b"{}").get("linux", {}).get("cgroupsPath")
        return str(path) if path else None

    async def forward(self, method: str, request: bytes, metadata: tuple[tuple[str, str], ...],
                      timeout: float | None) -> bytes:
        """Send a CRI call to containerd as it came; its errors come back unchanged (`Upstream`)."""
        call = self._channel.unary_unary(method)
        try:
            reply: bytes = await call(request, metadata=_forwardable(metadata), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise Upstream(Code(exc.code().value[0]), exc.details() or "") from None
        return reply

    async def image_status(self, image: str) -> cri.Image | None:
        reply = await _call(self._cri_images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=image))))
        found: cri.Image | None = reply.image if reply.HasField("image") else None
        return found

    async def stop_container(self, container_id: str) -> None:
        await _call(self._cri.StopContainer(cri.StopContainerRequest(container_id=container_id, timeout=0)))

    async def pull_image(self, image: str) -> None:
        await _call(self._cri_images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image))))

    async def checkpoint_task(self, container_id: str, options: runc_options.CheckpointOptions,
                              timeout: float | None) -> None:
        """runc checkpoint through containerd's runc shim, images written to `options.image_path`.

        With an image path containerd skips its content-store copy entirely
        (tasks service `Checkpoint`): this is the CRIU floor plus one RPC.
        """
        # containerd 1.6/1.7 resolve Any by the bare message name (gogo typeurl
        # registry), not by the "type.googleapis.com/" form Any.Pack writes.
        packed = any_pb2.Any(type_url=options.DESCRIPTOR.full_name, value=options.SerializeToString())
        await _call(self._tasks.Checkpoint(tasks_pb2.CheckpointTaskRequest(container_id=container_id,
                                                                          options=packed),
                                           metadata=self._meta, timeout=timeout))


def _forwardable(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The caller's own metadata; transport headers are gRPC's to set."""
    return tuple((k, v) for k, v in metadata
                 if not k.startswith(("grpc-", ":")) and k not in ("te", "content-type", "user-agent"))


async def _call(pending: Awaitable[T]) -> T:
    try:
        return await pending
    except grpc.aio.AioRpcError as exc:
        raise translate(exc) from None


def translate(exc: grpc.aio.AioRpcError) -> ShimError:
    """A containerd gRPC error as the domain error it is (the one table, for every containerd service)."""
    details = exc.details() or exc.code().name
    return _ERRORS.get(exc.code(), Unknown)(details)
