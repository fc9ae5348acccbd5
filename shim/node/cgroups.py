"""The kubelet's cgroup root on a cgroup v1 host: made before it starts, removed at `node down`.

The kubelet refuses a --cgroup-root that does not exist, and on v1 it creates its kubepods
tree below the root in every hierarchy (the unified one too on hybrid hosts). A root of the
node's own keeps two nodes apart and makes `node down` a bottom-up rmdir of one tree.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_FS = Path("/sys/fs/cgroup")


def hierarchies(base: Path = CGROUP_FS) -> list[Path]:
    """Mounted hierarchies (cpu,cpuacct style links to another hierarchy are skipped)."""
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink())


def create_root(name: str, base: Path = CGROUP_FS) -> list[Path]:
    made = []
    for hierarchy in hierarchies(base):
        path = hierarchy / name
        if path.is_dir():
            continue
        path.mkdir()
        made.append(path)
        if (hierarchy / "cpuset.cpus").exists():
            # A new v1 cpuset is empty: nothing could run below it until cpus and mems are set.
            for key in ("cpuset.cpus", "cpuset.mems"):
                (path / key).write_text((hierarchy / key).read_text())
    return made


def remove_root(name: str, base: Path = CGROUP_FS) -> list[Path]:
    """rmdir the tree `name` in every hierarchy, deepest first; what could not go is logged and kept."""
    removed = []
    for hierarchy in hierarchies(base):
        root = hierarchy / name
        if not root.is_dir():
            continue
        for current, dirs, _files in os.walk(root, topdown=False):
            for d in dirs:
                _rmdir(Path(current) / d)
        if _rmdir(root):
            removed.append(root)
    return removed


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:  # a process still in it: leave it for the leak check to name
        log.warning("could not remove cgroup %s: %s", path, exc)
        return False
