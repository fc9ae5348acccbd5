"""A spare page daemon whose relay died before it could tie itself to it (it starts at idle priority
and may be slow to get there) ends at once instead of waiting on a pipe nobody writes (left behind
by `node down` in CI)."""

from __future__ import annotations

import os
import subprocess
import sys

from shim.handoff import SPARE_PARENT_ENV


def _spare(parent: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "shim.runtime.page_daemon", "spare"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, SPARE_PARENT_ENV: parent})


def test_a_spare_whose_relay_is_not_its_parent_ends_at_once() -> None:
    spare = _spare("1")  # not our pid: as if its relay had died and it were re-parented
    try:
        assert spare.wait(timeout=30) == 0  # stdin still open: it did not wait for a restore
    finally:
        _end(spare)


def test_a_spare_of_a_live_relay_waits_for_its_restore() -> None:
    spare = _spare(str(os.getpid()))
    try:
        try:  # the orphan above ends well within this; a spare with its relay waits for its restore
            spare.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        assert spare.poll() is None
        spare.stdin.close()  # type: ignore[union-attr]  (no restore came: it ends quietly)
        assert spare.wait(timeout=30) == 0
    finally:
        _end(spare)


def _end(spare: subprocess.Popen[bytes]) -> None:
    spare.kill()
    spare.wait()
    for stream in (spare.stdin, spare.stderr):
        if stream is not None:
            stream.close()
