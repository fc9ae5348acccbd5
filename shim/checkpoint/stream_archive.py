"""The archive built while CRIU dumps: its memory streamed in (pagestream), the rest appended after.

Life cycle, all blocking (call from a worker thread), in pairs:
`open` (FIFOs and the archive file in the staging directory, the stream
running) before the freeze; `dump_ended` once runc's dump returned, whatever
its outcome (a stop-after dump: once CRIU waits at its gate, every page
written); `append` (optional, a stop-after dump before its gate opens) to
write every member that is final already; `complete` to append the rest and
rename the file onto the location; `close` on every path (idempotent). With a SealKey the archive
is sealed (encrypted) and/or compressed as it is written: same steps, same file, one pass. The file lives in the
private staging directory until the rename, so a failure or a crash leaves
nothing beside it that recovery does not delete with the staging directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from shim.archive_layout import IMAGES_DIR
from shim.checkpoint import pagestream
from shim.checkpoint.archive import FILE_MODE, Member, TarWriter, add_members
from shim.checkpoint.compression import ArchiveStream, Compression, ZstdFile
from shim.checkpoint.sealing import SealedTarWriter, SealKey, open_through

ARCHIVE_NAME = "archive.tar"  # inside the staging directory, until renamed onto the location


class StreamedArchive:
    def __init__(self, staging: Path, fifos: list[Path], fd: int, stream: pagestream.PageStream,
                 sealed: ArchiveStream | None = None) -> None:
        self._staging = staging
        self._sealed = sealed
        self._fifos = fifos
        self._fd: int | None = fd
        self._stream: pagestream.PageStream | None = stream
        self._result: pagestream.Result | None = None
        self._appended = False
        self._sealed_writer: SealedTarWriter | None = None  # one for the whole archive: it holds the stream's place

    @classmethod
    def open(cls, staging: Path, processes: int, seal: SealKey | None = None,
             compression: Compression | None = None) -> StreamedArchive | None:
        """Prepare the stream for a container of `processes` processes; None where FIFOs can't be made."""
        images = staging / IMAGES_DIR
        images.mkdir(mode=0o700, exist_ok=True)
        try:
            fifos = pagestream.prepare(images, processes)
        except OSError:
            pagestream.remove_fifos(list(images.glob(pagestream.PAGES_GLOB)))
            return None  # e.g. a filesystem without FIFOs: the archive is built the other way
        path = staging / ARCHIVE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
        sealed = None
        try:
            sealed = open_through(fd, seal, compression)
            stream = pagestream.PageStream(fifos, fd, os.statvfs(staging).f_bsize, staging, sealed)
            stream.start()
        except BaseException:
            if sealed is not None:
                sealed.abort()
            os.close(fd)
            pagestream.remove_fifos(fifos)
            raise
        return cls(staging, fifos, fd, stream, sealed)

    def dump_ended(self) -> None:
        """Drain the pipes and take the FIFOs away (CRIU is done with them)."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            self._result = stream.finish()
        finally:
            pagestream.remove_fifos(self._fifos)

    def append(self, members: Sequence[Member], durable: bool) -> tuple[int, int | None]:
        """Write `members` (and the spilled page images) now, the archive left open; where the next
        member goes in the tar, and in the file if another process could go on from there (a plain or
        compressed archive: `rollforward`; a sealed one cannot: None).

        A stop-after dump calls this before its gate opens, so that after it only
        what CRIU writes last is left to `complete`. `durable` fsyncs what is
        written (the bulk of the archive, its memory) before the gate too."""
        writer = self._writer()
        add_members(writer, self._rest(members))
        writer.flush()
        assert self._result is not None and self._fd is not None
        self._result.end = writer.written
        self._appended = True
        file_end: int | None = self._result.end
        if self._sealed is not None:
            file_end = self._sealed.resumable_at() if isinstance(self._sealed, ZstdFile) else None
        if durable:
            os.fsync(self._fd)  # a sealed stream's buffered tail goes with `complete`
        return self._result.end, file_end

    def complete(self, location: Path, members: Sequence[Member], durable: bool) -> int:
        """Append every member not streamed (nor appended), end the tar, rename it onto `location`; its size."""
        writer = self._writer()
        add_members(writer, self._rest(members))
        size = writer.finish()
        if self._sealed is not None:
            size = self._sealed.close()
        assert self._fd is not None
        os.ftruncate(self._fd, size)
        if durable:
            os.fsync(self._fd)
        os.rename(self._staging / ARCHIVE_NAME, location)  # same filesystem: atomic
        if durable:
            _fsync_dir(location.parent)
        return size

    @property
    def end(self) -> int:
        """Where the next member goes (the tar's offset)."""
        assert self._result is not None, "end before dump_ended()"
        return self._result.end

    def _rest(self, members: Sequence[Member]) -> list[Member]:
        assert self._result is not None
        rest = [m for m in members if not (m.is_dir and m.name == IMAGES_DIR)]
        if not self._appended:  # the spilled page images go with the first batch
            rest += [Member(s.name, source=s.path) for s in self._result.spilled]
        return rest

    def _writer(self) -> TarWriter:
        assert self._fd is not None and self._result is not None, "members before dump_ended()"
        if self._sealed is not None:
            if self._sealed_writer is None:
                self._sealed_writer = SealedTarWriter(self._sealed, start=self._result.end)
            return self._sealed_writer
        os.lseek(self._fd, self._result.end, os.SEEK_SET)
        return TarWriter(self._fd, start=self._result.end)

    def close(self) -> None:
        """Release everything (idempotent); the file itself goes with the staging directory."""
        with contextlib.suppress(OSError):
            self.dump_ended()
        if self._sealed is not None:
            self._sealed.abort()  # its writer thread (after complete() it has stopped already)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def image_names(self) -> set[str]:
        """The member names of the page images streamed or spilled (in the archive by `append`)."""
        result = self._result
        return {s.name for s in result.streamed} | {s.name for s in result.spilled} if result else set()

    @property
    def streamed_bytes(self) -> int:
        return sum(s.size for s in self._result.streamed) if self._result else 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
