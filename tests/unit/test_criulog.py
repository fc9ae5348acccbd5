"""CRIU's logs: reasons quoted from its Error lines only, advice only when an error asks, logs kept and bounded."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from shim.checkpoint import criulog
from shim.errors import Code, Unknown, Upstream
from shim.restore import criulogs

# Excerpts of real logs, CRIU 4.2.1 on these machines (kernel 6.18, no CAP_SYS_RESOURCE); the /dev/shm one
# has the error line the node test (tests/node/test_devshm.py) and the issue saw, in a shortened log.
NOFILE = "(00.035982) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
UNIX_SOCKETS = "(00.038087) unix: Dumping unix socket at 3\n(00.038110) unix: Dumping unix socket at 4\n"
RLIMIT_DUMP = (NOFILE + UNIX_SOCKETS
               + "(00.042311) Warn  (compel/arch/x86/src/lib/infect.c:419): Will restore 10445 with interrupted "
                 "system call\n"
               "(00.044528) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted\n"
               "(00.044529) Error (criu/cr-dump.c:1584): Dump core (pid: 10445) failed with -1\n"
               "(00.044752) Error (criu/cr-dump.c:1975): Dumping FAILED.\n")
FLOCK_DUMP = (NOFILE + "(00.043117) Error (criu/file-lock.c:110): Some file locks are hold by dumping tasks! "
                       "You can try --file-locks to dump them.\n"
              "(00.043170) Error (criu/cr-dump.c:1975): Dumping FAILED.\n")
TCP_DUMP = (NOFILE + UNIX_SOCKETS
            + "(00.040395) Error (criu/sk-inet.c:200): inet: Connected TCP socket, consider using "
              "--tcp-established option.\n"
            "(00.040415) Error (criu/cr-dump.c:1545): Dump files (pid: 10544) failed with -1\n"
            "(00.040671) Error (criu/cr-dump.c:1975): Dumping FAILED.\n")
EXT_UNIX_DUMP = ("(00.031000) Error (criu/sk-unix.c:882): unix: External socket is used. Consider using "
                 "--ext-unix-sk option.\n(00.031100) Error (criu/cr-dump.c:1975): Dumping FAILED.\n")
DEVSHM_RESTORE = (NOFILE + "(00.061022)      1: Error (criu/files-reg.c:2200): Can't open file dev/shm/travel on "
                           "restore: No such file or directory\n"
                  "(00.061030)      1: Error (criu/files-reg.c:2132): Can't open file dev/shm/travel: No such file "
                  "or directory\n"
                  "(00.074527) Error (criu/cr-restore.c:2331): Restoring FAILED.\n")
USERNS_RESTORE = (NOFILE + "(00.072940)      1: Error (criu/namespaces.c:258): Can't setns 16/net: Operation not "
                           "permitted\n"
                  "(00.072948)      1: Error (criu/cr-restore.c:1566): Can't unshare net-namespace: Operation not "
                  "permitted\n"
                  "(00.074527) Error (criu/cr-restore.c:2331): Restoring FAILED.\n")


def test_error_lines_are_criu_s_own_without_the_harmless_one() -> None:
    assert criulog.error_lines(RLIMIT_DUMP) == [
        "Can't get rlimit 0: Operation not permitted", "Dump core (pid: 10445) failed with -1", "Dumping FAILED."]
    assert criulog.error_lines(USERNS_RESTORE)[0] == "Can't setns 16/net: Operation not permitted"  # task-prefixed
    assert criulog.error_lines(UNIX_SOCKETS + "(00.1) Warn  (x.c:1): an Error here is no error\n") == []


@pytest.mark.parametrize(("log", "wanted"), [
    (TCP_DUMP, 'checkpoint.criu-shim.io/tcp-established: "true"'),
    (FLOCK_DUMP, 'checkpoint.criu-shim.io/file-locks: "true"'),
    (EXT_UNIX_DUMP, 'checkpoint.criu-shim.io/ext-unix-sockets: "true"'),
    (RLIMIT_DUMP, "runs as a non-root user"),
    (DEVSHM_RESTORE, "maps /dev/shm/travel, which is not in the new pod's /dev/shm"),
    (USERNS_RESTORE, "its own user namespace"),
])
def test_advice_comes_from_the_error_that_asks_for_it(log: str, wanted: str) -> None:
    found = criulog.advice(criulog.error_lines(log))
    assert len(found) == 1 and wanted in found[0]


def test_a_unix_socket_in_the_log_is_no_reason_for_the_ext_unix_advice() -> None:
    """The bug this replaces: any "unix socket" anywhere in dump.log suggested ext-unix-sockets."""
    message = criulog.explain("runc failed", RLIMIT_DUMP, None)
    assert "ext-unix-sockets" not in message and "annotation" not in message
    assert message.startswith("runc failed; CRIU: Can't get rlimit 0: Operation not permitted | ")


def test_without_error_lines_the_end_of_the_log_is_quoted() -> None:
    message = criulog.explain("runc failed", "(00.1) one\n(00.2) two\n(00.3) three\n(00.4) four\n", None)
    assert message == "runc failed; CRIU log ends: (00.2) two | (00.3) three | (00.4) four"
    assert criulog.explain("runc failed", "", None) == "runc failed"


def test_reworded_keeps_the_class_and_code() -> None:
    upstream = criulog.reworded(Upstream(Code.NOT_FOUND, "from containerd"), "more")
    assert isinstance(upstream, Upstream) and upstream.message == "more" and str(upstream) == "more"
    assert upstream.code == Code.NOT_FOUND
    unknown = criulog.reworded(Unknown("x"), "y")
    assert isinstance(unknown, Unknown) and unknown.code == Unknown.code


def test_kept_private_named_and_found_again(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(TCP_DUMP)
    logs = tmp_path / "state" / "logs"
    kept = criulog.keep(log, logs, "c" * 64, "dump")
    assert kept is not None and kept.read_text() == TCP_DUMP
    assert kept.parent == logs / ("c" * 64)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(logs.stat().st_mode) == stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert criulog.newest(logs, "c" * 64, "dump") == kept
    assert criulog.newest(logs, "c" * 64, "restore") is None
    assert "full CRIU log: " + str(kept) in criulog.explain("runc failed", TCP_DUMP, kept)


def test_nothing_kept_from_a_missing_log_or_a_symlink(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    assert criulog.keep(tmp_path / "absent.log", logs, "c1", "dump") is None
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    (tmp_path / "link.log").symlink_to(secret)
    assert criulog.keep(tmp_path / "link.log", logs, "c1", "dump") is None
    assert not logs.exists() or not any(logs.rglob("*.log"))


def test_a_hostile_container_id_does_not_leave_the_logs_directory(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(TCP_DUMP)
    kept = criulog.keep(log, tmp_path / "logs", "../../etc", "dump")
    assert kept is not None and kept.parent.parent == tmp_path / "logs"


def test_retention_per_container_and_in_total(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    log = tmp_path / "dump.log"
    log.write_text("x" * 1000)
    for age, container in enumerate(["a"] * 7 + ["b"] * 2):
        kept = criulog.keep(log, logs, container, "dump")
        assert kept is not None
        os.utime(kept, (time.time() - 1000 + age, time.time() - 1000 + age))
    criulog.prune(logs)
    assert len(list((logs / "a").iterdir())) == criulog.KEEP_PER_CONTAINER
    assert len(list((logs / "b").iterdir())) == 2
    criulog.prune(logs, total=2500)  # the two newest files of all fit, the rest goes
    remaining = sorted(logs.rglob("*.log"))
    assert [p.parent.name for p in remaining] == ["b", "b"]


def test_a_huge_log_is_kept_by_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(criulog, "MAX_COPY", 100)
    log = tmp_path / "dump.log"
    log.write_text("x" * 1000 + "the reason\n")
    kept = criulog.keep(log, tmp_path / "logs", "c", "dump")
    assert kept is not None and kept.stat().st_size == 100 and kept.read_text().endswith("the reason\n")


# --- a failed restore: kept by the relay at the task's Delete, quoted by StartContainer --------------


def _bundle(tmp_path: Path, logs: Path | None, restore_log: str | None, started: bool = False) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "work").mkdir(parents=True)
    annotations = {criulogs.LOGS_ANNOTATION: str(logs)} if logs else {}
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.1.0", "annotations": annotations}))
    if restore_log is not None:
        (bundle / "work" / "restore.log").write_text(restore_log)
    if started:
        (bundle / "init.pid").write_text("4242")
    return bundle


def test_the_relay_keeps_a_failed_restores_logs_and_start_container_quotes_them(tmp_path: Path) -> None:
    logs = tmp_path / "state" / "logs"
    lazy_log = tmp_path / "lazy-pages.log"
    lazy_log.write_text("(00.1) Error (criu/uffd.c:1): uffd: the daemon's own trouble\n")
    since = criulogs.now() - 1
    kept = criulogs.keep_failed_restore_logs(_bundle(tmp_path, logs, DEVSHM_RESTORE), lazy_log, "c" * 64)
    assert [p.name.split("-")[0] for p in kept] == ["restore", "lazy"]
    error = Upstream(Code.UNKNOWN, "failed to start containerd task: OCI runtime restore failed: criu failed: "
                                   "type NOTIFY errno 0\nlog file: /run/x/work/restore.log: unknown")
    explained = criulogs.explain_start_failure(error, logs, "c" * 64, since)
    assert isinstance(explained, Upstream) and explained.code == Code.UNKNOWN
    assert explained.message.startswith(error.message + "; CRIU restore: Can't open file dev/shm/travel on restore")
    assert f"full CRIU restore log: {kept[0]}" in explained.message
    assert "CRIU lazy-pages: uffd: the daemon's own trouble" in explained.message
    # An older failure's logs are not this one's reason.
    assert criulogs.explain_start_failure(error, logs, "c" * 64, criulogs.now() + 60) is error


def test_nothing_is_kept_for_a_restore_that_worked_or_without_a_logs_dir(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    assert criulogs.keep_failed_restore_logs(_bundle(tmp_path / "a", logs, DEVSHM_RESTORE, started=True), None,
                                             "c") == []
    assert criulogs.keep_failed_restore_logs(_bundle(tmp_path / "b", None, DEVSHM_RESTORE), None, "c") == []
    assert not logs.exists()


def test_a_page_daemon_that_fails_mid_fill_leaves_its_log(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    bundle = _bundle(tmp_path, logs, None, started=True)
    lazy_log = tmp_path / "lazy-pages.log"
    lazy_log.write_text("(00.2) Error (criu/uffd.c:1): uffd: can't read the pages\n")
    kept = criulogs.keep_lazy_pages_log(bundle, lazy_log)
    assert kept is not None and kept.parent == logs / bundle.name and kept.name.startswith("lazy-pages-")
