"""The CRI calls a migration makes on one node, through that node's criu-shim proxy (async).

Going through the proxy, not containerd, is the point: the checkpoint and the restore are
criu-shim's (stop-after, TCP lock, lazy pages, admission policy, audit), exactly as for the
kubelet. gRPC errors become domain errors carrying the peer's own message.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc as cri_grpc
from shim.errors import Code, NotFound, ShimError, Upstream
from shim.local_channel import local_channel

T = TypeVar("T")


async def _call(pending: Awaitable[T]) -> T:
    try:
        return await pending
    except grpc.aio.AioRpcError as exc:
        raise Upstream(Code(exc.code().value[0]), exc.details() or exc.code().name) from None


@dataclass(frozen=True)
class PodView:
    id: str
    namespace: str
    name: str
    ready: bool
    ips: tuple[str, ...]
    annotations: dict[str, str]

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ContainerView:
    id: str
    name: str
    state: str
    pod_id: str


class Runtime:
    def __init__(self, socket: Path, timeout: float = 30.0) -> None:
        self._channel = local_channel(socket)
        self._cri = cri_grpc.RuntimeServiceStub(self._channel)
        self._timeout = timeout
        self.socket = socket

    async def close(self) -> None:
        await self._channel.close()

    async def container(self, container_id: str) -> ContainerView:
        reply = await _call(self._cri.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id),
                                                      timeout=self._timeout))
        status = reply.status
        listed = await _call(self._cri.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(id=status.id)), timeout=self._timeout))
        pod_id = listed.containers[0].pod_sandbox_id if listed.containers else ""
        return ContainerView(status.id, status.metadata.name, cri.ContainerState.Name(status.state), pod_id)

    async def running_containers(self, pod_id: str) -> list[str]:
        """The ids of the pod's running containers."""
        listed = await _call(self._cri.ListContainers(cri.ListContainersRequest(filter=cri.ContainerFilter(
            pod_sandbox_id=pod_id, state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING))),
            timeout=self._timeout))
        return [str(c.id) for c in listed.containers]

    async def created_with(self, annotation: str) -> list[str]:
        """The ids of the containers created and never started that carry `annotation`."""
        listed = await _call(self._cri.ListContainers(cri.ListContainersRequest(filter=cri.ContainerFilter(
            state=cri.ContainerStateValue(state=cri.CONTAINER_CREATED))), timeout=self._timeout))
        return [str(c.id) for c in listed.containers if annotation in c.annotations]

    async def verbose(self, container_id: str) -> tuple[cri.ContainerStatus, dict[str, Any]]:
        """The container's CRI status and its runtime's verbose info (pid, runtime spec, runtime type)."""
        reply = await _call(self._cri.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id,
                                                                                 verbose=True),
                                                      timeout=self._timeout))
        try:
            info: Any = json.loads(reply.info.get("info", "{}") or "{}")
        except ValueError:
            info = {}
        return reply.status, info if isinstance(info, dict) else {}

    async def stop(self, container_id: str) -> None:
        await _call(self._cri.StopContainer(cri.StopContainerRequest(container_id=container_id, timeout=0),
                                            timeout=self._timeout))

    async def pod(self, ref: str) -> PodView:
        """A pod by id (or unique id prefix) or NAMESPACE/NAME; NotFound naming the reference."""
        listed = await _call(self._cri.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=self._timeout))
        if "/" in ref:
            namespace, _, name = ref.partition("/")
            matches = [p for p in listed.items if p.metadata.namespace == namespace and p.metadata.name == name]
            matches = [p for p in matches if p.state == cri.SANDBOX_READY] or matches
        else:
            matches = [p for p in listed.items if p.id.startswith(ref)] if ref else []
        if len(matches) != 1:
            raise NotFound(f"pod {ref!r}: " + ("no such pod on this node" if not matches else
                                               f"{len(matches)} pods match"))
        return await self.pod_by_id(matches[0].id)

    async def pod_by_id(self, pod_id: str) -> PodView:
        status = (await _call(self._cri.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                                         timeout=self._timeout))).status
        ips = tuple(ip for ip in (status.network.ip, *(i.ip for i in status.network.additional_ips)) if ip)
        return PodView(status.id, status.metadata.namespace, status.metadata.name,
                       status.state == cri.SANDBOX_READY, ips, dict(status.annotations))

    async def sandbox_config(self, pod_id: str) -> cri.PodSandboxConfig:
        """The config the pod was created with (containerd keeps it in its verbose status)."""
        reply = await _call(self._cri.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id,
                                                                                   verbose=True),
                                                       timeout=self._timeout))
        raw: Any = json.loads(reply.info.get("info", "{}") or "{}").get("config")
        config = cri.PodSandboxConfig()
        if isinstance(raw, dict):
            json_format.ParseDict(raw, config, ignore_unknown_fields=True)
        return config

    async def pod_netns(self, pod_id: str) -> Path | None:
        """The pod's network namespace file (its runtime spec, in the verbose status)."""
        reply = await _call(self._cri.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id,
                                                                                   verbose=True),
                                                       timeout=self._timeout))
        spec: Any = json.loads(reply.info.get("info", "{}") or "{}").get("runtimeSpec", {})
        for ns in spec.get("linux", {}).get("namespaces", []) if isinstance(spec, dict) else []:
            if isinstance(ns, dict) and ns.get("type") == "network" and isinstance(ns.get("path"), str):
                return Path(ns["path"])
        return None

    async def live_pod_ips(self) -> dict[str, str]:
        """IP -> "namespace/name" of every ready pod."""
        listed = await _call(self._cri.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=self._timeout))
        owners: dict[str, str] = {}
        for item in listed.items:
            if item.state == cri.SANDBOX_READY:
                pod = await self.pod_by_id(item.id)
                owners.update(dict.fromkeys(pod.ips, pod.label))
        return owners

    async def checkpoint(self, container_id: str, location: Path, timeout: float) -> None:
        await _call(self._cri.CheckpointContainer(cri.CheckpointContainerRequest(
            container_id=container_id, location=str(location), timeout=int(timeout)), timeout=timeout + 5))

    async def restore(self, pod_id: str, archive: Path, name: str, timeout: float) -> str:
        """Create the container from `archive` in the pod and start it (the proxy restores it)."""
        container_id = await self.create_restored(pod_id, archive, name, timeout)
        await self.start_restored(container_id, timeout)
        return container_id

    async def create_restored(self, pod_id: str, archive: Path, name: str, timeout: float,
                              sandbox: cri.PodSandboxConfig | None = None,
                              annotations: dict[str, str] | None = None) -> str:
        """CreateContainer with `archive` as image: the proxy unpacks it; its container id.
        `sandbox`: the pod's config when the caller read it already (else read now)."""
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                     image=cri.ImageSpec(image=str(archive)), log_path=f"{name}.log",
                                     annotations=annotations or {})
        if sandbox is None:
            sandbox = await self.sandbox_config(pod_id)
        created = await _call(self._cri.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox), timeout=timeout))
        return str(created.container_id)

    async def start_restored(self, container_id: str, timeout: float) -> None:
        """StartContainer (CRIU's restore, through the proxy's relay); the container is removed on failure."""
        try:
            await _call(self._cri.StartContainer(cri.StartContainerRequest(container_id=container_id),
                                                 timeout=timeout))
        except ShimError:
            await self.remove(container_id)
            raise

    async def remove(self, container_id: str) -> bool:
        """Stop and remove a container (best effort: a failed restore must not leave it behind); whether it
        is gone (False: the node's criu-shim or containerd did not answer)."""
        try:
            await _call(self._cri.StopContainer(cri.StopContainerRequest(container_id=container_id, timeout=0),
                                                timeout=self._timeout))
            await _call(self._cri.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id),
                                                  timeout=self._timeout))
        except ShimError as exc:
            return exc.code == Code.NOT_FOUND
        return True
