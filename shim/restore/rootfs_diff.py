"""Applying a rootfs diff and deleted.files to a restored container's rootfs (the runtime shim's part).

The rootfs diff (`rootfs-diff.tar`) and `deleted.files` are applied to the new
container's rootfs by walking it one directory fd at a time with O_NOFOLLOW
(shim.restore.dirfd): a symlink, whether the image or an earlier diff member
planted it, is never followed. Symlinks are created (they belong to the
container) but a path through one is refused. The diff is checked in full
(shim.restore.rootfs_diff_plan) before anything is written, so a refused diff
leaves the rootfs as it was.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

from shim.errors import InvalidArgument
from shim.restore.dirfd import DIR_FLAGS, NEW_FILE, close_unless, remove_entry, walk
from shim.restore.rootfs_diff_plan import DiffPlan, Entry, classify
from shim.restore.tar_reader import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_SIZE, Budget, TarInput, stream_limit

_CAPABILITY = "SCHILY.xattr.security.capability"


def apply_rootfs_diff(diff_tar: Path, rootfs: Path, *, max_size: int = DEFAULT_MAX_SIZE,
                      max_members: int = DEFAULT_MAX_MEMBERS) -> None:
    """Apply a rootfs diff (plain or gzip tar, OCI whiteouts allowed) to `rootfs`.

    The whole diff is checked first (names, types, no path through a symlink,
    hard links only to regular files inside the rootfs, limits); nothing is
    written unless it all passes. Ownership, mode, mtime and file capabilities
    come from the diff. Device nodes are refused.
    """
    label = f"rootfs diff {diff_tar}"
    root_fd = os.open(rootfs, DIR_FLAGS)
    try:
        plan = DiffPlan(label, root_fd, Budget(label, max_size, max_members))
        with TarInput(diff_tar, label, stream_limit(max_size, max_members)) as tar:
            for member in tar.members():
                plan.check(member)
        applier = _DiffApplier(label, root_fd)
        with TarInput(diff_tar, label, stream_limit(max_size, max_members)) as tar:
            for member in tar.members():
                applier.apply(member, tar)
    finally:
        os.close(root_fd)


def apply_deleted_files(deleted: list[str], rootfs: Path) -> None:
    """Remove each listed path (absolute, inside `rootfs`) if present; never follows a symlink.

    All entries are checked before the first removal: one that is malformed or
    whose parent path holds a symlink is refused and nothing is removed.
    """
    if not isinstance(deleted, list):
        raise InvalidArgument("deleted.files is not a JSON array of paths")
    paths = [deleted_path_parts(entry) for entry in deleted]
    root_fd = os.open(rootfs, DIR_FLAGS)
    try:
        for check_only in (True, False):
            for parts in paths:
                label = f"deleted.files entry {'/' + '/'.join(parts)!r}"
                parent_fd = walk(label, root_fd, parts[:-1], create=False)
                if parent_fd is None or check_only:
                    close_unless(parent_fd, root_fd)
                    continue
                try:
                    remove_entry(parent_fd, parts[-1])
                finally:
                    close_unless(parent_fd, root_fd)
    finally:
        os.close(root_fd)


def deleted_path_parts(entry: object) -> tuple[str, ...]:
    """A deleted.files entry as path components below the rootfs; refuses anything but a plain absolute path."""
    if not isinstance(entry, str):
        raise InvalidArgument(f"deleted.files entry {entry!r} is not a string")
    if not entry.startswith("/") or "\0" in entry:
        raise InvalidArgument(f"deleted.files entry {entry!r} is not an absolute path")
    # normpath keeps a leading "//" (POSIX leaves its meaning open): refused like any other oddity.
    if entry == "/" or entry.startswith("//") or posixpath.normpath(entry) != entry or "/../" in entry + "/":
        raise InvalidArgument(f"deleted.files entry {entry!r} is not a normalised path below /")
    return tuple(entry[1:].split("/"))



class _DiffApplier:
    """Second pass: writes each member, walking from the rootfs fd again (never trusting pass one)."""

    def __init__(self, label: str, root_fd: int) -> None:
        self._label = label
        self._root_fd = root_fd
        self._written: set[tuple[str, ...]] = set()

    def apply(self, member: tarfile.TarInfo, tar: TarInput) -> None:
        entry = classify(self._label, member)
        where = f"{self._label}: member {member.name!r}"
        if entry.action == "skip":
            return
        if entry.action == "opaque":
            self._opaque(where, entry.parts)
            return
        create = entry.action != "whiteout"
        parent_fd = walk(where, self._root_fd, entry.parts[:-1], create=create)
        if parent_fd is None:
            return  # whiteout of something whose directory is gone already
        try:
            if create:
                self._written.update(entry.parts[:i] for i in range(1, len(entry.parts) + 1))
            self._apply(where, entry, member, parent_fd, tar)
        finally:
            close_unless(parent_fd, self._root_fd)

    def _apply(self, where: str, entry: Entry, member: tarfile.TarInfo, parent_fd: int, tar: TarInput) -> None:
        leaf = entry.parts[-1]
        mode = stat.S_IMODE(member.mode)
        if entry.action == "whiteout":
            remove_entry(parent_fd, leaf)
        elif entry.action == "directory":
            self._directory(parent_fd, leaf, member, mode)
        elif entry.action == "file":
            remove_entry(parent_fd, leaf)
            fd = os.open(leaf, NEW_FILE, 0o600, dir_fd=parent_fd)
            try:
                tar.copy(member, fd)
                _own(fd, member, mode)
                capability = member.pax_headers.get(_CAPABILITY)
                if capability is not None:
                    os.setxattr(fd, "security.capability", capability.encode("utf-8", "surrogateescape"))
                _set_mtime(lambda times: os.utime(fd, times), member)
            finally:
                os.close(fd)
        elif entry.action == "symlink":
            remove_entry(parent_fd, leaf)
            os.symlink(member.linkname, leaf, dir_fd=parent_fd)
            os.chown(leaf, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
            _set_mtime(lambda times: os.utime(leaf, times, dir_fd=parent_fd, follow_symlinks=False), member)
        elif entry.action == "fifo":
            remove_entry(parent_fd, leaf)
            os.mkfifo(leaf, 0o600, dir_fd=parent_fd)
            # Read-only and non-blocking, a fifo opens at once; the fd pins the very node made.
            fd = os.open(leaf, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            try:
                _own(fd, member, mode)
            finally:
                os.close(fd)
        elif entry.action == "hard link":
            self._hard_link(where, entry, parent_fd)

    def _directory(self, parent_fd: int, leaf: str, member: tarfile.TarInfo, mode: int) -> None:
        try:
            existing = os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            existing = None
        if existing is None or not stat.S_ISDIR(existing):
            if existing is not None:
                os.unlink(leaf, dir_fd=parent_fd)
            os.mkdir(leaf, 0o700, dir_fd=parent_fd)
        fd = os.open(leaf, DIR_FLAGS, dir_fd=parent_fd)
        try:
            _own(fd, member, mode)
        finally:
            os.close(fd)

    def _hard_link(self, where: str, entry: Entry, parent_fd: int) -> None:
        source_fd = walk(where, self._root_fd, entry.target[:-1], create=False)
        if source_fd is None:
            raise InvalidArgument(f"{where}: hard link target {'/'.join(entry.target)!r} does not exist")
        try:
            source = entry.target[-1]
            try:
                mode = os.stat(source, dir_fd=source_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                mode = 0
            if not stat.S_ISREG(mode):
                raise InvalidArgument(f"{where}: hard link target {'/'.join(entry.target)!r} "
                                      "is not a regular file")
            remove_entry(parent_fd, entry.parts[-1])
            os.link(source, entry.parts[-1], src_dir_fd=source_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        finally:
            close_unless(source_fd, self._root_fd)

    def _opaque(self, where: str, parts: tuple[str, ...]) -> None:
        """OCI opaque whiteout: the directory keeps only what this diff put in it."""
        dir_fd = walk(where, self._root_fd, parts, create=True)
        assert dir_fd is not None
        try:
            for name in os.listdir(dir_fd):
                if (*parts, name) not in self._written:
                    remove_entry(dir_fd, name)
        finally:
            close_unless(dir_fd, self._root_fd)
        self._written.update(parts[:i] for i in range(1, len(parts) + 1))


def _set_mtime(utime: Callable[[tuple[float, float]], None], member: tarfile.TarInfo) -> None:
    with contextlib.suppress(OverflowError, ValueError):  # a time the OS cannot store is not worth a failure
        utime((member.mtime, member.mtime))


def _own(fd: int, member: tarfile.TarInfo, mode: int) -> None:
    """Owner first: chown clears set-uid/set-gid bits, so the mode goes on after it."""
    os.fchown(fd, member.uid, member.gid)
    os.fchmod(fd, mode)

