"""A rootfs diff's first pass: every member classified and checked before anything is written.

OCI whiteouts (`.wh.NAME`, the opaque `.wh..wh..opq`) are understood; device
nodes, owners tar cannot express and names that escape are refused. DiffPlan
tracks what earlier members made of each path (a symlink, a file, a deleted
path...) and otherwise looks at the rootfs (lstat, never following), so a diff
that would write through a symlink is refused with the rootfs untouched.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass

from shim.errors import InvalidArgument
from shim.restore.tar_reader import Budget, member_kind, member_parts

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_NO_ID = (1 << 32) - 1  # (uid_t)-1 means "leave unchanged" to chown


@dataclass(frozen=True, slots=True)
class Entry:
    """A rootfs diff member, classified: what to do, and where."""

    action: str  # "skip", "whiteout", "opaque", or the member kind to create
    parts: tuple[str, ...]
    target: tuple[str, ...] = ()  # a hard link's target


def classify(label: str, member: tarfile.TarInfo) -> Entry:
    parts = member_parts(label, member.name)
    kind = member_kind(member)
    if not parts:
        if kind == "directory":
            return Entry("skip", parts)
        raise InvalidArgument(f"{label}: member {member.name!r} is not a file name")
    leaf = parts[-1]
    if leaf == _OPAQUE:
        return Entry("opaque", parts[:-1])
    if leaf.startswith(_WHITEOUT + _WHITEOUT):
        return Entry("skip", parts)  # other AUFS metadata, as containerd and Docker do
    if leaf.startswith(_WHITEOUT):
        name = leaf[len(_WHITEOUT):]
        if name in ("", ".", ".."):
            raise InvalidArgument(f"{label}: whiteout {member.name!r} names no file")
        return Entry("whiteout", (*parts[:-1], name))
    if not (0 <= member.uid < _NO_ID and 0 <= member.gid < _NO_ID):
        raise InvalidArgument(f"{label}: member {member.name!r} has owner {member.uid}:{member.gid}")
    if kind in ("file", "directory", "symlink", "fifo"):
        return Entry(kind, parts)
    if kind == "hard link":
        target = member_parts(label, member.linkname, f"hard link {member.name!r} to")
        if not target:
            raise InvalidArgument(f"{label}: hard link {member.name!r} has no target")
        if target == parts:
            raise InvalidArgument(f"{label}: hard link {member.name!r} points at itself")
        return Entry(kind, parts, target)
    raise InvalidArgument(f"{label}: member {member.name!r} is a {kind}; a rootfs diff may hold files, "
                          "directories, symlinks, hard links and fifos, not devices")


class DiffPlan:
    """First pass: refuses a diff that would write through a symlink, before anything is written.

    It tracks what earlier members made of each path (a symlink, a file, a
    deleted path...) and otherwise looks at the rootfs (lstat, never following).
    """

    def __init__(self, label: str, root_fd: int, budget: Budget) -> None:
        self._label = label
        self._root_fd = root_fd
        self._budget = budget
        self._made: dict[tuple[str, ...], str] = {}
        self._opaque: set[tuple[str, ...]] = set()
        self._children: dict[tuple[str, ...], set[str]] = {}  # of paths in _made or _opaque
        self._on_disk: dict[tuple[str, ...], str] = {}

    def check(self, member: tarfile.TarInfo) -> None:
        self._budget.take(member)
        entry = classify(self._label, member)
        where = f"{self._label}: member {member.name!r}"
        if entry.action == "skip":
            return
        if entry.action == "opaque":
            self._directory(where, entry.parts)
            self._opaque.add(entry.parts)
            self._index(entry.parts)
            return
        self._directory(where, entry.parts[:-1])
        if entry.action == "hard link":
            self._link_target(where, entry.target)
        if entry.action == "directory":
            self._record(entry.parts, "directory")  # merged with what is there, if a directory
            return
        self._forget_below(entry.parts)
        self._record(entry.parts, "deleted" if entry.action == "whiteout" else _as_kind(entry.action))

    def _directory(self, where: str, parts: tuple[str, ...]) -> bool:
        """Check every prefix of `parts` is, or will be made, a real directory.

        Returns whether the rootfs's own contents are still visible below it.
        """
        visible = True
        for index in range(1, len(parts) + 1):
            prefix = parts[:index]
            state = self._state(prefix, visible)
            if state in ("missing", "deleted"):
                visible = False  # made as an empty directory on the way
                continue
            if state == "symlink":
                raise InvalidArgument(f"{where} would be written through the symlink {'/'.join(prefix)!r}")
            if state != "directory":
                raise InvalidArgument(f"{where} needs {'/'.join(prefix)!r} to be a directory, not a {state}")
            if visible and (prefix in self._opaque
                            or (prefix in self._made and self._disk(prefix) != "directory")):
                visible = False  # emptied, or a directory made where the rootfs had something else
        return visible

    def _state(self, parts: tuple[str, ...], visible: bool) -> str:
        made = self._made.get(parts)
        if made is not None:
            return made
        return self._disk(parts) if visible else "missing"

    def _disk(self, parts: tuple[str, ...]) -> str:
        """The rootfs entry's kind; only asked once every parent is known to be a real directory."""
        state = self._on_disk.get(parts)
        if state is None:
            try:
                mode = os.stat("/".join(parts), dir_fd=self._root_fd, follow_symlinks=False).st_mode
                state = _mode_kind(mode)
            except (FileNotFoundError, NotADirectoryError):
                state = "missing"
            self._on_disk[parts] = state
        return state

    def _link_target(self, where: str, target: tuple[str, ...]) -> None:
        visible = self._directory(where, target[:-1])
        state = self._state(target, visible)
        if state != "file":
            raise InvalidArgument(f"{where} is a hard link to {'/'.join(target)!r}, which is "
                                  f"{'missing' if state in ('missing', 'deleted') else 'a ' + state}; "
                                  "only regular files inside the rootfs can be linked")

    def _record(self, parts: tuple[str, ...], state: str) -> None:
        self._made[parts] = state
        self._index(parts)

    def _index(self, parts: tuple[str, ...]) -> None:
        while parts:
            children = self._children.setdefault(parts[:-1], set())
            if parts[-1] in children:
                return
            children.add(parts[-1])
            parts = parts[:-1]

    def _forget_below(self, parts: tuple[str, ...]) -> None:
        """What this diff put below `parts` is gone once `parts` is replaced or deleted."""
        pending = [parts]
        while pending:
            path = pending.pop()
            for name in self._children.pop(path, ()):
                child = (*path, name)
                self._made.pop(child, None)
                self._opaque.discard(child)
                pending.append(child)


def _as_kind(action: str) -> str:
    return "file" if action == "hard link" else action


def _mode_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special file"
