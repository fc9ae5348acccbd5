"""The hardened tar reader: a tar file from anyone, read as a stream of members without trust.

Plain, gzip or zstd. A missing end marker or a bad header after the first is
corruption (tarfile would take it as the end); extended headers are bounded; only
one header is held at a time, so memory does not grow with the archive. Member
names are refused when absolute, when they hold `..`, or when the kernel would
refuse them; a Budget caps the member count and the unpacked size.

Member data of an uncompressed tar is copied in the kernel from the member's
offset (copy_file_range, else sendfile): a memory image is gigabytes. gzip and
zstd archives (Podman's `--compress`, containerd's gzip rootfs diff) are read
through a decompressor, and so through Python.

Users: shim.restore.checkpoint_unpack (the archive), shim.restore.rootfs_diff
(the rootfs diff inside it), shim.restore.devshm (the /dev/shm tar inside it).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, TracebackType
from typing import IO, Self

from shim.errors import InvalidArgument, NotFound
from shim.fileio import kernel_copy

DEFAULT_MAX_SIZE = 64 << 30
DEFAULT_MAX_MEMBERS = 1_000_000
# The kernel's limits on a name (NAME_MAX) and a path (PATH_MAX, with its NUL).
NAME_MAX = 255
PATH_MAX = 4095

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_CHUNK = 1 << 20
_HEADER_ALLOWANCE = 4096
_TAIL_ALLOWANCE = 1 << 20  # end marker and a writer's record padding
_MAX_ZSTD_WINDOW = 128 << 20  # zstd's own default limit (ZSTD_WINDOWLOG_LIMIT_DEFAULT), said explicitly
# pax and GNU long-name/long-link headers: they describe the member after them.
_EXTENDED_TYPE_FLAGS = (b"x", b"g", b"L", b"K")
# pax and GNU long-name headers are read whole into memory by tarfile.
_MAX_EXTENDED_HEADER = 1 << 20
_EXTENDED_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                             tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})


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


class TarInput:
    """A tar file, plain, gzip or zstd, read as a stream of members; data copied out on demand."""

    def __init__(self, path: Path, label: str, max_stream: int | None = None) -> None:
        """`max_stream`: the most bytes a compressed archive may unpack to (a bomb is refused there)."""
        self._path = path
        self._max_stream = max_stream
        self._label = label
        self._stack = contextlib.ExitStack()
        self._fd = -1
        self._tar: _TarFile | None = None
        self._stream: IO[bytes] | gzip.GzipFile | _Bounded | None = None
        self._compressed = False
        self.compression = "none"  # "gzip", "zstd" (by the file's magic)
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
        stream: IO[bytes] | gzip.GzipFile | _Bounded = raw
        if magic.startswith(_GZIP_MAGIC):
            stream = self._stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
            self.compression = "gzip"
        elif magic == _ZSTD_MAGIC:
            zstd = _zstandard(self._label)
            self._errors += (zstd.ZstdError,)
            # A frame may ask for any window; zstd's default cap (128 MiB) bounds the memory a hostile one takes.
            stream = self._stack.enter_context(
                zstd.ZstdDecompressor(max_window_size=_MAX_ZSTD_WINDOW).stream_reader(raw, read_across_frames=True))
            self.compression = "zstd"
        self._compressed = stream is not raw
        if self._compressed and self._max_stream is not None:
            stream = _Bounded(stream, self._max_stream, self._label)
        self._stream = stream
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
                self._drain()
                return
            yield member

    def _drain(self) -> None:
        """Read a compressed stream to its end once the tar has ended.

        gzip's CRC and zstd's frame checksum sit after the data and are only checked when read: a
        byte flipped inside a member's data (an incompressible, stored block) decompresses without
        error, and the tar's end-of-archive blocks come before the last frame's checksum. Read to
        the end, the damage is found (what follows the tar's end is its padding, within the
        stream's bound).
        """
        if not self._compressed or self._stream is None:
            return
        with self._translated():
            while self._stream.read(_READ_CHUNK):
                pass

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


class _Bounded(io.RawIOBase):
    """A decompressed stream that ends in an error past `limit` bytes: a compression bomb stops there.

    The budget caps the member data a tar may hold, but a compressed tar is read
    through whatever it holds between members (skipped data of refused members,
    headers, padding): this caps all of it, before the bytes are produced.
    """

    def __init__(self, inner: IO[bytes] | gzip.GzipFile | io.RawIOBase, limit: int, label: str) -> None:
        super().__init__()
        self._inner = inner
        self._left = limit
        self._limit = limit
        self._label = label

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        if self._left <= 0:
            if self._inner.read(1):
                raise InvalidArgument(f"{self._label} decompresses to more than {self._limit} bytes, the limit "
                                      "for its kind of archive (a compression bomb?)")
            return 0
        count = self._inner.readinto(view[:min(len(view), self._left)])  # type: ignore[union-attr]
        self._left -= count
        return int(count)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = _READ_CHUNK
        buffer = bytearray(size)
        count = self.readinto(buffer)
        return bytes(buffer[:count])


def stream_limit(max_size: int, max_members: int) -> int:
    """The most bytes a compressed tar within these limits unpacks to: member data, then per member
    its headers (a pax header and padding are well under 4 KiB in any real archive), then the end."""
    return max_size + max_members * _HEADER_ALLOWANCE + _TAIL_ALLOWANCE


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


def count_members(path: Path, label: str, max_members: int) -> None:
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


class Budget:
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


def member_parts(label: str, name: str, what: str = "member") -> tuple[str, ...]:
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


def member_kind(member: tarfile.TarInfo) -> str:
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



# For readers of a tar that is a stream rather than a file (shim.inspection: a decrypted archive):
# the same strict headers, and the error they raise inside tarfile's parser.
StrictTarInfo = _StrictTarInfo
CorruptTar = _CorruptTar
