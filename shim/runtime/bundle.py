"""What the proxy told the shim about a restore, read from the OCI bundle (pure-ish)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Annotations the proxy sets on a restored container (allow-listed for the
# "criu" runtime handler, so containerd copies them into the OCI spec).
RESTORE_DIR = "restore.criu-shim.io/dir"


@dataclass(frozen=True)
class RestorePlan:
    """Where the unpacked checkpoint is: CRIU images, rootfs diff, deleted files."""

    dir: Path

    @property
    def images(self) -> Path:
        return self.dir / "checkpoint"

    @property
    def rootfs_diff(self) -> Path:
        return self.dir / "rootfs-diff.tar"

    @property
    def deleted_files(self) -> Path:
        return self.dir / "deleted.files"


def restore_plan(bundle: Path) -> RestorePlan | None:
    """The plan if the bundle's spec marks a restore, else None."""
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = spec.get("annotations", {}).get(RESTORE_DIR)
    if not value:
        return None
    path = Path(value)
    return RestorePlan(path) if path.is_absolute() else None
