"""Reading a checkpoint archive for restore: hostile input, unpacked without trust.

A checkpoint archive may come from us, containerd 2.x, CRI-O or Podman, or from
someone who wants a host file read, written or deleted. So:

* Members of the archive itself may only be regular files and directories, with
  relative names free of `..`; everything is created below a fresh private
  directory with O_NOFOLLOW|O_EXCL, mode 0600/0700 whatever the archive says,
  and no ownership change. Size and member count are capped. On any failure the
  directory is emptied again.
* The rootfs diff (`rootfs-diff.tar`) and `deleted.files` are applied to the new
  container's rootfs by walking it one directory fd at a time with O_NOFOLLOW:
  a symlink, whether the image or an earlier diff member planted it, is never
  followed. Symlinks are created (they belong to the container) but a path
  through one is refused. The diff is checked in full before anything is
  written, so a refused diff leaves the rootfs as it was.

Member data of an uncompressed tar is copied in the kernel from the member's
offset (copy_file_range, else sendfile): the memory image is gigabytes. gzip
and zstd archives (Podman's `--compress`, containerd's gzip rootfs diff) are
read through a decompressor, and so through Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import importlib
import json
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import IO, Any, Self

from shim import archive_layout as layout
from shim.archive_layout import REQUIRED
from shim.errors import InvalidArgument, NotFound, ResourceExhausted
from shim.fileio import kernel_copy
from shim.restore.checkpoint_spec import Producer, detect_producer
from shim.restore.lazy import Deferred

DEFAULT_MAX_SIZE = 64 << 30
DEFAULT_MAX_MEMBERS = 1_000_000
# A checkpoint archive holds CRIU's images (a handful per process), a few side files and one
# rootfs-diff.tar (whose own members have DEFAULT_MAX_MEMBERS): far fewer entries than this.
CHECKPOINT_MAX_MEMBERS = 100_000
# The kernel's limits on a name (NAME_MAX) and a path (PATH_MAX, with its NUL).
NAME_MAX = 255
PATH_MAX = 4095
# The saved container log: ours and containerd's, CRI-O's (named after its annotation), Podman's.
LOG_NAMES = (layout.CONTAINER_LOG, "io.kubernetes.cri-o.LogPath", "ctr.log")
# JSON side files are read into memory; none is anywhere near this big.
MAX_JSON_SIZE = 64 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_CHUNK = 1 << 20
# pax and GNU long-name/long-link headers: they describe the member after them.
_EXTENDED_TYPE_FLAGS = (b"x", b"g", b"L", b"K")
# pax and GNU long-name headers are read whole into memory by tarfile.
_MAX_EXTENDED_HEADER = 1 << 20
_EXTENDED_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                             tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_CAPABILITY = "SCHILY.xattr.security.capability"
_NO_ID = (1 << 32) - 1  # (uid_t)-1 means "leave unchanged" to chown


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


def open_checkpoint(path: Path, dest: Path, *, max_size: int = DEFAULT_MAX_SIZE,
                    max_members: int = CHECKPOINT_MAX_MEMBERS,
                    defer: Callable[[str, int], bool] | None = None) -> CheckpointArchive:
    """Unpack the archive at `path` into the empty private directory `dest` and read it.

    Raises InvalidArgument for anything hostile, malformed or over the limits
    (`max_size` bytes of member data, `max_members` entries); `dest` is left
    empty on any failure. Files for which `defer(name, size)` holds are, in an
    uncompressed archive, created sparse at their size and listed in
    `deferred` instead of being copied.
    """
    label = f"checkpoint archive {path}"
    dest_fd = os.open(dest, _DIR_FLAGS)
    try:
        if os.listdir(dest_fd):
            raise ValueError(f"{dest}: the directory to unpack a checkpoint into must be empty")
        try:
            _count_members(path, label, max_members)  # before anything is written
            unpacker = _Unpacker(label, dest_fd, _Budget(label, max_size, max_members), defer, dest)
            with _TarInput(path, label) as tar:
                unpacker.run(tar)
            return dataclasses.replace(_load(label, dest, dest_fd), deferred=tuple(unpacker.deferred))
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


def apply_rootfs_diff(diff_tar: Path, rootfs: Path, *, max_size: int = DEFAULT_MAX_SIZE,
                      max_members: int = DEFAULT_MAX_MEMBERS) -> None:
    """Apply a rootfs diff (plain or gzip tar, OCI whiteouts allowed) to `rootfs`.

    The whole diff is checked first (names, types, no path through a symlink,
    hard links only to regular files inside the rootfs, limits); nothing is
    written unless it all passes. Ownership, mode, mtime and file capabilities
    come from the diff. Device nodes are refused.
    """
    label = f"rootfs diff {diff_tar}"
    root_fd = os.open(rootfs, _DIR_FLAGS)
    try:
        plan = _DiffPlan(label, root_fd, _Budget(label, max_size, max_members))
        with _TarInput(diff_tar, label) as tar:
            for member in tar.members():
                plan.check(member)
        applier = _DiffApplier(label, root_fd)
        with _TarInput(diff_tar, label) as tar:
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
    paths = [_deleted_parts(entry) for entry in deleted]
    root_fd = os.open(rootfs, _DIR_FLAGS)
    try:
        for check_only in (True, False):
            for parts in paths:
                label = f"deleted.files entry {'/' + '/'.join(parts)!r}"
                parent_fd = _walk(label, root_fd, parts[:-1], create=False)
                if parent_fd is None or check_only:
                    _close_unless(parent_fd, root_fd)
                    continue
                try:
                    _remove(parent_fd, parts[-1])
                finally:
                    _close_unless(parent_fd, root_fd)
    finally:
        os.close(root_fd)


def parse_deleted_files(data: bytes, label: str = layout.DELETED_FILES) -> list[str]:
    """`deleted.files` content: a JSON array of absolute, normalised paths other than "/"."""
    value = _parse_json(data, label)
    if not isinstance(value, list):
        raise InvalidArgument(f"{label} is not a JSON array of paths")
    for entry in value:
        _deleted_parts(entry)
    return [str(entry) for entry in value]


def _deleted_parts(entry: object) -> tuple[str, ...]:
    if not isinstance(entry, str):
        raise InvalidArgument(f"deleted.files entry {entry!r} is not a string")
    if not entry.startswith("/") or "\0" in entry:
        raise InvalidArgument(f"deleted.files entry {entry!r} is not an absolute path")
    # normpath keeps a leading "//" (POSIX leaves its meaning open): refused like any other oddity.
    if entry == "/" or entry.startswith("//") or posixpath.normpath(entry) != entry or "/../" in entry + "/":
        raise InvalidArgument(f"deleted.files entry {entry!r} is not a normalised path below /")
    return tuple(entry[1:].split("/"))


# ---------------------------------------------------------------------------
# Reading the tar


class _CorruptTar(Exception):
    """Raised inside tarfile's parser; not a HeaderError, so tarfile cannot swallow it."""


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile takes a missing end marker or a bad header after the first as the end: refuse."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        if not buf:
            raise _CorruptTar("it ends without an end-of-archive marker")
        if len(buf) != tarfile.BLOCKSIZE:
            raise _CorruptTar("it ends inside a header")
        if buf.count(0) == tarfile.BLOCKSIZE:
            return super().frombuf(buf, encoding, errors)  # the end marker: tarfile stops cleanly
        try:
            info = super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as exc:
            raise _CorruptTar(f"invalid header: {exc}") from None
        if info.type in _EXTENDED_TYPES and info.size > _MAX_EXTENDED_HEADER:
            raise _CorruptTar(f"extended header of {info.size} bytes")
        return info


class _TarFile(tarfile.TarFile):
    members: list[tarfile.TarInfo]

    def next(self) -> tarfile.TarInfo | None:
        member = super().next()
        self.members.clear()  # tarfile keeps every header otherwise: memory grows with the archive
        return member


class _TarInput:
    """A tar file, plain, gzip or zstd, read as a stream of members; data copied out on demand."""

    def __init__(self, path: Path, label: str) -> None:
        self._path = path
        self._label = label
        self._stack = contextlib.ExitStack()
        self._fd = -1
        self._tar: _TarFile | None = None
        self._compressed = False
        self._errors: tuple[type[BaseException], ...] = (tarfile.TarError, _CorruptTar, EOFError,
                                                         zlib.error, gzip.BadGzipFile)

    def __enter__(self) -> Self:
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()

    def _open(self) -> None:
        try:
            # O_NONBLOCK: a fifo put in its place must not hang us before the type check.
            self._fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{self._label} does not exist") from None
        self._stack.callback(os.close, self._fd)
        mode = os.fstat(self._fd).st_mode
        if not stat.S_ISREG(mode):
            raise InvalidArgument(f"{self._label} is not a regular file")
        os.set_blocking(self._fd, True)
        raw = self._stack.enter_context(os.fdopen(self._fd, "rb", closefd=False))
        magic = os.pread(self._fd, 4, 0)
        stream: IO[bytes] | gzip.GzipFile = raw
        if magic.startswith(_GZIP_MAGIC):
            stream = self._stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif magic == _ZSTD_MAGIC:
            zstd = _zstandard(self._label)
            self._errors += (zstd.ZstdError,)
            stream = self._stack.enter_context(
                zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        self._compressed = stream is not raw
        with self._translated():
            # Random access for a plain tar (member data skipped by seeking); a stream otherwise.
            self._tar = self._stack.enter_context(_TarFile.open(
                fileobj=stream, mode="r|" if self._compressed else "r:",
                tarinfo=_StrictTarInfo, errors="surrogateescape"))

    def members(self) -> Iterator[tarfile.TarInfo]:
        assert self._tar is not None
        while True:
            with self._translated():
                member = self._tar.next()
            if member is None:
                return
            yield member

    @property
    def compressed(self) -> bool:
        return self._compressed

    def copy(self, member: tarfile.TarInfo, dst: int) -> None:
        """Write the member's data at `dst`'s current offset."""
        with self._translated():
            if self._compressed:
                self._copy_stream(member, dst)
            else:
                _copy_range(self._fd, dst, member.offset_data, member.size, member.name)

    def _copy_stream(self, member: tarfile.TarInfo, dst: int) -> None:
        for chunk in self._chunks(member, _READ_CHUNK):
            _write_all(dst, chunk)

    def chunks(self, member: tarfile.TarInfo, size: int) -> Iterator[bytes]:
        """The member's data in pieces of `size` bytes (the last may be shorter), through Python."""
        with self._translated():
            yield from self._chunks(member, size)

    def _chunks(self, member: tarfile.TarInfo, size: int) -> Iterator[bytes]:
        assert self._tar is not None
        source = self._tar.extractfile(member)
        assert source is not None  # regular files only
        remaining = member.size
        while remaining:
            chunk = source.read(min(remaining, size))
            if not chunk:
                raise _CorruptTar(f"member {member.name!r} ends {remaining} bytes early")
            yield chunk
            remaining -= len(chunk)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise InvalidArgument(f"{self._label} is truncated or corrupt: {exc or type(exc).__name__}") from None


def _zstandard(label: str) -> ModuleType:
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        raise InvalidArgument(f"{label} is zstd-compressed, and this node cannot decompress zstd "
                              "(Python module zstandard missing); decompress it first: zstd -d") from None


def _copy_range(src: int, dst: int, offset: int, count: int, name: str) -> None:
    """Copy `count` bytes from `src` at `offset` (its file position untouched), in the kernel."""
    if short := kernel_copy(src, dst, count, offset):
        raise _CorruptTar(f"member {name!r} ends {short} bytes early")


def _count_members(path: Path, label: str, max_members: int) -> None:
    """Refuse an uncompressed archive over the member limit before unpacking any of it.

    Only the ustar headers' type and size fields are read, hopping from header to
    header (a few microseconds per member, against tarfile's fifty): a bound, not a
    parse. Whatever it cannot read is left to the real parse, which checks everything
    (and counts again). A compressed archive is counted as it is unpacked.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # the real open says why
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        magic = os.pread(fd, 4, 0)
        if magic.startswith(_GZIP_MAGIC) or magic == _ZSTD_MAGIC:
            return
        count, offset = 0, 0
        while (header := os.pread(fd, 512, offset)) and len(header) == 512 and header != bytes(512):
            size = _header_size(header[124:136])
            if size is None:
                return
            if header[156:157] not in _EXTENDED_TYPE_FLAGS:
                count += 1
                if count > max_members:
                    raise InvalidArgument(f"{label} has more than {max_members} members, the limit for a "
                                          "checkpoint archive")
            offset += 512 + (size + 511) // 512 * 512
    finally:
        os.close(fd)


def _header_size(field: bytes) -> int | None:
    """A ustar size field: octal digits, or GNU base-256 (high bit set); None if neither."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(digits or b"0", 8)
    except ValueError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Budget:
    def __init__(self, label: str, max_size: int, max_members: int) -> None:
        self._label = label
        self._size_left = max_size
        self._members_left = max_members
        self._max_size = max_size
        self._max_members = max_members

    def take(self, member: tarfile.TarInfo) -> None:
        self._members_left -= 1
        if self._members_left < 0:
            raise InvalidArgument(f"{self._label} has more than {self._max_members} members, the limit "
                                  "for its kind of archive")
        if member.isreg():
            self._size_left -= member.size
            if self._size_left < 0:
                raise InvalidArgument(f"{self._label}: member {member.name!r} takes the unpacked size "
                                      f"over the limit of {self._max_size} bytes")


def _parts(label: str, name: str, what: str = "member") -> tuple[str, ...]:
    """A member name as path components, "." and empty ones dropped; refuses anything escaping."""
    if not name:
        raise InvalidArgument(f"{label}: {what} with an empty name")
    if name.startswith("/"):
        raise InvalidArgument(f"{label}: {what} {name!r} has an absolute name")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise InvalidArgument(f"{label}: {what} {name!r} has a '..' component")
    _check_length(label, name, parts, what)
    return parts


def _check_length(label: str, name: str, parts: tuple[str, ...], what: str) -> None:
    """Names the kernel would refuse (ENAMETOOLONG) are refused as the input error they are."""
    shown = name if len(name) <= 80 else f"{name[:60]}...({len(name)} characters)"
    if len(os.fsencode("/".join(parts))) > PATH_MAX:
        raise InvalidArgument(f"{label}: {what} name {shown!r} is longer than the kernel's path limit "
                              f"({PATH_MAX} bytes)")
    for part in parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InvalidArgument(f"{label}: {what} name {shown!r} has a component longer than the kernel's "
                                  f"name limit ({NAME_MAX} bytes)")


def _kind(member: tarfile.TarInfo) -> str:
    if member.isdir():
        return "directory"
    if member.issparse():
        return "sparse file"
    for test, kind in ((member.isreg, "file"), (member.issym, "symlink"), (member.islnk, "hard link"),
                       (member.ischr, "character device"), (member.isblk, "block device"),
                       (member.isfifo, "fifo")):
        if test():
            return kind
    return f"tar entry of type {member.type!r}"


# ---------------------------------------------------------------------------
# The checkpoint archive itself


class _Unpacker:
    def __init__(self, label: str, dest_fd: int, budget: _Budget,
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

    def run(self, tar: _TarInput) -> None:
        try:
            for member in tar.members():
                self._budget.take(member)
                self._unpack(member, tar)
        finally:
            self._forget_parent()

    def _forget_parent(self) -> None:
        if self._last is not None:
            _close_unless(self._last[1], self._dest_fd)
            self._last = None

    def _unpack(self, member: tarfile.TarInfo, tar: _TarInput) -> None:
        parts = _parts(self._label, member.name)
        kind = _kind(member)
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
                fd = _replace_fd(fd, self._dest_fd, self._open_dir(name, fd, part))
        except BaseException:
            _close_unless(fd, self._dest_fd)
            raise
        return fd

    def _mkdir(self, name: str, parent_fd: int, leaf: str) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf, 0o700, dir_fd=parent_fd)
        os.close(self._open_dir(name, parent_fd, leaf))

    def _open_dir(self, name: str, parent_fd: int, part: str) -> int:
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=parent_fd)
        except NotADirectoryError:
            raise InvalidArgument(f"{self._label}: member {name!r} needs {part!r} to be a directory, "
                                  "and an earlier member made it a file") from None

    def _file(self, member: tarfile.TarInfo, parent_fd: int, parts: tuple[str, ...], tar: _TarInput) -> None:
        try:
            fd = os.open(parts[-1], _NEW_FILE, 0o600, dir_fd=parent_fd)
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


def _load(label: str, dest: Path, dest_fd: int) -> CheckpointArchive:
    missing = [name for name in REQUIRED if not _is_file(dest_fd, name)]
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
            _remove(dir_fd, name)


# ---------------------------------------------------------------------------
# Applying the rootfs diff and deleted.files


def _walk(label: str, root_fd: int, parts: tuple[str, ...], create: bool) -> int | None:
    """An fd for directory `parts` under `root_fd`, never through a symlink.

    Missing directories are made (0755) when `create`, else None is returned.
    The fd is `root_fd` itself for the root; close it with `_close_unless`.
    """
    fd = root_fd
    try:
        for index, part in enumerate(parts):
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    _close_unless(fd, root_fd)
                    return None
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = "/".join(parts[:index + 1])
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise InvalidArgument(f"{label}: its path goes through the symlink {where!r}") from None
                if not create:
                    _close_unless(fd, root_fd)
                    return None  # nothing can exist below a non-directory
                raise InvalidArgument(f"{label}: {where!r} is not a directory") from None
            fd = _replace_fd(fd, root_fd, child)
    except BaseException:
        _close_unless(fd, root_fd)
        raise
    return fd


def _replace_fd(old: int, keep: int, new: int) -> int:
    _close_unless(old, keep)
    return new


def _close_unless(fd: int | None, keep: int) -> None:
    if fd is not None and fd != keep:
        os.close(fd)


def _remove(dir_fd: int, name: str) -> None:
    """Remove `name` (recursively if a directory) without following symlinks; absent is fine."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # fd-based on Linux: immune to symlink swaps
    else:
        os.unlink(name, dir_fd=dir_fd)


@dataclass(frozen=True, slots=True)
class _Entry:
    """A rootfs diff member, classified: what to do, and where."""

    action: str  # "skip", "whiteout", "opaque", or the member kind to create
    parts: tuple[str, ...]
    target: tuple[str, ...] = ()  # a hard link's target


def _classify(label: str, member: tarfile.TarInfo) -> _Entry:
    parts = _parts(label, member.name)
    kind = _kind(member)
    if not parts:
        if kind == "directory":
            return _Entry("skip", parts)
        raise InvalidArgument(f"{label}: member {member.name!r} is not a file name")
    leaf = parts[-1]
    if leaf == _OPAQUE:
        return _Entry("opaque", parts[:-1])
    if leaf.startswith(_WHITEOUT + _WHITEOUT):
        return _Entry("skip", parts)  # other AUFS metadata, as containerd and Docker do
    if leaf.startswith(_WHITEOUT):
        name = leaf[len(_WHITEOUT):]
        if name in ("", ".", ".."):
            raise InvalidArgument(f"{label}: whiteout {member.name!r} names no file")
        return _Entry("whiteout", (*parts[:-1], name))
    if not (0 <= member.uid < _NO_ID and 0 <= member.gid < _NO_ID):
        raise InvalidArgument(f"{label}: member {member.name!r} has owner {member.uid}:{member.gid}")
    if kind in ("file", "directory", "symlink", "fifo"):
        return _Entry(kind, parts)
    if kind == "hard link":
        target = _parts(label, member.linkname, f"hard link {member.name!r} to")
        if not target:
            raise InvalidArgument(f"{label}: hard link {member.name!r} has no target")
        if target == parts:
            raise InvalidArgument(f"{label}: hard link {member.name!r} points at itself")
        return _Entry(kind, parts, target)
    raise InvalidArgument(f"{label}: member {member.name!r} is a {kind}; a rootfs diff may hold files, "
                          "directories, symlinks, hard links and fifos, not devices")


class _DiffPlan:
    """First pass: refuses a diff that would write through a symlink, before anything is written.

    It tracks what earlier members made of each path (a symlink, a file, a
    deleted path...) and otherwise looks at the rootfs (lstat, never following).
    """

    def __init__(self, label: str, root_fd: int, budget: _Budget) -> None:
        self._label = label
        self._root_fd = root_fd
        self._budget = budget
        self._made: dict[tuple[str, ...], str] = {}
        self._opaque: set[tuple[str, ...]] = set()
        self._children: dict[tuple[str, ...], set[str]] = {}  # of paths in _made or _opaque
        self._on_disk: dict[tuple[str, ...], str] = {}

    def check(self, member: tarfile.TarInfo) -> None:
        self._budget.take(member)
        entry = _classify(self._label, member)
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


class _DiffApplier:
    """Second pass: writes each member, walking from the rootfs fd again (never trusting pass one)."""

    def __init__(self, label: str, root_fd: int) -> None:
        self._label = label
        self._root_fd = root_fd
        self._written: set[tuple[str, ...]] = set()

    def apply(self, member: tarfile.TarInfo, tar: _TarInput) -> None:
        entry = _classify(self._label, member)
        where = f"{self._label}: member {member.name!r}"
        if entry.action == "skip":
            return
        if entry.action == "opaque":
            self._opaque(where, entry.parts)
            return
        create = entry.action != "whiteout"
        parent_fd = _walk(where, self._root_fd, entry.parts[:-1], create=create)
        if parent_fd is None:
            return  # whiteout of something whose directory is gone already
        try:
            if create:
                self._written.update(entry.parts[:i] for i in range(1, len(entry.parts) + 1))
            self._apply(where, entry, member, parent_fd, tar)
        finally:
            _close_unless(parent_fd, self._root_fd)

    def _apply(self, where: str, entry: _Entry, member: tarfile.TarInfo, parent_fd: int, tar: _TarInput) -> None:
        leaf = entry.parts[-1]
        mode = stat.S_IMODE(member.mode)
        if entry.action == "whiteout":
            _remove(parent_fd, leaf)
        elif entry.action == "directory":
            self._directory(parent_fd, leaf, member, mode)
        elif entry.action == "file":
            _remove(parent_fd, leaf)
            fd = os.open(leaf, _NEW_FILE, 0o600, dir_fd=parent_fd)
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
            _remove(parent_fd, leaf)
            os.symlink(member.linkname, leaf, dir_fd=parent_fd)
            os.chown(leaf, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
            _set_mtime(lambda times: os.utime(leaf, times, dir_fd=parent_fd, follow_symlinks=False), member)
        elif entry.action == "fifo":
            _remove(parent_fd, leaf)
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
        fd = os.open(leaf, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            _own(fd, member, mode)
        finally:
            os.close(fd)

    def _hard_link(self, where: str, entry: _Entry, parent_fd: int) -> None:
        source_fd = _walk(where, self._root_fd, entry.target[:-1], create=False)
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
            _remove(parent_fd, entry.parts[-1])
            os.link(source, entry.parts[-1], src_dir_fd=source_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        finally:
            _close_unless(source_fd, self._root_fd)

    def _opaque(self, where: str, parts: tuple[str, ...]) -> None:
        """OCI opaque whiteout: the directory keeps only what this diff put in it."""
        dir_fd = _walk(where, self._root_fd, parts, create=True)
        assert dir_fd is not None
        try:
            for name in os.listdir(dir_fd):
                if (*parts, name) not in self._written:
                    _remove(dir_fd, name)
        finally:
            _close_unless(dir_fd, self._root_fd)
        self._written.update(parts[:i] for i in range(1, len(parts) + 1))


def _set_mtime(utime: Callable[[tuple[float, float]], None], member: tarfile.TarInfo) -> None:
    with contextlib.suppress(OverflowError, ValueError):  # a time the OS cannot store is not worth a failure
        utime((member.mtime, member.mtime))


def _own(fd: int, member: tarfile.TarInfo, mode: int) -> None:
    """Owner first: chown clears set-uid/set-gid bits, so the mode goes on after it."""
    os.fchown(fd, member.uid, member.gid)
    os.fchmod(fd, mode)


# The same hardened reading for a member that is itself a tar (shim.restore.devshm).
TarInput = _TarInput
Budget = _Budget
member_parts = _parts
member_kind = _kind
