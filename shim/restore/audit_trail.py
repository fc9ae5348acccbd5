"""One audit line per restore, written when the attempt ends: at CreateContainer or StartContainer.

A restore is two CRI calls. A failed CreateContainer ends the attempt and is
audited at once; a created one is held until its StartContainer ends, so that its
line says how the restore really went (CRIU runs at Start). A held line is
written when the Start ends, when the pending restore is given up
(shim.restore.pending), or when the proxy stops, whichever comes first: it is
never lost and never held without bound.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from shim.api.cri.v1 import api_pb2 as cri
from shim.checkpoint import audit
from shim.errors import ShimError
from shim.peer import Peer


class RestoreAudits:
    def __init__(self, audit_log: Path) -> None:
        self._log = audit_log
        # Created restores whose StartContainer has not ended: their audit line, written then.
        self._held: dict[str, tuple[audit.AuditRecord, float]] = {}

    def create_ended(self, request: cri.CreateContainerRequest, peer: Peer, container_id: str, started: float,
                     result: str, compression: str = "") -> None:
        """A failed Create ends the attempt; a created restore is audited when its Start ends (`start_ended`)."""
        sandbox = request.sandbox_config.metadata
        record = audit.AuditRecord(
            action=audit.Action.RESTORE, caller_uid=peer.uid, caller_pid=peer.pid, pod=sandbox.name,
            namespace=sandbox.namespace, container=request.config.metadata.name, container_id=container_id,
            location=request.config.image.image, size=0, duration_s=round(time.monotonic() - started, 4),
            frozen_s=0.0, dump_s=0.0, archive_s=0.0, result=result, compression=compression)
        if result == "ok" and container_id:
            self._held[container_id] = (record, started)
        else:
            audit.append(self._log, record)

    def start_ended(self, container_id: str, error: BaseException | None) -> None:
        """The StartContainer of a restore ended: its one audit line, with the Create and the Start outcome."""
        if error is None:
            result = "ok"
        elif isinstance(error, ShimError):
            result = f"error: StartContainer: {error.code.name}: {error.message}"
        else:
            result = f"error: StartContainer: {type(error).__name__}"
        self._write(container_id, result)

    def given_up(self, container_id: str, after: float) -> None:
        """The restore was created and never started within `after` seconds (shim.restore.pending)."""
        self._write(container_id, f"ok: created; not started within {after:.0f} s")

    def close(self) -> None:
        """Restores created but not started when the proxy stops: their line says so."""
        for container_id in list(self._held):
            self._write(container_id, "ok: created; not started before criu-shim stopped")

    def __contains__(self, container_id: object) -> bool:
        return container_id in self._held

    def _write(self, container_id: str, result: str) -> None:
        entry = self._held.pop(container_id, None)
        if entry is None:
            return
        record, started = entry
        audit.append(self._log, dataclasses.replace(
            record, duration_s=round(time.monotonic() - started, 4), result=result))
