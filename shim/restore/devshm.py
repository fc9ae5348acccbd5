"""The checkpoint's /dev/shm (`devshm-checkpoint.tar`), put back into the new pod's before CRIU restores.

Counterpart of shim.checkpoint.devshm, which owns the member's name and says
what is saved. The member is hostile input like the rest of an archive:

* only directories and regular files, names free of `..` and absolute paths,
  parents before children, no name twice, numeric owners in range, size and
  entry count capped (the same limits the checkpoint side writes under);
* the whole member is checked before anything is written;
* files are created below the pod's tmpfs by walking it one directory fd at a
  time with O_NOFOLLOW|O_EXCL: the pod's /dev/shm is shared with its other
  containers, and a symlink one of them planted is never followed;
* what is already in the new pod's /dev/shm wins: an entry of the same name is
  left as it is (a sibling container, or a container restored before this one
  from the same pod, may be using it), and only what is missing is added;
* set-uid/set-gid bits are dropped; holes stay holes (a tmpfs file may be
  larger than the memory it uses, and writing its zeros could fill the tmpfs);
* on a failure (the tmpfs full) what this restore created is removed again.

It is applied only into the pod's own tmpfs (shim.checkpoint.devshm.pod_shm_dir):
never into the host's /dev/shm (host IPC) or a volume mounted at /dev/shm.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from shim.checkpoint.devshm import MAX_DEPTH, MAX_ENTRIES, MAX_SIZE, MEMBER, pod_shm_dir
from shim.errors import InvalidArgument, ResourceExhausted
from shim.restore.tar_reader import Budget, TarInput, member_kind, member_parts, stream_limit

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PAGE = 4096
_CHUNK = 64 * _PAGE
_ZERO_PAGE = bytes(_PAGE)
_MAX_ID = (1 << 32) - 1  # (uid_t)-1 means "leave unchanged" to chown
log = logging.getLogger(__name__)


@dataclass
class Outcome:
    created: list[str] = field(default_factory=list)  # relative names, in creation order
    kept: list[str] = field(default_factory=list)  # already in the new pod's /dev/shm: left alone


def restore_devshm(unpacked: Path, bundle: Path) -> Outcome | None:
    """Fill the new container's pod /dev/shm from the unpacked checkpoint at `unpacked`, if it carries one.

    `bundle` is the new container's OCI bundle; its config.json says where the
    pod's /dev/shm is on the host. None when there is nothing to do.
    """
    member = unpacked / MEMBER
    if not _is_regular(member):
        return None
    try:
        spec = json.loads((bundle / "config.json").read_bytes())
    except (OSError, ValueError):
        spec = None
    target = pod_shm_dir(spec) if isinstance(spec, dict) else None
    if target is None:
        log.warning("the checkpoint carries the pod's /dev/shm, but the new container's /dev/shm is not "
                    "its pod's own (host IPC, or a volume): left as it is")
        return None
    outcome = apply_devshm(member, target)
    log.info("put %d entries of the checkpoint's /dev/shm into %s (%d already there, kept)",
             len(outcome.created), target, len(outcome.kept))
    return outcome


def apply_devshm(tar_path: Path, target: Path, *, max_size: int = MAX_SIZE,
                 max_entries: int = MAX_ENTRIES) -> Outcome:
    """Check the whole tar at `tar_path`, then add what `target` lacks; see the module doc."""
    label = f"the checkpoint's /dev/shm ({MEMBER})"
    with TarInput(tar_path, label, stream_limit(max_size, max_entries)) as tar:
        _check(label, tar, Budget(label, max_size, max_entries))
    root_fd = os.open(target, _DIR_FLAGS)
    outcome = Outcome()
    try:
        with TarInput(tar_path, label, stream_limit(max_size, max_entries)) as tar:
            for member in tar.members():
                _apply(label, root_fd, member, tar, outcome)
    except BaseException as exc:
        _undo(root_fd, outcome.created)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"the new pod's /dev/shm ({target}) has no room for {label}: "
                                    f"{exc.strerror}") from None
        raise
    finally:
        os.close(root_fd)
    return outcome


def _check(label: str, tar: TarInput, budget: Budget) -> None:
    directories: set[tuple[str, ...]] = {()}
    seen: set[tuple[str, ...]] = set()
    for member in tar.members():
        budget.take(member)
        parts = member_parts(label, member.name)
        kind = member_kind(member)
        where = f"{label}: member {member.name!r}"
        if kind not in ("file", "directory"):
            raise InvalidArgument(f"{where} is a {kind}; /dev/shm may only hold files and directories")
        if not parts:
            if kind != "directory":
                raise InvalidArgument(f"{where} is not a file name")
            continue  # "./": the directory itself
        if len(parts) > MAX_DEPTH + 1:
            raise InvalidArgument(f"{where} is nested deeper than {MAX_DEPTH} directories")
        if parts in seen:
            raise InvalidArgument(f"{where} appears twice")
        if parts[:-1] not in directories:
            raise InvalidArgument(f"{where} comes before its directory {'/'.join(parts[:-1])!r}")
        if not (0 <= member.uid < _MAX_ID and 0 <= member.gid < _MAX_ID):
            raise InvalidArgument(f"{where} has owner {member.uid}:{member.gid}")
        seen.add(parts)
        if kind == "directory":
            directories.add(parts)


def _apply(label: str, root_fd: int, member: tarfile.TarInfo, tar: TarInput, outcome: Outcome) -> None:
    parts = member_parts(label, member.name)
    if not parts:
        return  # the pod's /dev/shm keeps its own mode and owner
    rel = "/".join(parts)
    parent_fd = _open_parent(root_fd, parts[:-1])
    if parent_fd is None:
        outcome.kept.append(rel)  # its directory is something else in the new pod: theirs wins
        return
    try:
        leaf = parts[-1]
        if _exists(parent_fd, leaf):
            outcome.kept.append(rel)
            return
        if member.isdir():
            os.mkdir(leaf, 0o700, dir_fd=parent_fd)
            outcome.created.append(rel)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=parent_fd)
            mode = stat.S_IMODE(member.mode) & 0o1777
        else:
            fd = os.open(leaf, _NEW_FILE, 0o600, dir_fd=parent_fd)
            outcome.created.append(rel)
            mode = stat.S_IMODE(member.mode) & 0o777
        try:
            if member.isreg():
                _write_sparse(fd, member, tar)
            os.fchown(fd, member.uid, member.gid)  # owner first: chown clears set-id bits
            os.fchmod(fd, mode)
            with contextlib.suppress(OverflowError, ValueError):
                os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
    finally:
        if parent_fd != root_fd:
            os.close(parent_fd)


def _write_sparse(fd: int, member: tarfile.TarInfo, tar: TarInput) -> None:
    """The member's data at `fd`, zero pages left as holes."""
    os.ftruncate(fd, member.size)
    offset = 0
    for chunk in tar.chunks(member, _CHUNK):
        view = memoryview(chunk)
        for start in range(0, len(view), _PAGE):
            page = view[start:start + _PAGE]
            if page != _ZERO_PAGE[:len(page)]:
                _pwrite_all(fd, page, offset + start)
        offset += len(chunk)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _open_parent(root_fd: int, parts: tuple[str, ...]) -> int | None:
    """An fd of the directory `parts` below `root_fd`, None unless every step is a real directory."""
    fd = root_fd
    for part in parts:
        try:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise
            child = None
        if fd != root_fd:
            os.close(fd)
        if child is None:
            return None
        fd = child
    return fd


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _undo(root_fd: int, created: list[str]) -> None:
    """Remove what this restore made, children before parents; best effort (the first error is reported)."""
    for rel in reversed(created):
        parent, _, leaf = rel.rpartition("/")
        parent_fd = _open_parent(root_fd, tuple(parent.split("/")) if parent else ())
        if parent_fd is None:
            continue
        try:
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                    os.rmdir(leaf, dir_fd=parent_fd)
                else:
                    os.unlink(leaf, dir_fd=parent_fd)
        finally:
            if parent_fd != root_fd:
                os.close(parent_fd)
