"""What `criu-shim inspect` reads of an archive: member sizes, and the few small members it shows.

The archive is hostile input, read without trust and without writing anything: strict tar
headers (a missing end marker or a bad header after the first is corruption, as at restore),
at most MAX_MEMBERS members, and only the small members inspect parses are held in memory
(each at most MAX_SMALL bytes). A plain tar is read with seeks over the memory images; gzip,
zstd and encrypted archives (shim.sealed: every chunk authenticated, the final one too) as a
stream. Nothing is unpacked to disk.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shim import archive_layout as layout
from shim.errors import FailedPrecondition, InvalidArgument, NotFound
from shim.restore.tar_reader import CorruptTar, StrictTarInfo
from shim.sealed import reader as sealed
from shim.sealed.format import CONTENT_TAR_ZSTD, Header
from shim.sealed.keys import Keyring

MAX_MEMBERS = 1_000_000
MAX_SMALL = 16 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PSTREE = f"{layout.IMAGES_DIR}/pstree.img"
CORE_PREFIX = f"{layout.IMAGES_DIR}/core-"
PAGES_PREFIX = f"{layout.IMAGES_DIR}/pages-"
# The members inspect parses (besides core-<pid>.img, one per task).
SMALL = frozenset({layout.SPEC_DUMP, layout.CONFIG_DUMP, layout.STATUS_DUMP, layout.FACTS, layout.STATS_DUMP,
                   PSTREE})


@dataclass
class Contents:
    path: Path
    file_size: int
    compression: str  # "none", "gzip", "zstd"
    encryption: Header | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # every regular member, by name
    small: dict[str, bytes] = field(default_factory=dict)  # the members parsed, by name
    too_large: list[str] = field(default_factory=list)  # wanted, but over MAX_SMALL
    members_seen: int = 0


def encryption_header(path: Path) -> Header | None:
    """The sealed header of an encrypted archive (no key needed); None for any other regular file."""
    with contextlib.ExitStack() as stack:
        _open(path, stack)  # a fifo or a device in its place is refused here, never opened blocking
    return sealed.read_header(path) if sealed.is_encrypted(path) else None


def read(path: Path, keyring: Keyring | None = None) -> Contents:
    """Everything inspect shows of `path`; InvalidArgument when it is not a readable checkpoint archive."""
    label = str(path)
    with contextlib.ExitStack() as stack:
        raw, size = _open(path, stack)
        header = encryption_header(path)
        stream: IO[bytes] = raw
        decrypted: sealed.DecryptingReader | None = None
        if header is not None:
            if keyring is None:
                raise FailedPrecondition(f"{label} is encrypted (key id {header.key_id!r}): inspecting its "
                                         "contents needs the key: --key-file FILE or --key-command")
            decrypted = stack.enter_context(sealed.open_decrypted(path, keyring))
            stream = decrypted  # type: ignore[assignment]  # a RawIOBase is a binary stream
        compression, stream = _decompressed(stream, raw if header is None else None, header, label, stack)
        contents = Contents(path, size, compression, header)
        seekable = header is None and compression == "none"
        with _translated(label, contents):
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r:" if seekable else "r|",
                                                   tarinfo=StrictTarInfo, errors="surrogateescape"))
            _collect(tar, contents, label)
            if decrypted is not None:
                decrypted.verify_to_end()  # what follows the tar's end is authenticated too
    missing = [name for name in layout.REQUIRED if name not in contents.sizes]
    if missing:
        raise InvalidArgument(f"{label} is not a checkpoint archive: it has no {', '.join(missing)}")
    return contents


def _open(path: Path, stack: contextlib.ExitStack) -> tuple[IO[bytes], int]:
    try:
        # O_NONBLOCK: a fifo in its place must not hang us before the type check.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # checked before fdopen, which has its own error for a directory
        os.close(fd)
        raise InvalidArgument(f"{path} is not a regular file")
    raw = stack.enter_context(os.fdopen(fd, "rb"))
    os.set_blocking(fd, True)
    return raw, info.st_size


def _decompressed(stream: IO[bytes], raw: IO[bytes] | None, header: Header | None, label: str,
                  stack: contextlib.ExitStack) -> tuple[str, IO[bytes]]:
    """The tar stream inside: gzip and zstd by their magic (plain files), zstd as the sealed header says."""
    if header is not None:
        if header.content != CONTENT_TAR_ZSTD:
            return "none", stream
        magic = b""
    else:
        assert raw is not None
        magic = os.pread(raw.fileno(), 4, 0)
    if magic.startswith(_GZIP_MAGIC):
        unzipped: Any = stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb"))
        return "gzip", unzipped
    if header is not None or magic == _ZSTD_MAGIC:
        try:
            zstd: Any = importlib.import_module("zstandard")
        except ImportError:
            raise InvalidArgument(f"{label} is zstd-compressed and the Python module zstandard is missing") \
                from None
        return "zstd", stack.enter_context(zstd.ZstdDecompressor().stream_reader(stream, read_across_frames=True))
    return "none", stream


def _collect(tar: tarfile.TarFile, contents: Contents, label: str) -> None:
    for member in _members(tar):
        contents.members_seen += 1
        if contents.members_seen > MAX_MEMBERS:
            raise InvalidArgument(f"{label} has over {MAX_MEMBERS} members: not a checkpoint archive")
        if not member.isreg():
            continue
        name = member.name.removeprefix("./")
        contents.sizes[name] = member.size
        if name in SMALL or (name.startswith(CORE_PREFIX) and name.endswith(".img")):
            if member.size > MAX_SMALL:
                contents.too_large.append(name)
                continue
            data = tar.extractfile(member)
            assert data is not None  # a regular file
            content = data.read(member.size)
            if len(content) != member.size:
                raise CorruptTar(f"member {name!r} ends {member.size - len(content)} bytes early")
            contents.small[name] = content


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        # tarfile keeps every header otherwise: memory would grow with the archive.
        tar.members.clear()  # type: ignore[attr-defined]  # (undeclared in typeshed)
        yield member


@contextlib.contextmanager
def _translated(label: str, contents: Contents) -> Iterator[None]:
    errors: tuple[type[BaseException], ...] = (tarfile.TarError, CorruptTar, EOFError, zlib.error,
                                               gzip.BadGzipFile)
    with contextlib.suppress(ImportError):
        errors += (importlib.import_module("zstandard").ZstdError,)
    try:
        yield
    except errors as exc:
        if not contents.members_seen:  # not even one good header: it never was a tar
            kinds = "a tar archive (plain, gzip, zstd or encrypted)"
            raise InvalidArgument(f"{label} is not a checkpoint archive: not {kinds} ({exc or type(exc).__name__})") \
                from None
        raise InvalidArgument(f"{label} is truncated or corrupt: {exc or type(exc).__name__}") from None
