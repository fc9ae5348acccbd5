"""The journal of in-flight operations: atomic records, owners that die, garbage in the directory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from shim.journal import Journal, Operation, Owner


def test_a_record_lives_from_begin_to_close_and_says_what_is_held(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    record = journal.begin(Operation.CHECKPOINT, container_id="abc")
    record.note(staging="/x/.criu-shim-abc")
    [read] = journal.records()
    assert read.operation is Operation.CHECKPOINT
    assert read.facts == {"container_id": "abc", "staging": "/x/.criu-shim-abc"}
    assert read.owner == Owner.current() and read.owner.alive()
    assert stat.S_IMODE(record.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(journal.directory.stat().st_mode) == 0o700
    assert journal.orphans() == []  # its owner (this process) is alive
    record.close()
    record.close()  # idempotent
    assert journal.records() == []


def test_a_record_whose_owner_died_is_an_orphan(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    code = ("import sys; from pathlib import Path; from shim.journal import Journal, Operation; "
            "Journal(Path(sys.argv[1])).begin(Operation.RESTORE, work='/w')")
    subprocess.run([sys.executable, "-c", code, str(journal.directory)], check=True)
    [orphan] = journal.orphans()
    assert orphan.operation is Operation.RESTORE and orphan.facts == {"work": "/w"}
    assert not orphan.owner.alive()


def test_a_reused_pid_is_not_the_owner(tmp_path: Path) -> None:
    me = Owner.current()
    assert not Owner(me.pid, me.start_time + 1).alive()
    assert not Owner(0, 0).alive() and not Owner(-5, 0).alive()


def test_garbage_records_are_dropped_and_stale_temporaries_removed(tmp_path: Path) -> None:
    journal = Journal.in_state_dir(tmp_path)
    journal.directory.mkdir(parents=True)
    (journal.directory / "checkpoint-1.json").write_bytes(b"\x00not json")
    (journal.directory / "checkpoint-2.json").write_text(json.dumps({"operation": "bogus", "pid": 1,
                                                                     "start_time": 1, "started": 0, "facts": {}}))
    (journal.directory / "checkpoint-3.json").write_text(json.dumps({"operation": "checkpoint", "pid": 1,
                                                                     "start_time": 1, "started": 0, "facts": []}))
    (journal.directory / ".restore-4.json.999999999.tmp").write_text("{")  # no such pid: its writer is dead
    mine = journal.directory / f".restore-5.json.{os.getpid()}.tmp"  # being written by us right now
    mine.write_text("{")
    (journal.directory / "unrelated.txt").write_text("left alone")
    assert journal.records() == []
    assert sorted(p.name for p in journal.directory.iterdir()) == [mine.name, "unrelated.txt"]


def test_no_directory_means_no_records(tmp_path: Path) -> None:
    assert Journal(tmp_path / "missing").records() == []
    assert not (tmp_path / "missing").exists()
