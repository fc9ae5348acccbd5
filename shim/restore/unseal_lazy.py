"""Lazy restore of a sealed archive: decrypt up front all but the memory the page daemon serves.

A sealed archive (format version 2, an uncompressed tar inside) restored lazily
with criu-shim's page daemon is not decrypted whole. At CreateContainer:

1. The chunk index is read (shim.sealed.chunks: one small read per chunk,
   truncation refused here) and the tar's headers are walked through a
   random-access view of the plaintext (only the chunks holding headers are
   opened), to find the large memory images that stay in the archive
   (`lazy.deferrable`, the same rule as for a plain archive).
2. Every chunk that is not wholly inside such an image is authenticated and
   decrypted into the private plaintext copy (`<work>.plain`, 0600) at its
   place; the chunks of the images are left as holes (a sparse file). The last
   chunk is among those opened, so the archive's end (its counter and offset,
   bound into its tag) is authenticated before anything is created.
3. The unpacker reads the copy as usual; the lazy plan (shim.restore.lazy)
   then fills in the few runs of each image CRIU reads itself (`fill`), checks
   that every hole lies inside an image the unpacker left in the archive
   (`check_holes`: nothing it read was a hole), and tells the page daemon to
   serve the images from the sealed archive (shim.restore.sealed_pages), with
   the node's keys as named in `[encryption]` (paths and a command, never a key).

So the memory is decrypted by the page daemon, chunk by chunk, a fault's chunks
first, after the process runs; it never lands on disk in the clear. A tampered
chunk of an image is found when the daemon opens it: the daemon fails and its
relay ends the task (never wrong memory). Older archives (format version 1),
zstd archives and CRIU's page daemon take the whole-decryption path
(shim.restore.unseal).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import tarfile
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shim.config import EncryptionSettings
from shim.errors import InvalidArgument, ResourceExhausted, ShimError
from shim.restore.unseal import keyring, plaintext_path
from shim.sealed import CONTENT_TAR, read_header
from shim.sealed.chunks import ChunkIndex, ChunkOpener, open_sealed
from shim.sealed.format import TAG_SIZE

Deferrable = Callable[[str, int], bool]


def servable(archive: Path) -> bool:
    """Whether the sealed archive's pages can be served from it: format version 2 holding a plain tar."""
    header = read_header(archive)
    return header.random_access and header.content == CONTENT_TAR


@dataclass
class PartlyDecrypted:
    """The plaintext copy with the memory images' chunks left out, and how to open those chunks."""

    archive: Path  # the sealed archive
    plain: Path  # its sparse plaintext copy
    settings: EncryptionSettings
    index: ChunkIndex
    _opener: ChunkOpener = field(repr=False)
    _plain_fd: int = field(repr=False)
    holes: list[range] = field(default_factory=list)  # runs of chunks left out
    chunks_opened: int = 0

    def fill(self, start: int, length: int) -> None:
        """Decrypt into the copy the left-out chunks holding plaintext bytes [start, start + length)."""
        left_out = {k for run in self.holes for k in run}
        buffer = memoryview(bytearray(self.index.header.chunk_size + TAG_SIZE))
        for k in self.index.covering(start, start + length):
            if k in left_out:
                self._put(k, buffer)
                for i, run in enumerate(self.holes):  # filled: no longer a hole
                    if k in run:
                        self.holes[i:i + 1] = [r for r in (range(run.start, k), range(k + 1, run.stop)) if r]
                        break
                left_out.discard(k)

    def check_holes(self, members: Iterable[tuple[str, int, int]]) -> None:
        """Every chunk left out lies inside a memory image the unpacker left in the archive."""
        spans = sorted((offset, offset + size) for _, offset, size in members)
        for run in self.holes:
            lo = self.index.starts[run.start]
            hi = self.index.starts[run[-1]] + self.index.lengths[run[-1]]
            if not any(a <= lo and hi <= b for a, b in spans):
                raise InvalidArgument(f"encrypted archive {self.archive}: plaintext bytes {lo}..{hi} were left "
                                      "encrypted for the page daemon but belong to no memory image it serves "
                                      "(the tar does not read the same twice)")

    def key_sources(self) -> dict[str, object]:
        """What the page daemon opens the archive with: where the node's keys are, never a key."""
        return {"key_files": {k: str(p) for k, p in self.settings.key_files.items()},
                "key_command": list(self.settings.key_command)}

    def _put(self, k: int, buffer: memoryview) -> None:
        length = self._opener.open_into(k, buffer)
        view = buffer[:length]
        at = self.index.starts[k]
        while view:
            count = os.pwrite(self._plain_fd, view, at)
            view, at = view[count:], at + count
        self.chunks_opened += 1


@contextlib.asynccontextmanager
async def decrypted_partly(archive: Path, work: Path, settings: EncryptionSettings,
                           deferrable: Deferrable) -> AsyncIterator[PartlyDecrypted]:
    """The partly decrypted copy of `archive` (see the module's doc); removed when the block ends."""
    plain = plaintext_path(work)
    fd = os.open(plain, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    sealed_fd = -1
    try:
        label = f"encrypted archive {archive}"
        sealed_fd, index, opener = await asyncio.to_thread(open_sealed, archive, keyring(settings), label)
        partial = PartlyDecrypted(archive, plain, settings, index, opener, fd)
        await asyncio.to_thread(_decrypt_all_but_images, partial, deferrable, plain)
        try:
            yield partial
        except ShimError as exc:
            if str(plain) not in exc.message:
                raise
            raise type(exc)(exc.message.replace(str(plain), f"{archive} (decrypted)")) from None
    finally:
        if sealed_fd >= 0:
            os.close(sealed_fd)
        os.close(fd)
        plain.unlink(missing_ok=True)


def _decrypt_all_but_images(partial: PartlyDecrypted, deferrable: Deferrable, plain: Path) -> None:
    index = partial.index
    skip = bytearray(index.count)
    for start, size in _deferred_members(partial, deferrable):
        for k in index.inside(start, start + size):
            skip[k] = 1
    buffer = memoryview(bytearray(index.header.chunk_size + TAG_SIZE))
    try:
        os.ftruncate(partial._plain_fd, index.plain_size)
        run_start = -1
        for k in range(index.count):
            if skip[k]:
                run_start = k if run_start < 0 else run_start
                continue
            if run_start >= 0:
                partial.holes.append(range(run_start, k))
                run_start = -1
            partial._put(k, buffer)
        if run_start >= 0:  # cannot happen: the final chunk holds the tar's end, in no member
            partial.holes.append(range(run_start, index.count))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"no space left on the filesystem of {plain} decrypting {partial.archive}: "
                                    f"{exc.strerror}") from None
        raise


def _deferred_members(partial: PartlyDecrypted, deferrable: Deferrable) -> list[tuple[int, int]]:
    """(plaintext offset, size) of each member that stays in the archive: the tar's headers walked
    through a view that opens only the chunks they lie in (tarfile seeks over the members' data)."""
    view = io.BufferedReader(_PlainView(partial), 64 << 10)  # tarfile wants whole blocks from each read
    found: list[tuple[int, int]] = []
    try:
        with tarfile.open(fileobj=view, mode="r:") as tar:
            for info in tar:
                if info.isreg() and deferrable(info.name, info.size):
                    found.append((info.offset_data, info.size))
                tar.members.clear()  # type: ignore[attr-defined]  # one header at a time, as the hardened reader
    except tarfile.TarError as exc:
        raise InvalidArgument(f"encrypted archive {partial.archive}: its content is not a valid tar: {exc}") from None
    return found


class _PlainView(io.RawIOBase):
    """The archive's plaintext, seekable, each read served from the one chunk it falls in."""

    def __init__(self, partial: PartlyDecrypted) -> None:
        super().__init__()
        self._index = partial.index
        self._opener = partial._opener
        self._buffer = memoryview(bytearray(self._index.header.chunk_size + TAG_SIZE))
        self._chunk = -1
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._index.plain_size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._position >= self._index.plain_size or not len(buffer):
            return 0
        k = self._index.covering(self._position, self._position + 1).start
        if k != self._chunk:
            self._chunk = -1  # a chunk that fails is never read from
            self._opener.open_into(k, self._buffer)
            self._chunk = k
        at = self._position - self._index.starts[k]
        count = min(len(buffer), self._index.lengths[k] - at)
        buffer[:count] = self._buffer[at:at + count]
        self._position += count
        return count
