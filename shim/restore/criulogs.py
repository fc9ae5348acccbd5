"""A failed restore's CRIU logs: kept by the relay before the task is deleted, quoted by StartContainer.

runc restores at the task's Start and writes CRIU's log to its work dir in the
task's bundle (`<bundle>/work/restore.log`, the path its error names); the lazy
restore's page daemon logs into the restore's work dir. containerd deletes the
task when Start fails, and both go with it. So the relay, which sees the task's
Delete before the runc shim does, copies them (shim.checkpoint.criulog.keep)
when the restore never produced a process, into the directory the proxy named
in the container's spec (LOGS_ANNOTATION: `<state_dir>/logs`); the proxy's
StartContainer then quotes CRIU's reason and names the kept files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from shim.annotations import RESTORE_PREFIX
from shim.checkpoint import criulog
from shim.errors import ShimError

# Set by the proxy on a restored container (allow-listed like every restore.criu-shim.io/ key).
LOGS_ANNOTATION = RESTORE_PREFIX + "logs"
RESTORE_LOG = "restore.log"  # runc's name, in its work dir
KINDS = (("restore", "CRIU restore"), ("lazy-pages", "CRIU lazy-pages"))


def keep_failed_restore_logs(bundle: Path, lazy_log: Path | None, container_id: str) -> list[Path]:
    """Relay side, at the task's Delete: keep the logs of a restore that never produced a process."""
    if (bundle / "init.pid").exists():  # runc wrote the restored process's pid: the restore worked
        return []
    logs_dir = _logs_dir(bundle)
    if logs_dir is None:
        return []
    kept = [criulog.keep(bundle / "work" / RESTORE_LOG, logs_dir, container_id, "restore")]
    if lazy_log is not None:
        kept.append(criulog.keep(lazy_log, logs_dir, container_id, "lazy-pages"))
    return [path for path in kept if path is not None]


def keep_lazy_pages_log(bundle: Path, lazy_log: Path) -> Path | None:
    """Relay side: the page daemon failed mid-fill (the restored process is ended): keep its log."""
    logs_dir = _logs_dir(bundle)
    return criulog.keep(lazy_log, logs_dir, bundle.name, "lazy-pages") if logs_dir is not None else None


def explain_start_failure(error: ShimError, logs_dir: Path, container_id: str, since: float) -> ShimError:
    """Proxy side: containerd's error as it was, then CRIU's reason and the kept logs (newer than `since`)."""
    message = error.message
    for kind, what in KINDS:
        kept = criulog.newest(logs_dir, container_id, kind)
        if kept is None or _mtime(kept) < since:
            continue
        message = criulog.explain(message, criulog.read_log(kept), kept, what)
    return error if message == error.message else criulog.reworded(error, message)


def _logs_dir(bundle: Path) -> Path | None:
    try:
        spec = json.loads((bundle / "config.json").read_bytes())
        value = spec["annotations"][LOGS_ANNOTATION]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(value) if isinstance(value, str) and value.startswith("/") else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def now() -> float:
    """A time to pass as `since`: file times and this clock agree (both are the wall clock)."""
    return time.time()
