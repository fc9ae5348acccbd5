"""The target's side of `criu-shim migrate --mode registry`: restore from a checkpoint image, the kubelet's way.

At preflight the image's registry must be one this node's criu-shim restores from
(`restore.allowed_registries`: its own rule, checked here too so that a refusal comes before
the source stops). At restore the source names the image pinned by digest (`REF@sha256:...`);
the receiver pulls it through its criu-shim (CRI PullImage: containerd fetches it with its own
registry config, hosts.toml and credentials) and creates the container with the image ID the
pull answered as its image (what the kubelet sends; criu-shim's restore-from-image path), starts
it, and only then has the pod IPs claimed (the caller's `claim`, as for an archive).

A failure removes what this side made: a created container, and the image it pulled for it
(unless it was on the node before). The source keeps its archive and the pushed image.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc as cri_grpc
from shim.errors import Code, FailedPrecondition, InvalidArgument, ShimError, Upstream
from shim.image_reference import Reference
from shim.migrate import channel
from shim.migrate.runtime import PodView, Runtime, _call
from shim.policy import admit_registry


def check_preflight(message: dict[str, Any], allowed_registries: tuple[str, ...] | None) -> None:
    """The source's image repository is one this node's criu-shim restores from (else PermissionDenied,
    the proxy's own words). `None`: this receiver was not told its proxy's rule (its proxy checks it then)."""
    image = channel.field(message, "image", str)
    ref = Reference.parse(image)  # InvalidArgument with the grammar's words
    if allowed_registries is not None:
        admit_registry(str(ref), allowed_registries)


def pinned_image(message: dict[str, Any]) -> Reference:
    ref = Reference.parse(channel.field(message, "image", str))
    if ref.digest is None:
        raise InvalidArgument(f"checkpoint image {ref} is not pinned by digest (REF@sha256:...)")
    return ref


class Images:
    """The CRI calls of a restore from an image, through this node's criu-shim (a channel of its own)."""

    def __init__(self, runtime: Runtime) -> None:
        self._channel = grpc.aio.insecure_channel(f"unix://{runtime.socket}")
        self._images = cri_grpc.ImageServiceStub(self._channel)
        self._runtime = cri_grpc.RuntimeServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def present(self, ref: str) -> bool:
        reply = await _call(self._images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)),
                                                     timeout=30))
        return bool(reply.image.id)

    async def pull(self, ref: str, sandbox: cri.PodSandboxConfig, timeout: float) -> str:
        """PullImage, as the kubelet asks it (with the pod's sandbox config); the image ID it answers."""
        reply = await _call(self._images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref),
                                                                        sandbox_config=sandbox), timeout=timeout))
        return str(reply.image_ref)

    async def remove_image(self, ref: str) -> None:
        try:
            await _call(self._images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)), timeout=60))
        except ShimError:
            pass  # best effort: the restore's own error is the one to report

    async def create(self, pod_id: str, image_id: str, name: str, sandbox: cri.PodSandboxConfig,
                     timeout: float) -> str:
        """CreateContainer with the checkpoint image as the container's image: criu-shim restores from it."""
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                     image=cri.ImageSpec(image=image_id), log_path=f"{name}.log")
        created = await _call(self._runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox), timeout=timeout))
        return str(created.container_id)

    async def start(self, container_id: str, timeout: float) -> None:
        await _call(self._runtime.StartContainer(cri.StartContainerRequest(container_id=container_id),
                                                 timeout=timeout))


async def current_pod(runtime: Runtime, pod: PodView) -> PodView:
    """The prepared pod, still there and ready (it may have been deleted during the checkpoint and push)."""
    try:
        now = await runtime.pod_by_id(pod.id)
    except ShimError as exc:
        if exc.code != Code.NOT_FOUND:  # the node's criu-shim or containerd down: not a deleted pod
            raise Upstream(exc.code, f"this node's criu-shim could not look up target pod {pod.label} "
                           f"({exc.message}); nothing was restored") from None
        raise FailedPrecondition(f"target pod {pod.label} was deleted during the migration; nothing was restored") \
            from None
    if not now.ready:
        raise FailedPrecondition(f"target pod {pod.label} was stopped during the migration; nothing was restored")
    return now


async def restore(runtime: Runtime, pod: PodView, name: str, message: dict[str, Any], timeout: float,
                  claim: Callable[[PodView], Awaitable[None]],
                  allowed_registries: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Pull, create, start, claim (module docstring); the answer for the source."""
    image = pinned_image(message)
    # Again, on the name this node is asked to pull (a peer's message is input, whatever its preflight said):
    # this node's containerd contacts no registry its criu-shim would not restore from.
    check_preflight(message, allowed_registries)
    started = time.monotonic()
    pod = await current_pod(runtime, pod)
    images = Images(runtime)
    try:
        sandbox = await runtime.sandbox_config(pod.id)
        there_before = await images.present(str(image))
        image_id = await images.pull(str(image), sandbox, timeout)
        pulled = time.monotonic()
        try:
            container_id = await images.create(pod.id, image_id, name, sandbox, timeout)
            try:
                await images.start(container_id, timeout)
                await claim(pod)
            except ShimError:
                await runtime.remove(container_id)  # stopped and removed: never a half-running container
                raise
        except ShimError:
            if not there_before:
                await images.remove_image(image_id)
            raise
    finally:
        await images.close()
    return {"container_id": container_id, "image": str(image), "image_id": image_id,
            "pull_seconds": round(pulled - started, 3), "restore_seconds": round(time.monotonic() - pulled, 3)}
