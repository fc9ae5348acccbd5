"""CRIU's memory images streamed straight into the archive: memory written once, never copied.

A checkpoint archive is mostly the container's memory (`pages-N.img`). CRIU
writes each page image once, sequentially, by splicing pages out of the
process. If `checkpoint/pages-N.img` in the image directory is a FIFO of ours
instead of a file, CRIU's writes come straight to us, and we splice them (in
the kernel, no copy through Python) into the archive file at their final
place, right behind a reserved tar header that is filled in once the size is
known. The memory reaches the page cache once, at its final offset; nothing
forces a write-back (as inserting a header in front of CRIU's own file did);
and the dump is as fast as CRIU's own. The same stream is where encryption
and network transfer of checkpoints plug in: with a `SealedFile` (shim.sealed)
the pages are read from the pipe straight into its chunk buffer and sealed
there (a copy through user space is what encryption costs; still one pass,
nothing read back), and each tar header's slot is sealed once its size is known.
A `ZstdFile` (shim.checkpoint.compression) compresses the same way, alone or
in front of a SealedFile (compress, then seal).

Why FIFOs and not CRIU's page server: containerd's checkpoint options carry
no page-server address (and runc's CRIU configuration file is per node or per
container spec), so a page server would mean calling runc behind
containerd's back; FIFOs in the image directory need neither and keep
containerd's view of the task true.

Robustness: CRIU numbers page images 1, 2, ... (one per process, then shared
memory objects); we prepare FIFOs for as many as the container has processes
plus a margin. An image beyond those is an ordinary file and is archived by
copying. All FIFOs are opened (non-blocking) before the dump, so CRIU never
blocks opening one; the first image with data streams into the archive, and
data arriving on another FIFO meanwhile is spilled to a private file and
archived by copy: CRIU's order can never deadlock us. A FIFO that no writer
ever opened is removed before the archive is built. The thread ends when it
is told the dump is over and every opened FIFO is drained. If criu-shim dies
mid-dump, CRIU's write into a FIFO gets EPIPE and the dump fails (the tasks run
on); a CRIU that opens its next FIFO only afterwards is made to fail by
recovery (`orphandump`), never let through by a reader.
"""

from __future__ import annotations

import fcntl
import os
import select
import stat
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from shim.archive_layout import IMAGES_DIR
from shim.checkpoint.archive import FILE_MODE, root_entry
from shim.checkpoint.compression import ArchiveStream

PAGES_PATTERN = "pages-{}.img"  # CRIU's page image names (criu/image-desc.c)
PAGES_GLOB = PAGES_PATTERN.format("*")
MARGIN = 4  # FIFOs beyond one per process: shared memory objects get page images too
PIPE_SIZE = 1 << 20  # fewer wake-ups than the default 64 KiB
SPLICE_CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
_HUGE = 1 << 44  # a size bound for reserving header room (16 TiB)


@dataclass
class Streamed:
    """A page image whose data is in the archive already: its header sits at `header_at`."""

    name: str
    header_at: int
    header_len: int
    size: int = 0
    slot: object | None = None  # sealed or compressed archives: where the header goes once the size is known


@dataclass
class Spilled:
    """A page image that arrived out of turn: in a private file, archived by copy."""

    name: str
    path: Path


@dataclass
class Result:
    streamed: list[Streamed] = field(default_factory=list)
    spilled: list[Spilled] = field(default_factory=list)
    end: int = 0  # where the next member goes (block aligned)


def prepare(images: Path, count: int) -> list[Path]:
    """Make FIFOs pages-1.img .. pages-N.img in CRIU's (empty, private) image directory."""
    fifos = []
    for index in range(1, count + MARGIN + 1):
        path = images / PAGES_PATTERN.format(index)
        os.mkfifo(path, FILE_MODE)
        fifos.append(path)
    return fifos


class PageStream:
    """Runs in a thread during the dump: FIFO data -> archive (or spill files); start/finish in pairs."""

    def __init__(self, fifos: list[Path], archive_fd: int, block: int, spill_dir: Path,
                 through: ArchiveStream | None = None) -> None:
        """`through`: write the archive through it (sealed, compressed); offsets are then the tar's."""
        self._fifos = fifos
        self._archive = archive_fd
        self._through = through
        # Block alignment is for the loop device of a lazy restore, which a sealed or compressed archive
        # never gets (its pages are not in place).
        self._block = _BLOCK if through is not None else block
        self._spill_dir = spill_dir
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._result = Result(end=_BLOCK)  # block 0: the `checkpoint/` directory header
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._fds: dict[int, Path] = {}
        self._sink = -1  # /dev/null, where an image goes once writing it failed

    def start(self) -> None:
        if self._through is not None:
            self._through.write(_directory_header(IMAGES_DIR))
        else:
            os.pwrite(self._archive, _directory_header(IMAGES_DIR), 0)
        self._fds = {os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC): p for p in self._fifos}
        self._thread = threading.Thread(target=self._run, name="pagestream", daemon=True)
        self._thread.start()

    def finish(self, timeout: float = 60.0) -> Result:
        """The dump is over (all writers closed): take what is left in the pipes. Blocking."""
        os.write(self._stop_w, b"x")
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():  # a writer still holds a FIFO open after runc ended: give up on it
            raise OSError(f"the page stream did not end within {timeout:.0f}s of the dump")
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self._error is not None:
            raise self._error
        return self._result

    def _run(self) -> None:
        self._sink = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self._pump()
        except BaseException as exc:  # handed to finish()
            self._error = exc
        finally:
            for fd in list(self._fds):
                os.close(fd)
            self._fds.clear()
            os.close(self._sink)

    def _pump(self) -> None:
        poller = select.poll()
        for fd in self._fds:
            poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        active: dict[int, tuple[int, Streamed | Spilled]] = {}  # fifo fd -> (target fd, entry)
        stopping = False
        while self._fds:
            # Until the dump is over, wait for data; afterwards only take what is there. A FIFO no
            # writer ever opened reports nothing (Linux reports POLLHUP only after a writer left).
            events = poller.poll(0 if stopping else None)
            if stopping and not events:
                break
            for fd, mask in events:
                if fd == self._stop_r:
                    stopping = True
                    poller.unregister(self._stop_r)
                elif mask & (select.POLLIN | select.POLLHUP) and self._move(fd, active):
                    poller.unregister(fd)  # end of file: this image is complete
                    self._close_image(fd, active)

    def _move(self, fd: int, active: dict[int, tuple[int, Streamed | Spilled]]) -> bool:
        """Move what the pipe holds; True at end of file.

        A write that fails (a full disk) is recorded and the rest of that image is
        discarded: CRIU must never block on a pipe nobody reads, or the container
        would stay frozen; the dump's outcome is decided by `finish`.
        """
        if fd not in active:
            self._open_image(fd, active)
        target, entry = active[fd]
        while True:
            try:
                moved = self._splice(fd, target, entry)
            except BlockingIOError:
                return False
            except OSError as exc:
                if self._error is None:
                    self._error = exc
                active[fd] = (self._sink, entry)
                target = self._sink
                continue
            if moved == 0:
                return True
            if isinstance(entry, Streamed) and target != self._sink:
                entry.size += moved

    def _splice(self, fd: int, target: int, entry: Streamed | Spilled) -> int:
        if self._through is not None and isinstance(entry, Streamed) and target != self._sink:
            return self._through.read_from(fd, SPLICE_CHUNK)
        if isinstance(entry, Streamed) and target != self._sink:
            offset = entry.header_at + entry.header_len + entry.size
            return os.splice(fd, target, SPLICE_CHUNK, offset_dst=offset, flags=os.SPLICE_F_NONBLOCK)
        return os.splice(fd, target, SPLICE_CHUNK, flags=os.SPLICE_F_NONBLOCK)

    def _open_image(self, fd: int, active: dict[int, tuple[int, Streamed | Spilled]]) -> None:
        name = f"{IMAGES_DIR}/{self._fds[fd].name}"
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe only means more wake-ups
        if not any(isinstance(entry, Streamed) for _, entry in active.values()):
            header_len = len(aligned_header(name, _HUGE, self._result.end, self._block))
            streamed = Streamed(name, self._result.end, header_len)
            self._result.end += header_len
            active[fd] = (self._archive, streamed)
            if self._through is not None:
                try:
                    streamed.slot = self._through.reserve(header_len)
                except OSError as exc:  # the sealer's writer failed (a full disk): discard, as below
                    self._error = self._error or exc
                    active[fd] = (self._sink, streamed)
            return
        path = self._spill_dir / f".spill-{self._fds[fd].name}"
        spill = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
        active[fd] = (spill, Spilled(name, path))

    def _close_image(self, fd: int, active: dict[int, tuple[int, Streamed | Spilled]]) -> None:
        target, entry = active.pop(fd)
        os.close(fd)
        del self._fds[fd]
        if self._error is not None:
            if isinstance(entry, Spilled) and target != self._sink:
                os.close(target)
            return  # the archive is lost anyway: finish() raises
        if isinstance(entry, Spilled):
            os.close(target)
            self._result.spilled.append(entry)
            return
        header = aligned_header(entry.name, entry.size, entry.header_at, self._block, entry.header_len)
        data_end = entry.header_at + entry.header_len + entry.size
        padding = -data_end % _BLOCK
        if self._through is not None and entry.slot is not None:
            try:
                self._through.fill(entry.slot, header)
                self._through.write(bytes(padding))
            except OSError as exc:
                self._error = exc
                return
        else:
            os.pwrite(self._archive, header, entry.header_at)
            if padding:
                os.pwrite(self._archive, bytes(padding), data_end)
        self._result.end = data_end + padding
        self._result.streamed.append(entry)


def remove_fifos(fifos: list[Path]) -> None:
    """After the dump: the images they carried are in the archive or spilled; unused ones never
    held anything. None may reach the archive as a member (only files and directories do)."""
    for path in fifos:
        try:
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                path.unlink()
        except FileNotFoundError:
            pass


def aligned_header(name: str, size: int, offset: int, block: int, length: int | None = None) -> bytes:
    """The PAX header of `name`, padded (a `comment` record) so its data starts on a `block` boundary.

    With `length`, the header is exactly that long (the room reserved before the size was known).
    CRIU waits on a full pipe while this runs, so the padding is found by bisection: the
    header grows by whole 512-byte blocks as the comment grows a byte at a time.
    """
    info = root_entry(name, tarfile.REGTYPE, FILE_MODE, int(time.time()))
    info.size = size

    def build(pad: int) -> bytes:
        info.pax_headers = {"comment": "criu-shim alignment " + "." * pad}
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    shortest = len(build(0))
    target = length if length is not None else shortest + (-(offset + shortest) % block)
    low, high = 0, max(target, 1)
    while low < high:
        middle = (low + high) // 2
        if len(build(middle)) >= target:
            high = middle
        else:
            low = middle + 1
    header = build(low)
    if len(header) != target or (offset + len(header)) % block:
        raise ValueError(f"no header padding for {name} at {offset} (block {block}, length {length})")
    return header


def _directory_header(name: str) -> bytes:
    info = root_entry(name, tarfile.DIRTYPE, 0o700, int(time.time()))
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    if len(header) != _BLOCK:
        raise ValueError(f"directory header {name!r} is {len(header)} bytes")
    return header
