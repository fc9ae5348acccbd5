"""The gate CRIU's last image waits at (shim.checkpoint.dumpgate), with a writer thread playing CRIU."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from shim.checkpoint import dumpgate


def _criu_writes(path: Path, data: bytes, opened: threading.Event) -> threading.Thread:
    """CRIU's side: open(O_WRONLY) blocks until a reader is there, then it writes and closes."""
    def run() -> None:
        fd = os.open(path, os.O_WRONLY)
        opened.set()
        os.write(fd, data)
        os.close(fd)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_criu_waits_at_the_gate_until_it_opens_then_the_inventory_is_a_plain_file(tmp_path: Path) -> None:
    gate = dumpgate.Gate.make(tmp_path)
    assert gate is not None and stat.S_ISFIFO(os.lstat(tmp_path / dumpgate.GATE).st_mode)
    opened = threading.Event()
    writer = _criu_writes(gate.path, b"inventory-bytes", opened)
    assert not opened.wait(0.2)  # held: CRIU cannot write its last image, so cannot release the tasks
    gate.open()
    assert opened.wait(5)
    writer.join(5)
    gate.finish()
    path = tmp_path / dumpgate.GATE
    assert stat.S_ISREG(os.lstat(path).st_mode) and path.read_bytes() == b"inventory-bytes"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [dumpgate.GATE]  # no temporary left
    gate.close()  # idempotent after finish


def test_open_is_idempotent_and_close_releases_a_gate_never_used(tmp_path: Path) -> None:
    gate = dumpgate.Gate.make(tmp_path)
    assert gate is not None
    gate.open()
    gate.open()
    gate.close()
    gate.close()


def test_finish_refuses_an_empty_inventory(tmp_path: Path) -> None:
    gate = dumpgate.Gate.make(tmp_path)
    assert gate is not None
    gate.open()
    fd = os.open(gate.path, os.O_WRONLY)  # a writer that leaves without writing
    os.close(fd)
    with pytest.raises(dumpgate.GateError, match="empty"):
        gate.finish(timeout=2)
    gate.close()


def test_no_gate_where_a_fifo_cannot_be_made(tmp_path: Path) -> None:
    assert dumpgate.Gate.make(tmp_path / "missing") is None


def test_held_open_lets_a_waiting_criu_through_for_recovery(tmp_path: Path) -> None:
    gate = dumpgate.Gate.make(tmp_path)
    assert gate is not None
    opened = threading.Event()
    with dumpgate.held_open(tmp_path):
        writer = _criu_writes(gate.path, b"x", opened)
        assert opened.wait(5)
        writer.join(5)
    with dumpgate.held_open(tmp_path / "nothing-here"):  # no gate: nothing to do
        pass


def test_wait_held_never_sees_untraced_tasks_as_held_and_ends_when_told(tmp_path: Path) -> None:
    (tmp_path / "tasks").write_text(f"{os.getpid()}\n")  # this test process: not traced
    stop = threading.Event()
    stop.set()
    with pytest.raises(dumpgate.GateError, match="ended before CRIU held"):
        dumpgate.wait_held(tmp_path, stop, timeout=5)
    with pytest.raises(dumpgate.GateError, match="did not take hold"):
        dumpgate.wait_held(tmp_path, threading.Event(), timeout=0.05)


def test_an_empty_cgroup_is_never_held(tmp_path: Path) -> None:
    (tmp_path / "tasks").write_text("")
    with pytest.raises(dumpgate.GateError):
        dumpgate.wait_held(tmp_path, threading.Event(), timeout=0.02)
