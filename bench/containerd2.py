"""containerd 2.x: criu-shim on containerd 2.4 against containerd 2.3's own checkpoint and restore.

containerd 2.4 has no restore through CreateContainer (containerd#13871); 2.3 (LTS) still has it,
off by default since 2.3.4 and switched on here (`enable_experimental_restore_via_create`, node
variant `2.3-native`). For each memory size, one run, both nodes up at once, the paths interleaved
so machine noise hits them alike:

  CheckpointContainer
    ours      through criu-shim on containerd 2.4 (archive written)
    2.3       containerd 2.3's own CRI CheckpointContainer (archive written)
  restore: CreateContainer (image = the archive) + StartContainer into a new pod
    ours      criu-shim on 2.4, until StartContainer returns: the process runs (lazy restore,
              its memory still being filled in)
    resident  the same until all memory is in place (the page daemon is done)
    eager     criu-shim on 2.4 with lazy pages off (memory in place before it runs)
    2.3       containerd 2.3's own restore of its own checkpoint (memory in place before it runs)

Both run the same program from the same image, pulled from a loopback registry (2.3's own
restore resolves the base image by the archive's repo digest, as on a real node). Reuses the
counter of bench/checkpoint.py and the restore steps of bench/restore.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from checkpoint import Counter, criu_shim, timed  # bench/checkpoint.py
from restore import Node, remove_made, timed_restore  # bench/restore.py

OURS, NATIVE = "2.4", "2.3-native"


def checkpoints(mem_mb: int, endpoints: dict[str, str], archives: dict[str, Path], image: str, work: Path,
                reps: int) -> dict[str, list[float]]:
    """CheckpointContainer of a counter holding `mem_mb` MiB on each path, `reps` times interleaved;
    the last archive of each path is left at `archives[path]` for the restores."""
    ctrs = {path: Counter(endpoint, work / "logs" / f"{path}-{mem_mb}", mem_mb, f"{path}-{mem_mb}", image)
            for path, endpoint in endpoints.items()}
    times: dict[str, list[float]] = {path: [] for path in ctrs}
    try:
        for _ in range(reps):
            for path, ctr in ctrs.items():
                archives[path].unlink(missing_ok=True)
                os.sync()  # nothing dirty in the page cache: no path pays for the write-back of another
                times[path].append(timed(lambda ctr=ctr, path=path: ctr.cri_checkpoint(archives[path])))
    finally:
        for ctr in ctrs.values():
            ctr.remove()
    return times


def restores(ours: Node, native: Node, archives: dict[str, Path], reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"ours": [], "resident": [], "eager": [], "native": []}
    for _ in range(reps):
        os.sync()
        times["native"].append(timed_restore(native, archives["native"], lazy=False)[0])
        os.sync()
        elapsed, resident, _ = timed_restore(ours, archives["ours"])
        times["ours"].append(elapsed)
        times["resident"].append(resident)
        os.sync()
        times["eager"].append(timed_restore(ours, archives["ours"], lazy=False)[0])
    return times


def one_size(mem_mb: int, ours: Node, native: Node, endpoints: dict[str, str], image: str, work: Path,
             reps: int) -> dict[str, float]:
    archives = {"ours": ours.dir / "checkpoints" / f"bench-{mem_mb}.tar",  # the proxy's restore.allowed_dirs
                "native": work / f"native-{mem_mb}.tar"}
    try:
        cp = checkpoints(mem_mb, endpoints, archives, image, work, reps)
        sizes = {path: archive.stat().st_size for path, archive in archives.items()}
        rs = restores(ours, native, archives, reps)
    finally:
        for archive in archives.values():
            archive.unlink(missing_ok=True)
    row = {f"cp_{k}": statistics.median(v) for k, v in cp.items()}
    row |= {f"rs_{k}": statistics.median(v) for k, v in rs.items()}
    return row | {f"size_{k}": float(v) for k, v in sizes.items()}


def main() -> int:
    from shim.node import registry

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512,1024", help="MiB per container, comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="measurements per path and size (median shown)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-bench-2x"))
    args = parser.parse_args()
    dirs = {"ours": args.dir / "ours", "native": args.dir / "native"}
    try:
        up = {"ours": criu_shim("node", "up", "--dir", str(dirs["ours"]), "--containerd", OURS),
              "native": criu_shim("node", "up", "--dir", str(dirs["native"]), "--containerd", NATIVE)}
        reg = registry.start_registry(args.dir / "registry")
        image = {p.name: p for p in registry.push_images(reg)}["testprogs"].ref
        # criu-shim's path goes through the proxy; 2.3's own path is containerd's own socket, no proxy.
        endpoints = {"ours": up["ours"]["CRI_ENDPOINT"], "native": up["native"]["CONTAINERD_ENDPOINT"]}
        nodes = {path: Node(dirs[path].resolve(), endpoint, image) for path, endpoint in endpoints.items()}
        for node in nodes.values():
            node.pull(image)
        work = args.dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        rows = [(int(s), one_size(int(s), nodes["ours"], nodes["native"], endpoints, image, work, args.reps))
                for s in args.sizes.split(",")]
    finally:
        registry.stop_registry(args.dir / "registry")
        for d in dirs.values():
            subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(d), "--purge"],
                           capture_output=True)
        remove_made(args.dir, ("registry", "work"))  # `node down --purge` took the nodes'
    report(rows, args.reps)
    return 0


def report(rows: list[tuple[int, dict[str, float]]], reps: int) -> None:
    print(f"{'memory':>7} | {'checkpoint ours':>15} {'2.3':>8} {'2.3/ours':>8} | {'restore ours':>12} "
          f"{'resident':>8} {'eager':>8} {'2.3':>8} {'2.3/ours':>8} {'2.3/resident':>12} {'2.3/eager':>9} | "
          f"{'archive ours':>12} {'2.3':>8}")
    for mem_mb, r in rows:
        print(f"{mem_mb:>5}Mi | {r['cp_ours']:>14.3f}s {r['cp_native']:>7.3f}s {r['cp_native'] / r['cp_ours']:>7.2f}x | "
              f"{r['rs_ours']:>11.3f}s {r['rs_resident']:>7.3f}s {r['rs_eager']:>7.3f}s {r['rs_native']:>7.3f}s "
              f"{r['rs_native'] / r['rs_ours']:>7.2f}x {r['rs_native'] / r['rs_resident']:>11.2f}x "
              f"{r['rs_native'] / r['rs_eager']:>8.2f}x | {r['size_ours'] / 2**20:>10.1f}Mi "
              f"{r['size_native'] / 2**20:>6.1f}Mi")
    print(f"(median of {reps} per path and size, interleaved; ours = criu-shim on containerd {OURS}, 2.3 = "
          "containerd 2.3's own CheckpointContainer and restore, enable_experimental_restore_via_create on; "
          "restore = CreateContainer+StartContainer until the process runs, resident = until all memory is in place)")


if __name__ == "__main__":
    sys.exit(main())
