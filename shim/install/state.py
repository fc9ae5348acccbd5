"""Write an installation's files with the originals kept, and put the originals back byte for byte.

`<state_dir>/install/` (0700) holds `manifest.json` and one `<n>.orig` per file
that existed before the first install (0600, its bytes unchanged). The
manifest records, per file, whether it existed, its mode and owner, and the
sha256 of what install wrote. A second install keeps the first originals (it
is idempotent: it writes only what differs). Uninstall refuses, naming the
files, when one was changed since install (unless forced), then restores every
file (or removes the ones install created) and the state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from shim.errors import FailedPrecondition
from shim.install.files import Change

MANIFEST = "manifest.json"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(directory: Path) -> dict[str, dict[str, Any]]:
    """path -> record; {} when nothing is installed."""
    return _manifest(directory)[0]


def _manifest(directory: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The file records and the directories install created (removed again if empty)."""
    try:
        raw = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return {}, []
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"{directory / MANIFEST}: unreadable install record ({exc}); "
                                 "nothing was changed") from None
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict):
        raise FailedPrecondition(f"{directory / MANIFEST}: not an install record; nothing was changed")
    dirs = raw.get("created_dirs", [])
    return files, [str(d) for d in dirs] if isinstance(dirs, list) else []


def install(changes: list[Change], directory: Path) -> list[Path]:
    """Write what differs, originals first; returns the paths written."""
    state_parents = _missing_parents(directory / MANIFEST)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    files, dirs = _manifest(directory)
    dirs.extend(str(d) for d in state_parents if str(d) not in dirs)
    written = []
    for change in changes:
        key = str(change.path)
        dirs.extend(str(d) for d in _missing_parents(change.path) if str(d) not in dirs)
        record = files.get(key)
        if record is None:
            record = _keep_original(change, directory, len(files))
        record["installed_sha256"] = _sha(change.after)
        files[key] = record
        # Recorded before the file changes: a crash between the two leaves an uninstallable state.
        _write_atomic(directory / MANIFEST, json.dumps({"files": files, "created_dirs": dirs}, indent=1).encode(), 0o600)
        if change.changes_anything:
            owner = (int(record["uid"]), int(record["gid"])) if record.get("existed") else None
            _write_atomic(change.path, change.after, _mode(change, record), owner)
            written.append(change.path)
    return written


def _keep_original(change: Change, directory: Path, index: int) -> dict[str, Any]:
    if change.before is None:
        return {"existed": False}
    stat = change.path.stat()
    backup = f"{index}.orig"
    _write_atomic(directory / backup, change.before, 0o600)
    return {"existed": True, "backup": backup, "mode": stat.st_mode & 0o7777, "uid": stat.st_uid,
            "gid": stat.st_gid, "original_sha256": _sha(change.before)}


def _mode(change: Change, record: dict[str, Any]) -> int:
    return int(record["mode"]) if record.get("existed") else change.mode


def changed_since_install(directory: Path) -> list[str]:
    """Files whose content is no longer what install wrote (or that are gone)."""
    changed = []
    for path, record in load(directory).items():
        try:
            current = _sha(Path(path).read_bytes())
        except FileNotFoundError:
            current = None
        if current != record.get("installed_sha256"):
            changed.append(path)
    return changed


def uninstall(directory: Path, force: bool = False) -> list[str]:
    """Put every original back; returns what it did, one line per file."""
    files, dirs = _manifest(directory)
    if not files:
        raise FailedPrecondition(f"nothing to uninstall: no install record in {directory}")
    changed = changed_since_install(directory)
    if changed and not force:
        raise FailedPrecondition(
            "refusing to uninstall: changed since criu-shim install: " + ", ".join(changed)
            + f" (their originals are in {directory}; --force puts the originals back anyway)")
    # Read every original first: a missing backup is found before anything is touched.
    originals = {path: (directory / r["backup"]).read_bytes() for path, r in files.items() if r.get("existed")}
    for path, data in originals.items():
        if _sha(data) != files[path]["original_sha256"]:
            raise FailedPrecondition(f"{directory / files[path]['backup']}: the kept original of {path} is damaged; "
                                     "nothing was changed")
    done = []
    for path, record in files.items():
        if record.get("existed"):
            _write_atomic(Path(path), originals[path], int(record["mode"]), (int(record["uid"]), int(record["gid"])))
            done.append(f"restored {path}")
        else:
            with contextlib.suppress(FileNotFoundError):
                Path(path).unlink()
            done.append(f"removed {path}")
    for record in files.values():
        if record.get("backup"):
            (directory / record["backup"]).unlink(missing_ok=True)
    (directory / MANIFEST).unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()
    for created in sorted(dirs, key=len, reverse=True):  # deepest first; only if nothing else moved in
        with contextlib.suppress(OSError):
            Path(created).rmdir()
    return done


def _missing_parents(path: Path) -> list[Path]:
    return [parent for parent in path.parents if not parent.exists()]


def _write_atomic(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Write by rename, so a reader (containerd, systemd) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.criu-shim.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        if owner is not None and os.geteuid() == 0:
            os.chown(temp, *owner)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
