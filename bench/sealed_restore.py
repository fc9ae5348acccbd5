"""Lazy restore of a sealed (encrypted) archive against an unencrypted one, in one run.

For each memory size a counter holding that much memory is checkpointed twice
through criu-shim on containerd 1.7 (criu-shim's page daemon, the default):
unencrypted, and sealed (pod annotation checkpoint.criu-shim.io/encrypt; the
node's [encryption] key). The sealed archive is also re-sealed in format
version 1, which a restore still reads but only by decrypting it whole first
(the path every sealed restore took before format version 2). Then,
repeatedly and interleaved, each is restored into a new pod:

  running   CreateContainer + StartContainer until StartContainer returns: the
            process runs (its memory still being filled in)
  resident  the same until all its memory is in place (the page daemon is done:
            "lazy-pages" leaves the task's CRIU config)

  plain     the unencrypted archive: the daemon maps the memory image in place
  sealed    format 2: only the chunks that are not memory are decrypted up front;
            the daemon decrypts the memory chunk by chunk, a fault's first
  sealed v1 format 1: the whole archive decrypted to a private copy first, then
            served from it as an unencrypted one

The 1-minute load average is printed with each size (a 2-core VM shared with
other work: read the ratios, not the absolute times, when the load is high).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

from checkpoint import sealing_config  # bench/ is the script's directory
from restore import Node, checkpointed, node_up, timed_restore

from shim.sealed import Keyring, SealedFile, new_header, open_decrypted, read_header

ENCRYPT = "checkpoint.criu-shim.io/encrypt"
PATHS = ("plain", "sealed", "sealed_v1")


def sealed_checkpoint(node: Node, mem_mb: int, archive: Path) -> None:
    """Like restore.checkpointed, in a pod that asks for a sealed archive."""
    original = node.pod
    node.pod = lambda handler="", annotations=None: original(handler, {ENCRYPT: "true"})  # type: ignore[method-assign]
    try:
        checkpointed(node, mem_mb, archive)
    finally:
        node.pod = original  # type: ignore[method-assign]


def reseal_v1(sealed: Path, out: Path, keyring: Keyring) -> None:
    """The same plaintext sealed in format version 1 (no plaintext offsets in the AAD)."""
    key_id = read_header(sealed).key_id
    header, data_key = new_header(key_id, keyring.key(key_id))
    header = dataclasses.replace(header, version=1)
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer = SealedFile(fd, header, data_key)
        with open_decrypted(sealed, keyring) as reader:
            while block := reader.read(1 << 20):
                writer.write(block)
        os.ftruncate(fd, writer.close())
    finally:
        os.close(fd)


def one_size(node: Node, mem_mb: int, reps: int, work: Path, keyring: Keyring) -> dict[str, float]:
    archives = {"plain": work / f"plain-{mem_mb}.tar", "sealed": work / f"sealed-{mem_mb}.tar",
                "sealed_v1": work / f"sealed-v1-{mem_mb}.tar"}
    checkpointed(node, mem_mb, archives["plain"])
    sealed_checkpoint(node, mem_mb, archives["sealed"])
    reseal_v1(archives["sealed"], archives["sealed_v1"], keyring)
    times: dict[str, list[float]] = {f"{p}_{k}": [] for p in PATHS for k in ("running", "resident")}
    loads = []
    try:
        for _ in range(reps):
            loads.append(os.getloadavg()[0])
            for path in PATHS:
                running, resident, _ = timed_restore(node, archives[path])
                times[f"{path}_running"].append(running)
                times[f"{path}_resident"].append(resident)
    finally:
        for archive in archives.values():
            archive.unlink(missing_ok=True)
    row = {k: statistics.median(v) for k, v in times.items()}
    row["load"] = statistics.median(loads)
    print(f"  {mem_mb} MiB: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return row


def report(rows: list[tuple[int, dict[str, float]]], reps: int) -> None:
    print("\nLazy restore, sealed vs unencrypted (same run), until running and until all memory is in place")
    print(f"{'memory':>7} {'running':>8} {'sealed':>8} {'ratio':>6} {'resident':>9} {'sealed':>8} {'ratio':>6} "
          f"{'v1 running':>10} {'v1 resident':>11} {'load':>5}")
    for mem_mb, t in rows:
        print(f"{mem_mb:>5}Mi {t['plain_running']:>7.3f}s {t['sealed_running']:>7.3f}s "
              f"{t['sealed_running'] / t['plain_running']:>5.2f}x {t['plain_resident']:>8.3f}s "
              f"{t['sealed_resident']:>7.3f}s {t['sealed_resident'] / t['plain_resident']:>5.2f}x "
              f"{t['sealed_v1_running']:>9.3f}s {t['sealed_v1_resident']:>10.3f}s {t['load']:>5.2f}")
    print(f"(median of {reps}, interleaved; running = CreateContainer+StartContainer until the process runs, "
          "resident = until the page daemon has put all memory in place; sealed = format 2, memory decrypted "
          "chunk by chunk by the page daemon; v1 = the same archive in format 1, decrypted whole before the "
          "restore; load = 1-min load average at each rep's start, median)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512,1024", help="MiB per container, comma-separated")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-bench-sealed"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="criu-shim-bench-", dir="/var/tmp"))
    config, keyring = sealing_config(args.dir, work)
    with node_up(args.dir, work, config) as ours:
        node = Node(args.dir.resolve(), ours["CRI_ENDPOINT"])
        warm_up = work / "warm-up.tar"
        checkpointed(node, 0, warm_up)
        timed_restore(node, warm_up, lazy=False)  # the first restore after start-up has no spare relay
        rows = [(int(s), one_size(node, int(s), args.reps, work, keyring)) for s in args.sizes.split(",")]
    report(rows, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
