"""What a dead criu-shim left in a staging directory, opened as hostile input (`rollforward`'s recovery).

Owner, mode, file type, link count and sizes are checked; no symlink is followed (files are opened
relative to directories opened O_NOFOLLOW, the archive's own directory excepted: the kubelet's may
be reached through one, as the checkpoint's was); the archive's written part must be a tar stream
(a zstd one decompressed, never past the length the marker vouches for) ending exactly there.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from shim.checkpoint.archive import FILE_MODE, Member, check_member_name

LATE_MAX = 256 << 20  # a late member (an image CRIU closed last, its statistics, its log) above this is refused
ZSTD_WINDOW = 128 << 20  # zstd's default limit, as the restore's reader has it


class RollForwardError(Exception):
    """The interrupted checkpoint cannot be completed; the message says why."""


def written_names(archive: int, end: int, zstd_end: int | None = None) -> set[str]:
    """The members of the archive's first `end` tar bytes (a zstd archive: its first `zstd_end` bytes,
    decompressed), which must be a whole tar stream of valid names, ending there."""
    names: set[str] = set()
    with os.fdopen(os.dup(archive), "rb") as f:
        try:
            if zstd_end is None:
                source, mode = Bounded(f, end), "r:"
            else:
                reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW).stream_reader(
                    cast(BinaryIO, Bounded(f, zstd_end)), read_across_frames=True)
                source, mode = Bounded(reader, end, strict=True), "r|"
            with tarfile.open(fileobj=source, mode=mode) as tar:  # type: ignore[call-overload]
                for info in tar:
                    name = info.name.rstrip("/")
                    check_member_name(name)
                    if not (info.isreg() or info.isdir()) or name in names:
                        raise RollForwardError(f"the staging archive holds {name!r} twice or not as a file")
                    names.add(name)
                if tar.offset != end:
                    raise RollForwardError(f"the staging archive's members end at {tar.offset}, not {end}")
                if zstd_end is not None:
                    source.read()  # a decompressed stream longer than the marker says is refused
        except (tarfile.TarError, ValueError, EOFError, zstandard.ZstdError) as exc:
            raise RollForwardError(f"the staging archive's first {end} bytes are not a tar: {exc}") from None
    return names


class Bounded:
    """A read-only view of a stream's first `limit` bytes (what the marker vouches for); `strict`: more
    than that is refused (a decompressed stream: no bomb is read past it)."""

    def __init__(self, f: BinaryIO | Any, limit: int, strict: bool = False) -> None:
        self._f, self._limit, self._strict, self._read = f, limit, strict, 0

    def read(self, size: int = -1) -> bytes:
        left = max(0, self._limit - (self._read if self._strict else self._f.tell()))
        want = left if size < 0 else min(size, left)
        data: bytes = self._f.read(want + (self._strict and want == left))  # one more, to see it ends there
        if len(data) > want:
            raise ValueError(f"the stream goes on past the marker's {self._limit} bytes")
        self._read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


def check_source(member: Member) -> None:
    """A file CRIU wrote: regular, ours, one link, not writable by others, of a sane size."""
    assert member.source is not None
    st = os.lstat(member.source)
    if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1 or st.st_size > LATE_MAX
            or st.st_mode & 0o022):
        raise RollForwardError(f"{member.source} is not a file CRIU wrote (type {stat.S_IFMT(st.st_mode):#o}, "
                               f"owner {st.st_uid}, {st.st_nlink} links, {st.st_size} bytes)")


def refuse_existing_non_file(parent: int, location: Path) -> None:
    try:
        st = os.lstat(location.name, dir_fd=parent)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise RollForwardError(f"{location} exists and is not a file (type {stat.S_IFMT(st.st_mode):#o})")


def open_private(directory: int, name: str, flags: int, limit: int | None = None, exact_mode: bool = True) -> int:
    """`name` in `directory`: a regular file of ours, one link (within `limit` bytes), 0600 (`exact_mode`,
    ours) or at least not writable by others (CRIU's); its fd."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except OSError as exc:
        raise RollForwardError(f"{name}: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
               f"owned by uid {st.st_uid}" if st.st_uid != os.geteuid() else
               f"mode {stat.S_IMODE(st.st_mode):o}" if (stat.S_IMODE(st.st_mode) != FILE_MODE if exact_mode
                                                         else st.st_mode & 0o022) else
               f"{st.st_nlink} links" if st.st_nlink != 1 else
               f"{st.st_size} bytes" if limit is not None and st.st_size > limit else "")
    if problem:
        os.close(fd)
        raise RollForwardError(f"{name} is {problem}: not as criu-shim left it")
    return fd


def lstat_in(directory: int, name: str) -> os.stat_result:
    try:
        return os.lstat(name, dir_fd=directory)
    except OSError as exc:
        raise RollForwardError(f"{name}: {exc.strerror}") from None


@contextmanager
def checked_dir(path: Path) -> Iterator[int]:
    """`path` opened as a directory (never through a symlink), ours and private; its fd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise RollForwardError(f"{path}: not a directory of criu-shim ({exc.strerror})") from None
    try:
        check_private_dir(fd, path)
        yield fd
    finally:
        os.close(fd)


@contextmanager
def checked_dir_at(directory: int, name: str) -> Iterator[int]:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except OSError as exc:
        raise RollForwardError(f"{name}: not a directory of criu-shim ({exc.strerror})") from None
    try:
        check_private_dir(fd, Path(name))
        yield fd
    finally:
        os.close(fd)


def check_private_dir(fd: int, path: Path) -> None:
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise RollForwardError(f"{path}: owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}: "
                               "not a private directory of criu-shim")


@contextmanager
def directory(path: Path) -> Iterator[int]:
    """The archive's directory (the kubelet's: it may be reached through a symlink, as the checkpoint's was)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


