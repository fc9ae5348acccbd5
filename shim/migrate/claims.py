"""Pod IPs this node claimed for migrated containers, released once such a container is removed.

The receiver claims a migrated container's addresses with the node's address hook (`HOOK claim IP
VIA`: a /32 announced, a route table changed). Nothing else would ever withdraw them: if the
container migrates on, the next target claims them and this node's `migrate` releases them; if it
ends here, its /32s would stay routed to this node for good, and the node whose IPAM owns an address
could not use it again. So the receiver remembers each claim and, every `interval` seconds, asks
its criu-shim for the container: once it is gone (removed, with its pod or alone), `HOOK release IP`
for each address, then `HOOK free IP`: the source node's IPAM, which kept the address reserved
since the migration (`HOOK reserve IP` there), may give it out again.

Released on removal, not on exit: a container that migrates away exits (stop-after) before its new
node has claimed its addresses, and a release then would route the peers' packets nowhere (or to a
pod that got the address meanwhile) for the rest of the migration. A release after the next node's
claim is harmless: `release` withdraws only this node's own announcement.

Claims live in the receiver's memory: after a receiver restart the ones made before are not watched
(their routes stay, as before this existed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from shim.errors import Code, ShimError
from shim.migrate import hook
from shim.migrate.runtime import Runtime

log = logging.getLogger(__name__)


class ClaimWatcher:
    def __init__(self, runtime_socket: Path, address_hook: Path | None, interval: float = 10.0) -> None:
        self._socket = runtime_socket
        self._hook = address_hook
        self._interval = interval
        self._claims: dict[str, tuple[str, ...]] = {}  # container id -> the addresses claimed for it

    def add(self, container_id: str, addresses: list[str]) -> None:
        if addresses and self._hook is not None:
            self._claims[container_id] = tuple(addresses)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every interval until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
            await self.sweep()

    async def sweep(self) -> None:
        if not self._claims:
            return
        runtime = Runtime(self._socket)  # a channel per sweep: the proxy may have restarted meanwhile
        try:
            for container_id, addresses in list(self._claims.items()):
                if await _removed(runtime, container_id):
                    await self._release(container_id, addresses)
        finally:
            await runtime.close()

    async def _release(self, container_id: str, addresses: tuple[str, ...]) -> None:
        assert self._hook is not None  # add() records nothing without one
        for ip in addresses:
            try:
                await hook.run(self._hook, "release", ip)
            except ShimError as exc:  # tried again at the next sweep
                log.warning("releasing pod IP %s of removed container %s: %s", ip, container_id, exc.message)
                return
        del self._claims[container_id]
        log.info("container %s is gone: released pod IPs %s", container_id, ", ".join(addresses))
        for ip in addresses:  # the owner's IPAM may give it out again (the hook knows if it lives on elsewhere)
            try:
                await hook.run(self._hook, "free", ip)
            except ShimError as exc:  # an older hook without `free`: the address stays reserved, said once
                log.warning("freeing pod IP %s of removed container %s: %s; its IPAM keeps it reserved",
                            ip, container_id, exc.message)


async def _removed(runtime: Runtime, container_id: str) -> bool:
    try:
        await runtime.container(container_id)
    except ShimError as exc:  # not answering (a restart): keep the claim and ask again later
        return exc.code == Code.NOT_FOUND
    return False
