"""The journal of in-flight operations: what a crash of criu-shim could leave behind.

Before criu-shim acquires something that must not outlive the operation (a
frozen container, a staging directory holding a memory image, a network lock
in a pod, an unpacked checkpoint...), it records the intent in a small JSON
file under `<state_dir>/journal/`; as the operation acquires more, it rewrites
the record (`note`); once everything is released it removes the record
(`close`). A record whose owner process is gone is exactly what a crash left
behind: the reconciler (`shim.recovery`) finishes or undoes it at start-up
and periodically while serving.

Records are written atomically (a temporary file renamed over the record), so
a reader never sees half a record. They are not fsynced: what they guard
against is the death of our process (OOM killer, SIGKILL, a restart), which
keeps the page cache; a node crash also ends every frozen cgroup and process a
record could name, and the staging directories it would leave are found by
name as well.

The owner is named by pid *and* start time, so a recycled pid never makes a
dead operation look alive.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.fileio import write_atomically

log = logging.getLogger(__name__)
SUFFIX = ".json"
DIRECTORY = "journal"  # under the configured state_dir


class Operation(enum.StrEnum):
    CHECKPOINT = "checkpoint"
    RESTORE = "restore"


@dataclass(frozen=True)
class Owner:
    """A process, named so that a reused pid is not mistaken for it."""

    pid: int
    start_time: int

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(pid, _start_time(pid) or 0)

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start_time


@dataclass
class Record:
    """One operation in flight; `facts` says what it holds (its undo list)."""

    path: Path
    operation: Operation
    owner: Owner
    started: float
    facts: dict[str, Any] = field(default_factory=dict)

    def note(self, **facts: Any) -> None:
        """Record more of what the operation holds, before acquiring it."""
        self.facts.update(facts)
        write_atomically(self.path, self._encode())

    def close(self) -> None:
        """Everything is released: forget the operation (idempotent)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _encode(self) -> bytes:
        return json.dumps({"operation": self.operation.value, "pid": self.owner.pid,
                           "start_time": self.owner.start_time, "started": self.started,
                           "facts": self.facts}, sort_keys=True).encode()


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> Journal:
        return cls(state_dir / DIRECTORY)

    def begin(self, operation: Operation, **facts: Any) -> Record:
        """Record an operation before it acquires anything."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{operation.value}-{time.time_ns()}-{secrets.token_hex(4)}{SUFFIX}"
        record = Record(self.directory / name, operation, Owner.current(), time.time())
        record.note(**facts)
        return record

    def records(self) -> list[Record]:
        """Every record, oldest first; unreadable ones are logged and dropped (ours, never hostile)."""
        found: list[Record] = []
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return found
        for name in names:
            path = self.directory / name
            if name.startswith(".") and name.endswith(".tmp"):
                _remove_stale_temp(path)
            elif name.endswith(SUFFIX):
                record = _read(path)
                if record is not None:
                    found.append(record)
        return found

    def orphans(self) -> list[Record]:
        """Records whose owner died: what a crash left behind."""
        return [r for r in self.records() if not r.owner.alive()]


def _read(path: Path) -> Record | None:
    try:
        raw = json.loads(path.read_bytes())
        owner = Owner(int(raw["pid"]), int(raw["start_time"]))
        facts = raw["facts"]
        if not isinstance(facts, dict):
            raise TypeError("facts is not an object")
        return Record(path, Operation(raw["operation"]), owner, float(raw["started"]), facts)
    except FileNotFoundError:
        return None  # closed meanwhile
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("journal record %s is unreadable (%s); removing it", path, exc)
        path.unlink(missing_ok=True)
        return None


def _remove_stale_temp(path: Path) -> None:
    # ".<record>.<pid>.tmp": a writer died between write and rename, or is writing right now.
    try:
        pid = int(path.name.rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        pid = -1
    if pid != os.getpid() and _start_time(pid) is None:
        path.unlink(missing_ok=True)


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if there is no such process."""
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[19])
