"""A stop-after checkpoint whose criu-shim died after CRIU's gate opened: its archive completed at start-up.

The window. A stop-after dump's gate (`dumpgate`) opens only once the page
stream kept every page; from then on CRIU finishes and ends the container,
and the archive is all that will be left of the workload. Before the gate
opens criu-shim writes into the staging archive every member that is final
already (`StreamedArchive.append`: the metadata, the rootfs diff, /dev/shm,
the container's log and every CRIU image CRIU has closed), then this marker;
what CRIU writes last is left for after the gate: its inventory (the gate
itself), the images it still holds open at the gate (buffered, flushed when it
closes them after the inventory: criu/cr-dump.c cr_dump_finish closes the
global image set, `files.img`, `cgroup.img`...), its statistics and the end
of its log (`late_members`). Right after the gate opens the inventory is taken
out of the pipe into a file (`Gate.finish`).

Recovery (`decide`, `complete`): a marker in the staging directory of an
interrupted checkpoint means the gate may have opened. The archive is
completed only if CRIU's dump went through: the inventory is a file (not the
gate's FIFO) and CRIU's log ends its dump with "Dumping finished
successfully" (its last line, written after it released or ended the
tasks and wrote its statistics). Else nothing is completed: CRIU failed at
the gate, so the container runs on (the caller checks and says so).

Everything in the staging directory is hostile input to recovery, the marker
included: owner, mode, file type, link count and sizes are checked, no
symlink is followed (files are opened relative to directories opened
O_NOFOLLOW), and the archive's written part must be a tar ending exactly where
the marker says. A refusal says what was wrong; the caller deletes the
staging directory either way. Blocking: call from a worker thread.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from shim import archive_layout as layout
from shim.checkpoint import rollforward_files as files
from shim.checkpoint.archive import FILE_MODE, Member, TarWriter, add_members
from shim.checkpoint.compression import Compression, FileSink, ZstdFile
from shim.checkpoint.rollforward_files import RollForwardError as RollForwardError
from shim.checkpoint.sealing import SealedTarWriter
from shim.checkpoint.stream_archive import ARCHIVE_NAME

MARKER = "rollforward.json"  # in the staging directory: the gate of a stop-after dump is about to open
VERSION = 1
WORK_DIR = "work"  # CRIU's work directory in the staging directory (runc's work_path)
MARKER_MAX = 64 << 10
DUMP_DONE = b"Dumping finished successfully"  # CRIU's last log line of a dump that went through (cr_dump_finish)
LOG_TAIL = 64 << 10
# CRIU's global image set (criu/include/image-desc.h, _CR_FD_GLOB_FROM.._TO; names from criu/image-desc.c):
# open for the whole dump and closed only after the inventory is written. Whatever else CRIU still holds
# open at the gate is found by looking (dumpgate.held_open) and deferred too.
GLOBAL_IMAGES = frozenset(f"{name}.img" for name in (
    "files", "sk-queues", "ext-files", "unixsk", "pipes", "pipes-data", "fifo", "fifo-data", "tty", "tty-info",
    "tty-data", "remap-fpath", "cgroup", "filelocks", "seccomp"))
TAIL_FILES = ((layout.STATS_DUMP, layout.STATS_DUMP), (layout.DUMP_LOG, layout.DUMP_LOG))  # member, file in work/


@dataclass(frozen=True)
class Marker:
    container_id: str
    location: Path
    staging: Path
    end: int  # where the members written after the gate go (the tar's offset)
    file_end: int | None  # where the file goes on (a zstd one: past its last whole frame); None: sealed, it cannot
    zstd_level: int | None = None  # a zstd archive, continued with a new frame (readers read across frames)

    def encode(self) -> bytes:
        return json.dumps({"version": VERSION, "container_id": self.container_id, "location": str(self.location),
                           "staging": str(self.staging), "end": self.end, "file_end": self.file_end,
                           "zstd_level": self.zstd_level}).encode()


def late_names(open_at_gate: Collection[str]) -> frozenset[str]:
    """The members a stop-after archive gets only after the gate: what CRIU writes last."""
    images = GLOBAL_IMAGES | {n for n in open_at_gate if n.endswith(".img")} | {"inventory.img"}
    return frozenset({f"{layout.IMAGES_DIR}/{n}" for n in images} | {m for m, _ in TAIL_FILES})


def late_members(staging: Path, written: Collection[str]) -> list[Member]:
    """The members not written before the gate, once CRIU is done: the images it wrote last, its
    statistics and its log. The caller has checked the directories (recovery: `files.checked_dir`)."""
    images = staging / layout.IMAGES_DIR
    members = []
    for entry in sorted(os.scandir(images), key=lambda e: e.name):
        name = f"{layout.IMAGES_DIR}/{entry.name}"
        if name not in written:
            members.append(Member(name, source=Path(entry.path)))
    for member, source in TAIL_FILES:
        path = staging / WORK_DIR / source
        if member not in written and path.is_file() and not path.is_symlink():
            members.append(Member(member, source=path))
    return members


def write_marker(marker: Marker, durable: bool) -> None:
    """The marker in the staging directory, atomically (a temporary renamed), 0600."""
    temporary = marker.staging / f".{MARKER}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, marker.encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, marker.staging / MARKER)


def has_marker(staging: Path) -> bool:
    return os.path.lexists(staging / MARKER)


def decide(staging: Path, container_id: str, location: str) -> Marker:
    """The marker of an interrupted stop-after checkpoint, if its archive can be completed; else
    RollForwardError saying why. `container_id` and `location` are the journal's (trusted)."""
    with files.checked_dir(staging) as fd:
        marker = _read_marker(fd, staging)
        if (marker.container_id, str(marker.location), marker.staging) != (container_id, location, staging):
            raise RollForwardError(f"{staging / MARKER} names another checkpoint than the journal "
                                   f"(container {marker.container_id!r}, archive {str(marker.location)!r})")
        if marker.file_end is None:
            raise RollForwardError("the archive is sealed: its encrypted stream cannot be continued after "
                                   "criu-shim died")
        _require_dump_done(fd)
        with files.checked_dir(staging / layout.IMAGES_DIR) as images:
            inventory = files.lstat_in(images, "inventory.img")
            if not stat.S_ISREG(inventory.st_mode) or inventory.st_size == 0:
                raise RollForwardError("CRIU's inventory never reached a file (the gate's FIFO is still there): "
                                       "the gate did not open, or criu-shim died before it kept the inventory")
    return marker


def complete(marker: Marker) -> int:
    """Append the late members to the staging archive, end it, fsync it and rename it onto the
    location; its size. RollForwardError for anything not as criu-shim left it."""
    staging, location = marker.staging, marker.location
    if location.parent != staging.parent or location.name in ("", ".", ".."):
        raise RollForwardError(f"archive path {location} is not beside its staging directory {staging}")
    with ExitStack() as stack:
        fd = stack.enter_context(files.checked_dir(staging))
        stack.enter_context(files.checked_dir(staging / layout.IMAGES_DIR))
        stack.enter_context(files.checked_dir(staging / WORK_DIR))
        archive = files.open_private(fd, ARCHIVE_NAME, os.O_RDWR)
        stack.callback(os.close, archive)
        size, file_end = os.fstat(archive).st_size, marker.file_end
        if file_end is None or file_end > size or marker.end % tarfile.BLOCKSIZE:
            raise RollForwardError(f"the staging archive holds {size} bytes, the marker says {file_end}")
        stream = None
        if marker.zstd_level is None:
            written = files.written_names(archive, marker.end)
            os.lseek(archive, marker.end, os.SEEK_SET)
            writer = TarWriter(archive, start=marker.end)
        else:
            written = files.written_names(archive, marker.end, file_end)
            stream = ZstdFile(FileSink(archive, file_end), Compression(marker.zstd_level, threads=0))
            writer = SealedTarWriter(stream, start=marker.end)
        late = late_members(staging, written)
        for member in late:
            files.check_source(member)
        add_members(writer, late)
        size = writer.finish() if stream is None else (writer.finish(), stream.close())[1]
        os.ftruncate(archive, size)
        os.fsync(archive)
        parent = stack.enter_context(files.directory(location.parent))
        files.refuse_existing_non_file(parent, location)
        os.rename(ARCHIVE_NAME, location.name, src_dir_fd=fd, dst_dir_fd=parent)
        os.fsync(parent)
        return size


def _read_marker(directory: int, staging: Path) -> Marker:
    fd = files.open_private(directory, MARKER, os.O_RDONLY, MARKER_MAX)
    try:
        raw = os.read(fd, MARKER_MAX + 1)
    finally:
        os.close(fd)
    try:
        facts = json.loads(raw)
        assert isinstance(facts, dict) and facts.get("version") == VERSION
        container_id, location, where, end, file_end, level = (
            facts["container_id"], facts["location"], facts["staging"], facts["end"], facts["file_end"],
            facts["zstd_level"])
        assert isinstance(container_id, str) and isinstance(location, str) and isinstance(where, str)
        assert type(end) is int and end > 0 and Path(location).is_absolute()
        assert file_end is None or (type(file_end) is int and file_end > 0)
        assert level is None or (type(level) is int and 1 <= level <= 22)
        assert level is not None or file_end in (None, end)  # a plain tar: the file is the tar
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError):
        raise RollForwardError(f"{staging / MARKER} is not a marker of criu-shim ({len(raw)} bytes)") from None
    return Marker(container_id, Path(location), Path(where), end, file_end, level)


def _require_dump_done(staging: int) -> None:
    try:
        with files.checked_dir_at(staging, WORK_DIR) as work:
            log = files.open_private(work, layout.DUMP_LOG, os.O_RDONLY, exact_mode=False)
    except RollForwardError as exc:
        raise RollForwardError(f"CRIU's log of the dump cannot be read: {exc}") from None
    try:
        size = os.fstat(log).st_size
        tail = os.pread(log, LOG_TAIL, max(0, size - LOG_TAIL))
    finally:
        os.close(log)
    # Printed only by a dump that went through ("Dumping FAILED." otherwise), as CRIU's last word: the
    # log also carries paths the container chose (at log level 4), so the text anywhere else proves nothing.
    lines = [line for line in tail.splitlines() if line.strip()]
    if not lines or not lines[-1].rstrip().endswith(DUMP_DONE):
        raise RollForwardError("CRIU's dump did not go through (its log does not end with "
                               f"{DUMP_DONE.decode()!r}): the container was not ended by it")
