"""How much of a lazy migration's memory may be on the way at once: a fault's wait against the link's rate.

The source's page server answers in the order it is asked (criu/page-xfer.c, one connection), so a
fault's reply comes only after every byte asked for before it. With the background fill keeping
8 MiB on the way, a fault waited 30-70 ms behind it at 120-300 MB/s, and the first answer a migrated
server gave its client came 0.05-0.14 s after the restore (bench/migrate.py, 64 MiB: each request
it answers faults a few pages, one after the other). Two MiB on the way bring that to 0-0.05 s but
cost a fifth of the fill's rate (the round trips through both tunnel ends show). So the window is
small while the process faults, and from the moment it resumes (its first faults come then), and
large once it has run for QUIET without faulting: a process that waits for its peers gets its
pages at once, a fill nobody waits for gets the link.

Pure policy (times in, sizes out): the page daemon feeds it the faults and asks it for sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

QUIET = 0.25  # seconds without a fault before the fill may fill the link
NEAR_WINDOW = 2 << 20  # on the way while the process faults: a fault waits ~7 ms at 300 MB/s
FAR_WINDOW = 8 << 20  # on the way otherwise: the link's rate, not the round trips, sets the fill's
# A fault on the source node's memory is asked for with this much from its page on (a local image's
# fault takes fillplan.FAULT_RUN): one millisecond on the wire, so that the next fault waits little.
FAULT_RUN = 256 << 10


@dataclass(slots=True)
class FillPace:
    """When the process last faulted (or resumed), and so how large the background fill's requests are."""

    last_fault: float = -math.inf

    def faulted(self, now: float) -> None:
        """A page fault, or the process resuming (its faults follow at once)."""
        self.last_fault = now

    def window(self, now: float) -> int:
        """Bytes the background fill may keep on the way now (faults are asked for whatever the window)."""
        return FAR_WINDOW if now - self.last_fault >= QUIET else NEAR_WINDOW

    def run(self, now: float) -> int:
        """The next background request's largest size: half the window, so that two are on the way."""
        return self.window(now) // 2
