"""The pod's /dev/shm, saved at checkpoint: the `devshm-checkpoint.tar` member (Podman's name and format).

POSIX shared memory (shm_open: PostgreSQL's dynamic shared memory, Python's
multiprocessing.shared_memory, Chromium) is a file in /dev/shm. Under the CRI
that is a tmpfs of the pod, mounted into each container from the host, so for
CRIU it is an external mount: a process that maps such a file is dumped with a
reference to it, not its content, and its restore needs the file back in place
("Can't open file dev/shm/PostgreSQL.N on restore").

What is saved: the whole pod /dev/shm, taken while the container is frozen,
right after the dump. Every container of a pod shares that one tmpfs (they
share the IPC namespace), and nothing records which container made or uses a
file, so all of it is saved; files of sibling containers, which keep running,
are taken as they are at that instant. Only the pod's own tmpfs is saved, the
one containerd creates for the sandbox (`<state>/sandboxes/<sandbox id>/shm`):
never the host's /dev/shm (a pod with host IPC) and never a volume mounted at
/dev/shm (an emptyDir of medium Memory is the user's volume like any other).

Format, as Podman writes it (`archive.TarWithOptions(ShmDir, IncludeSourceDir)`):
an uncompressed tar whose first entry is the directory itself, "./", then the
entries relative to it ("PostgreSQL.1234", "dir/", "dir/file"), numeric owners
and modes kept. Only regular files and directories are archived, because only
those are restored; anything else (a symlink, socket, fifo, device) is left out
and logged. The walk opens everything relative to a directory fd without
following symlinks, so a running sibling cannot steer it elsewhere on the host.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from shim import archive_layout, oci
from shim.checkpoint.archive import SourceChangedError, TarWriter, file_kind, private_tar
from shim.errors import FailedPrecondition

# Podman's member name (checkpointctl's metadata.DevShmCheckpointTar): archives interoperate.
MEMBER = archive_layout.DEVSHM
# The pod's /dev/shm is a 64 MiB tmpfs by default (containerd); a node may make it bigger, not this big.
MAX_SIZE = 1 << 30
MAX_ENTRIES = 100_000
MAX_DEPTH = 32  # directories in directories: shm names are flat; a deep tree is nobody's real data
# containerd's CRI puts the sandbox id on every container's runtime spec.
SANDBOX_ID_ANNOTATION = oci.CRI_SANDBOX_ID
DESTINATION = "/dev/shm"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
log = logging.getLogger(__name__)


def pod_shm_dir(spec: Mapping[str, Any]) -> Path | None:
    """The host directory of the pod's own /dev/shm tmpfs in an OCI spec, or None if it has none.

    None as well when /dev/shm is the host's (host IPC) or a volume: those are
    not the pod's to save or to fill.
    """
    sandbox = (spec.get("annotations") or {}).get(SANDBOX_ID_ANNOTATION)
    mounts = [m for m in spec.get("mounts") or [] if isinstance(m, dict) and m.get("destination") == DESTINATION]
    if not sandbox or not mounts:
        return None
    source = mounts[-1].get("source")  # the last mount at a destination is the one the container sees
    if not isinstance(source, str) or not source.startswith("/"):
        return None
    path = Path(source)
    return path if path.parts[-3:] == ("sandboxes", sandbox, "shm") else None


def save(spec_json: bytes, out: Path) -> bool:
    """Write the pod's /dev/shm named by the container's spec into `out` (0600); False if there is none."""
    try:
        spec = json.loads(spec_json)
    except ValueError:
        return False
    source = pod_shm_dir(spec) if isinstance(spec, dict) else None
    if source is None:
        return False
    try:
        write_devshm(source, out)
    except SourceChangedError as exc:  # a sibling container, not frozen, changed a file under us
        raise FailedPrecondition(f"{exc}; checkpoint again") from None
    return True


def write_devshm(source: Path, out: Path, max_size: int = MAX_SIZE, max_entries: int = MAX_ENTRIES) -> None:
    """Tar the directory `source` into the new file `out`, Podman's layout; see the module doc.

    Over `max_size` bytes of file data or `max_entries` entries: FailedPrecondition,
    and `out` is removed (as on any failure).
    """
    root_fd = os.open(source, _DIR_FLAGS)
    try:
        with private_tar(out) as writer:
            _Walk(writer, max_size, max_entries).run(root_fd)
    finally:
        os.close(root_fd)


class _Walk:
    """Parents before children, names sorted; regular files and directories only."""

    def __init__(self, writer: TarWriter, max_size: int, max_entries: int) -> None:
        self._writer = writer
        self._size_left = max_size
        self._entries_left = max_entries
        self._max = (max_size, max_entries)
        self.skipped: list[str] = []

    def run(self, root_fd: int) -> None:
        self._add("./", tarfile.DIRTYPE, os.fstat(root_fd))
        self._directory(root_fd, "")
        if self.skipped:
            log.warning("the pod's /dev/shm holds %d entries that are neither files nor directories; "
                        "not saved: %s", len(self.skipped), ", ".join(self.skipped[:10]))
        self._writer.finish()

    def _directory(self, dir_fd: int, prefix: str) -> None:
        if prefix.count("/") > MAX_DEPTH:
            raise FailedPrecondition(f"the pod's /dev/shm nests directories deeper than {MAX_DEPTH} levels "
                                     f"(/dev/shm/{prefix}), more than a checkpoint carries")
        for name in _sorted_names(dir_fd):
            rel = prefix + name
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self._add(rel + "/", tarfile.DIRTYPE, os.fstat(child))
                    self._directory(child, rel + "/")
                finally:
                    os.close(child)
            elif stat.S_ISREG(st.st_mode):
                self._file(dir_fd, name, rel)
            else:
                self.skipped.append(f"{rel} ({file_kind(st.st_mode)})")

    def _file(self, dir_fd: int, name: str, rel: str) -> None:
        # O_NONBLOCK: a fifo swapped in meanwhile must not hang us before the type check.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceChangedError(f"/dev/shm/{rel}: changed type while being saved")
            info = self._add(rel, tarfile.REGTYPE, st)
            self._writer.add_file(info, fd)
        finally:
            os.close(fd)

    def _add(self, name: str, kind: bytes, st: os.stat_result) -> tarfile.TarInfo:
        self._entries_left -= 1
        if kind == tarfile.REGTYPE:
            self._size_left -= st.st_size
        if self._entries_left < 0 or self._size_left < 0:
            raise FailedPrecondition(f"the pod's /dev/shm holds more than {self._max[0]} bytes or "
                                     f"{self._max[1]} entries, more than a checkpoint carries")
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = int(st.st_mtime)
        info.size = st.st_size if kind == tarfile.REGTYPE else 0
        if kind != tarfile.REGTYPE:
            self._writer.add(info)
        return info


def _sorted_names(dir_fd: int) -> Iterator[str]:
    with os.scandir(dir_fd) as it:
        return iter(sorted(entry.name for entry in it))
