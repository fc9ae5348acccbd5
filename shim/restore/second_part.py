"""A restore whose CRIU images come after its container was created: a lazy migration's second part.

In a lazy migration the target's CreateContainer needs only what the source knows before it stops
anything (the spec, the config, the status and our facts); CRIU's images and the rootfs diff exist
only once the source's CRIU has dumped. So the migration receiver creates the container from that
first part while the source still runs, and names in the container annotation IMAGES_FROM where
the second part will be: the whole small archive, written once the dump is done. At StartContainer
the proxy unpacks it (the same hostile-input rules as any restore) into a fresh directory of the
restore, requires its spec to be the first part's, and moves CRIU's images, the rootfs diff, the
deleted files, /dev/shm, CRIU's log and statistics and the container's log into the restore's work
dir; only then does containerd start the task. CreateContainer (35-50 ms on the 2-core VM) thus
leaves the migration's pause.

A second part is restored eagerly or from its source's page server (a lazy migration), never from
memory left in the archive: the plan of a loop device over it would name the fresh directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shim import archive_layout as layout
from shim.annotations import IMAGES_FROM
from shim.api.cri.v1 import api_pb2 as cri
from shim.errors import InvalidArgument, PermissionDenied
from shim.restore import lazy
from shim.restore.checkpoint_unpack import LOG_NAMES, CheckpointArchive
from shim.restore.create_request import copy_log

SECOND = "second-part"  # the fresh directory in the work dir the second part is unpacked into
# What the second part brings; everything else in it (spec, config, status, facts) is the first part's.
MEMBERS = (layout.IMAGES_DIR, layout.ROOTFS_DIFF, layout.DELETED_FILES, layout.DEVSHM, layout.DUMP_LOG,
           layout.STATS_DUMP, *LOG_NAMES)


@dataclass(frozen=True, slots=True)
class Later:
    """A created restore's second part: where it will be, and where the container's log goes."""

    path: Path
    log_directory: str
    log_path: str


def requested(request: cri.CreateContainerRequest, allowed_dirs: Sequence[Path]) -> Later | None:
    """The second part a CreateContainer asks for (annotation IMAGES_FROM), or None.

    The path must be absolute and lie in an allowed directory, like the archive itself: the file
    need not exist yet (the source is still dumping), its directory must."""
    value = request.config.annotations.get(IMAGES_FROM)
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute() or path.name in ("", ".", ".."):
        raise InvalidArgument(f"annotation {IMAGES_FROM}: {value!r:.200} is not an absolute file path")
    parent = path.parent.resolve()
    allowed = [d.resolve() for d in allowed_dirs]
    if not any(parent.is_relative_to(d) for d in allowed):
        raise PermissionDenied(f"annotation {IMAGES_FROM}: {value!r:.200} is refused by rule restore.allowed_dirs: "
                               f"it is not under an allowed directory ({[str(d) for d in allowed]})")
    return Later(parent / path.name, request.sandbox_config.log_directory, request.config.log_path)


def check_first_part(archive: CheckpointArchive) -> None:
    """The first part holds no CRIU image and no rootfs diff: those come in the second."""
    if archive.images_dir.exists() or archive.rootfs_diff is not None:
        raise InvalidArgument(f"the checkpoint's first part holds {layout.IMAGES_DIR}/ or {layout.ROOTFS_DIFF}, "
                              f"which only its second part (annotation {IMAGES_FROM}) may bring")


def complete(later: Later, archive_path: Path, work: Path, unpack: Callable[..., CheckpointArchive],
             criu: Path | None, page_daemon: str) -> bool:
    """Unpack the second part at `archive_path` into `work` (blocking); whether it restores lazily.

    `work` is left as the first part made it on any failure (the fresh directory goes)."""
    second = work / SECOND
    second.mkdir(mode=0o700)
    try:
        unpack(archive_path, second)
        if (second / layout.SPEC_DUMP).read_bytes() != (work / layout.SPEC_DUMP).read_bytes():
            raise InvalidArgument(f"the checkpoint's second part {archive_path} is not of the container its first "
                                  "part created: their specs differ")
        moved = [name for name in MEMBERS if os.path.lexists(second / name)]
        for name in moved:
            os.rename(second / name, work / name)
        try:
            lazy.check_memory_images(work)
            remote = lazy.plan_remote(archive_path, work, criu, page_daemon)
        except BaseException:
            for name in moved:  # back as the first part left it: a retried start finds no half
                with contextlib.suppress(OSError):
                    os.rename(work / name, second / name)
            raise
        log = next((work / name for name in LOG_NAMES if (work / name).is_file()), None)
        copy_log(log, _log_target(later))
        return remote
    finally:
        shutil.rmtree(second, ignore_errors=True)


def _log_target(later: Later) -> cri.CreateContainerRequest:
    request = cri.CreateContainerRequest()
    request.sandbox_config.log_directory = later.log_directory
    request.config.log_path = later.log_path
    return request
