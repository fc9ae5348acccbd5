"""Restores created and not yet started: what StartContainer needs of them, kept bounded.

CreateContainer of a restore leaves a relay waiting for containerd; StartContainer then
asks whether the container is a pending restore (to open a 2.x pod shim to our handler,
and to refuse one containerd started afresh). A container that is never started, or whose
start failed, would stay in that table for the life of the proxy. Two bounds keep it small:

* Time: an entry is collected once it is older than RELAY_START_WAIT. Its relay gives up
  waiting for containerd at that age (shim.runtime.relay_daemon), so nothing could start
  the restore through us any more; forgetting it changes no outcome.
* Count: with MAX_PENDING restores created and not started (those inside CreateContainer
  counted too), a new restore is refused with RESOURCE_EXHAUSTED until one starts or
  expires. Evicting the oldest instead would silently break its later start (on 2.x it
  would bypass our handler); each entry also stands for a live relay process.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from shim.errors import ResourceExhausted
from shim.handoff import RELAY_START_WAIT
from shim.restore.relay_processes import Relay
from shim.restore.second_part import Later

MAX_PENDING = 1024


@dataclass(frozen=True, slots=True)
class PendingRestore:
    relay: Relay
    pid: int  # the relay's
    created: float  # on the table's clock
    sandbox: str = ""  # the pod's id, from CreateContainer (StartContainer need not ask containerd)
    later: Later | None = None  # CRIU's images still to come (shim.restore.second_part), until StartContainer


class PendingRestores:
    """container id -> PendingRestore, in creation order; collected by age, refused at `limit`."""

    def __init__(self, ttl: float = RELAY_START_WAIT, limit: int = MAX_PENDING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._limit = limit
        self._clock = clock
        self._entries: dict[str, PendingRestore] = {}  # insertion order is age order

    @property
    def ttl(self) -> float:
        return self._ttl

    def __contains__(self, container_id: object) -> bool:
        return container_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, container_id: str) -> PendingRestore | None:
        return self._entries.get(container_id)

    def pop(self, container_id: str) -> PendingRestore | None:
        return self._entries.pop(container_id, None)

    def add(self, container_id: str, relay: Relay, pid: int, sandbox: str = "", later: Later | None = None) -> None:
        self._entries[container_id] = PendingRestore(relay, pid, self._clock(), sandbox, later)

    def completed(self, container_id: str) -> None:
        """Its second part is in place: a StartContainer tried again does not unpack it again."""
        entry = self._entries.get(container_id)
        if entry is not None:
            self._entries[container_id] = dataclasses.replace(entry, later=None)

    def collect(self) -> list[str]:
        """Forget the entries older than the ttl; their container ids, oldest first."""
        horizon = self._clock() - self._ttl
        expired = []
        for container_id, entry in self._entries.items():
            if entry.created > horizon:
                break  # the rest are younger
            expired.append(container_id)
        for container_id in expired:
            del self._entries[container_id]
        return expired

    def admit(self, creating: int) -> None:
        """Refuse one more restore when `limit` are already created (or being created) and not started."""
        if len(self._entries) + creating >= self._limit:
            raise ResourceExhausted(
                f"{len(self._entries)} restored containers are created and not started, {creating} more are "
                f"being created: the limit is {self._limit}; start or remove some (a restore not started "
                f"within {self._ttl:.0f} s is given up)")
