"""Recovery of a frozen container: containerd's view and the freezer's brought back together."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shim import freezer
from shim.checkpoint import recovery
from shim.errors import FailedPrecondition, Unknown


class Task:
    """containerd's runc shim and runc, as far as pause/resume go, over a fake freezer file."""

    def __init__(self, cgroup: Path, paused: bool | None, kernel: str) -> None:
        self.cgroup, self.paused, self.resumes = cgroup, paused, 0
        cgroup.mkdir(parents=True, exist_ok=True)
        (cgroup / "freezer.state").write_text(kernel)

    async def task_paused(self, container_id: str) -> bool | None:
        return self.paused

    async def cgroups_path(self, container_id: str) -> str | None:
        return None if self.paused is None else str(self.cgroup)

    async def resume(self, container_id: str) -> None:
        self.resumes += 1
        if not self.paused:
            raise FailedPrecondition("cannot resume a running process")  # the shim's state machine
        if freezer.state(self.cgroup) is not freezer.State.FROZEN:
            raise Unknown("container not paused")  # runc, looking at the freezer
        (self.cgroup / "freezer.state").write_text("THAWED")
        self.paused = False


@pytest.fixture(autouse=True)
def cgroups_are_plain_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(freezer, "cgroup_dir", lambda path: Path(path))


def test_paused_and_frozen_is_resumed(tmp_path: Path) -> None:
    task = Task(tmp_path / "cg", paused=True, kernel="FROZEN")
    assert asyncio.run(recovery.ensure_running(task, "c")) == "resumed the paused container"  # type: ignore[arg-type]
    assert not task.paused and freezer.state(task.cgroup) is freezer.State.THAWED


def test_paused_over_a_thawed_cgroup_is_frozen_then_resumed(tmp_path: Path) -> None:
    """CRIU died after thawing the cgroup: runc says "container not paused" to a plain resume."""
    task = Task(tmp_path / "cg", paused=True, kernel="THAWED")
    with pytest.raises(Unknown, match="container not paused"):
        asyncio.run(task.resume("c"))
    asyncio.run(recovery.ensure_running(task, "c"))  # type: ignore[arg-type]
    assert not task.paused and freezer.state(task.cgroup) is freezer.State.THAWED


def test_running_over_a_frozen_cgroup_is_thawed_directly(tmp_path: Path) -> None:
    task = Task(tmp_path / "cg", paused=False, kernel="FROZEN")
    assert asyncio.run(recovery.ensure_running(task, "c")) == "thawed the container's cgroup"  # type: ignore[arg-type]
    assert task.resumes == 0 and freezer.state(task.cgroup) is freezer.State.THAWED


def test_running_and_thawed_is_left_alone(tmp_path: Path) -> None:
    task = Task(tmp_path / "cg", paused=False, kernel="THAWED")
    assert asyncio.run(recovery.ensure_running(task, "c")) == "the container was running"  # type: ignore[arg-type]
    assert task.resumes == 0


def test_a_gone_container_needs_nothing(tmp_path: Path) -> None:
    task = Task(tmp_path / "cg", paused=None, kernel="FROZEN")
    assert "no task" in asyncio.run(recovery.ensure_running(task, "c"))  # type: ignore[arg-type]


def test_resume_falls_back_to_reconciling(tmp_path: Path) -> None:
    task = Task(tmp_path / "cg", paused=True, kernel="THAWED")
    asyncio.run(recovery.resume(task, "c"))  # type: ignore[arg-type]
    assert not task.paused and task.resumes == 2


def test_undo_thaws_and_deletes_the_staging_directory(tmp_path: Path) -> None:
    task = Task(tmp_path / "cg", paused=True, kernel="FROZEN")
    staging = tmp_path / ".criu-shim-c-1"
    (staging / "checkpoint").mkdir(parents=True)
    (staging / "checkpoint" / "pages-1.img").write_bytes(b"secret")
    done = asyncio.run(recovery.undo(task, {recovery.CONTAINER: "c", recovery.PAUSED: True,  # type: ignore[arg-type]
                                            recovery.STAGING: str(staging)}))
    assert done == ["resumed the paused container", f"deleted staging directory {staging}"]
    assert not staging.exists() and not task.paused
