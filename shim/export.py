"""Checkpoint images in a registry: push an archive as one (`criu-shim push`), pull its archive back,
and the reference under which a node publishes each kubelet checkpoint (`[export] registry`).

The image is `shim.restore.build_image`'s (one layer = the archive, both annotation families), pushed
blob by blob through `shim.registry` with the manifest's exact bytes, so the digest returned is the
digest the registry serves and a signer signs.

The published reference is derived from the archive's file name alone, so that `kubectl checkpoint`
(which learns the name from the kubelet's answer and has no node access) derives the same one:

    checkpoint-<pod>_<namespace>-<container>-<RFC 3339 time>.tar      (the kubelet's name)
    -> <registry>/<repository>/<pod>_<namespace>-<container>:<time, ':' as '-', '+' as '_'>
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from shim import cosign, oci, signing
from shim.arch import go_arch
from shim.config import ExportSettings
from shim.errors import InvalidArgument
from shim.image_reference import Reference, is_registry_host, is_repository
from shim.registry import RegistryClient
from shim.restore.build_image import archive_blob, checkpoint_image
from shim.sealed import Keyring

log = logging.getLogger(__name__)

DEFAULT_REPOSITORY = ExportSettings.repository
# pkg/kubelet/server: "checkpoint-%s-%s-%s.tar", podFullName (name_namespace), container, time.RFC3339
KUBELET_ARCHIVE = re.compile(
    r"^checkpoint-(?P<stem>[a-z0-9][a-z0-9.-]*_[a-z0-9][a-z0-9-]*-[a-z0-9][a-z0-9-]*)"
    r"-(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d))\.tar$")


@dataclass(frozen=True)
class Pushed:
    ref: Reference  # as asked (tag)
    digest: str  # manifest digest
    size: int  # the archive's bytes

    @property
    def pinned(self) -> Reference:
        """ref@digest: what a restore pod should name to get exactly this image."""
        return self.ref.with_digest(self.digest)


def push_checkpoint(archive: Path, ref: str | Reference, docker_config: Path | None = None,
                    signing_key: Path | None = None, keyring: Keyring | None = None) -> Pushed:
    """Build the checkpoint image of `archive` and push it as `ref`; returns its manifest digest.

    Blobs first, manifest last: a failure leaves at most unreferenced blobs, never a tag naming
    an incomplete image. With `signing_key`, the image's cosign signature follows (shim.cosign),
    the key loaded (and a bad one refused) before anything is sent."""
    target = push_target(ref)
    key = signing.load_signing_key(signing_key) if signing_key is not None else None
    image = checkpoint_image(archive, keyring)  # a sealed archive is pushed sealed; the keys read its names
    with RegistryClient(target.registry, docker_config) as client:
        for small in (image.config, *image.small_blobs):
            client.push_blob_bytes(target, small)
        client.push_blob(target, archive, image.layer_digest, image.layer_size)
        digest = client.push_manifest(target, image.manifest, oci.OCI_MANIFEST)
        if digest != image.digest:  # push_manifest hashes the bytes it sent: a mismatch is a bug of ours
            raise AssertionError(f"pushed {digest}, built {image.digest}")
        if key is not None:
            cosign.push_signature(target, digest, key, client)
    return Pushed(target, digest, image.layer_size)


def push_target(ref: str | Reference) -> Reference:
    """Where a push may go: a reference naming its registry and a tag (InvalidArgument otherwise)."""
    target = ref if isinstance(ref, Reference) else Reference.parse(ref)
    if target.digest is not None:
        raise InvalidArgument(f"push to a tag, not a digest: {target}")
    return target


def pull_checkpoint(ref: str | Reference, dest: Path, docker_config: Path | None = None) -> str:
    """Fetch the archive of the checkpoint image `ref` into `dest` (0600, must not exist); returns
    the manifest digest. Refuses images that are not checkpoint images (no annotation family, not
    exactly one layer)."""
    source = ref if isinstance(ref, Reference) else Reference.parse(ref)
    if dest.exists() or dest.is_symlink():
        raise InvalidArgument(f"{dest} exists: pull writes a new file and overwrites nothing")
    if not dest.parent.is_dir():
        raise InvalidArgument(f"{dest}: directory {dest.parent} does not exist")
    with RegistryClient(source.registry, docker_config) as client:
        body, media_type, digest = client.manifest(source)
        if media_type in oci.INDEX_TYPES:  # a multi-platform image: this machine's manifest, or its only one
            chosen = platform_manifest(body, str(source))
            body, media_type, digest = client.manifest(source.with_digest(chosen))
        layer = checkpoint_layer(body, media_type, str(source))
        client.pull_blob(source, layer, dest)
    return digest


def platform_manifest(body: bytes, name: str) -> str:
    """The digest of the linux/<this architecture> manifest of an index, or of its only manifest."""
    try:
        entries = json.loads(body).get("manifests")
    except (ValueError, AttributeError):
        raise InvalidArgument(f"{name}: index is not a JSON object") from None
    manifests = [e for e in entries or [] if isinstance(e, dict) and e.get("mediaType") in oci.MANIFEST_TYPES]
    arch = go_arch()
    for entry in manifests:
        platform = entry.get("platform") or {}
        if isinstance(platform, dict) and platform.get("os") == "linux" and platform.get("architecture") == arch:
            return str(entry.get("digest", ""))
    if len(manifests) == 1 and not (manifests[0].get("platform") or {}).get("architecture"):
        return str(manifests[0].get("digest", ""))
    raise InvalidArgument(f"{name}: the index has no image manifest for linux/{arch}")


def checkpoint_layer(body: bytes, media_type: str, name: str) -> str:
    """The digest of the blob holding the archive in a checkpoint image manifest (a tar layer, or a sealed blob)."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise InvalidArgument(f"{name}: manifest is not JSON") from None
    media_type = media_type or (doc.get("mediaType") if isinstance(doc, dict) else "") or ""
    if not isinstance(doc, dict) or media_type not in oci.MANIFEST_TYPES:
        raise InvalidArgument(f"{name} is not an image manifest (media type {media_type!r})")
    notes = doc.get("annotations") or {}
    if not any(key in notes for _, keys in oci.MARKERS for key in keys):
        raise InvalidArgument(f"{name} is not a checkpoint image: no checkpoint annotation")
    layers = doc.get("layers") or []
    if not isinstance(layers, list):
        raise InvalidArgument(f"{name} is not an image manifest: its layers are not a list")
    return str(archive_blob(layers, name).get("digest", ""))


def check_destination(registry: str, repository: str) -> None:
    """Where kubelet checkpoints are published: a registry host and a repository path, or InvalidArgument."""
    if not is_registry_host(registry):
        raise InvalidArgument(f"invalid registry {registry!r}: HOST[:PORT], with a dot or a port, or localhost")
    if not is_repository(repository):
        raise InvalidArgument(f"invalid repository {repository!r}: lowercase path components, a/b/c")


def kubelet_reference(archive_name: str, registry: str, repository: str = DEFAULT_REPOSITORY) -> Reference:
    """Where a node publishes the kubelet checkpoint `archive_name` (module docstring)."""
    match = KUBELET_ARCHIVE.match(archive_name)
    if not match:
        raise InvalidArgument(f"{archive_name!r} is not a kubelet checkpoint archive name "
                              "(checkpoint-<pod>_<namespace>-<container>-<time>.tar)")
    tag = match["time"].replace(":", "-").replace("+", "_")
    ref = Reference(registry, f"{repository}/{match['stem']}", tag)
    ref.check()
    return ref


@dataclass(frozen=True)
class Exporter:
    """Publishes each kubelet checkpoint under `kubelet_reference` (`[export]` of the config)."""

    registry: str
    repository: str = DEFAULT_REPOSITORY
    docker_config: Path | None = None
    signing_key: Path | None = None  # [signing] key_file: the image gets a cosign signature
    keyring: Keyring | None = None  # [encryption]'s keys: a sealed archive's image needs its names

    def wants(self, archive: Path) -> bool:
        return KUBELET_ARCHIVE.match(archive.name) is not None

    def publish(self, archive: Path) -> Pushed:
        ref = kubelet_reference(archive.name, self.registry, self.repository)
        pushed = push_checkpoint(archive, ref, self.docker_config, self.signing_key, self.keyring)
        log.info("published checkpoint %s as %s@%s", archive, ref, pushed.digest)
        return pushed
