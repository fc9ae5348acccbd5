"""CRIU pagemap images read as hostile input: runs, the eager ranges of a lazy restore, refusals naming the image."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from pycriu.images import pb

from shim.errors import InvalidArgument
from shim.restore.pagemap import (
    IMG_COMMON_MAGIC,
    PAGE_SIZE,
    PAGEMAP_MAGIC,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    Pagemap,
    Run,
    eager_ranges,
    lazy_runs,
    parse,
    remote_runs,
)

LABEL = "checkpoint image pagemap-1.img"
MAGIC = struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC)
EAGER = PE_PRESENT
LAZY = PE_PRESENT | PE_LAZY


# --- building images -------------------------------------------------------------


def record(raw: bytes) -> bytes:
    return struct.pack("<I", len(raw)) + raw


def head(pages_id: int = 1) -> bytes:
    message = pb.pagemap_head()
    message.pages_id = pages_id
    return bytes(message.SerializeToString())


VADDR = 0x400000


def entry(nr_pages: int, flags: int | None = EAGER, *, vaddr: int = VADDR,
          in_parent: bool | None = None) -> bytes:
    """A pagemap entry as CRIU writes it today: nr_pages set, compat_nr_pages 0."""
    message: Any = pb.pagemap_entry()
    message.vaddr, message.compat_nr_pages, message.nr_pages = vaddr, 0, nr_pages
    if flags is not None:
        message.flags = flags
    if in_parent is not None:
        message.in_parent = in_parent
    return bytes(message.SerializeToString())


def image(*entries: bytes, pages_id: int = 1) -> bytes:
    return MAGIC + record(head(pages_id)) + b"".join(record(raw) for raw in entries)


def refused(data: bytes, *fragments: str) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse(data, LABEL)
    assert caught.value.message.startswith(f"{LABEL}: ")
    for fragment in fragments:
        assert fragment in caught.value.message
    return caught.value.message


# --- parse: valid images -------------------------------------------------------------


def test_runs_in_order_with_their_flags() -> None:
    parsed = parse(image(entry(2, EAGER), entry(3, LAZY), entry(1, 0), entry(4, EAGER), pages_id=7), LABEL)
    assert parsed == Pagemap(7, (Run(2, True, False, VADDR), Run(3, True, True, VADDR), Run(1, False, False, VADDR),
                                 Run(4, True, False, VADDR)))


def test_header_only_is_an_empty_pagemap() -> None:
    parsed = parse(image(pages_id=3), LABEL)
    assert parsed == Pagemap(3, ())
    assert parsed.data_size == 0
    assert eager_ranges(parsed) == []


def test_data_size_counts_present_pages_only() -> None:
    parsed = parse(image(entry(2, EAGER), entry(5, LAZY), entry(100, 0), entry(1, PE_LAZY)), LABEL)
    assert parsed.data_size == 7 * PAGE_SIZE


def test_entry_without_flags_is_present_and_eager() -> None:
    parsed = parse(image(entry(3, flags=None)), LABEL)
    assert parsed.runs == (Run(3, True, False, VADDR),)
    assert eager_ranges(parsed) == [(0, 3 * PAGE_SIZE)]


def test_old_entry_counting_pages_in_compat_nr_pages() -> None:
    # Older CRIU wrote neither flags nor nr_pages; CRIU itself still reads these images.
    message: Any = pb.pagemap_entry()
    message.vaddr, message.compat_nr_pages = 0x7F0000000000, 5
    parsed = parse(image(bytes(message.SerializeToString())), LABEL)
    assert parsed.runs == (Run(5, True, False, 0x7F0000000000),)
    assert parsed.data_size == 5 * PAGE_SIZE


def test_nr_pages_wins_over_compat_nr_pages() -> None:
    message: Any = pb.pagemap_entry()
    message.vaddr, message.compat_nr_pages, message.nr_pages, message.flags = 0, 9, 2, EAGER
    assert parse(image(bytes(message.SerializeToString())), LABEL).runs == (Run(2, True, False, 0),)


def test_in_parent_false_is_fine() -> None:
    assert parse(image(entry(1, EAGER, in_parent=False)), LABEL).runs == (Run(1, True, False, VADDR),)


# --- eager_ranges ---------------------------------------------------------------------


def ranges_of(*entries: bytes) -> list[tuple[int, int]]:
    return eager_ranges(parse(image(*entries), LABEL))


def test_eager_ranges_skip_lazy_runs_and_holes() -> None:
    # pages file: [eager 2][lazy 3][eager 1] ; the hole (not present) takes no room in the file.
    assert ranges_of(entry(2, EAGER), entry(3, LAZY), entry(10, 0), entry(1, EAGER)) == [
        (0, 2 * PAGE_SIZE), (5 * PAGE_SIZE, PAGE_SIZE)]


def test_adjacent_eager_runs_merge_across_holes_not_across_lazy_runs() -> None:
    ranges = ranges_of(entry(1, EAGER), entry(2, EAGER), entry(7, 0), entry(3, EAGER),  # one range: 6 pages
                       entry(4, LAZY), entry(1, EAGER), entry(1, flags=None))  # lazy gap, then 2 pages
    assert ranges == [(0, 6 * PAGE_SIZE), (10 * PAGE_SIZE, 2 * PAGE_SIZE)]


def test_eager_ranges_all_lazy_and_lazy_first() -> None:
    assert ranges_of(entry(4, LAZY), entry(2, LAZY)) == []
    assert ranges_of(entry(4, LAZY), entry(2, EAGER)) == [(4 * PAGE_SIZE, 2 * PAGE_SIZE)]


def test_eager_ranges_lie_inside_the_data() -> None:
    parsed = parse(image(entry(3, LAZY), entry(2, EAGER), entry(1, 0), entry(5, LAZY), entry(1, EAGER)), LABEL)
    assert all(offset + length <= parsed.data_size for offset, length in eager_ranges(parsed))
    assert eager_ranges(parsed)[-1] == (parsed.data_size - PAGE_SIZE, PAGE_SIZE)


# --- parse: garbage refused, naming the image -------------------------------------------


@pytest.mark.parametrize("data", [
    b"",
    MAGIC[:7],
    struct.pack("<II", IMG_COMMON_MAGIC, 0x12345678) + record(head()),  # another CRIU image kind
    struct.pack("<II", 0x12345678, PAGEMAP_MAGIC) + record(head()),
    struct.pack("<I", PAGEMAP_MAGIC) + record(head()),  # no common magic first
    b"\x7fELF" + bytes(100),
])
def test_bad_magic_or_too_short(data: bytes) -> None:
    refused(data, "not a CRIU pagemap image (bad magic)")


def test_no_header() -> None:
    refused(MAGIC, "no pagemap header")


def test_truncated_entry_length() -> None:
    data = image(entry(1)) + b"\x05\x00"
    refused(data, f"truncated entry length at byte {len(data) - 2}")


def test_truncated_entry() -> None:
    full = image(entry(1), entry(2))
    refused(full[:-1], "is truncated or oversized")


def test_length_beyond_the_end() -> None:
    refused(MAGIC + struct.pack("<I", 200) + head(), "entry of 200 bytes at byte 12 is truncated or oversized")


def test_oversized_entry() -> None:
    # Complete, but longer than any pagemap entry CRIU writes (a few varints).
    junk = bytes(300)
    refused(MAGIC + record(head()) + record(junk), "entry of 300 bytes", "truncated or oversized")


def test_huge_length_word() -> None:
    refused(MAGIC + struct.pack("<I", 0xFFFFFFFF) + bytes(16), "entry of 4294967295 bytes")


@pytest.mark.parametrize("raw", [
    b"\xff\xff\xff",          # a key varint that never ends
    b"\x28",                  # nr_pages key without its value
    b"\x2a\x10abc",           # field 5 as a length-delimited of 16 bytes, 3 there
])
def test_corrupt_protobuf_entry(raw: bytes) -> None:
    refused(image(entry(1)) + record(raw), "corrupt entry")


def test_corrupt_protobuf_header() -> None:
    refused(MAGIC + record(b"\x08"), "corrupt entry")


@pytest.mark.parametrize("raw", [entry(0), entry(0, LAZY), entry(0, flags=None)])
def test_entry_of_zero_pages(raw: bytes) -> None:
    refused(image(entry(1), raw), "an entry with 0 pages")


def test_entry_without_any_page_count() -> None:
    message: Any = pb.pagemap_entry()
    message.vaddr, message.flags = 0, EAGER
    refused(image(bytes(message.SerializePartialToString())), "an entry with 0 pages")


@pytest.mark.parametrize("raw", [
    entry(2, PE_PARENT),
    entry(2, PE_PARENT | PE_PRESENT),
    entry(2, EAGER, in_parent=True),
    entry(2, flags=None, in_parent=True),
])
def test_pages_in_a_parent_image_refused(raw: bytes) -> None:
    refused(image(entry(1), raw), "pages in a parent image (incremental dump)", "not restorable from an archive")


def test_lazy_runs_give_address_length_and_offset_in_the_pages_file() -> None:
    # pages file: [eager 2 @0][lazy 3 @2p][hole][lazy 1 right after the 3 in memory and in the file][lazy 2 far]
    p = PAGE_SIZE
    parsed = parse(image(entry(2, EAGER, vaddr=0x10000), entry(3, LAZY, vaddr=0x20000), entry(4, 0, vaddr=0x40000),
                         entry(1, LAZY, vaddr=0x23000), entry(2, LAZY, vaddr=0x90000)), LABEL)
    assert lazy_runs(parsed) == [(0x20000, 4 * p, 2 * p), (0x90000, 2 * p, 6 * p)]


def test_remote_runs_of_a_lazy_migration_are_its_entries_at_their_addresses() -> None:
    # A lazy dump for a page server: lazy runs have no data here (PE_LAZY without PE_PRESENT). Each entry
    # is one iovec of the source's page pipe, so adjacent ones stay apart; the offset is the address.
    p = PAGE_SIZE
    parsed = parse(image(entry(2, EAGER, vaddr=0x10000), entry(3, PE_LAZY, vaddr=0x20000),
                         entry(1, PE_LAZY, vaddr=0x23000), entry(4, 0, vaddr=0x40000), entry(2, LAZY, vaddr=0x90000)),
                   LABEL)
    assert remote_runs(parsed) == [(0x20000, 3 * p, 0x20000), (0x23000, p, 0x23000)]
    assert lazy_runs(parsed) == [(0x90000, 2 * p, 2 * p)]  # with data here: the local daemon's, not the source's
