"""Leave nothing behind: mounts, network namespaces, the bridge, CNI state.

Every function is idempotent: calling it when there is nothing to clean is a
no-op, so `node down` can run after a crash, twice, or on a half-started node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

CNI_CACHE = Path("/var/lib/cni/results")


def mounts_under(*prefixes: Path) -> list[str]:
    """Mount points below any of `prefixes`, deepest first (the order to unmount in)."""
    roots = [str(p.resolve()) for p in prefixes]
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == r or point.startswith(r + "/") for r in roots):
            points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


# runc's default state root, where a restore mounts the container's rootfs as <id>/criu-root.
RUNC_ROOT = Path("/run/containerd/runc")


def runc_mounts_over(directory: Path, mountinfo: str | None = None, runc_root: Path = RUNC_ROOT) -> list[str]:
    """Mounts under runc's state root whose source lies in `directory` (a node's snapshots).

    A restore that CRIU never finished (killed at a deadline, spinning on a bad
    image) can leave runc's `<id>/criu-root` bind of the rootfs behind; it sits
    outside the node's directory, so `mounts_under` does not see it.
    """
    root, ours = str(runc_root), str(directory.resolve())
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    points = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        if point.startswith(root + "/") and (ours + "/") in line:
            points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_runc_leftovers(directory: Path) -> list[str]:
    done = []
    for point in runc_mounts_over(directory):
        if subprocess.run(["umount", "-l", point], capture_output=True).returncode == 0:
            done.append(point)
            with contextlib.suppress(OSError):
                os.rmdir(point)  # runc's empty mount point; its state dir is runc's own
        else:
            log.warning("could not unmount %s", point)
    return done


def unmount_all(*prefixes: Path) -> list[str]:
    done = []
    for point in mounts_under(*prefixes):
        # Lazy: a mount still busy because a process is exiting must not stop the sweep.
        if subprocess.run(["umount", "-l", point], capture_output=True).returncode == 0:
            done.append(point)
        else:
            log.warning("could not unmount %s", point)
    return done


def remove_netns(path: Path) -> bool:
    """Unmount and delete a named network namespace file if it still exists."""
    if not path.exists():
        return False
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
    path.unlink(missing_ok=True)
    return True


def delete_link(name: str) -> bool:
    if not Path(f"/sys/class/net/{name}").exists():
        return False
    subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
    return True


def remove_cni_cache(network_name: str) -> int:
    """Results libcni keeps for a network that no longer exists."""
    count = 0
    if CNI_CACHE.is_dir():
        for entry in CNI_CACHE.glob(f"{network_name}-*"):
            entry.unlink(missing_ok=True)
            count += 1
    return count


def remove_tree(path: Path) -> None:
    if path.is_dir() and not mounts_under(path):
        shutil.rmtree(path, ignore_errors=True)


def subnet_in_use(subnet: str, own_bridge: str) -> str | None:
    """The link that already routes `subnet`, if it is not our bridge."""
    out = subprocess.run(["ip", "-o", "route", "show", "exact", subnet], capture_output=True, text=True).stdout
    for line in out.splitlines():
        words = line.split()
        if "dev" in words:
            dev = words[words.index("dev") + 1]
            if dev != own_bridge:
                return dev
    return None


def has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 24))
    return False


def is_root() -> bool:
    return os.geteuid() == 0
