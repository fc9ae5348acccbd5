"""The relay's page daemon against a fake `criu lazy-pages`: start, listening, settling, stopping.

The fake is a shell script given the daemon's command line. It records its
arguments and pid in the work dir, then does what the `mode` file beside it
says: create the socket and exit, create the socket and wait for a `release`
file, exit without a socket, or hang without one. The devices in the plans
are paths that do not exist, so releasing them (loopdev.detach) does nothing.
Each test body is a coroutine run by `asyncio.run`.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.config import PAGE_DAEMON_OURS
from shim.errors import FailedPrecondition
from shim.runtime import lazy_daemon, page_daemon
from shim.runtime.lazy_daemon import LazyPages
from tests.support.procs import alive, run

REPO = Path(__file__).resolve().parents[2]

FAKE_CRIU = """#!/bin/sh
work=""
for arg in "$@"; do
    [ "$prev" = "--work-dir" ] && work="$arg"
    prev="$arg"
done
printf '%s\\n' "$@" > "$work/argv"
echo $$ > "$work/pid"
mode=$(cat "$(dirname "$0")/mode")
case "$mode" in
    listen-exit) : > "$work/lazy-pages.socket"; exit 0 ;;
    listen-wait) : > "$work/lazy-pages.socket"
                 while [ ! -e "$work/release" ]; do sleep 0.01; done
                 exit 0 ;;
    listen-fail) : > "$work/lazy-pages.socket"
                 while [ ! -e "$work/release" ]; do sleep 0.01; done
                 exit 5 ;;
    die) echo "fake: cannot start" > "$work/lazy-pages.log"; exit 3 ;;
    hang) while :; do sleep 0.01; done ;;
esac
exit 99
"""
CONFIG = "tcp-established\nlazy-pages\nfile-locks\nlazy-pages-extra\n"


@dataclass
class Restore:
    dir: Path  # the unpacked checkpoint
    task_work: Path  # runc's work dir for the restore
    criu: Path
    devices: dict[str, str]

    @property
    def daemon_work(self) -> Path:
        """The daemon's own work dir (socket, log; the fake's argv and pid)."""
        return self.dir / "lazy-work"

    @property
    def config(self) -> Path:
        return self.dir.parent / f"{self.dir.name}.criu.conf"

    def mode(self, mode: str) -> None:
        (self.criu.parent / "mode").write_text(mode)

    def plan(self) -> LazyPages:
        plan = {"criu": str(self.criu), "pages": [{"image": k, "device": v} for k, v in self.devices.items()]}
        (self.dir / lazy_daemon.PLAN_FILE).write_text(json.dumps(plan))
        planned = LazyPages.planned(self.dir)
        assert planned is not None
        return planned


@pytest.fixture
def restore(tmp_path: Path) -> Restore:
    work = tmp_path / "restore" / ("0f" * 16)
    images = work / "checkpoint"
    images.mkdir(parents=True)
    (images / "inventory.img").write_bytes(b"inventory")
    (images / "pagemap-1.img").write_bytes(b"pagemap")
    (images / "pages-1.img").write_bytes(b"")  # sparse in real life; the device stands for it
    (images / "pages-2.img").write_bytes(b"small, copied")
    task_work = tmp_path / "bundle" / "work"
    task_work.mkdir(parents=True)
    criu = tmp_path / "bin" / "criu"
    criu.parent.mkdir()
    criu.write_text(FAKE_CRIU)
    criu.chmod(0o755)
    devices = {"pages-1.img": str(tmp_path / "dev" / "loop-absent-0")}
    made = Restore(work, task_work, criu, devices)
    made.config.write_text(CONFIG)
    return made


@pytest.fixture
def daemons() -> Iterator[list[LazyPages]]:
    """Every LazyPages a test starts is closed afterwards, whatever happened (no fake left running)."""
    started: list[LazyPages] = []
    yield started
    for lazy in started:
        lazy.close()


def start(restore: Restore, daemons: list[LazyPages], mode: str) -> LazyPages:
    restore.mode(mode)
    lazy = restore.plan()
    daemons.append(lazy)
    lazy.start()
    lazy.expose(restore.task_work)
    return lazy


def wait_for_file(path: Path, timeout: float = 5.0) -> str:
    """The file's content once the fake has written it (polled)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.005)
    return path.read_text()


def fakes(restore: Restore) -> list[int]:
    """Live fake daemons of this test (their command line names the fake's path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(restore.criu).encode() in cmdline and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


# --- the plan ---------------------------------------------------------------------------


def test_no_plan_is_an_eager_restore(restore: Restore) -> None:
    assert LazyPages.planned(restore.dir) is None


def test_plan_names_criu_and_config(restore: Restore) -> None:
    lazy = restore.plan()
    assert lazy.criu_config == restore.dir.parent / f"{restore.dir.name}.criu.conf"
    assert lazy.criu_config.read_text() == CONFIG


def test_image_view_links_files_and_points_page_images_at_devices(restore: Restore) -> None:
    images = restore.dir / "checkpoint"
    (images / "subdir").mkdir()
    (images / "stray-link").symlink_to("/etc/passwd")
    restore.devices["pages-2.img"] = "/nonexistent/loop-absent-1"
    view = restore.plan()._image_view()

    assert view == restore.dir / "lazy-images"
    assert stat.S_IMODE(view.stat().st_mode) == 0o700
    assert sorted(p.name for p in view.iterdir()) == ["inventory.img", "pagemap-1.img", "pages-1.img", "pages-2.img"]
    for name in ("inventory.img", "pagemap-1.img"):
        assert not (view / name).is_symlink()
        assert (view / name).stat().st_ino == (images / name).stat().st_ino  # a hard link, not a copy
    assert os.readlink(view / "pages-1.img") == restore.devices["pages-1.img"]
    assert os.readlink(view / "pages-2.img") == "/nonexistent/loop-absent-1"


# --- start and listening -------------------------------------------------------------------


def test_listening_once_the_socket_is_there(restore: Restore, daemons: list[LazyPages]) -> None:
    lazy = start(restore, daemons, "listen-wait")
    run(lazy.listening())
    assert (restore.daemon_work / lazy_daemon.SOCKET).exists()
    # CRIU's restore looks in runc's work dir: the socket is linked there.
    assert (restore.task_work / lazy_daemon.SOCKET).readlink() == restore.daemon_work / lazy_daemon.SOCKET
    argv = (restore.daemon_work / "argv").read_text().splitlines()
    assert argv == ["lazy-pages", "--images-dir", str(restore.dir / "lazy-images"),
                    "--work-dir", str(restore.daemon_work), "--log-file", str(restore.daemon_work / lazy_daemon.LOG),
                    "-v2"]


def test_a_second_start_does_not_start_a_second_daemon(restore: Restore, daemons: list[LazyPages]) -> None:
    # The relay starts the daemon as soon as it has its restore, and again (to no effect) at Create.
    lazy = start(restore, daemons, "listen-wait")
    run(lazy.listening())
    daemon, watcher = lazy._daemon, lazy._watcher
    pid = int(wait_for_file(restore.daemon_work / "pid"))
    lazy.start()
    lazy.expose(restore.task_work)
    assert lazy._daemon is daemon and lazy._watcher is watcher
    # Popen returns once its child has exec'd: a second fake would be running by now.
    assert fakes(restore) == [pid]
    assert (restore.task_work / lazy_daemon.SOCKET).readlink() == restore.daemon_work / lazy_daemon.SOCKET
    run(lazy.listening())
    (restore.daemon_work / "release").touch()
    run(lazy.settled())
    assert daemon is not None and daemon.returncode == 0
    assert fakes(restore) == []


def test_daemon_that_dies_without_listening(restore: Restore, daemons: list[LazyPages]) -> None:
    lazy = start(restore, daemons, "die")
    with pytest.raises(FailedPrecondition) as caught:
        run(lazy.listening())
    assert "the lazy-pages daemon for this restore did not start" in caught.value.message
    assert str(restore.daemon_work / "lazy-pages.log") in caught.value.message
    assert not (restore.daemon_work / lazy_daemon.SOCKET).exists()


def test_daemon_that_hangs_without_listening(restore: Restore, daemons: list[LazyPages],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazy_daemon, "LISTEN_TIMEOUT", 0.3)
    lazy = start(restore, daemons, "hang")
    with pytest.raises(FailedPrecondition, match="lazy-pages.log"):
        run(lazy.listening())
    pid = int(wait_for_file(restore.daemon_work / "pid"))
    assert alive(pid)  # listening() only reports; close() stops it
    lazy.close()
    assert not alive(pid)


# --- settled and close -----------------------------------------------------------------------


def test_settled_waits_for_the_daemon_then_strips_only_the_lazy_pages_line(restore: Restore,
                                                                          daemons: list[LazyPages]) -> None:
    lazy = start(restore, daemons, "listen-wait")

    async def body() -> None:
        await lazy.listening()
        # The daemon is waiting for "release": it has not exited, so the config is as it was.
        assert restore.config.read_text() == CONFIG
        (restore.daemon_work / "release").touch()
        await lazy.settled()

    run(body())
    assert restore.config.read_text() == "tcp-established\nfile-locks\nlazy-pages-extra\n"
    assert not restore.config.with_name(restore.config.name + ".tmp").exists()
    run(lazy.settled())  # again: returns at once


def test_settled_keeps_a_config_without_the_option(restore: Restore, daemons: list[LazyPages]) -> None:
    restore.config.write_text("tcp-established\n")
    before = restore.config.stat()
    lazy = start(restore, daemons, "listen-exit")
    run(lazy.settled())
    after = restore.config.stat()
    assert restore.config.read_text() == "tcp-established\n"
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


def test_settled_without_a_config(restore: Restore, daemons: list[LazyPages]) -> None:
    restore.config.unlink()
    lazy = start(restore, daemons, "listen-exit")
    run(lazy.settled())
    assert not restore.config.exists()


def test_settled_before_start_returns() -> None:
    run(LazyPages(Path("/nonexistent/restore"), Path("/nonexistent/criu"), {}).settled())


def test_close_kills_a_running_daemon_and_is_idempotent(restore: Restore, daemons: list[LazyPages]) -> None:
    lazy = start(restore, daemons, "listen-wait")
    run(lazy.listening())
    pid = int((restore.daemon_work / "pid").read_text())
    assert alive(pid)
    lazy.close()
    assert not alive(pid)
    assert lazy._daemon is not None and lazy._daemon.returncode == -9
    # The watcher saw it exit: the option is gone from the config, as after a normal end.
    assert restore.config.read_text() == "tcp-established\nfile-locks\nlazy-pages-extra\n"
    lazy.close()
    run(lazy.settled())


def test_close_after_the_daemon_exited(restore: Restore, daemons: list[LazyPages]) -> None:
    lazy = start(restore, daemons, "listen-exit")
    run(lazy.settled())
    assert lazy._daemon is not None and lazy._daemon.returncode == 0
    lazy.close()
    lazy.close()
    assert lazy._daemon.returncode == 0


def test_close_without_start() -> None:
    lazy = LazyPages(Path("/nonexistent/restore"), Path("/nonexistent/criu"), {"pages-1.img": "/nonexistent/loop"})
    lazy.close()
    lazy.close()


def test_a_daemon_failing_mid_fill_is_reported_once(restore: Restore, daemons: list[LazyPages]) -> None:
    """Memory not yet filled in would read as zeros: the relay is told, to end the restored process."""
    lazy = start(restore, daemons, "listen-fail")
    failures: list[int] = []
    lazy.on_failure = failures.append
    run(lazy.listening())
    (restore.daemon_work / "release").touch()
    run(lazy.settled())
    assert failures == [5]


def test_a_daemon_stopped_on_purpose_is_no_failure(restore: Restore, daemons: list[LazyPages]) -> None:
    lazy = start(restore, daemons, "listen-wait")
    failures: list[int] = []
    lazy.on_failure = failures.append
    run(lazy.listening())
    lazy.close()
    assert failures == []


def test_a_daemon_done_is_no_failure(restore: Restore, daemons: list[LazyPages]) -> None:
    lazy = start(restore, daemons, "listen-exit")
    failures: list[int] = []
    lazy.on_failure = failures.append
    run(lazy.settled())
    assert failures == []


# --- our daemon, started ahead of need by a spare relay ------------------------------------


def _ours(restore: Restore) -> LazyPages:
    plan = {"criu": str(restore.criu), "daemon": PAGE_DAEMON_OURS, "pages": []}
    (restore.dir / lazy_daemon.PLAN_FILE).write_text(json.dumps(plan))
    planned = LazyPages.planned(restore.dir)
    assert planned is not None
    return planned


def _spare_pid() -> int:
    assert lazy_daemon._spare is not None
    return lazy_daemon._spare.pid


def test_a_spare_page_daemon_takes_the_restore_and_listens(restore: Restore, daemons: list[LazyPages]) -> None:
    lazy_daemon.start_spare()
    spare = _spare_pid()
    lazy = _ours(restore)
    daemons.append(lazy)
    lazy.start()
    assert lazy_daemon._spare is None, "the spare is taken: one restore only"
    assert lazy._daemon is not None and lazy._daemon.pid == spare
    run(lazy.listening())  # it binds the socket itself, in the restore's daemon work dir
    log = wait_for_file(restore.daemon_work / lazy_daemon.LOG)
    assert "ready for the restore" in log
    lazy.close()
    assert not alive(spare)


def test_an_unused_spare_page_daemon_is_discarded() -> None:
    lazy_daemon.start_spare()
    spare = _spare_pid()
    lazy_daemon.discard_spare()
    lazy_daemon.discard_spare()  # idempotent
    deadline = time.monotonic() + 10
    while alive(spare):
        assert time.monotonic() < deadline, "the discarded spare page daemon is still running"
        time.sleep(0.01)


def test_a_spare_page_daemon_without_a_restore_ends_quietly() -> None:
    done = subprocess.run([sys.executable, "-m", "shim.runtime.page_daemon", "spare"], input=b"",
                          capture_output=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, b"")


def test_a_dead_spare_page_daemon_falls_back_to_a_fresh_one(restore: Restore, daemons: list[LazyPages]) -> None:
    lazy_daemon.start_spare()
    assert lazy_daemon._spare is not None
    lazy_daemon._spare.kill()
    lazy_daemon._spare.wait()
    dead = lazy_daemon._spare.pid
    lazy = _ours(restore)
    daemons.append(lazy)
    lazy.start()
    assert lazy._daemon is not None and lazy._daemon.pid != dead
    run(lazy.listening())


# --- our daemon failing while it holds the task's userfaultfds ------------------------------

_FAILING_DAEMON = """
import sys
from pathlib import Path
from shim.runtime import page_daemon
page_daemon._stop_first()  # as _serve does on a failure with tasks in hand
Path(sys.argv[1]).write_text("let go")  # from here its userfaultfds would be closed
sys.exit(1)
"""


def test_our_daemon_failing_has_the_task_ended_before_it_lets_go(tmp_path: Path) -> None:
    """A page daemon that exits releases its userfaultfds, and the kernel then hands the task zero pages
    where memory was missing. So a failing daemon asks first (STOP_FIRST on its stdout) and waits: the
    relay ends the task while the daemon still holds them, then lets it go (closes the pipe)."""
    let_go = tmp_path / "let-go"
    lazy = LazyPages(tmp_path / "restore", Path("/nonexistent/criu"), {}, daemon=PAGE_DAEMON_OURS)
    seen: list[tuple[int, bool]] = []
    lazy.on_failure = lambda status: seen.append((status, let_go.exists()))
    lazy._daemon = subprocess.Popen([sys.executable, "-c", _FAILING_DAEMON, str(let_go)], stdout=subprocess.PIPE,
                                    cwd=REPO)
    lazy._started = time.monotonic()
    lazy._watcher = threading.Thread(target=lazy._watch)
    lazy._watcher.start()
    lazy._watcher.join(page_daemon.STOP_WAIT / 2)  # let go once told, long before its own limit
    assert not lazy._watcher.is_alive(), "the daemon was not let go"
    assert seen == [(1, False)]  # ended while the daemon held on, and reported once (not again at its exit)
    assert let_go.exists() and lazy._daemon.returncode == 1


def test_a_daemon_without_a_relay_does_not_wait(tmp_path: Path) -> None:
    """Started by hand (stdout not a pipe): nobody would end the task, so it exits at once."""
    let_go = tmp_path / "let-go"
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", _FAILING_DAEMON, str(let_go)], stdout=subprocess.DEVNULL, cwd=REPO,
                   timeout=page_daemon.STOP_WAIT / 2)
    assert let_go.exists() and time.monotonic() - started < page_daemon.STOP_WAIT / 2
