"""`node down` finds runc's criu-root mounts left over this node's snapshots (shim.node.cleanup)."""

from __future__ import annotations

from pathlib import Path

from shim.node.cleanup import runc_mounts_over


def _line(point: str, source: str) -> str:
    return (f"612 28 0:52 / {point} rw,relatime shared:301 - overlay overlay "
            f"rw,lowerdir={source}/root/io.containerd.snapshotter.v1.overlayfs/snapshots/3/fs,"
            f"upperdir={source}/root/io.containerd.snapshotter.v1.overlayfs/snapshots/9/fs")


def test_only_this_nodes_mounts_under_runcs_root(tmp_path: Path) -> None:
    node, other = tmp_path / "node", tmp_path / "node-other"
    ours = "/run/containerd/runc/k8s.io/abc/criu-root"
    mountinfo = "\n".join([
        _line(ours, str(node)),
        _line("/run/containerd/runc/k8s.io/def/criu-root", str(other)),  # another node's (a prefix of ours)
        _line(f"{node}/run/rootfs", str(node)),  # under the node dir: `mounts_under` takes it
        "25 1 0:22 / /run rw - tmpfs tmpfs rw",
    ])
    assert runc_mounts_over(node, mountinfo) == [ours]
