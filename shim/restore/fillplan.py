"""What a lazy restore still has to put in place, and what to do next: the page daemon's plan, sans I/O.

One plan per restored process (one userfaultfd). It knows the process's lazy
memory as spans of addresses, each with where its bytes start in the memory
image (`offset` in pages-N.img), and nothing about how bytes are read or copied:
the daemon (shim.runtime.page_daemon) asks `next()` for an action, performs it
(UFFDIO_COPY, UFFDIO_ZEROPAGE) and reports back with `finished`; it feeds in
what userfaultfd tells it (`fault`, `removed`, `remapped`, `forked`). The same
plan serves any page source: a source that delivers bytes later (a network
stream) holds a claim in flight until they arrive.

Rules (the facts of CRIU's restore, criu/uffd.c): a fault always jumps the
queue; an address the plan does not hold (a page that was zero or absent at
dump time, or removed since) gets a zero page; a copy is never larger than one
span, so it never crosses a VMA (spans are split at VMA boundaries when built,
see `from_runs`); a copy that stops at a page already there (EEXIST) counts
that page as in place.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

PAGE = 4096
# A fault is served with the missing run from its page on, up to this: large enough that a program
# walking its memory faults once per run, small enough to answer it within a fraction of a millisecond.
FAULT_RUN = 1 << 20
# The background fill's copies: large, so that the per-copy cost disappears against the bytes.
BACKGROUND_RUN = 4 << 20


@dataclass(slots=True)
class Span:
    """Addresses [start, end) whose bytes are at `offset` in the memory image."""

    start: int
    end: int
    offset: int

    def cut(self, at: int) -> Span:
        """Split at `at` (inside): self keeps the head, the tail is returned."""
        tail = Span(at, self.end, self.offset + at - self.start)
        self.end = at
        return tail


@dataclass(frozen=True, slots=True)
class Copy:
    """Copy `length` bytes of the image from `offset` to `start`; `claim` identifies it to `finished`."""

    claim: int
    start: int
    length: int
    offset: int
    fault: bool  # served for a fault (True) or the background fill


@dataclass(frozen=True, slots=True)
class Zero:
    """Map zero pages at [start, start + length): a fault where the image has no data."""

    start: int
    length: int


class FillPlan:
    """One process's lazy memory: what is missing, what is in flight, what to do next."""

    def __init__(self, spans: Iterable[Span]) -> None:
        self._missing: list[Span] = sorted((Span(s.start, s.end, s.offset) for s in spans if s.end > s.start),
                                           key=lambda s: s.start)
        self._check_disjoint(self._missing)
        self._flight: dict[int, list[Span]] = {}
        self._faults: deque[int] = deque()  # page addresses faulted and not yet acted upon
        self._waiting: set[int] = set()  # faulted pages whose bytes are in flight
        self._cursor = self._missing[0].start if self._missing else 0
        self._claims = itertools.count(1)

    @classmethod
    def from_runs(cls, runs: Iterable[tuple[int, int, int]], vmas: Iterable[tuple[int, int]]) -> FillPlan:
        """A plan from (address, length, image offset) runs, split where a VMA ends: a copy stays in one VMA."""
        bounds = sorted({end for _, end in vmas})
        spans: list[Span] = []
        for start, length, offset in runs:
            span = Span(start, start + length, offset)
            for edge in bounds[bisect.bisect_right(bounds, span.start):]:
                if edge >= span.end:
                    break
                spans.append(span)
                span = span.cut(edge)
            spans.append(span)
        return cls(spans)

    # What the daemon asks

    @property
    def missing_bytes(self) -> int:
        return sum(s.end - s.start for s in self._missing)

    @property
    def has_missing(self) -> bool:
        """Something is neither in place nor in flight: a background copy can be claimed."""
        return bool(self._missing)

    @property
    def in_flight(self) -> bool:
        return bool(self._flight)

    @property
    def complete(self) -> bool:
        """Every byte the image holds for this process is in place (nothing missing, nothing in flight)."""
        return not self._missing and not self._flight

    @property
    def has_faults(self) -> bool:
        return bool(self._faults)

    def next(self, background: bool = True, run: int = BACKGROUND_RUN, fault_run: int = FAULT_RUN) -> Copy | Zero | None:
        """The next action: faults first (up to `fault_run` from the faulting page), then (if `background`) the
        fill from the cursor on (up to `run`); None: nothing now."""
        while self._faults:
            page = self._faults.popleft()
            action = self._serve(page, fault_run)
            if action is not None:
                return action
        if background and self._missing:
            return self._claim(self._from_cursor(), run, fault=False)
        return None

    def peek_background(self, length: int) -> tuple[int, int] | None:
        """(image offset, bytes) the background fill reads next, up to `length`: for the source's read-ahead."""
        if not self._missing:
            return None
        index = self._from_cursor()
        span = self._missing[index]
        start = max(span.start, self._cursor) if span.start <= self._cursor < span.end else span.start
        return span.offset + start - span.start, min(length, span.end - start)

    # What the daemon reports

    def fault(self, address: int) -> None:
        """A page fault at `address` (any byte of the page); served before any background copy."""
        self._faults.append(address & ~(PAGE - 1))

    def finished(self, copy: Copy, done: int, exists: bool = False) -> None:
        """`copy` ended with its first `done` bytes in place; `exists`: the page right after them was there already.

        What was not done goes back to missing (a copy interrupted by a change of the address
        space, EAGAIN, is simply planned again); faults waiting on it are served first.
        """
        spans = self._flight.pop(copy.claim, [])
        end = copy.start + done + (PAGE if exists else 0)
        for span in spans:
            if span.end <= end:
                continue
            if span.start < end:  # the head landed, the tail did not
                span = Span(end, span.end, span.offset + end - span.start)
            self._insert(span)
        for page in sorted(self._waiting):
            if self._find(self._missing, page) is not None:
                self._waiting.discard(page)
                self._faults.appendleft(page)
            elif not self._in_flight(page):
                self._waiting.discard(page)  # in place now: the copy woke it

    def removed(self, start: int, end: int) -> None:
        """[start, end) was unmapped or discarded (MADV_DONTNEED): nothing there is ours to fill any more."""
        self._missing = self._without(self._missing, start, end)
        for claim, spans in self._flight.items():
            self._flight[claim] = self._without(spans, start, end)

    def remapped(self, old: int, new: int, length: int) -> None:
        """mremap moved [old, old + length) to `new`: the spans there move with it (image offsets stay)."""
        self._missing = self._moved(self._missing, old, new, length)
        for claim, spans in self._flight.items():
            self._flight[claim] = self._moved(spans, old, new, length)
        self._cursor = new + self._cursor - old if old <= self._cursor < old + length else self._cursor

    def forked(self) -> FillPlan:
        """The plan of a child forked now: all that is missing here, including what is in flight for the parent."""
        spans = [Span(s.start, s.end, s.offset) for s in self._missing]
        spans += [Span(s.start, s.end, s.offset) for flying in self._flight.values() for s in flying]
        return FillPlan(spans)

    # Inside

    def _serve(self, page: int, fault_run: int) -> Copy | Zero | None:
        index = self._find(self._missing, page)
        if index is not None:
            span = self._missing[index]
            if span.start < page:  # the run starts at the faulting page
                self._missing.insert(index + 1, span.cut(page))
                index += 1
            return self._claim(index, fault_run, fault=True)
        if self._in_flight(page):
            self._waiting.add(page)  # the copy in flight wakes it when it lands
            return None
        return Zero(page, PAGE)  # zero or absent at dump time, or removed since (or just landed: EEXIST)

    def _claim(self, index: int, limit: int, fault: bool) -> Copy:
        span = self._missing[index]
        if not fault and span.start < self._cursor < span.end:
            self._missing.insert(index + 1, span.cut(self._cursor))
            index += 1
            span = self._missing[index]
        if span.end - span.start > limit:
            self._missing.insert(index + 1, span.cut(span.start + limit))
        del self._missing[index]
        claim = next(self._claims)
        self._flight[claim] = [span]
        self._cursor = span.end  # the fill goes on where the process is reading
        return Copy(claim, span.start, span.end - span.start, span.offset, fault)

    def _from_cursor(self) -> int:
        """The missing span at or after the cursor (wrapping around to the lowest)."""
        index = bisect.bisect_right([s.end for s in self._missing], self._cursor)
        return index if index < len(self._missing) else 0

    def _in_flight(self, page: int) -> bool:
        return any(self._find(spans, page) is not None for spans in self._flight.values())

    def _insert(self, span: Span) -> None:
        index = bisect.bisect_left([s.start for s in self._missing], span.start)
        self._missing.insert(index, span)

    @staticmethod
    def _find(spans: list[Span], address: int) -> int | None:
        index = bisect.bisect_right([s.start for s in spans], address) - 1
        return index if index >= 0 and address < spans[index].end else None

    @staticmethod
    def _without(spans: list[Span], start: int, end: int) -> list[Span]:
        kept: list[Span] = []
        for span in spans:
            if span.end <= start or span.start >= end:
                kept.append(span)
                continue
            if span.start < start:
                kept.append(Span(span.start, start, span.offset))
            if span.end > end:
                kept.append(Span(end, span.end, span.offset + end - span.start))
        return kept

    @staticmethod
    def _moved(spans: list[Span], old: int, new: int, length: int) -> list[Span]:
        stay = FillPlan._without(spans, old, old + length)
        moving = [s for s in spans if s.start < old + length and s.end > old]
        shift = new - old
        for span in moving:
            lo, hi = max(span.start, old), min(span.end, old + length)
            stay.append(Span(lo + shift, hi + shift, span.offset + lo - span.start))
        return sorted(stay, key=lambda s: s.start)

    @staticmethod
    def _check_disjoint(spans: list[Span]) -> None:
        for a, b in itertools.pairwise(spans):
            if a.end > b.start:
                raise ValueError(f"overlapping lazy runs at {b.start:#x}")
