"""The reconciler: finish or undo what a crash of criu-shim left behind.

It reads the journal (shim.journal) for operations whose owner process died
and hands each to the undo of its kind (checkpoint: thaw and resume the
container, remove the network lock, delete the staging directory; restore:
see shim.restore.recovery). It runs once before the proxy serves and then
periodically, so a crash is also repaired while a new proxy is already
serving. An operation that is still being worked on by a process that
outlived us (runc finishing a dump) is left for a later pass. Every recovery
gets an audit line.

Composition level: it knows both domains, and only the composition root
imports it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shim.checkpoint import audit
from shim.checkpoint import recovery as checkpoint_recovery
from shim.config import Config
from shim.containerd import Containerd
from shim.journal import Journal, Operation, Record
from shim.restore import recovery as restore_recovery

log = logging.getLogger(__name__)
INTERVAL = 30.0
# While an orphan is still being worked on (runc finishing a dump its criu-shim did not
# live to see), look again soon: the container it froze must not wait a whole interval.
BUSY_INTERVAL = 0.5


@dataclass
class Pass:
    """What one pass over the journal did."""

    undone: int = 0
    busy: int = 0  # left for later: a process that outlived the owner still works on it
    ending: int = 0  # of those, the ones expected to end soon (a dump): looked at again soon
    failed: int = 0


@dataclass(frozen=True)
class Undo:
    busy: Callable[[dict[str, Any]], bool]
    undo: Callable[[Containerd, dict[str, Any]], Awaitable[list[str]]]
    # Busy means "about to end" (a dump finishing: look again soon, a container is frozen),
    # not "in use for as long as a container lives" (look again at the normal interval).
    ends_soon: bool = False


# Passes over what live processes hold but nothing needs any more (a relay whose container was
# removed before it started); each returns the records acted on and what was done.
Sweep = Callable[[Containerd, Journal], Awaitable[list[tuple[Record, list[str]]]]]
SWEEPS: tuple[Sweep, ...] = (restore_recovery.sweep,)

def default_undo(config: Config) -> dict[Operation, Undo]:
    """The undo of each operation; a checkpoint's signs an archive it completes as the node signs checkpoints."""
    checkpoint = functools.partial(checkpoint_recovery.undo, signing_key=config.signing.key_file)
    return {
        Operation.CHECKPOINT: Undo(checkpoint_recovery.busy, checkpoint, ends_soon=True),
        Operation.RESTORE: Undo(restore_recovery.busy, restore_recovery.undo),
    }


class Reconciler:
    def __init__(self, containerd: Containerd, config: Config, journal: Journal | None = None,
                 undo: dict[Operation, Undo] | None = None, sweeps: tuple[Sweep, ...] = SWEEPS) -> None:
        self._containerd = containerd
        self._config = config
        self._journal = journal or Journal.in_state_dir(config.state_dir)
        self._undo = undo if undo is not None else default_undo(config)
        self._sweeps = sweeps

    async def run_once(self) -> Pass:
        """One pass over the orphans."""
        orphans = await asyncio.to_thread(self._journal.orphans)
        result = Pass()
        for record in orphans:
            try:
                await self._recover(record, result)
            except Exception:  # one bad record must not stop the others, nor the proxy
                log.exception("could not recover %s", record.path)
                result.failed += 1
        for sweep in self._sweeps:
            try:
                for record, done in await sweep(self._containerd, self._journal):
                    self._audit(record, done)
                    log.warning("recovered: %s", "; ".join(done))
                    result.undone += 1
            except Exception:  # containerd down: the next pass
                log.exception("a recovery sweep failed")
                result.failed += 1
        return result

    async def run_forever(self, interval: float = INTERVAL, busy_interval: float = BUSY_INTERVAL) -> None:
        wait = busy_interval
        while True:
            await asyncio.sleep(wait)  # a period, not a synchronisation
            result = await self.run_once()
            wait = busy_interval if result.ending else interval

    async def _recover(self, record: Record, result: Pass) -> None:
        kind = self._undo.get(record.operation)
        if kind is None:
            log.error("no recovery for %s operations; leaving %s", record.operation.value, record.path)
            result.failed += 1
            return
        if await asyncio.to_thread(kind.busy, record.facts):
            log.info("%s: still being worked on by a process that outlived its owner; later", record.path)
            result.busy += 1
            result.ending += kind.ends_soon
            return
        done = await kind.undo(self._containerd, record.facts)
        self._audit(record, done)
        record.close()
        log.warning("recovered an interrupted %s (owner pid %d): %s", record.operation.value,
                    record.owner.pid, "; ".join(done) or "nothing was left")
        result.undone += 1

    def _audit(self, record: Record, done: list[str]) -> None:
        facts = record.facts
        audit.append(self._config.audit_log, audit.AuditRecord(
            action=audit.Action.recovery_of(record.operation.value), caller_uid=0, caller_pid=record.owner.pid,
            pod=str(facts.get("pod", "")), namespace=str(facts.get("namespace", "")),
            container=str(facts.get("container", "")), container_id=str(facts.get("container_id", "")),
            location=str(facts.get("location", "")), size=0,
            duration_s=round(time.time() - record.started, 4), frozen_s=0.0, dump_s=0.0, archive_s=0.0,
            result="interrupted: " + ("; ".join(done) or "nothing was left")))
