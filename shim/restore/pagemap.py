"""CRIU's pagemap images, read as hostile input: which bytes of pages-N.img a restore reads itself.

`pagemap-<pid>.img` lists a process's memory runs in the order their pages
sit in `pages-<id>.img`. A run with PE_PRESENT has data there; PE_LAZY marks
runs that a lazy restore leaves to the page daemon (userfaultfd), so the
restoring CRIU reads only the present runs without PE_LAZY. Knowing them, the
proxy copies out of an archive just those few pages (`eager_ranges`) and lets
the daemon read the rest in place.

Image layout: a u32 magic (CRIU's common magic, then the pagemap magic), then
entries, each a u32 length and a protobuf message: first a PagemapHead, then
PagemapEntry records.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from shim.errors import InvalidArgument

PAGE_SIZE = 4096
IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
# A pagemap entry is a handful of varints; anything longer is not CRIU's.
_MAX_ENTRY = 256
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Run:
    """A run of pages: how many, whether their data is in the pages file, whether lazy; where it was mapped."""

    nr_pages: int
    present: bool
    lazy: bool
    vaddr: int = 0


@dataclass(frozen=True, slots=True)
class Pagemap:
    pages_id: int
    runs: tuple[Run, ...]

    @property
    def data_size(self) -> int:
        """Bytes of pages-<pages_id>.img that the runs account for."""
        return sum(r.nr_pages for r in self.runs if r.present) * PAGE_SIZE


def parse(data: bytes, label: str) -> Pagemap:
    """A pagemap image; InvalidArgument for anything that is not one."""
    from pycriu.images import pb

    records = list(_records(data, label))
    if not records:
        raise InvalidArgument(f"{label}: no pagemap header")
    head = _message(pb.pagemap_head, records[0], label)
    runs = tuple(_run(_message(pb.pagemap_entry, raw, label), label) for raw in records[1:])
    return Pagemap(int(head.pages_id), runs)


def eager_ranges(pagemap: Pagemap) -> list[tuple[int, int]]:
    """(offset, length) in the pages file of the data a lazy restore reads itself, adjacent runs merged."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    for run in pagemap.runs:
        if not run.present:
            continue
        length = run.nr_pages * PAGE_SIZE
        if not run.lazy:
            if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((offset, length))
        offset += length
    return ranges


def lazy_runs(pagemap: Pagemap) -> list[tuple[int, int, int]]:
    """(address, bytes, offset in the pages file) of the runs a lazy restore leaves to the page daemon, adjacent ones merged."""
    runs: list[tuple[int, int, int]] = []
    offset = 0
    for run in pagemap.runs:
        length = run.nr_pages * PAGE_SIZE
        if run.present and run.lazy:
            if runs and runs[-1][0] + runs[-1][1] == run.vaddr and runs[-1][2] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + length, runs[-1][2])
            else:
                runs.append((run.vaddr, length, offset))
        if run.present:
            offset += length
    return runs


def remote_runs(pagemap: Pagemap) -> list[tuple[int, int, int]]:
    """(address, bytes, address) of a lazy migration's lazy runs, whose data the source's page server holds.

    Such a run has no data in the pages file (PE_LAZY without PE_PRESENT): its "image offset" is its
    dump-time address, what the page server is asked for. Not merged: each entry is one iovec of the
    source's page pipe, and the server answers a request up to the end of its iovec only.
    """
    return [(run.vaddr, run.nr_pages * PAGE_SIZE, run.vaddr) for run in pagemap.runs
            if run.lazy and not run.present]


def _records(data: bytes, label: str) -> list[bytes]:
    if len(data) < 8 or _U32.unpack_from(data, 0)[0] != IMG_COMMON_MAGIC \
            or _U32.unpack_from(data, 4)[0] != PAGEMAP_MAGIC:
        raise InvalidArgument(f"{label}: not a CRIU pagemap image (bad magic)")
    records, pos = [], 8
    while pos < len(data):
        if pos + 4 > len(data):
            raise InvalidArgument(f"{label}: truncated entry length at byte {pos}")
        size = _U32.unpack_from(data, pos)[0]
        pos += 4
        if size > _MAX_ENTRY or pos + size > len(data):
            raise InvalidArgument(f"{label}: entry of {size} bytes at byte {pos} is truncated or oversized")
        records.append(data[pos:pos + size])
        pos += size
    return records


def _message(kind: type, raw: bytes, label: str) -> Any:
    from google.protobuf.message import DecodeError

    message = kind()
    try:
        message.ParseFromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"{label}: corrupt entry: {exc}") from None
    return message


def _run(entry: Any, label: str) -> Run:
    # Images of older CRIU count pages in compat_nr_pages only; CRIU reads them so (init_compat_pagemap_entry).
    nr_pages = int(entry.nr_pages if entry.HasField("nr_pages") else entry.compat_nr_pages)
    flags = int(entry.flags)
    in_parent = bool(entry.in_parent) or bool(flags & PE_PARENT)
    if nr_pages <= 0:
        raise InvalidArgument(f"{label}: an entry with {nr_pages} pages")
    if in_parent:
        raise InvalidArgument(f"{label}: pages in a parent image (incremental dump): not restorable from "
                              "an archive")
    # Images without flags (old CRIU) have every listed page present and eager.
    present = bool(flags & PE_PRESENT) or not entry.HasField("flags")
    return Run(nr_pages, present, bool(flags & PE_LAZY), int(entry.vaddr))
