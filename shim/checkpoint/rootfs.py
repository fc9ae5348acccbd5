"""The container's filesystem changes, read from its overlayfs upperdir.

Output mirrors CRI-O and Podman (podman `crutils.CRCreateRootFsDiffTar`):
`rootfs-diff.tar` is an uncompressed tar of what the container added or changed,
named relative to the rootfs without "./" ("etc/motd", "var/cache/"), and
`deleted.files` is a JSON array of the rootfs paths it removed ("/etc/motd").
Their restore untars the diff first, then RemoveAll()s each deleted path.

Choices, where the upperdir says more than that format can:
* Whiteouts (character devices 0:0, or files carrying `trusted.overlay.whiteout`)
  become `deleted` entries and are not archived.
* Opaque directories (`trusted.overlay.opaque` == "y": lower contents hidden) are
  archived as ordinary directories and listed in `RootfsDiff.opaque`. Like Podman and
  CRI-O we do not turn them into deletions: restore deletes *after* untarring, so
  listing the directory would delete its new contents. Lower-layer files hidden by
  an opaque directory therefore reappear after a restore.
* Every directory in the upperdir is archived, including those overlayfs merely
  copied up as parents; their metadata equals the lower one's, so that is harmless.
* Hard links are archived as separate regular files; sockets are skipped (Docker's
  and containerd's archivers do the same); fifos and device nodes are kept.
* Ownership, mode, mtime and `security.capability` are kept, with numeric ids only
  (user names on the host mean nothing in the container).
* Upperdirs using `redirect_dir` or `metacopy` are refused: their data lives partly
  in lower layers, which this module is not given.

The walk holds a directory fd per level and opens everything relative to it
without following symlinks, so a container that is still running cannot steer
the walk onto the host by swapping a directory for a symlink.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shim.checkpoint.archive import SourceChangedError, TarWriter, private_tar
from shim.checkpoint.metadata import go_json

_OVERLAY = "trusted.overlay."
_OPAQUE = _OVERLAY + "opaque"
_WHITEOUT = _OVERLAY + "whiteout"
_UNSUPPORTED = (_OVERLAY + "redirect", _OVERLAY + "metacopy")
_CAPABILITY = "security.capability"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class RootfsDiff:
    size: int
    deleted: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)


def write_rootfs_diff(upperdir: Path, out: Path) -> RootfsDiff:
    """Tar the changes recorded in `upperdir` into a new file `out` (0600); see module doc."""
    root_fd = os.open(upperdir, _DIR_FLAGS)
    try:
        with private_tar(out) as writer:
            return _DiffWalk(writer).run(root_fd)
    finally:
        os.close(root_fd)


def deleted_files_json(deleted: list[str]) -> bytes:
    return go_json(deleted)


def _sorted_names(dir_fd: int) -> Iterator[str]:
    with os.scandir(dir_fd) as it:
        names = sorted(entry.name for entry in it)
    return iter(names)


class _DiffWalk:
    """Depth-first, parents before children, names sorted within each directory."""

    def __init__(self, writer: TarWriter) -> None:
        self._writer = writer
        self._deleted: list[str] = []
        self._opaque: list[str] = []

    def run(self, root_fd: int) -> RootfsDiff:
        stack: list[tuple[int, str, Iterator[str]]] = [(root_fd, "", _sorted_names(root_fd))]
        try:
            while stack:
                dir_fd, prefix, names = stack[-1]
                name = next(names, None)
                if name is None:
                    stack.pop()
                    if dir_fd != root_fd:
                        os.close(dir_fd)
                    continue
                child_fd = self._visit(dir_fd, name, prefix + name)
                if child_fd is not None:
                    stack.append((child_fd, f"{prefix}{name}/", _sorted_names(child_fd)))
        finally:
            for dir_fd, _, _ in stack:
                if dir_fd != root_fd:
                    os.close(dir_fd)
        return RootfsDiff(self._writer.finish(), self._deleted, self._opaque)

    def _visit(self, dir_fd: int, name: str, rel: str) -> int | None:
        """Archive one entry; return an open fd if it is a directory to descend into."""
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            self._deleted.append("/" + rel)
        elif stat.S_ISDIR(mode):
            return self._add_dir(dir_fd, name, rel)
        elif stat.S_ISREG(mode):
            self._add_regular(dir_fd, name, rel)
        elif stat.S_ISLNK(mode):
            info = _entry(rel, tarfile.SYMTYPE, st)
            info.linkname = os.readlink(name, dir_fd=dir_fd)
            self._writer.add(info)
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            self._writer.add(_special(rel, st))
        return None  # sockets: nothing a restore could use

    def _add_dir(self, dir_fd: int, name: str, rel: str) -> int:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            xattrs = _overlay_xattrs(fd, rel)
            if xattrs.get(_OPAQUE) == b"y":
                self._opaque.append("/" + rel)
            self._writer.add(_entry(rel, tarfile.DIRTYPE, os.fstat(fd)))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _add_regular(self, dir_fd: int, name: str, rel: str) -> None:
        fd = _open_regular(dir_fd, name, rel)
        try:
            xattrs = _overlay_xattrs(fd, rel)
            if _WHITEOUT in xattrs:
                self._deleted.append("/" + rel)
                return
            st = os.fstat(fd)
            info = _entry(rel, tarfile.REGTYPE, st)
            info.size = st.st_size
            if _CAPABILITY in xattrs:
                capability = xattrs[_CAPABILITY].decode("utf-8", "surrogateescape")
                info.pax_headers = {"SCHILY.xattr." + _CAPABILITY: capability}
            self._writer.add_file(info, fd)
        finally:
            os.close(fd)


def _open_regular(dir_fd: int, name: str, rel: str) -> int:
    """Open for reading only if it is still a regular file, without ever opening anything else.

    O_PATH opens nothing (no device open side effects, no fifo hang); the type is
    checked on that handle, then the very same inode is reopened through /proc.
    """
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            raise SourceChangedError(f"/{rel}: changed type while being archived")
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


def _overlay_xattrs(fd: int, rel: str) -> dict[str, bytes]:
    """The overlay and capability xattrs of an open file; refuses layouts we cannot diff."""
    wanted = [key for key in os.listxattr(fd) if key.startswith(_OVERLAY) or key == _CAPABILITY]
    values = {key: os.getxattr(fd, key) for key in wanted}
    for key in _UNSUPPORTED:
        if key in values:
            raise ValueError(f"/{rel}: overlayfs {key.removeprefix(_OVERLAY)} is not supported")
    return values


def _entry(rel: str, kind: bytes, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = int(st.st_mtime)
    return info


def _special(rel: str, st: os.stat_result) -> tarfile.TarInfo:
    if stat.S_ISFIFO(st.st_mode):
        return _entry(rel, tarfile.FIFOTYPE, st)
    info = _entry(rel, tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE, st)
    info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    return info
