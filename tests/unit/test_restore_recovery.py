"""Undo of an interrupted restore from its journal facts (shim.restore.recovery), without a node."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

from shim.journal import Journal, Operation
from shim.restore import recovery


class Containerd:
    def __init__(self, restoring_from: set[str]) -> None:
        self.restoring_from = restoring_from

    async def container_annotation_values(self, key: str) -> set[str]:
        return self.restoring_from


def _restore(tmp_path: Path) -> tuple[Path, Path]:
    work, shims = tmp_path / "restore" / "0123abcd", tmp_path / "shims"
    (work / "checkpoint").mkdir(parents=True)
    shims.mkdir()
    for suffix in (".sock", ".log", ".upstream"):
        (shims / f"{work.name}{suffix}").write_text("")
    (work.parent / f"{work.name}.criu.conf").write_text("tcp-close\n")
    return work, shims


def _create_facts(work: Path, shims: Path) -> dict[str, Any]:
    return recovery.create_facts(work, shims, "pod", "ns", "ctr", "/ckpt.tar")


def test_a_proxy_crash_before_containerd_had_the_container_is_undone(tmp_path: Path) -> None:
    work, shims = _restore(tmp_path)
    done = asyncio.run(recovery.undo(Containerd(set()), _create_facts(work, shims)))  # type: ignore[arg-type]
    assert not work.exists() and not (work.parent / f"{work.name}.criu.conf").exists()
    assert list(shims.iterdir()) == []
    assert f"deleted work dir {work}" in done


def test_once_containerd_has_the_container_its_relay_owns_it(tmp_path: Path) -> None:
    work, shims = _restore(tmp_path)
    done = asyncio.run(recovery.undo(Containerd({str(work)}), _create_facts(work, shims)))  # type: ignore[arg-type]
    assert work.is_dir() and len(list(shims.iterdir())) == 3
    assert "its relay owns it" in done[0]


def test_a_relay_record_waits_while_the_proxy_still_creates(tmp_path: Path) -> None:
    work, shims = _restore(tmp_path)
    journal = Journal(tmp_path / "journal")
    facts = recovery.relay_facts(work, shims, journal.directory)
    creating = journal.begin(Operation.RESTORE, **_create_facts(work, shims))  # owned by us: alive
    assert recovery.busy(facts)
    creating.close()
    assert not recovery.busy(facts)
    facts.update(recovery.task_facts("c0ffee", tmp_path / "bundle"))
    assert not recovery.busy(facts)  # its container does not run


def test_a_relay_record_is_left_while_its_container_runs(tmp_path: Path) -> None:
    work, shims = _restore(tmp_path)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        # The bundle is named after the container, which its cgroup path names.
        cgroup = Path(f"/proc/{sleeper.pid}/cgroup").read_text().strip().rsplit("/", 1)[-1] or "root"
        bundle = tmp_path / cgroup
        bundle.mkdir()
        (bundle / "init.pid").write_text(str(sleeper.pid))
        facts = recovery.relay_facts(work, shims, tmp_path / "journal")
        facts.update(recovery.task_facts("c0ffee", bundle))
        assert recovery.busy(facts) == (cgroup in Path(f"/proc/{sleeper.pid}/cgroup").read_text())
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not recovery.busy(facts)  # gone: undone on the next pass


def test_an_undone_relay_record_removes_the_relay_files(tmp_path: Path) -> None:
    work, shims = _restore(tmp_path)
    facts = recovery.relay_facts(work, shims, tmp_path / "journal")
    facts[recovery.RELAY_PID] = os.getpid()
    done = asyncio.run(recovery.undo(Containerd(set()), facts))  # type: ignore[arg-type]
    assert not work.exists() and list(shims.iterdir()) == []
    assert (work.parent / f"{work.name}.criu.conf").exists()  # its container may still exist: collected later
    assert any("deleted work dir" in d for d in done)


def test_a_relay_record_names_the_pod_and_container_of_the_restore(tmp_path: Path) -> None:
    work, shims = _restore(tmp_path)
    journal = Journal(tmp_path / "journal")
    journal.begin(Operation.RESTORE, **_create_facts(work, shims))
    journal.begin(Operation.RESTORE, **_create_facts(tmp_path / "restore" / "other", shims))
    facts = recovery.relay_facts(work, shims, journal.directory)
    assert (facts[recovery.POD], facts[recovery.NAMESPACE], facts[recovery.CONTAINER]) == ("pod", "ns", "ctr")
    assert facts[recovery.LOCATION] == "/ckpt.tar"
