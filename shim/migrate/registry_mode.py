"""`criu-shim migrate --mode registry --image REF`: the checkpoint travels as an OCI image (source side).

The order of `source.py`, with the registry in the archive's place:

1. before anything stops: `--image` is a registry reference (a tag, never a digest), the
   signing key (if configured) loads, and the registry answers and accepts a push with this
   node's docker config credentials (an upload opened and cancelled: `RegistryClient.check_push`);
   the target's preflight also checks that its criu-shim admits images of that registry
   (`restore.allowed_registries`);
2. the stop-after checkpoint, as in eager mode (or the kept `--checkpoint` of a failed attempt);
3. the archive becomes a checkpoint image and is pushed (`shim.export.push_checkpoint`: blobs
   first, manifest last, signed and sealed as this node's config says), pinned by its digest;
4. the target's receiver is asked to restore `REF@DIGEST`: it pulls it the kubelet's way (CRI
   PullImage through its criu-shim) and creates the container with that image
   (`registry_restore.py`), starts it and claims the pod IPs (with the hold, the default, it claimed
   them right before 2 and lets the packets it held go on now); here the pod IPs are released and
   the local archive deleted, as in eager mode. The image stays in the registry (it is the
   operator's reference; a later restore or an audit may want it).

A failure from 3 on leaves the source stopped, its archive kept and, once pushed, the image too;
the message names both and the retry command.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim import export, signing
from shim.errors import FailedPrecondition, InvalidArgument, ShimError, Upstream
from shim.image_reference import Reference
from shim.migrate import channel, source
from shim.migrate.runtime import ContainerView, PodView, Runtime
from shim.registry import RegistryClient
from shim.sealed import Keyring

MODE = "registry"


@dataclass(frozen=True)
class ImageTarget:
    """Where `--mode registry` pushes the checkpoint image, and how (this node's config)."""

    ref: Reference  # a tag: the one given, or migrate-<container>-<time> when none was
    tag_given: bool
    signing_key: Path | None = None  # [signing] key_file: the image gets a cosign signature
    keyring: Keyring | None = None  # [encryption]: a sealed archive is pushed sealed
    docker_config: Path | None = None  # None: $DOCKER_CONFIG/config.json, else ~/.docker/config.json

    def for_container(self, container_id: str) -> Reference:
        if self.tag_given:
            return self.ref
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return Reference(self.ref.registry, self.ref.repository, f"migrate-{container_id[:12]}-{stamp}")


def image_target(mode: str, image: str | None, signing_key: Path | None = None, keyring: Keyring | None = None,
                 docker_config: Path | None = None) -> ImageTarget | None:
    """`--mode` and `--image` checked together (InvalidArgument): an ImageTarget for registry mode."""
    if mode != MODE:
        if image is not None:
            raise InvalidArgument(f"--image is for --mode registry; --mode {mode} sends the checkpoint to the target "
                                  "directly")
        return None
    if image is None:
        raise InvalidArgument("--mode registry needs --image REGISTRY[:PORT]/REPOSITORY[:TAG]: where the checkpoint "
                              "image is pushed (the target node pulls it from there)")
    ref = export.push_target(image)  # the grammar's errors, and "push to a tag, not a digest"
    last = image.rsplit("/", 1)[-1]
    return ImageTarget(ref, ":" in last, signing_key, keyring, docker_config)


def check(target: ImageTarget) -> None:
    """Blocking: everything about the push that can fail before the source is stopped."""
    try:
        if target.signing_key is not None:
            signing.load_signing_key(target.signing_key)
        with RegistryClient(target.ref.registry, target.docker_config) as client:
            client.check_push(target.ref)
    except ShimError as exc:
        raise Upstream(exc.code, f"{exc.message}; nothing was stopped") from None


def preflight_fields(target: ImageTarget | None) -> dict[str, Any]:
    """What the target's preflight needs to know of the image: its repository, for its admission rules."""
    return {} if target is None else {"image": f"{target.ref.registry}/{target.ref.repository}"}


@dataclass(frozen=True)
class RegistryMigrated(source.Migrated):
    image: str = ""  # REF@DIGEST, as the target pulled it
    push_seconds: float = 0.0
    pull_seconds: float = 0.0

    def lines(self) -> str:
        return (super().lines() + f"\nimage {self.image}; push {self.push_seconds:.2f} s, pull on the target "
                f"{self.pull_seconds:.2f} s")


async def migrate(request: source.MigrateRequest, target: ImageTarget, runtime: Runtime, container: ContainerView,
                  addresses: list[str], reader: Any, writer: Any, ready: dict[str, Any],
                  pod: PodView) -> RegistryMigrated:
    """Steps 2-4 (module docstring), on a channel whose preflight the target has answered."""
    await source.switch(request, pod, addresses, ready, reader, writer)  # the target holds from here on
    started = time.monotonic()
    try:
        return await _migrate(request, target, runtime, container, addresses, reader, writer, ready, started)
    except source.OutcomeUnknown:  # the target may run it: its addresses stay with it
        raise
    except ShimError:
        await source.claim_back(request, pod, addresses, ready)  # the target released them
        raise


async def _migrate(request: source.MigrateRequest, target: ImageTarget, runtime: Runtime, container: ContainerView,
                   addresses: list[str], reader: Any, writer: Any, ready: dict[str, Any],
                   started: float) -> RegistryMigrated:
    archive = request.checkpoint or await source._checkpoint(request, runtime, container, writer)
    checkpointed = time.monotonic()
    ref = target.for_container(container.id)
    try:
        pushed = await asyncio.to_thread(export.push_checkpoint, archive, ref, target.docker_config,
                                         target.signing_key, target.keyring)
    except ShimError as exc:
        with contextlib.suppress(Exception):
            await channel.send(writer, {"op": "abort"})
        raise source.MigrationFailed(f"the push of the checkpoint image {ref} failed: {exc.message}; "
                                     f"{stopped(container, archive, ref, None, request)}") from None
    except OSError as exc:  # the archive unreadable (a --checkpoint of someone else's making)
        raise source.MigrationFailed(f"the checkpoint image could not be built: {exc}; "
                                     f"{stopped(container, archive, ref, None, request)}") from None
    pushed_at = time.monotonic()
    asked = False
    try:
        await channel.send(writer, {"op": "restore_image", "image": str(pushed.pinned)})
        asked = True
        done = await source.ask(reader, writer, None, request.timeout, "the target node could not restore it")
    except ShimError as exc:
        if asked and not isinstance(exc, FailedPrecondition):  # the target has the image: no answer came
            raise source.OutcomeUnknown(f"{exc.message}; {source.UNKNOWN}; "
                                        f"{stopped(container, archive, ref, pushed.pinned, request)}") from None
        raise source.MigrationFailed(f"{exc.message}; {stopped(container, archive, ref, pushed.pinned, request)}") \
            from None
    finished = time.monotonic()
    await source.release(request, addresses)
    if not request.keep_checkpoint:
        archive.unlink(missing_ok=True)
    pull = float(done.get("pull_seconds", 0.0))
    return RegistryMigrated(
        str(done.get("container_id")), str(ready.get("pod")), tuple(addresses), pushed.size,
        checkpointed - started, pushed_at - checkpointed + pull, float(done.get("restore_seconds", 0.0)),
        finished - started, image=str(pushed.pinned), push_seconds=pushed_at - checkpointed, pull_seconds=pull)


def stopped(container: ContainerView, archive: Path, ref: Reference, pinned: Reference | None,
            request: source.MigrateRequest) -> str:
    """The source's state after a failure from the checkpoint on, and how to go on from it."""
    pushed = f"its checkpoint image is {pinned} and " if pinned is not None else ""
    return (f"the source container {container.id} is stopped, {pushed}its checkpoint is kept at {archive}: retry "
            f"with `criu-shim migrate {container.id} --checkpoint {archive} --mode registry --image {ref} --to "
            f"{request.to} --to-pod {request.to_pod} ...`, or restore it on this node by creating a container whose "
            "image is that path")
