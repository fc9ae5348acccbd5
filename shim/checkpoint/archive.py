"""Writing the checkpoint archive: an uncompressed tar, atomic, never readable by others.

The archive is what the kubelet hands back to its caller, and what checkpointctl
and containerd 2.x read: entries named exactly `spec.dump`, `config.dump`,
`checkpoint/inventory.img`... with no "./" prefix, and an explicit `checkpoint/`
directory header (checkpointctl looks for one). It is uncompressed because
containerd's restore feeds the file straight to its untar.

It holds process memory, so it is created 0600 in the destination directory,
renamed into place only once complete (and fsynced when asked to be durable),
and removed on any failure.
File data is copied in the kernel (copy_file_range, else sendfile): memory
images are gigabytes and a Python read/write loop would halve the throughput.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tarfile
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shim.fileio import kernel_copy

FILE_MODE = 0o600
DIR_MODE = 0o700
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
# Headers and small in-memory members are batched into one write up to this size.
_FLUSH_AT = 1 << 20


class SourceChangedError(RuntimeError):
    """A file shrank or changed type while it was being archived."""


@dataclass(frozen=True, slots=True)
class Member:
    """One archive entry: exactly one of `data`, `source` (a regular file) or `is_dir`."""

    name: str
    data: bytes | None = None
    source: Path | None = None
    is_dir: bool = False

    def __post_init__(self) -> None:
        check_member_name(self.name)
        kinds = (self.data is not None) + (self.source is not None) + self.is_dir
        if kinds != 1:
            raise ValueError(f"member {self.name!r}: give exactly one of data, source, is_dir")


def check_member_name(name: str) -> None:
    """Refuse names a reader could resolve outside its target or would not match exactly."""
    if not name or name.startswith("/") or "\0" in name:
        raise ValueError(f"invalid archive member name {name!r}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"invalid archive member name {name!r}: empty, '.' or '..' component")


def directory_members(prefix: str, root: Path, skip: Collection[str] = ()) -> list[Member]:
    """A directory entry `prefix`, then everything under `root` as `prefix/...`, parents first.

    Only regular files and directories: CRIU image directories hold nothing else,
    so anything else is a bug or tampering, and archiving it could leak the host.
    `skip`: member names left out (not even looked at: a stop-after dump's images CRIU still writes).
    """
    check_member_name(prefix)
    if not stat.S_ISDIR(os.lstat(root).st_mode):
        raise ValueError(f"{root}: not a directory (symlinks are not followed)")
    members = [Member(prefix, is_dir=True)]
    _collect(root, prefix, members, frozenset(skip))
    return members


def _collect(directory: Path, prefix: str, out: list[Member], skip: frozenset[str] = frozenset()) -> None:
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda entry: entry.name)
    for entry in entries:
        name = f"{prefix}/{entry.name}"
        if name in skip:
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            out.append(Member(name, is_dir=True))
            _collect(path, name, out, skip)
        elif entry.is_file(follow_symlinks=False):
            out.append(Member(name, source=path))
        else:
            kind = file_kind(entry.stat(follow_symlinks=False).st_mode)
            raise ValueError(f"{path}: is a {kind}; only regular files and directories are archived")


def file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISREG, "regular file"),
    ):
        if test(mode):
            return kind
    return f"file of type {stat.S_IFMT(mode):#o}"


def write_archive(location: Path, members: Iterable[Member], durable: bool = True) -> int:
    """Write `members` as an uncompressed tar at `location`, atomically; return its size.

    On any exception, KeyboardInterrupt included, nothing is left behind and the
    exception propagates unchanged. An existing file at `location` is replaced.
    `durable` fsyncs the data before the rename (costly for gigabytes of memory
    images: a full write-back); the rename is atomic either way.
    """
    if location.name in ("", ".", ".."):
        raise ValueError(f"{location}: not a file path")
    dir_fd = os.open(location.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _write_atomically(dir_fd, location.name, members, durable)
    finally:
        os.close(dir_fd)


def _write_atomically(dir_fd: int, final: str, members: Iterable[Member], durable: bool) -> int:
    temp = f".{final}.criu-shim-{secrets.token_hex(8)}.tmp"
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(temp, flags, FILE_MODE, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits away
            size = _write_members(TarWriter(fd), members)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _discard(dir_fd, temp)
        raise
    try:
        if durable:
            os.fsync(dir_fd)
    except BaseException:
        # The caller will report failure, so an archive we cannot vouch for must go.
        _discard(dir_fd, final)
        raise
    return size


def _discard(dir_fd: int, name: str) -> None:
    # Best effort: the original exception is the one worth reporting.
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def _write_members(writer: TarWriter, members: Iterable[Member]) -> int:
    add_members(writer, members)
    return writer.finish()


def add_members(writer: TarWriter, members: Iterable[Member]) -> None:
    """Append `members` (names unique) to `writer`, without the end-of-archive marker."""
    now = int(time.time())
    seen: set[str] = set()
    for member in members:
        if member.name in seen:
            raise ValueError(f"duplicate archive member {member.name!r}")
        seen.add(member.name)
        _add_member(writer, member, now)


def _add_member(writer: TarWriter, member: Member, now: int) -> None:
    if member.is_dir:
        writer.add(root_entry(member.name, tarfile.DIRTYPE, DIR_MODE, now))
    elif member.data is not None:
        info = root_entry(member.name, tarfile.REGTYPE, FILE_MODE, now)
        info.size = len(member.data)
        writer.add(info, member.data)
    elif member.source is not None:
        _add_source(writer, member.name, member.source)


def _add_source(writer: TarWriter, name: str, source: Path) -> None:
    # O_NONBLOCK so that a fifo swapped in cannot hang us before the type check.
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{source}: is a {file_kind(st.st_mode)}, not a regular file")
        info = root_entry(name, tarfile.REGTYPE, FILE_MODE, int(st.st_mtime))
        info.size = st.st_size
        writer.add_file(info, fd)
    finally:
        os.close(fd)


def root_entry(name: str, kind: bytes, mode: int, mtime: int) -> tarfile.TarInfo:
    """A header owned by root: the archive's contents are the runtime's, not a user's."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


@contextlib.contextmanager
def private_tar(out: Path) -> Iterator[TarWriter]:
    """A new tar file `out` (0600, never through a link, never over an existing file), removed if
    the block fails. The caller writes the members; the end-of-archive marker is its to add."""
    fd = os.open(out, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask
        yield TarWriter(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(out)
        raise
    finally:
        os.close(fd)


class TarWriter:
    """Appends tar entries to a file descriptor positioned at 0; no Python-level data copies.

    Headers come from `tarfile.TarInfo.tobuf` in PAX format, so long names and
    sizes of 8 GiB and more get extended headers.
    """

    def __init__(self, fd: int, start: int = 0) -> None:
        """`start`: the fd's position, when the archive already holds that much (streamed members)."""
        self._fd = fd
        self._pending = bytearray()
        self._written = start

    def add(self, info: tarfile.TarInfo, data: bytes = b"") -> None:
        if info.size != len(data):
            raise ValueError(f"{info.name}: header size {info.size} != {len(data)} bytes of data")
        self._pending += _header(info)
        self._pending += data
        self._pending += _padding(len(data))
        if len(self._pending) >= _FLUSH_AT:
            self._flush()

    def add_file(self, info: tarfile.TarInfo, source_fd: int) -> None:
        """Add `info.size` bytes read from `source_fd`'s current position."""
        self._pending += _header(info)
        self._flush()
        try:
            copy_fd(source_fd, self._fd, info.size)
        except SourceChangedError as exc:
            raise SourceChangedError(f"{info.name}: {exc}") from None
        self._written += info.size
        self._pending += _padding(info.size)

    def finish(self) -> int:
        """Write the end-of-archive marker, padded to a whole record like tar does; return size."""
        self._pending += bytes(2 * _BLOCK)
        self._pending += bytes(-(self._written + len(self._pending)) % _RECORD)
        self._flush()
        return self._written

    @property
    def written(self) -> int:
        """Bytes written so far, not counting what is still buffered."""
        return self._written

    def flush(self) -> None:
        self._flush()

    def _flush(self) -> None:
        view = memoryview(self._pending)
        while view:
            count = os.write(self._fd, view)
            view = view[count:]
            self._written += count
        view.release()
        self._pending.clear()


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return bytes(-size % _BLOCK)


def copy_fd(src: int, dst: int, count: int) -> None:
    """Copy `count` bytes between the fds' current offsets, in the kernel."""
    if short := kernel_copy(src, dst, count):
        raise SourceChangedError(f"file shrank while being copied ({short} bytes short)")
