"""The restore relay's rewriter: ending a restored process whose memory cannot be completed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from shim.handoff import RestorePlan
from shim.runtime.relay_daemon import RestoreRewriter


def _cgroup_token(pid: int) -> str:
    """A word of the process's /proc/<pid>/cgroup: a bundle so named passes the relay's ownership check."""
    words = re.split(r"[:/\n]+", Path(f"/proc/{pid}/cgroup").read_text())
    return max((w for w in words if w), key=len)


def test_a_failed_page_daemon_ends_the_restored_process(tmp_path: Path) -> None:
    process = subprocess.Popen(["sleep", "60"])  # stands in for the restored init process
    try:
        bundle = tmp_path / _cgroup_token(process.pid)  # the container's id shows in its cgroup path
        bundle.mkdir()
        (bundle / "init.pid").write_text(str(process.pid))
        rewriter = RestoreRewriter(RestorePlan(tmp_path / "restore"), bundle)
        rewriter._stop_task(5)
        assert process.wait(timeout=10) == -9
    finally:
        process.kill()
        process.wait()


def test_a_reused_pid_of_another_cgroup_is_left_alone(tmp_path: Path) -> None:
    process = subprocess.Popen(["sleep", "60"])  # not the container's: its cgroup does not name it
    try:
        bundle = tmp_path / ("f" * 64)
        bundle.mkdir()
        (bundle / "init.pid").write_text(str(process.pid))
        RestoreRewriter(RestorePlan(tmp_path / "restore"), bundle)._stop_task(5)
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_before_the_restore_there_is_nothing_to_end(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    rewriter = RestoreRewriter(RestorePlan(tmp_path / "restore"), bundle)
    rewriter._stop_task(5)  # no init.pid yet: Start fails on its own; nothing raised
    assert not (bundle / "init.pid").exists()
