"""One audit line per checkpoint or restore attempt (JSON lines, 0600, append-only)."""

from __future__ import annotations

import enum
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class Action(enum.StrEnum):
    """What an audit line is about (a StrEnum: the line carries the plain word)."""

    CHECKPOINT = "checkpoint"
    RESTORE = "restore"
    GC = "gc"  # retention deleted an archive
    RECOVER_CHECKPOINT = "recover-checkpoint"  # the reconciler undid what a crash left of one
    RECOVER_RESTORE = "recover-restore"

    @classmethod
    def recovery_of(cls, operation: str) -> Action:
        """The recovery action for a journal operation ("checkpoint" or "restore")."""
        return cls(f"recover-{operation}")


@dataclass(frozen=True)
class AuditRecord:
    action: Action
    caller_uid: int
    caller_pid: int
    pod: str
    namespace: str
    container: str
    container_id: str
    location: str
    size: int
    duration_s: float
    frozen_s: float
    dump_s: float
    archive_s: float
    result: str
    encryption_key_id: str = ""  # the key id a sealed archive names ("" when not encrypted); never the key
    compression: str = ""  # "zstd" for a compressed archive; a restore of one: "zstd (eager: not lazy)"


def append(path: Path, record: AuditRecord) -> None:
    """Write one line; an unwritable audit log is logged loudly but never fails the call."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **asdict(record)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.error("cannot write audit log %s (%s); record: %s", path, exc, line)
