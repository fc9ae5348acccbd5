"""A dump can outlive its criu-shim: recovery waits while a process still works in the staging dir."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from shim.checkpoint import recovery


def test_a_staging_directory_named_by_a_live_process_is_busy(tmp_path: Path) -> None:
    staging = tmp_path / ".criu-shim-abc-1"
    assert not recovery.busy({recovery.STAGING: str(staging)})
    assert not recovery.busy({})
    # As runc's argv names `--image-path <staging>/checkpoint` while it dumps.
    worker = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", f"{staging}/checkpoint"],
                              stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10  # until the child has exec'd Python with that argv
        while not recovery.busy({recovery.STAGING: str(staging)}):
            assert time.monotonic() < deadline, "a live process naming the staging dir is not seen as busy"
    finally:
        worker.communicate(b"")
    assert not recovery.busy({recovery.STAGING: str(staging)})
