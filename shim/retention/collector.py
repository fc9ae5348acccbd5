"""The collector: one pass scans the configured directories, applies the policy and deletes what goes.

Each deletion gets an audit line (action "gc") and counts in the metrics.
Nothing a restore still reads is deleted (shim.retention.inuse, plus what the
proxy's Restorer holds), and a file is deleted only by name in a directory
opened without following links, after checking it is still the file judged.
The proxy runs a pass every `interval` and soon after each checkpoint; `criu-shim gc` runs one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shim import metrics, signing
from shim.checkpoint import audit
from shim.config import RetentionSettings
from shim.retention import archives, inuse, policy
from shim.retention.archives import Archive

log = logging.getLogger(__name__)
# After a checkpoint, wait this long for others (a kubelet checkpointing every container of a pod).
SETTLE = 1.0


@dataclass(frozen=True)
class Action:
    decision: policy.Decision
    done: str  # "deleted", "would delete", "kept: in use by a restore", "error: ..."


def collect_once(settings: RetentionSettings, audit_log: Path, held: frozenset[Path] = frozenset(),
                 dry_run: bool = False, now: float | None = None) -> list[Action]:
    """One pass (blocking: run it in a worker thread); what was (or would be) done to each archive.

    `held`: real paths of archives the caller knows to be read now.
    """
    found = [a for directory in settings.dirs for a in archives.scan(directory)]
    now = time.time() if now is None else now
    candidates = policy.select(found, settings, now)
    if not candidates:
        return []
    seen_busy = inuse.in_use({d.archive.path for d in candidates})

    def busy(archive: Archive) -> bool:
        return archive.path in seen_busy or Path(os.path.realpath(archive.path)) in held

    actions = [Action(d, "kept: in use by a restore") for d in candidates if busy(d.archive)]
    for decision in policy.select(found, settings, now, busy):
        actions.append(Action(decision, "would delete" if dry_run else _delete(decision, audit_log)))
    return actions


def _delete(decision: policy.Decision, audit_log: Path) -> str:
    archive = decision.archive
    try:
        fd = os.open(archive.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return f"error: {exc.strerror}"
    try:
        if not archives.still_same(archive, fd):
            return "skipped: replaced or removed since it was judged"
        os.unlink(archive.path.name, dir_fd=fd)
        _delete_signature(archive.path.name, fd)
    except OSError as exc:
        log.error("retention: could not delete %s: %s", archive.path, exc)
        return f"error: {exc.strerror}"
    finally:
        os.close(fd)
    metrics.record_gc_deletion(decision.reason, archive.size)
    _audit(audit_log, archive, f"deleted: {decision.reason}: {decision.detail}")
    log.info("retention: deleted %s (%s: %s)", archive.path, decision.reason, decision.detail)
    return "deleted"


def _delete_signature(name: str, dir_fd: int) -> None:
    """ARCHIVE.sig (shim.signing) goes with its archive: alone it signs nothing."""
    try:
        os.unlink(name + signing.SIGNATURE_SUFFIX, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:  # the archive is gone already; a leftover signature is harmless
        log.warning("retention: could not delete the signature of %s: %s", name, exc)


def _audit(audit_log: Path, archive: Archive, result: str) -> None:
    audit.append(audit_log, audit.AuditRecord(
        action=audit.Action.GC, caller_uid=os.getuid(), caller_pid=os.getpid(), pod=archive.pod or "",
        namespace=archive.namespace or "", container=archive.container or "", container_id="",
        location=str(archive.path), size=archive.size, duration_s=0.0, frozen_s=0.0, dump_s=0.0, archive_s=0.0,
        result=result))


class ArchiveCollector:
    """The proxy's periodic collection; `poke()` after a checkpoint asks for a pass soon."""

    def __init__(self, settings: RetentionSettings, audit_log: Path,
                 held: Callable[[], set[Path]] = set) -> None:
        self._settings = settings
        self._audit_log = audit_log
        self._held = held  # what the proxy's Restorer reads now (it knows before the kernel does)
        self._wake = asyncio.Event()

    def poke(self) -> None:
        self._wake.set()

    async def run_once(self) -> list[Action]:
        held = frozenset(self._held())  # real paths (the Restorer admits archives by their real path)
        return await asyncio.to_thread(collect_once, self._settings, self._audit_log, held)

    async def run_forever(self) -> None:
        """A pass soon after start, then every interval and soon after each poke."""
        self._wake.set()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._settings.interval_s)
                await asyncio.sleep(SETTLE)  # a period, not a synchronisation: let a burst of checkpoints end
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.run_once()
            except Exception:  # a bad pass must not end collection, nor the proxy
                log.exception("retention pass failed; trying again in %.0fs", self._settings.interval_s)
