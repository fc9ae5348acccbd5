"""Restore from a checkpoint image: its layer linked from containerd's content store vs streamed out of it.

For each memory size a counter holding that much memory is checkpointed through
criu-shim on containerd 1.7, the archive made a checkpoint image
(`criu-shim checkpoint-image`) and imported into the node's containerd (as a
pull leaves it: the layer a blob of its content store). Then, interleaved rep by rep:

  export, linked    the layer as the restore gets it now (shim.restore.image.export_layer):
                    a hard link to containerd's blob, its size and digest checked in place
  export, streamed  the same through containerd's content API into a new file, hashed on
                    the way: what every image restore did before, and still does where the
                    content store is not on the restore's file system
  restore, image    CreateContainer + StartContainer from the image until StartContainer returns
  restore, archive  the same from the archive file itself: the reference, nothing to export

The 1-minute load average is printed with each size (a 2-core VM shared with other work).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc.aio
from restore import Node, checkpointed, criu_shim, node_up, timed_restore  # bench/ is the script's directory

from shim.containerd_images import ContainerdImages
from shim.paths_env import load_paths
from shim.restore.image import CheckpointImage, checkpoint_image, export_layer

COLUMNS = ("export, linked", "export, streamed", "restore, image", "restore, archive")


class Streamed(ContainerdImages):
    """containerd's image store without the local content store: blobs only through the content API."""

    async def local_blob(self, digest: str) -> Path | None:
        return None


def imported(node: Node, archive: Path, ref: str, containerd: str, work: Path) -> None:
    """The archive as checkpoint image `ref` in the node's containerd (k8s.io namespace)."""
    layout = work / "image.tar"
    criu_shim("checkpoint-image", str(archive), "--name", ref, "--out", str(layout))
    ctr = Path(load_paths()["CONTAINERD_1_7"]) / "ctr"
    subprocess.run([str(ctr), "--address", containerd.removeprefix("unix://"), "-n", "k8s.io", "images", "import",
                    str(layout)], check=True, capture_output=True)
    layout.unlink()


async def timed_export(containerd: str, ref: str, dest: Path, streamed: bool) -> float:
    async with grpc.aio.insecure_channel(containerd) as channel:
        store = (Streamed if streamed else ContainerdImages)(channel)
        image = await checkpoint_image(store, ref)
        assert isinstance(image, CheckpointImage), f"{ref} is not a checkpoint image"
        start = time.perf_counter()
        await export_layer(store, image.layer, dest)
        elapsed = time.perf_counter() - start
    dest.unlink()
    return elapsed


def one_size(node: Node, containerd: str, mem_mb: int, reps: int, work: Path) -> dict[str, list[float]]:
    archive = node.dir / "checkpoints" / f"bench-image-{mem_mb}.tar"
    ref = f"localhost/criu-shim/bench-image-{mem_mb}:1"
    checkpointed(node, mem_mb, archive)
    imported(node, archive, ref, containerd, work)
    times: dict[str, list[float]] = {c: [] for c in COLUMNS}
    dest = node.dir / "restore" / "bench-export.layer"  # beside the restores' work dirs, as a restore exports
    for _ in range(reps):
        times["export, linked"].append(asyncio.run(timed_export(containerd, ref, dest, streamed=False)))
        times["export, streamed"].append(asyncio.run(timed_export(containerd, ref, dest, streamed=True)))
        times["restore, image"].append(timed_restore(node, Path(ref), lazy=True)[0])
        times["restore, archive"].append(timed_restore(node, archive, lazy=True)[0])
    archive.unlink()
    return times


def report(rows: list[tuple[int, dict[str, list[float]], float]], reps: int) -> None:
    print(f"\nmedians of {reps} reps, seconds (range)")
    print("| memory | " + " | ".join(COLUMNS) + " | streamed / linked | load |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for mem_mb, times, load in rows:
        cells = [f"{statistics.median(times[c]):.3f} ({min(times[c]):.3f}-{max(times[c]):.3f})" for c in COLUMNS]
        ratio = statistics.median(times["export, streamed"]) / statistics.median(times["export, linked"])
        print(f"| {mem_mb} MiB | " + " | ".join(cells) + f" | {ratio:.1f}x | {load:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512,2048", help="MiB per container, comma-separated")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-bench-image"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="criu-shim-bench-", dir="/var/tmp"))
    rows = []
    with node_up(args.dir, work) as ours:
        node = Node(args.dir.resolve(), ours["CRI_ENDPOINT"])
        warm_up = node.dir / "checkpoints" / "warm-up.tar"  # under the node's restore.allowed_dirs
        checkpointed(node, 0, warm_up)
        timed_restore(node, warm_up, lazy=False)  # the first restore after start-up has no spare relay
        for size in args.sizes.split(","):
            load = os.getloadavg()[0]
            rows.append((int(size), one_size(node, ours["CONTAINERD_ENDPOINT"], int(size), args.reps, work), load))
            print(f"{size} MiB done (load {load:.1f})", flush=True)
    report(rows, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
