"""Unpacking a checkpoint archive for restore (the proxy's part): hostile input, unpacked without trust.

A checkpoint archive may come from us, containerd 2.x, CRI-O or Podman, or from
someone who wants a host file read, written or deleted. So members of the
archive itself may only be regular files and directories, with relative names
free of `..`; everything is created below a fresh private directory with
O_NOFOLLOW|O_EXCL, mode 0600/0700 whatever the archive says, and no ownership
change. Size and member count are capped (shim.restore.tar_reader). On any
failure the directory is emptied again. The rootfs diff inside is only checked
and applied later, by the runtime shim (shim.restore.rootfs_diff).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim import archive_layout as layout
from shim.archive_layout import REQUIRED
from shim.errors import InvalidArgument, ResourceExhausted
from shim.restore.checkpoint_spec import Producer, detect_producer
from shim.restore.dirfd import DIR_FLAGS, NEW_FILE, close_unless, remove_entry, replace_fd
from shim.restore.lazy import Deferred
from shim.restore.rootfs_diff import deleted_path_parts
from shim.restore.tar_reader import (
    DEFAULT_MAX_SIZE,
    Budget,
    TarInput,
    count_members,
    member_kind,
    member_parts,
    stream_limit,
)

# A checkpoint archive holds CRIU's images (a handful per process), a few side files and one
# rootfs-diff.tar (whose own members have DEFAULT_MAX_MEMBERS): far fewer entries than this.
CHECKPOINT_MAX_MEMBERS = 100_000
# The saved container log: ours and containerd's, CRI-O's (named after its annotation), Podman's.
LOG_NAMES = (layout.CONTAINER_LOG, "io.kubernetes.cri-o.LogPath", "ctr.log")
# JSON side files are read into memory; none is anywhere near this big.
MAX_JSON_SIZE = 64 << 20


@dataclass(frozen=True, slots=True)
class CheckpointArchive:
    """An unpacked checkpoint archive; every path lies inside `dir`."""

    dir: Path
    spec: dict[str, Any]
    config: dict[str, Any]
    status: dict[str, Any] | None
    images_dir: Path
    rootfs_diff: Path | None
    deleted_files: list[str]
    log: Path | None
    producer: Producer
    # Members left in the archive (created sparse here): see shim.restore.lazy.
    deferred: tuple[Deferred, ...] = ()
    compression: str = "none"  # of the archive file: "gzip", "zstd" (then nothing can be deferred)


def open_checkpoint(path: Path, dest: Path, *, max_size: int = DEFAULT_MAX_SIZE,
                    max_members: int = CHECKPOINT_MAX_MEMBERS,
                    defer: Callable[[str, int], bool] | None = None,
                    images_follow: bool = False) -> CheckpointArchive:
    """Unpack the archive at `path` into the empty private directory `dest` and read it.

    Raises InvalidArgument for anything hostile, malformed or over the limits
    (`max_size` bytes of member data, `max_members` entries); `dest` is left
    empty on any failure. Files for which `defer(name, size)` holds are, in an
    uncompressed archive, created sparse at their size and listed in
    `deferred` instead of being copied. `images_follow`: the first part of a checkpoint whose CRIU
    images come later (shim.restore.second_part): no inventory required.
    """
    label = f"checkpoint archive {path}"
    dest_fd = os.open(dest, DIR_FLAGS)
    try:
        if os.listdir(dest_fd):
            raise ValueError(f"{dest}: the directory to unpack a checkpoint into must be empty")
        try:
            count_members(path, label, max_members)  # before anything is written
            unpacker = _Unpacker(label, dest_fd, Budget(label, max_size, max_members), defer, dest)
            with TarInput(path, label, stream_limit(max_size, max_members)) as tar:
                unpacker.run(tar)
            return dataclasses.replace(_load(label, dest, dest_fd, images_follow), deferred=tuple(unpacker.deferred),
                                       compression=tar.compression)
        except OSError as exc:
            _empty(dest_fd)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"no space left on the filesystem of {dest} unpacking {label}: "
                                        f"{exc.strerror}") from None
            raise
        except BaseException:
            _empty(dest_fd)
            raise
    finally:
        os.close(dest_fd)


def parse_deleted_files(data: bytes, label: str = layout.DELETED_FILES) -> list[str]:
    """`deleted.files` content: a JSON array of absolute, normalised paths other than "/"."""
    value = _parse_json(data, label)
    if not isinstance(value, list):
        raise InvalidArgument(f"{label} is not a JSON array of paths")
    for entry in value:
        deleted_path_parts(entry)
    return [str(entry) for entry in value]


class _Unpacker:
    def __init__(self, label: str, dest_fd: int, budget: Budget,
                 defer: Callable[[str, int], bool] | None = None, dest: Path | None = None) -> None:
        self._label = label
        self._dest = dest  # for messages
        self._dest_fd = dest_fd
        self._budget = budget
        self._defer = defer
        self.deferred: list[Deferred] = []
        # The directory of the last member, kept open: members come grouped by directory, and
        # opening every parent again made 200k tiny members in one directory take tens of seconds.
        self._last: tuple[tuple[str, ...], int] | None = None

    def run(self, tar: TarInput) -> None:
        try:
            for member in tar.members():
                self._budget.take(member)
                self._unpack(member, tar)
        finally:
            self._forget_parent()

    def _forget_parent(self) -> None:
        if self._last is not None:
            close_unless(self._last[1], self._dest_fd)
            self._last = None

    def _unpack(self, member: tarfile.TarInfo, tar: TarInput) -> None:
        parts = member_parts(self._label, member.name)
        kind = member_kind(member)
        if kind not in ("file", "directory"):
            raise InvalidArgument(f"{self._label}: member {member.name!r} is a {kind}; only regular files "
                                  "and directories may be in a checkpoint archive")
        if not parts:
            if kind == "directory":
                return  # "./": the archive's root
            raise InvalidArgument(f"{self._label}: member {member.name!r} is not a file name")
        parent_fd = self._cached_parent(member.name, parts[:-1])
        if kind == "directory":
            self._mkdir(member.name, parent_fd, parts[-1])
        else:
            self._file(member, parent_fd, parts, tar)

    def _cached_parent(self, name: str, parents: tuple[str, ...]) -> int:
        # Safe to keep: only regular files and directories are ever created here, so a directory
        # once opened cannot be swapped for a link under us by a later member.
        if self._last is not None and self._last[0] == parents:
            return self._last[1]
        self._forget_parent()
        fd = self._parent(name, parents)
        self._last = (parents, fd)
        return fd

    def _parent(self, name: str, parts: tuple[str, ...]) -> int:
        fd = self._dest_fd
        try:
            for part in parts:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                fd = replace_fd(fd, self._dest_fd, self._open_dir(name, fd, part))
        except BaseException:
            close_unless(fd, self._dest_fd)
            raise
        return fd

    def _mkdir(self, name: str, parent_fd: int, leaf: str) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf, 0o700, dir_fd=parent_fd)
        os.close(self._open_dir(name, parent_fd, leaf))

    def _open_dir(self, name: str, parent_fd: int, part: str) -> int:
        try:
            return os.open(part, DIR_FLAGS, dir_fd=parent_fd)
        except NotADirectoryError:
            raise InvalidArgument(f"{self._label}: member {name!r} needs {part!r} to be a directory, "
                                  "and an earlier member made it a file") from None

    def _file(self, member: tarfile.TarInfo, parent_fd: int, parts: tuple[str, ...], tar: TarInput) -> None:
        try:
            fd = os.open(parts[-1], NEW_FILE, 0o600, dir_fd=parent_fd)
        except FileExistsError:
            raise InvalidArgument(f"{self._label}: member {member.name!r} appears twice") from None
        name = "/".join(parts)
        try:
            if self._defer is not None and not tar.compressed and self._defer(name, member.size):
                os.ftruncate(fd, member.size)  # sparse: no data written, no space taken
                self.deferred.append(Deferred(name, member.offset_data, member.size))
            else:
                tar.copy(member, fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                where = self._dest / name if self._dest is not None else name
                raise ResourceExhausted(f"no space left unpacking {self._label}: writing {where}: "
                                        f"{exc.strerror}") from None
            raise
        finally:
            os.close(fd)


def _load(label: str, dest: Path, dest_fd: int, images_follow: bool = False) -> CheckpointArchive:
    missing = [name for name in REQUIRED if not _is_file(dest_fd, name)
               and not (images_follow and name == layout.INVENTORY)]
    if missing:
        raise InvalidArgument(f"{label} has no {', '.join(missing)}: not a checkpoint archive")
    spec = _read_object(label, dest_fd, layout.SPEC_DUMP)
    config = _read_object(label, dest_fd, layout.CONFIG_DUMP)
    status = _read_object(label, dest_fd, layout.STATUS_DUMP) if _is_file(dest_fd, layout.STATUS_DUMP) else None
    deleted: list[str] = []
    if _is_file(dest_fd, layout.DELETED_FILES):
        deleted = parse_deleted_files(_read(label, dest_fd, layout.DELETED_FILES), f"{label}: {layout.DELETED_FILES}")
    log = next((dest / name for name in LOG_NAMES if _is_file(dest_fd, name)), None)
    return CheckpointArchive(
        dir=dest, spec=spec, config=config, status=status, images_dir=dest / layout.IMAGES_DIR,
        rootfs_diff=dest / layout.ROOTFS_DIFF if _is_file(dest_fd, layout.ROOTFS_DIFF) else None,
        deleted_files=deleted, log=log, producer=detect_producer(spec))


def _is_file(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _read(label: str, dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size > MAX_JSON_SIZE:
            raise InvalidArgument(f"{label}: {name} is larger than {MAX_JSON_SIZE} bytes")
        return f.read()


def _read_object(label: str, dir_fd: int, name: str) -> dict[str, Any]:
    value = _parse_json(_read(label, dir_fd, name), f"{label}: {name}")
    if not isinstance(value, dict):
        raise InvalidArgument(f"{label}: {name} is not a JSON object")
    return value


def _parse_json(data: bytes, label: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{label} is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _empty(dir_fd: int) -> None:
    for name in os.listdir(dir_fd):
        with contextlib.suppress(OSError):  # best effort: the original error is the one to report
            remove_entry(dir_fd, name)
