"""The checkpoint archive's member names: the one place they are spelled.

The archive is read by others (checkpointctl, CRI-O, Podman, containerd 2.x), so most names are
theirs, kept verbatim: `spec.dump`, `config.dump`, `status.dump`, the CRIU images under
`checkpoint/`, `rootfs-diff.tar`, `deleted.files`, `stats-dump`, `dump.log`, Podman's
`devshm-checkpoint.tar`. `criu-shim.json` is ours (pod IPs, architecture, TCP mode). An unpacked
checkpoint (a restore's work dir, shim.handoff.RestorePlan) has the same layout.
"""

from __future__ import annotations

SPEC_DUMP = "spec.dump"  # the container's OCI spec
CONFIG_DUMP = "config.dump"  # CRI-O's ContainerConfig: name, image, times (Go encoding/json)
STATUS_DUMP = "status.dump"  # the CRI ContainerStatus
IMAGES_DIR = "checkpoint"  # CRIU's image files
INVENTORY = f"{IMAGES_DIR}/inventory.img"  # CRIU writes it last: its presence means a whole dump
ROOTFS_DIFF = "rootfs-diff.tar"  # what the container added or changed in its rootfs
DELETED_FILES = "deleted.files"  # JSON array of the rootfs paths it removed
STATS_DUMP = "stats-dump"  # CRIU's dump statistics
DUMP_LOG = "dump.log"  # CRIU's log of the dump
CONTAINER_LOG = "container.log"  # the container's CRI log at checkpoint time
DEVSHM = "devshm-checkpoint.tar"  # the pod's /dev/shm (Podman's name and format)
FACTS = "criu-shim.json"  # criu-shim's own facts: pod IPs, architecture, TCP mode

# Without these an archive is not a checkpoint (what every reader checks first).
REQUIRED = (SPEC_DUMP, CONFIG_DUMP, INVENTORY)
