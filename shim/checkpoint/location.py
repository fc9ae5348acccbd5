"""Validation of the archive location the kubelet asks for, before anything is frozen."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shim.errors import InvalidArgument

STAGING_PREFIX = ".criu-shim-"


def validate(location: str) -> Path:
    if not location:
        raise InvalidArgument("checkpoint location is empty: an absolute path of the archive to write is required")
    path = Path(location)
    if not path.is_absolute():
        raise InvalidArgument(f"checkpoint location {location!r} is not an absolute path")
    if path.name in ("", ".", "..") or ".." in path.parts:
        raise InvalidArgument(f"checkpoint location {location!r} must name a file, without '..'")
    parent = path.parent
    if not parent.is_dir():
        raise InvalidArgument(f"checkpoint location {location!r}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"checkpoint location {location!r}: directory {parent} is not writable")
    if path.is_dir() or path.is_symlink():
        raise InvalidArgument(f"checkpoint location {location!r} is a directory or a symlink")
    return path


@contextmanager
def staging_dir(location: Path, container_id: str,
                before_create: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A private work dir beside the archive (same filesystem, so images never cross disks).

    `before_create` learns the path first (the journal: a crash must not leave
    an unrecorded directory of memory images behind).
    """
    path = location.parent / f"{STAGING_PREFIX}{container_id[:12]}-{secrets.token_hex(4)}"
    if before_create is not None:
        before_create(path)
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
