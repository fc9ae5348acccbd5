"""Waiting on things in adapter tests: a coroutine run under a deadline, processes read from /proc,
a condition polled until it holds (never a sleep standing in for synchronisation)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
TIMEOUT = 10.0


def run(awaitable: Awaitable[T], timeout: float = TIMEOUT) -> T:
    """Run `awaitable` on a new event loop; TimeoutError rather than a hung test."""
    return asyncio.run(asyncio.wait_for(awaitable, timeout))


def poll(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def _stat_fields(pid: int) -> list[str]:
    # After the command name, which may hold spaces and parentheses: state, ppid, ...
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Not yet a zombie. (A dying process's command line reads empty before it closes its files.)"""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def parent(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> str:
    """The command line of a live (not zombie) process, arguments joined by spaces; "" if it is gone."""
    try:
        state = _stat_fields(pid)[0]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return ""
    return "" if state == "Z" else argv.replace(b"\0", b" ").decode(errors="replace").strip()


def processes(*texts: str) -> list[int]:
    """Live processes whose command line has every one of `texts` in it."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (line := cmdline(int(entry.name))) and all(t in line for t in texts):
            found.append(int(entry.name))
    return sorted(found)


@contextmanager
def owned_processes() -> Iterator[list[subprocess.Popen[str]]]:
    """A list to put started processes in: each is killed (if still running), reaped and its pipes closed."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
