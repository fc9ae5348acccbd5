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

Claims are kept in a file of the receiver's (`CLAIMS_FILE` in the node's state_dir, root's, 0600,
replaced atomically at each change), so a restarted receiver watches the claims of the one before.
The file is read as untrusted: one that is not a plain file of ours, not JSON of the expected shape,
or names something that is not a container id and IP addresses, is ignored with an error logged
(its claims are then not watched, as before they were kept) and replaced at the next change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.errors import Code, ShimError
from shim.fileio import write_atomically
from shim.migrate import hook
from shim.migrate.runtime import Runtime

log = logging.getLogger(__name__)

CLAIMS_FILE = "migrate-claims.json"  # in the node's state_dir
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_FILE = 1 << 20


class ClaimWatcher:
    def __init__(self, runtime_socket: Path, address_hook: Path | None, interval: float = 10.0,
                 store: Path | None = None) -> None:
        self._socket = runtime_socket
        self._hook = address_hook
        self._interval = interval
        self._store = store
        # container id -> the addresses claimed for it
        kept = load(store) if store is not None and address_hook else Kept({}, {})
        self._claims = kept.claims
        # pod id -> the addresses claimed early for a migration into it (at "switch"), until it settles
        self._pending = kept.pending
        # Of those, the ones a receiver before this one left: only these are settled here (`settle_pending`);
        # this receiver's own are under way, however long their restore takes.
        self._inherited = set(kept.pending)
        if self._claims:
            log.info("watching %d container(s) a receiver before this one claimed pod IPs for", len(self._claims))

    def add(self, container_id: str, addresses: list[str]) -> None:
        if addresses and self._hook is not None:
            self._claims[container_id] = tuple(addresses)
            self._save()

    def begin(self, pod_id: str, addresses: list[str]) -> None:
        """Addresses about to be claimed for a migration into `pod_id` before its container exists: kept
        until `end`, so a receiver that dies meanwhile leaves them to the next one (`settle_pending`)."""
        if addresses and self._hook is not None:
            self._pending[pod_id] = tuple(addresses)
            self._inherited.discard(pod_id)  # this receiver's own from now on
            self._save()

    def end(self, pod_id: str) -> None:
        """That migration settled (restored and watched with `add`, or its claim released): idempotent."""
        self._inherited.discard(pod_id)
        if self._pending.pop(pod_id, None) is not None:
            self._save()

    async def settle_pending(self) -> None:
        """Early claims a receiver before this one did not live to settle: a pod that runs a container
        now got it (watched from here on, as any claim); any other's addresses are released. Never this
        receiver's own: an eager restore of gigabytes is under way for many sweeps (released then, the
        address was routed nowhere mid-migration: found by the 2 GiB eager bench)."""
        if not self._inherited:
            return
        assert self._hook is not None  # nothing is kept without one
        runtime = Runtime(self._socket)
        try:
            for pod_id in list(self._inherited):
                addresses = self._pending[pod_id]
                try:
                    running = await runtime.running_containers(pod_id)
                except ShimError as exc:
                    if exc.code != Code.NOT_FOUND:  # not answering: the next sweep tries again
                        log.warning("cannot tell whether pod %s got its migrated container: %s", pod_id, exc.message)
                        continue
                    running = []
                if running:
                    self._claims[running[0]] = addresses
                    log.warning("a migration into pod %s had restored container %s when its receiver died: "
                                "watching its pod IPs %s", pod_id, running[0], ", ".join(addresses))
                else:
                    for ip in addresses:
                        with contextlib.suppress(ShimError):
                            await hook.run(self._hook, "release", ip)
                    log.warning("a migration into pod %s ended with its receiver before its container ran: "
                                "released pod IPs %s", pod_id, ", ".join(addresses))
                del self._pending[pod_id]
                self._inherited.discard(pod_id)
                self._save()
        finally:
            await runtime.close()

    def _save(self) -> None:
        if self._store is None:
            return
        try:
            self._store.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            data = {"claims": {c: list(a) for c, a in self._claims.items()},
                    "pending": {p: list(a) for p, a in self._pending.items()}}
            write_atomically(self._store, json.dumps(data, indent=1).encode())
        except OSError as exc:  # the claims still hold in memory; a restart would forget them
            log.error("cannot keep the claimed pod IPs in %s: %s", self._store, exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every interval until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
            await self.sweep()

    async def sweep(self) -> None:
        await self.settle_pending()
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
        self._save()
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


@dataclass(frozen=True)
class Kept:
    claims: dict[str, tuple[str, ...]]  # container id -> addresses
    pending: dict[str, tuple[str, ...]]  # pod id -> addresses claimed early, not yet settled


def load(store: Path) -> Kept:
    """The claims kept in `store`; none (an error logged) when it is missing or not to be trusted."""
    try:
        fd = os.open(store, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return Kept({}, {})
    except OSError as exc:  # ELOOP: a symlink
        log.error("ignoring the claims file %s: %s", store, exc.strerror)
        return Kept({}, {})
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            log.error("ignoring the claims file %s: not a file of ours that only we may read and write", store)
            return Kept({}, {})
        raw = os.read(fd, MAX_FILE + 1)
    finally:
        os.close(fd)
    try:
        return _parse(raw)
    except (ValueError, TypeError) as exc:
        log.error("ignoring the claims file %s: %s", store, exc)
        return Kept({}, {})


def _parse(raw: bytes) -> Kept:
    if len(raw) > MAX_FILE:
        raise ValueError(f"over {MAX_FILE} bytes")
    document = json.loads(raw)
    claims = document.get("claims") if isinstance(document, dict) else None
    if not isinstance(claims, dict):
        raise TypeError("no claims object")
    pending = document.get("pending", {})
    if not isinstance(pending, dict):
        raise TypeError("pending is not an object")
    return Kept(_addresses_by_id(claims, "container"), _addresses_by_id(pending, "pod"))


def _addresses_by_id(table: dict[str, Any], what: str) -> dict[str, tuple[str, ...]]:
    parsed: dict[str, tuple[str, ...]] = {}
    for key, addresses in table.items():
        if not _CONTAINER_ID.fullmatch(key):
            raise ValueError(f"{key[:80]!r} is not a {what} id")
        if not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) for a in addresses):
            raise TypeError(f"{what} {key}: the addresses are not a list of strings")
        parsed[key] = tuple(str(ipaddress.ip_address(a)) for a in addresses)
    return parsed
