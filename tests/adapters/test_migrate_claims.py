"""The receiver's claimed pod IPs are released once their container is removed, never before."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from shim.errors import NotFound, Unavailable
from shim.migrate import claims


class _FakeRuntime:
    """A node's CRI as the watcher sees it: containers that exist, or a proxy that does not answer."""

    existing: set[str] = set()
    running_in: dict[str, list[str]] = {}  # pod id -> its running containers (a missing pod: NOT_FOUND)
    down = False

    async def running_containers(self, pod_id: str) -> list[str]:
        if _FakeRuntime.down:
            raise Unavailable("criu-shim is restarting")
        if pod_id not in _FakeRuntime.running_in:
            raise NotFound(f"pod {pod_id} not found")
        return _FakeRuntime.running_in[pod_id]

    def __init__(self, socket: Path) -> None:
        pass

    async def container(self, container_id: str) -> object:
        if _FakeRuntime.down:
            raise Unavailable("criu-shim is restarting")
        if container_id not in _FakeRuntime.existing:
            raise NotFound(f"container {container_id} not found")
        return object()

    async def close(self) -> None:
        pass


def test_released_once_removed_and_not_while_it_exists_or_the_proxy_is_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims, "Runtime", _FakeRuntime)
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/hook.log\n")
    hook.chmod(0o700)
    log = tmp_path / "hook.log"
    watcher = claims.ClaimWatcher(tmp_path / "cri.sock", hook, interval=0.01)
    watcher.add("ctr-1", ["10.234.1.7", "10.234.2.9"])
    watcher.add("ctr-2", [])  # nothing claimed, nothing to release
    _FakeRuntime.existing, _FakeRuntime.down = {"ctr-1"}, False
    asyncio.run(watcher.sweep())
    assert not log.exists()  # still there (exited or running): its addresses stay
    _FakeRuntime.existing, _FakeRuntime.down = set(), True
    asyncio.run(watcher.sweep())
    assert not log.exists()  # no answer is not "removed"
    _FakeRuntime.down = False
    asyncio.run(watcher.sweep())
    # Released (routes withdrawn) first, then freed (the owning IPAM may give them out again).
    assert log.read_text() == "release 10.234.1.7\nrelease 10.234.2.9\nfree 10.234.1.7\nfree 10.234.2.9\n"
    asyncio.run(watcher.sweep())
    assert log.read_text().count("release") == 2 and log.read_text().count("free") == 2  # once


def test_a_hook_without_free_leaves_the_address_reserved_and_is_not_asked_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(claims, "Runtime", _FakeRuntime)
    hook = tmp_path / "hook"  # an older hook: claim, release and check only
    hook.write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/hook.log\n"
                    "case $1 in release) ;; *) echo \"usage: $0 claim IP VIA | release IP | check\" >&2; exit 2;; esac\n")
    hook.chmod(0o700)
    watcher = claims.ClaimWatcher(tmp_path / "cri.sock", hook, interval=0.01)
    watcher.add("ctr-1", ["10.234.1.7"])
    _FakeRuntime.existing, _FakeRuntime.down = set(), False
    asyncio.run(watcher.sweep())
    asyncio.run(watcher.sweep())
    assert (tmp_path / "hook.log").read_text() == "release 10.234.1.7\nfree 10.234.1.7\n"
    assert "freeing pod IP 10.234.1.7 of removed container ctr-1" in caplog.text
    assert "its IPAM keeps it reserved" in caplog.text and "usage:" in caplog.text


def test_no_hook_no_claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims, "Runtime", _FakeRuntime)
    watcher = claims.ClaimWatcher(tmp_path / "cri.sock", None, interval=0.01)
    watcher.add("ctr-1", ["10.234.1.7"])
    _FakeRuntime.existing, _FakeRuntime.down = set(), False
    asyncio.run(watcher.sweep())  # nothing recorded, nothing run


def test_run_stops_with_the_receiver(tmp_path: Path) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        watcher = claims.ClaimWatcher(tmp_path / "cri.sock", None, interval=10.0)
        task = asyncio.create_task(watcher.run(stop))
        stop.set()
        await asyncio.wait_for(task, 2)

    asyncio.run(main())


def _logging_hook(tmp_path: Path) -> Path:
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/hook.log\n")
    hook.chmod(0o700)
    return hook


def test_claims_outlive_the_receiver_and_are_released_by_the_next_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims, "Runtime", _FakeRuntime)
    hook, store = _logging_hook(tmp_path), tmp_path / "state" / claims.CLAIMS_FILE
    first = claims.ClaimWatcher(tmp_path / "cri.sock", hook, store=store)
    first.add("ctr-1", ["10.234.1.7"])
    first.add("ctr-2", ["10.234.2.9", "fd00::7"])
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    del first  # the receiver restarts
    _FakeRuntime.existing, _FakeRuntime.down = {"ctr-2"}, False
    second = claims.ClaimWatcher(tmp_path / "cri.sock", hook, store=store)
    asyncio.run(second.sweep())
    assert (tmp_path / "hook.log").read_text() == "release 10.234.1.7\nfree 10.234.1.7\n"
    assert claims.load(store).claims == {"ctr-2": ("10.234.2.9", "fd00::7")}  # what is left to watch, kept


@pytest.mark.parametrize("content, why", [
    (b"{not json", "Expecting property name"),
    (b'{"claims": []}', "no claims object"),
    (b'{"claims": {"../../etc": ["10.0.0.1"]}}', "is not a container id"),
    (b'{"claims": {"ctr-1": ["10.0.0.1; reboot"]}}', "does not appear to be an IPv4 or IPv6 address"),
    (b'{"claims": {"ctr-1": "10.0.0.1"}}', "not a list of strings"),
    (b'{"claims": {"ctr-1": []}}', "not a list of strings"),
])
def test_a_garbled_claims_file_is_ignored_and_nothing_is_released(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        content: bytes, why: str) -> None:
    monkeypatch.setattr(claims, "Runtime", _FakeRuntime)
    store = tmp_path / claims.CLAIMS_FILE
    store.write_bytes(content)
    store.chmod(0o600)
    watcher = claims.ClaimWatcher(tmp_path / "cri.sock", _logging_hook(tmp_path), store=store)
    _FakeRuntime.existing, _FakeRuntime.down = set(), False
    asyncio.run(watcher.sweep())
    assert not (tmp_path / "hook.log").exists()
    assert f"ignoring the claims file {store}" in caplog.text and why in caplog.text


@pytest.mark.parametrize("kind", ["symlink", "group-writable", "directory"])
def test_a_claims_file_that_is_not_a_private_file_of_ours_is_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    monkeypatch.setattr(claims, "Runtime", _FakeRuntime)
    store, planted = tmp_path / claims.CLAIMS_FILE, tmp_path / "planted.json"
    planted.write_text('{"claims": {"ctr-1": ["10.234.1.7"]}}')
    planted.chmod(0o600)
    if kind == "symlink":
        store.symlink_to(planted)
    elif kind == "group-writable":
        store.write_text(planted.read_text())
        store.chmod(0o620)
    else:
        store.mkdir()
    watcher = claims.ClaimWatcher(tmp_path / "cri.sock", _logging_hook(tmp_path), store=store)
    _FakeRuntime.existing, _FakeRuntime.down = set(), False
    asyncio.run(watcher.sweep())
    assert not (tmp_path / "hook.log").exists()
    assert f"ignoring the claims file {store}" in caplog.text
    if kind == "symlink":  # the next change replaces the link itself, never what it points to
        watcher.add("ctr-9", ["10.234.9.9"])
        assert not store.is_symlink() and claims.load(store).claims == {"ctr-9": ("10.234.9.9",)}
        assert planted.read_text() == '{"claims": {"ctr-1": ["10.234.1.7"]}}'


def test_an_early_claim_a_dead_receiver_left_is_released_or_watched_by_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claimed at the switch-over, before the container exists: a receiver that dies then leaves the
    route to the next one, which releases it where no container came, and watches it where one runs."""
    monkeypatch.setattr(claims, "Runtime", _FakeRuntime)
    hook, store = _logging_hook(tmp_path), tmp_path / claims.CLAIMS_FILE
    first = claims.ClaimWatcher(tmp_path / "cri.sock", hook, store=store)
    first.begin("pod-empty", ["10.234.1.7"])
    first.begin("pod-gone", ["10.234.1.8"])
    first.begin("pod-restored", ["10.234.1.9"])
    first.begin("pod-settled", ["10.234.1.10"])
    first.end("pod-settled")  # this one settled before the receiver died
    assert claims.load(store).pending.keys() == {"pod-empty", "pod-gone", "pod-restored"}
    del first  # SIGKILL
    _FakeRuntime.running_in, _FakeRuntime.down = {"pod-empty": [], "pod-restored": ["ctr-9"]}, True
    second = claims.ClaimWatcher(tmp_path / "cri.sock", hook, store=store)
    asyncio.run(second.settle_pending())  # its proxy not answering yet: nothing decided, nothing lost
    assert not (tmp_path / "hook.log").exists() and len(claims.load(store).pending) == 3
    _FakeRuntime.down = False
    asyncio.run(second.settle_pending())
    assert sorted((tmp_path / "hook.log").read_text().splitlines()) == ["release 10.234.1.7", "release 10.234.1.8"]
    kept = claims.load(store)
    assert kept.pending == {} and kept.claims == {"ctr-9": ("10.234.1.9",)}  # watched like any claim


def test_a_garbled_pending_table_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(claims, "Runtime", _FakeRuntime)
    store = tmp_path / claims.CLAIMS_FILE
    store.write_text('{"claims": {}, "pending": {"pod-1": ["10.0.0.1\\nflush"]}}')
    store.chmod(0o600)
    watcher = claims.ClaimWatcher(tmp_path / "cri.sock", _logging_hook(tmp_path), store=store)
    asyncio.run(watcher.settle_pending())
    assert not (tmp_path / "hook.log").exists()
    assert "does not appear to be an IPv4 or IPv6 address" in caplog.text


def test_this_receiver_s_own_early_claim_is_never_settled_by_its_sweeps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 GiB eager migration runs for many sweeps before its container exists: a sweep that took its
    early claim for a dead receiver's released the address mid-migration (found by the bench)."""
    monkeypatch.setattr(claims, "Runtime", _FakeRuntime)
    hook, store = _logging_hook(tmp_path), tmp_path / claims.CLAIMS_FILE
    _FakeRuntime.running_in, _FakeRuntime.existing, _FakeRuntime.down = {"pod-1": [], "pod-2": []}, set(), False
    left = claims.ClaimWatcher(tmp_path / "cri.sock", hook, store=store)
    left.begin("pod-2", ["10.234.1.8"])  # a receiver that dies with it pending
    watcher = claims.ClaimWatcher(tmp_path / "cri.sock", hook, store=store)
    watcher.begin("pod-1", ["10.234.1.7"])  # its own migration, under way
    watcher.begin("pod-2", ["10.234.1.8"])  # ... and a new one into the dead one's pod: its own now
    for _ in range(3):
        asyncio.run(watcher.sweep())
    assert not (tmp_path / "hook.log").exists()
    assert claims.load(store).pending == {"pod-1": ("10.234.1.7",), "pod-2": ("10.234.1.8",)}
