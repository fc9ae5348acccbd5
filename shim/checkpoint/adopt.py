"""Turn CRIU's largest image file into the archive itself: an archive without copying memory.

A checkpoint archive is mostly one file, CRIU's `pages-1.img`, which holds the
container's memory. Copying it into a tar costs as much as the dump itself
(the disk writes every byte twice). Instead, the tar is built *around* it:
every other member, plus the tar header of the pages file, is inserted in
front of its data with `fallocate(FALLOC_FL_INSERT_RANGE)`, which shifts the
file's extents instead of moving bytes; the end-of-archive marker is
appended; and the file is renamed onto the location. The inserted range must
be a multiple of the filesystem block size, so the pages file's PAX header
carries a `comment` record sized to make it so.

This needs the image dir on the same filesystem as the location (the engine
stages beside the archive for that reason) and a filesystem that can insert
ranges (ext4, xfs). Where it cannot, `write_archive` copies as usual.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

from shim.checkpoint.archive import (
    FILE_MODE,
    Member,
    TarWriter,
    add_members,
    root_entry,
    write_archive,
)

FALLOC_FL_INSERT_RANGE = 0x20
# Below this the copy is cheap and the ordinary writer is simpler.
MIN_ADOPT_SIZE = 8 << 20
_BLOCK = tarfile.BLOCKSIZE
_NOT_SUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EXDEV})

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class CannotAdopt(Exception):
    """The filesystem or the file does not allow building the archive in place."""


def write_archive_in_place(location: Path, members: Sequence[Member], durable: bool = False) -> int:
    """Like `write_archive`, but the largest source member becomes the archive file."""
    adopted = _largest_source(members)
    if adopted is not None:
        rest = [m for m in members if m is not adopted]
        try:
            return _adopt(location, rest, adopted, durable)
        except CannotAdopt:
            pass
    return write_archive(location, members, durable)


def _largest_source(members: Sequence[Member]) -> Member | None:
    sized = [(m.source.stat().st_size, i) for i, m in enumerate(members) if m.source is not None]
    if not sized:
        return None
    size, index = max(sized)
    return members[index] if size >= MIN_ADOPT_SIZE else None


def _adopt(location: Path, rest: list[Member], adopted: Member, durable: bool) -> int:
    assert adopted.source is not None
    fd = os.open(adopted.source, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_dev != os.stat(location.parent).st_dev:
            raise CannotAdopt(f"{adopted.source} is not a regular file beside {location}")
        block = os.statvfs(location.parent).f_bsize
        prefix_len = _insert_prefix(fd, adopted.source.parent, rest, adopted.name, info.st_size, block)
        size = _append_end(fd, prefix_len + info.st_size)
        os.fchmod(fd, FILE_MODE)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(adopted.source, location)  # same filesystem: atomic
    if durable:
        dir_fd = os.open(location.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return size


def _insert_prefix(fd: int, workdir: Path, rest: list[Member], name: str, data_size: int, block: int) -> int:
    """Write every other member and the adopted member's header in front of its data."""
    # Built in the (private) directory of the adopted file, never beside the archive.
    prefix_path = workdir / f".archive-prefix-{os.getpid()}"
    prefix_fd = os.open(prefix_path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        writer = TarWriter(prefix_fd)
        add_members(writer, rest)
        writer.flush()
        header = _aligned_header(name, data_size, writer.written, block)
        os.write(prefix_fd, header)
        prefix_len = writer.written + len(header)
        if _libc.fallocate(fd, FALLOC_FL_INSERT_RANGE, 0, prefix_len) != 0:
            err = ctypes.get_errno()
            if err in _NOT_SUPPORTED:
                raise CannotAdopt(os.strerror(err))
            raise OSError(err, os.strerror(err))
        _copy_range(prefix_fd, fd, prefix_len)
        return prefix_len
    finally:
        os.close(prefix_fd)
        prefix_path.unlink(missing_ok=True)


def _aligned_header(name: str, size: int, offset: int, block: int) -> bytes:
    """The header for `name`, padded (PAX comment) so its data starts on a `block` boundary."""
    info = root_entry(name, tarfile.REGTYPE, FILE_MODE, int(time.time()))
    info.size = size
    for pad in range(0, block + _BLOCK, 64):
        info.pax_headers = {"comment": "criu-shim alignment " + "." * pad}
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if (offset + len(header)) % block == 0:
            return header
    raise CannotAdopt(f"no alignment padding found for block size {block}")


def _copy_range(src: int, dst: int, count: int) -> None:
    done = 0
    while done < count:
        moved = os.copy_file_range(src, dst, count - done, done, done)
        if moved == 0:
            raise OSError(errno.EIO, "short copy of the archive prefix")
        done += moved


def _append_end(fd: int, data_end: int) -> int:
    """Pad the last member to a block, then the two zero blocks that end a tar; return the size."""
    trailer = bytes(-data_end % _BLOCK) + bytes(2 * _BLOCK)
    end = data_end + len(trailer)
    trailer += bytes(-end % tarfile.RECORDSIZE)
    os.pwrite(fd, trailer, data_end)
    return data_end + len(trailer)
