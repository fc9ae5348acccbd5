"""The relay's watchdog finds the CRIU that restores one container, and only that one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shim.runtime import criu_deadline
from shim.runtime.criu_deadline import CriuDeadline, criu_restoring


def _process(proc: Path, pid: int, comm: str, parent: int, argv: list[str]) -> None:
    entry = proc / str(pid)
    entry.mkdir()
    (entry / "comm").write_text(comm + "\n")
    (entry / "stat").write_text(f"{pid} ({comm}) S {parent} 1 1 0 -1")
    (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_only_the_criu_under_this_containers_runc_restore(tmp_path: Path) -> None:
    ctr = "c0ffee"
    _process(tmp_path, 20, "runc", 1, ["runc", "--root", "/run/containerd/runc/k8s.io", "restore", "--bundle",
                                       f"/run/b/{ctr}", "--image-path", "/w/checkpoint", ctr])
    _process(tmp_path, 21, "criu", 20, ["criu", "swrk", "3"])  # ours
    _process(tmp_path, 30, "runc", 1, ["runc", "checkpoint", ctr])
    _process(tmp_path, 31, "criu", 30, ["criu", "swrk", "3"])  # a dump of it: not a restore
    _process(tmp_path, 40, "runc", 1, ["runc", "restore", "other"])
    _process(tmp_path, 41, "criu", 40, ["criu", "swrk", "3"])  # another container's restore
    _process(tmp_path, 22, "sh", 20, ["sh"])
    assert criu_restoring(ctr, tmp_path) == [21]


def test_an_expired_deadline_kills_the_criu_it_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setattr(criu_deadline, "criu_restoring", lambda container_id: [sleeper.pid])
        CriuDeadline("c0ffee", seconds=0.0)._expire()
        assert sleeper.wait(10) == -signal.SIGKILL
    finally:
        if sleeper.poll() is None:
            os.kill(sleeper.pid, signal.SIGKILL)
            sleeper.wait()
