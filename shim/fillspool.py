"""The lazy fill records a restore relay leaves for the proxy's metrics: one small JSON file per finished fill.

The relay is a process of its own that outlives the proxy, so it cannot add to
the proxy's Prometheus registry. It writes `<restore>.json` (`{"seconds": S}`,
atomically, 0600) into `SPOOL` under the restore work dir, but only when that
directory exists: the proxy creates it when it serves metrics, and folds the
files into its histogram at each scrape, deleting them (shim.metrics). Nothing
is written when nobody scrapes for long (MAX_FILES).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
SPOOL = "lazy-fill-metrics"  # in the restore work dir
MAX_FILES = 10000
_MAX_RECORD = 4096


def write(spool: Path, name: str, seconds: float) -> None:
    """Relay side: record one finished fill, if the proxy serves metrics (it created `spool`)."""
    try:
        if not spool.is_dir() or sum(1 for _ in os.scandir(spool)) >= MAX_FILES:
            return
        temp = spool / f".{name}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps({"seconds": round(seconds, 6)}))
        os.rename(temp, spool / f"{name}.json")
    except OSError as exc:  # a metric is never worth failing a restore for
        log.warning("could not record the lazy fill time in %s: %s", spool, exc)


def drain(spool: Path) -> Iterator[float]:
    """Proxy side: the recorded fill times, each file deleted once read (garbage skipped and deleted)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(spool):
            if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                seconds = _read(Path(entry.path))
                if seconds is not None:
                    yield seconds


def _read(path: Path) -> float | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as source:
            raw: Any = json.loads(source.read(_MAX_RECORD))
    except (OSError, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    seconds = raw.get("seconds") if isinstance(raw, dict) else None
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and 0 <= seconds < 1e7:
        return float(seconds)
    return None
