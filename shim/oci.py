"""OCI and CRI names everyone agrees on: media types, the checkpoint image annotation families, and
the annotations containerd's CRI writes into a container's spec. Spelled here only.

Standard library only: scripts/build-images.py (run by plain python3) reads it too.
"""

from __future__ import annotations

from typing import Literal

# Media types (OCI image spec, and Docker's, which containerd still serves).
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# Layers the archive reader takes: plain tar, gzip, zstd (it goes by the magic bytes).
LAYER_TYPES = frozenset({
    OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
})

# criu-shim's own: a sealed (encrypted, shim.sealed) checkpoint archive in a checkpoint image. No layer
# type to containerd (its images.IsLayerType: the "application/vnd.oci.image.layer." prefix and the Docker
# rootfs.diff types), so a pull or import fetches and keeps the blob but never unpacks it: under a tar
# type the unpacker met ciphertext and every CRI PullImage of the image failed.
SEALED_CHECKPOINT = "application/vnd.criu-shim.checkpoint.sealed.v1"

# Image annotations naming an image (the OCI layout's index, containerd's import).
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_IMAGE_NAME = "io.containerd.image.name"

# The three families of checkpoint image annotations; each engine recognises only its own.
Family = Literal["org.criu", "io.kubernetes.cri-o", "io.podman"]
CRIU_PREFIX = "org.criu.checkpoint."  # checkpointctl build, containerd
CRIO_PREFIX = "io.kubernetes.cri-o.annotations.checkpoint."  # CRI-O, buildah (the Kubernetes blog)
PODMAN_PREFIX = "io.podman.annotations.checkpoint."  # podman container checkpoint --create-image
# Marker keys, in this order: an image marked by more than one family is reported as the first.
MARKERS: tuple[tuple[Family, tuple[str, ...]], ...] = (
    ("org.criu", (CRIU_PREFIX + "container.name",)),
    ("io.kubernetes.cri-o", (CRIO_PREFIX + "name",)),
    ("io.podman", (PODMAN_PREFIX + "name", PODMAN_PREFIX + "runtime.name")),
)

# What containerd's CRI (and CRI-O, under its own keys) records in a container's OCI spec.
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
CRI_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
CRI_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CRIO_METADATA = "io.kubernetes.cri-o.Metadata"

# criu-shim's own: on a checkpoint image's manifest, the archive's signature (shim.signing's
# cosign blob format). The uncompressed layer is the archive, so it signs the layer's digest.
ARCHIVE_SIGNATURE = "io.criu-shim.checkpoint.archive-signature"
