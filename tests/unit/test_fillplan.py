"""The page daemon's plan (shim.restore.fillplan): faults first, runs within spans and VMAs, EEXIST, EAGAIN,
remove, remap and fork, without any I/O."""

from __future__ import annotations

import pytest

from shim.restore.fillplan import BACKGROUND_RUN, FAULT_RUN, PAGE, Copy, FillPlan, Span, Zero

MiB = 1 << 20
BASE = 0x7F0000000000


def plan(*spans: tuple[int, int, int]) -> FillPlan:
    return FillPlan(Span(start, start + length, offset) for start, length, offset in spans)


def drain(p: FillPlan) -> list[Copy]:
    """Run the plan to the end, every copy landing whole."""
    done = []
    while (action := p.next()) is not None:
        assert isinstance(action, Copy)
        p.finished(action, action.length)
        done.append(action)
    return done


def test_background_fill_copies_everything_once_in_large_runs() -> None:
    p = plan((BASE, 10 * MiB, 0), (BASE + 64 * MiB, 1 * MiB, 10 * MiB))
    copies = drain(p)
    assert p.complete and p.missing_bytes == 0
    assert all(c.length <= BACKGROUND_RUN and not c.fault for c in copies)
    covered = sorted((c.start, c.start + c.length, c.offset) for c in copies)
    assert covered[0] == (BASE, BASE + BACKGROUND_RUN, 0)
    assert sum(c.length for c in copies) == 11 * MiB
    for start, _, offset in covered:  # each byte from its own place in the image
        assert offset == (start - BASE if start < BASE + 64 * MiB else 10 * MiB + start - BASE - 64 * MiB)


def test_a_fault_jumps_the_queue_and_the_fill_goes_on_after_it() -> None:
    p = plan((BASE, 64 * MiB, 0))
    first = p.next()
    assert isinstance(first, Copy) and first.start == BASE
    p.fault(BASE + 40 * MiB + 123)  # any byte of the page
    served = p.next()
    assert isinstance(served, Copy) and served.fault
    assert (served.start, served.offset, served.length) == (BASE + 40 * MiB, 40 * MiB, FAULT_RUN)
    p.finished(served, served.length)
    after = p.next()
    assert isinstance(after, Copy) and not after.fault
    assert after.start == BASE + 40 * MiB + FAULT_RUN  # where the process is reading
    p.finished(after, after.length)
    p.finished(first, first.length)
    drain(p)
    assert p.complete


def test_a_fault_run_stops_at_the_end_of_its_span() -> None:
    p = plan((BASE, 3 * PAGE, 0), (BASE + 3 * PAGE, 5 * PAGE, 100 * PAGE))  # adjacent, not contiguous in the image
    p.fault(BASE + PAGE)
    served = p.next()
    assert isinstance(served, Copy) and (served.start, served.length, served.offset) == (BASE + PAGE, 2 * PAGE, PAGE)


def test_a_fault_where_the_image_has_nothing_gets_a_zero_page() -> None:
    p = plan((BASE, MiB, 0))
    p.fault(BASE + 2 * MiB + 5)
    assert p.next(background=False) == Zero(BASE + 2 * MiB, PAGE)


def test_a_fault_on_bytes_in_flight_waits_for_them_and_is_served_if_they_do_not_land() -> None:
    p = plan((BASE, 8 * MiB, 0))
    flying = p.next()
    assert isinstance(flying, Copy)
    p.fault(BASE + PAGE)
    assert p.next(background=False) is None  # the copy in flight wakes it
    p.finished(flying, 0)  # EAGAIN: nothing landed
    again = p.next(background=False)
    assert isinstance(again, Copy) and again.fault and again.start == BASE + PAGE


def test_eexist_counts_the_page_that_was_there_and_plans_the_rest() -> None:
    p = plan((BASE, 16 * PAGE, 0))
    p.fault(BASE)
    copy = p.next()
    assert isinstance(copy, Copy) and copy.length == 16 * PAGE
    p.finished(copy, 3 * PAGE, exists=True)  # pages 0-2 copied, page 3 was there
    assert p.missing_bytes == 12 * PAGE
    rest = p.next()
    assert isinstance(rest, Copy) and (rest.start, rest.offset) == (BASE + 4 * PAGE, 4 * PAGE)
    p.finished(rest, rest.length)
    assert p.complete


def test_a_partial_copy_plans_what_did_not_land() -> None:
    p = plan((BASE, 16 * PAGE, 0))
    copy = p.next()
    assert isinstance(copy, Copy)
    p.finished(copy, 5 * PAGE)
    assert p.missing_bytes == 11 * PAGE and not p.complete
    drain(p)
    assert p.complete


def test_runs_are_split_where_a_vma_ends() -> None:
    p = FillPlan.from_runs([(BASE, 8 * PAGE, 0)], [(BASE, BASE + 3 * PAGE), (BASE + 3 * PAGE, BASE + 8 * PAGE)])
    p.fault(BASE)
    copy = p.next()
    assert isinstance(copy, Copy) and copy.length == 3 * PAGE
    p.finished(copy, copy.length)
    rest = p.next()
    assert isinstance(rest, Copy) and (rest.start, rest.offset, rest.length) == (BASE + 3 * PAGE, 3 * PAGE, 5 * PAGE)


def test_removed_ranges_are_not_filled_even_when_in_flight() -> None:
    p = plan((BASE, 8 * PAGE, 0))
    copy = p.next()
    assert isinstance(copy, Copy)
    p.removed(BASE + 2 * PAGE, BASE + 6 * PAGE)
    p.finished(copy, 0)  # interrupted: only what is still mapped comes back
    assert p.missing_bytes == 4 * PAGE
    copies = drain(p)
    assert sorted((c.start, c.offset) for c in copies) == [(BASE, 0), (BASE + 6 * PAGE, 6 * PAGE)]


def test_remapped_spans_move_and_keep_their_image_offsets() -> None:
    p = plan((BASE, 8 * PAGE, 0))
    new = BASE + 100 * MiB
    p.remapped(BASE + 4 * PAGE, new, 4 * PAGE)
    p.fault(new + PAGE)
    copy = p.next()
    assert isinstance(copy, Copy) and (copy.start, copy.offset, copy.length) == (new + PAGE, 5 * PAGE, 3 * PAGE)
    p.fault(BASE + 5 * PAGE)  # the old place is not ours any more
    p.finished(copy, copy.length)
    assert p.next(background=False) == Zero(BASE + 5 * PAGE, PAGE)


def test_a_forked_child_needs_what_the_parent_still_misses_including_in_flight() -> None:
    p = plan((BASE, 8 * PAGE, 0))
    p.fault(BASE)
    first = p.next()
    assert isinstance(first, Copy)
    p.finished(first, 2 * PAGE)  # 2 pages landed before the fork
    p.fault(BASE + 2 * PAGE)
    flying = p.next()
    assert isinstance(flying, Copy)
    child = p.forked()
    assert child.missing_bytes == 6 * PAGE  # the parent's in-flight copy does not land in the child
    p.finished(flying, flying.length)
    assert p.complete and not child.complete
    drain(child)
    assert child.complete


def test_overlapping_runs_are_refused() -> None:
    with pytest.raises(ValueError, match="overlapping"):
        plan((BASE, 2 * PAGE, 0), (BASE + PAGE, 2 * PAGE, 2 * PAGE))


def test_peek_names_what_the_fill_reads_next() -> None:
    p = plan((BASE, 16 * MiB, 4 * MiB))
    assert p.peek_background(BACKGROUND_RUN) == (4 * MiB, BACKGROUND_RUN)
    drain(p)
    assert p.peek_background(BACKGROUND_RUN) is None


def test_claims_pipelined_from_a_network_source_land_later_and_short_replies_are_asked_again() -> None:
    # A network source (shim.restore.remote_pages) claims several background copies before any lands.
    p = plan((BASE, 3 * MiB, BASE), (BASE + 8 * MiB, 2 * MiB, BASE + 8 * MiB))  # offsets: dump-time addresses
    first, second = p.next(), p.next()
    assert isinstance(first, Copy) and isinstance(second, Copy) and first.claim != second.claim
    assert not p.has_missing and not p.complete and p.in_flight  # all asked for, nothing in place yet
    p.fault(BASE + 8 * MiB + PAGE)  # a page on its way: waits for it, nothing asked twice
    assert p.next() is None
    p.finished(second, 1 * MiB)  # the reply was shorter (the end of the source's iovec): the rest is missing
    assert p.has_missing
    again = p.next()
    assert isinstance(again, Copy) and (again.start, again.length, again.offset) == (
        BASE + 9 * MiB, 1 * MiB, BASE + 9 * MiB)
    p.finished(first, first.length)
    p.finished(again, again.length)
    assert p.complete


def test_the_caller_sizes_fault_and_background_runs() -> None:
    p = plan((BASE, 16 * MiB, 0))
    p.fault(BASE + 8 * MiB + 5)
    served = p.next(fault_run=256 << 10, run=1 * MiB)
    assert served == Copy(1, BASE + 8 * MiB, 256 << 10, 8 * MiB, True)
    p.finished(served, served.length)
    background = p.next(fault_run=256 << 10, run=1 * MiB)  # the fill goes on after the fault, 1 MiB at a time
    assert isinstance(background, Copy) and not background.fault
    assert (background.start, background.length) == (BASE + 8 * MiB + (256 << 10), 1 * MiB)
