"""CRIU's logs for the operator: the reason quoted in the error, the whole log kept, hints only from real errors.

A failed dump, restore or lazy-pages daemon leaves its CRIU log in a directory
that is deleted with the attempt (the checkpoint's staging directory, the task's
bundle, the restore's work directory). So the log is copied first, under
criu-shim's state directory:

    <state_dir>/logs/<container id>/<kind>-<UTC time>.log     (dirs 0700, files 0600)

bounded: the newest KEEP_PER_CONTAINER per container, the newest MAX_TOTAL bytes
over all containers, each copy at most MAX_COPY bytes (the end of the log, which
is where CRIU says why it failed).

The error message then quotes CRIU's own `Error` lines (not every line that
happens to mention a socket: CRIU logs "unix: Dumping unix socket at 7" for
any process that has one) and adds advice only when an error line asks for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from shim.checkpoint import options
from shim.errors import ShimError

LOGS = "logs"  # under Config.state_dir
KEEP_PER_CONTAINER = 5
MAX_TOTAL = 64 << 20
MAX_COPY = 8 << 20
QUOTED_ERRORS = 3
# "(00.044528) Error (criu/cr-dump.c:389): Can't get rlimit 0: ..." or, in a restored task,
# "(00.053930)      1: Error (criu/namespaces.c:258): Can't setns 16/net: ..."
_ERROR = re.compile(r"^\(\s*[\d.]+\)\s+(?:\d+:\s+)?Error \([^)]*\):\s*(?P<message>.*\S)")
# Logged on every run on a node without CAP_SYS_RESOURCE, and harmless: never the reason.
_NOISE = ("rlimit: Can't setup RLIMIT_NOFILE for self",)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Hint:
    """Advice for a CRIU error line matching `pattern` (a regular expression)."""

    pattern: str
    advice: Callable[[re.Match[str]], str]


def _annotation(name: str) -> Callable[[re.Match[str]], str]:
    return lambda match: (f'to checkpoint this container set the pod annotation {options.annotation(name)}: "true" '
                          "(or the node default in the criu-shim config)")


HINTS = (
    Hint(r"--tcp-established", _annotation("tcp-established")),
    Hint(r"--ext-unix-sk", _annotation("ext-unix-sockets")),
    Hint(r"--file-locks", _annotation("file-locks")),
    Hint(r"Can't get rlimit \d+: Operation not permitted", lambda match: (
        "a process of this container runs as a non-root user, and CRIU may only read another user's resource "
        "limits with CAP_SYS_RESOURCE, which this node withholds from containerd and CRIU (criu-shim check says "
        "so); processes of non-root users can be checkpointed only where containerd runs with CAP_SYS_RESOURCE")),
    Hint(r"Can't open file (dev/shm/\S+) on restore", lambda match: (
        f"the restored process maps /{match.group(1)}, which is not in the new pod's /dev/shm: the checkpoint "
        "carries no /dev/shm (made by another tool or an older criu-shim), or the new container's /dev/shm is "
        "not its pod's own (host IPC, or a volume mounted there: volumes are not part of a checkpoint)")),
    Hint(r"Can't setns \d+/net: Operation not permitted", lambda match: (
        "the checkpoint was taken in a pod with its own user namespace (hostUsers: false); CRIU 4.2 cannot restore "
        "such a checkpoint into a pod's network namespace (checkpoint-restore/criu#2651)")),
)


def error_lines(text: str) -> list[str]:
    """CRIU's own error messages in a log, in order, without the known harmless ones."""
    found = []
    for line in text.splitlines():
        match = _ERROR.match(line)
        if match and not match.group("message").startswith(_NOISE):
            found.append(match.group("message"))
    return found


def advice(errors: Iterable[str]) -> list[str]:
    """The advice of every hint an error line asks for, once each, in HINTS order."""
    errors = list(errors)
    found = []
    for hint in HINTS:
        for line in errors:
            match = re.search(hint.pattern, line)
            if match:
                found.append(hint.advice(match))
                break
    return found


def explain(message: str, log_text: str, kept: Path | None, what: str = "CRIU") -> str:
    """`message` as it was, then CRIU's reason, the advice it calls for and where the whole log is."""
    errors = error_lines(log_text)
    parts = [message]
    if errors:
        parts.append(f"{what}: " + " | ".join(errors[:QUOTED_ERRORS]))
    elif log_text.strip():
        parts.append(f"{what} log ends: " + " | ".join(log_text.strip().splitlines()[-QUOTED_ERRORS:]))
    parts.extend(advice(errors))
    if kept is not None:
        parts.append(f"full {what} log: {kept}")
    return "; ".join(parts)


def reworded(error: ShimError, message: str) -> ShimError:
    """The same error (class and code) with another message."""
    kind = type(error)
    new = kind.__new__(kind)  # not kind(message): Upstream's constructor takes the code too
    new.__dict__.update(error.__dict__)
    Exception.__init__(new, message)
    new.message = message
    return new


def read_log(path: Path) -> str:
    """The end of a log (MAX_COPY bytes at most), never through a symlink; "" if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ""
        return os.pread(fd, MAX_COPY, max(0, st.st_size - MAX_COPY)).decode(errors="replace")
    finally:
        os.close(fd)


def keep(log: Path, logs_dir: Path, container_id: str, kind: str) -> Path | None:
    """Copy `log` to logs_dir/<container_id>/<kind>-<time>.log (0600) and prune; its path, or None if none.

    Never raises for an I/O failure: keeping the log must not change the outcome
    of what failed (the caller's error is the one to report).
    """
    text = read_log(log)
    if not text:
        return None
    try:
        directory = _private_dir(_private_dir(logs_dir) / _safe(container_id))
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = directory / f"{_safe(kind)}-{stamp}-{secrets.token_hex(3)}.log"
        _write_private(kept, text.encode())
        prune(logs_dir)
    except OSError:
        return None
    return kept


def newest(logs_dir: Path, container_id: str, kind: str) -> Path | None:
    """The most recently kept log of `kind` for the container, if any."""
    directory = logs_dir / _safe(container_id)
    try:
        candidates = [p for p in directory.iterdir() if p.name.startswith(f"{_safe(kind)}-") and p.suffix == ".log"]
    except OSError:
        return None
    return max(candidates, key=lambda p: p.name, default=None)


def prune(logs_dir: Path, per_container: int = KEEP_PER_CONTAINER, total: int = MAX_TOTAL) -> None:
    """Keep the newest `per_container` logs of each container and the newest `total` bytes overall."""
    kept: list[tuple[float, int, Path]] = []
    for directory in _subdirs(logs_dir):
        logs = sorted(_logs(directory), reverse=True)
        for _, _, old in logs[per_container:]:
            old.unlink(missing_ok=True)
        kept.extend(logs[:per_container])
        if not logs[:per_container]:
            with contextlib.suppress(OSError):
                directory.rmdir()
    size = 0
    for _, length, path in sorted(kept, reverse=True):
        size += length
        if size > total:
            path.unlink(missing_ok=True)


def _subdirs(root: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _logs(directory: Path) -> list[tuple[float, int, Path]]:
    found = []
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False) and entry.name.endswith(".log"):
            st = entry.stat(follow_symlinks=False)
            found.append((st.st_mtime, st.st_size, Path(entry.path)))
    return found


def _safe(name: str) -> str:
    """A file name from an id: as it is when harmless (containerd ids are hex), else a digest."""
    if _SAFE_NAME.match(name):
        return name
    return "id-" + hashlib.sha256(name.encode()).hexdigest()[:32]


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _write_private(path: Path, data: bytes) -> None:
    """Written under a temporary name and renamed: a reader never sees half a log."""
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(temp, path)
