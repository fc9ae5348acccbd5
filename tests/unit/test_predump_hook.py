"""CRIU's pre-dump hook of a lazy dump (shim.migrate.predump_hook): the script run as CRIU runs action
scripts (`sh -c PATH`, the action in CRTOOLS_SCRIPT_ACTION), against our end of its FIFOs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.migrate.predump_hook import PreDumpHook


def run_as_criu(hook: PreDumpHook, action: str = "pre-dump") -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sh", "-c", str(hook.script)], env={**os.environ, "CRTOOLS_SCRIPT_ACTION": action})


@pytest.fixture
def hook(tmp_path: Path) -> Iterator[PreDumpHook]:
    made = PreDumpHook(tmp_path)
    yield made
    made.close()


@pytest.fixture
def status() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_criu_waits_in_the_hook_until_we_say_go(hook: PreDumpHook, status: tuple[int, int]) -> None:
    criu = run_as_criu(hook)
    assert hook.wait(status[0], 10) == "hook" and hook.waiting
    with pytest.raises(subprocess.TimeoutExpired):
        criu.wait(0.2)  # still waiting for our word
    hook.answer(True)
    assert criu.wait(10) == 0 and not hook.waiting


def test_our_no_fails_the_dump(hook: PreDumpHook, status: tuple[int, int]) -> None:
    criu = run_as_criu(hook)
    assert hook.wait(status[0], 10) == "hook"
    hook.answer(False)
    hook.answer(True)  # once only: the first word counts
    assert criu.wait(10) == 1


def test_our_end_gone_fails_the_dump(tmp_path: Path, status: tuple[int, int]) -> None:
    """As when criu-shim dies while CRIU waits: the FIFO's only writer closes and the script reads its
    end, or (gone before the script opened it) the script's open would wait forever: its limit ends it."""
    hook = PreDumpHook(tmp_path, limit=2)
    criu = run_as_criu(hook)
    assert hook.wait(status[0], 10) == "hook"
    hook.close()
    assert criu.wait(10) != 0


def test_gone_before_criu_ran_the_hook_fails_the_dump_within_the_limit(tmp_path: Path) -> None:
    hook = PreDumpHook(tmp_path, limit=1)
    hook.close()  # no reader of `ready` ever again: the script's open of it would block for good
    assert run_as_criu(hook).wait(10) == 124  # timeout's word


@pytest.mark.parametrize("action", ["network-lock", "post-dump", "pre-restore", ""])
def test_other_actions_pass_at_once(hook: PreDumpHook, status: tuple[int, int], action: str) -> None:
    assert run_as_criu(hook, action).wait(10) == 0
    assert hook.wait(status[0], 0.1) == "timeout"


def test_criu_ready_or_runc_gone_before_any_hook_is_said(hook: PreDumpHook, status: tuple[int, int]) -> None:
    os.close(status[1])  # runc exited: its status fd's end of file
    assert hook.wait(status[0], 10) == "status" and not hook.waiting
    hook.answer(True)  # nobody waits: nothing is written


def test_the_config_names_the_private_script(hook: PreDumpHook, tmp_path: Path) -> None:
    assert hook.config_line() == f"action-script {tmp_path / 'pre-dump.sh'}\n"
    assert oct(hook.script.stat().st_mode & 0o777) == "0o700"
    with pytest.raises(FileExistsError):  # never over something already there
        PreDumpHook(tmp_path)
