"""What a node test may leave behind: processes, mounts, netns, links, nft rules."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shim.handoff import SHIM_DIR

Nodes = Path | Sequence[Path]  # a node's directory, or several nodes'


@dataclass(frozen=True)
class HostState:
    processes: frozenset[str]
    mounts: frozenset[str]
    netns: frozenset[str]
    links: frozenset[str]
    relay_files: frozenset[str]
    loops: str
    nft: str
    kubelet: frozenset[str]  # kubelet cgroup roots (criu-shim-*, kubepods) and /var/lib/kubelet


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout


def _processes() -> frozenset[str]:
    names = ("containerd", "containerd-shim-runc-v2", "criu", "runc", "kubelet", "kube-apiserver", "etcd")
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (comm in names or "shim serve" in cmdline or "shim.runtime" in cmdline) and cmdline.strip():
            found.add(f"{entry.name} {cmdline.strip()}")
    return frozenset(found)


def _kubelet_state() -> frozenset[str]:
    found = {str(p) for p in Path("/sys/fs/cgroup").glob("*/criu-shim-*")}
    found |= {str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods")}
    return frozenset(found | ({"/var/lib/kubelet"} if Path("/var/lib/kubelet").exists() else set()))


def snapshot() -> HostState:
    mounts = frozenset(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return HostState(
        processes=_processes(),
        mounts=mounts,
        netns=frozenset(_run("ip", "netns", "list").split("\n")) - {""},
        links=frozenset(line.split(":")[1].strip() for line in _run("ip", "-o", "link").splitlines()),
        relay_files=frozenset(str(p) for p in SHIM_DIR.glob("*")),
        loops=_run("losetup", "--list", "--noheadings"),
        nft=_run("nft", "-s", "list", "ruleset"),  # -s: without counters (they move with traffic)
        kubelet=_kubelet_state(),
    )


def settled_snapshot(before: HostState, timeout: float = 10.0, directory: Nodes | None = None) -> HostState:
    """The host state once exiting processes are gone (poll, do not sleep blindly); with `directory`
    (the nodes' directories), another node's spares (started meanwhile) are not waited for."""
    deadline = time.monotonic() + timeout
    while True:
        after = snapshot()
        if not _new_processes(before, after, directory) or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def _another_nodes_spare(process: str, directory: Nodes) -> bool:
    """A spare restore relay or spare page daemon working outside `directory`: another node's (a node's
    spares work in its restores' root, DIR/restore). A node that restored starts its next spare
    alongside, at idle priority: on a loaded machine it appears during the next module's node."""
    pid, _, cmdline = process.partition(" ")
    if "shim.runtime" not in cmdline or "spare" not in cmdline:
        return False
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    ours = [directory] if isinstance(directory, Path) else list(directory)
    return not any(cwd.is_relative_to(d.resolve()) for d in ours)


def _new_processes(before: HostState, after: HostState, directory: Nodes | None) -> list[str]:
    return sorted(p for p in after.processes - before.processes
                  if directory is None or not _another_nodes_spare(p, directory))


def assert_nothing_left(before: HostState, after: HostState, directory: Nodes) -> None:
    """Nothing new on the host but another node's spares (`directory`: the node's, or the nodes')."""
    left = {
        "processes": _new_processes(before, after, directory),
        "mounts": sorted(after.mounts - before.mounts),
        "netns": sorted(after.netns - before.netns),
        "links": sorted(after.links - before.links),
        "restore relay files": sorted(after.relay_files - before.relay_files),
        "kubelet cgroups and files": sorted(after.kubelet - before.kubelet),
    }
    left = {k: v for k, v in left.items() if v}
    assert not left, f"left behind by the node in {directory}: {left}"
    assert after.nft == before.nft, "nftables ruleset changed"
    assert after.loops == before.loops, "loop devices changed"
