"""zstd archives against uncompressed ones, one run: archive size, checkpoint time, restore time.

Two workloads, each a pod whose memory is held by busybox `dd` (its one block
buffer, filled, then blocked writing to a pipe nobody reads):

  text     `seq 1 ...` output: numbers as text, about 25:1 with zstd -3
  random   /dev/urandom: nothing to compress

For each size and workload, two pods checkpointed round-robin through criu-shim
on containerd 1.7, one uncompressed (the node default), one zstd (pod annotation
checkpoint.criu-shim.io/compression), median of --reps. Restore = CreateContainer
+ StartContainer of each archive into a new pod, until the process runs:
both eagerly (annotation restore.criu-shim.io/lazy-pages: "false"): a
compressed archive always is restored so (its pages are not in place for a
page daemon), so all memory is in place when the process runs, either way.
A lazy restore of the uncompressed archive runs sooner: see bench/restore.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from restore import node_up  # bench/ is the script's directory

from shim.annotations import COMPRESSION, LAZY_PAGES
from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc

BUSYBOX = "localhost/criu-shim/busybox:1"
LAZY = LAZY_PAGES
SOURCES = {"text": "seq 1 999999999", "random": "cat /dev/urandom"}
HOLD = ("{source} | dd bs={mib}M count=1 iflag=fullblock 2>/dev/null"
        " | {{ head -c 1 >/dev/null; echo ready; exec sleep 1000000; }}")


class Holder:
    """A pod whose one container holds `mib` MiB of `kind` memory."""

    def __init__(self, stub: api_pb2_grpc.RuntimeServiceStub, log_dir: Path, kind: str, mib: int,
                 compression: str) -> None:
        self.stub = stub
        name = f"{compression}-{kind}-{mib}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="bench", uid=name),
                                           log_directory=str(log_dir), annotations={COMPRESSION: compression})
        self.pod = stub.RunPodSandbox(cri.RunPodSandboxRequest(config=self.config)).pod_sandbox_id
        ctr = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="holder"), image=cri.ImageSpec(image=BUSYBOX),
                                  command=["sh", "-c", HOLD.format(source=SOURCES[kind], mib=mib)],
                                  log_path="holder.log")
        self.id = stub.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=self.pod, config=ctr, sandbox_config=self.config)).container_id
        stub.StartContainer(cri.StartContainerRequest(container_id=self.id))
        log = log_dir / "holder.log"
        deadline = time.monotonic() + 300
        while "ready" not in (log.read_text() if log.exists() else ""):  # the buffer is full
            assert time.monotonic() < deadline, f"{name}: the holder did not fill its memory"
            time.sleep(0.1)

    def checkpoint(self, location: Path) -> float:
        started = time.perf_counter()
        self.stub.CheckpointContainer(cri.CheckpointContainerRequest(container_id=self.id, location=str(location)),
                                      timeout=600)
        return time.perf_counter() - started

    def remove(self) -> None:
        self.stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=self.pod))
        self.stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=self.pod))


def restore(stub: api_pb2_grpc.RuntimeServiceStub, log_dir: Path, archive: Path, name: str, lazy: bool) -> float:
    """Create + Start of `archive` in a new pod, until the process runs; the pod removed after."""
    config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="bench", uid=name),
                                  log_directory=str(log_dir), annotations={LAZY: "true" if lazy else "false"})
    pod = stub.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    try:
        ctr = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="restored"),
                                  image=cri.ImageSpec(image=str(archive)), log_path=f"{name}.log")
        started = time.perf_counter()
        restored = stub.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=ctr, sandbox_config=config), timeout=600).container_id
        stub.StartContainer(cri.StartContainerRequest(container_id=restored), timeout=600)
        return time.perf_counter() - started
    finally:
        stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))


def one(stub: api_pb2_grpc.RuntimeServiceStub, work: Path, kind: str, mib: int, reps: int) -> dict[str, object]:
    holders = {mode: Holder(stub, work / "logs" / f"{mode}-{kind}-{mib}", kind, mib, mode) for mode in ("none", "zstd")}
    times: dict[str, list[float]] = {k: [] for k in ("ckpt_none", "ckpt_zstd", "eager_none", "eager_zstd")}
    sizes: dict[str, int] = {}
    try:
        for rep in range(reps):
            archives = {}
            for mode, holder in holders.items():
                os.sync()
                archive = work / f"{mode}-{kind}-{mib}-{rep}.tar"
                times[f"ckpt_{mode}"].append(holder.checkpoint(archive))
                sizes[mode] = archive.stat().st_size
                archives[mode] = archive
            for key, mode, lazy in (("eager_none", "none", False), ("eager_zstd", "zstd", False)):
                os.sync()
                times[key].append(restore(stub, work / "logs", archives[mode], f"r-{key}-{kind}-{mib}-{rep}",
                                          lazy))
            for archive in archives.values():
                archive.unlink()
    finally:
        for holder in holders.values():
            holder.remove()
    return {"kind": kind, "mib": mib, "sizes": sizes, **{k: statistics.median(v) for k, v in times.items()}}


def node_config(node_dir: Path, work: Path) -> Path:
    """The node's proxy config, restores allowed from `work` (compression stays the default: none)."""
    from shim.node.layout import NodeLayout
    from shim.node.render import proxy_config
    from shim.node.tools import tools_for

    config = work / "proxy.toml"
    config.write_text(proxy_config(NodeLayout(node_dir.resolve()), tools_for("1.7").criu, extra_dirs=[work]))
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512", help="MiB per container, comma-separated")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-bench-zstd"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="criu-shim-bench-zstd-", dir="/var/tmp"))
    rows = []
    with node_up(args.dir, work, node_config(args.dir, work)) as up, grpc.insecure_channel(up["CRI_ENDPOINT"]) as channel:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)
        for mib in (int(s) for s in args.sizes.split(",")):
            for kind in SOURCES:
                rows.append(one(stub, work, kind, mib, args.reps))
    report(rows, args.reps)
    return 0


def report(rows: list[dict[str, object]], reps: int) -> None:
    print(f"{'memory':>7} {'workload':>8} {'archive':>9} {'zstd':>8} {'ratio':>6} {'ckpt':>7} {'zstd':>7} "
          f"{'zstd/none':>9} {'restore':>8} {'zstd':>7} {'zstd/none':>9}")
    for r in rows:
        sizes: dict[str, int] = r["sizes"]  # type: ignore[assignment]
        c0, c1 = float(r["ckpt_none"]), float(r["ckpt_zstd"])  # type: ignore[arg-type]
        re, rz = float(r["eager_none"]), float(r["eager_zstd"])  # type: ignore[arg-type]
        print(f"{r['mib']:>5}Mi {r['kind']:>8} {sizes['none'] / 2**20:>7.1f}Mi {sizes['zstd'] / 2**20:>6.1f}Mi "
              f"{sizes['zstd'] / sizes['none']:>6.3f} {c0:>6.3f}s {c1:>6.3f}s {c1 / c0:>8.2f}x {re:>7.3f}s "
              f"{rz:>6.3f}s {rz / re:>8.2f}x")
    print(f"(median of {reps}; load average {os.getloadavg()[0]:.1f}; restore until the process runs: "
          "eager, all memory in place, both)")


if __name__ == "__main__":
    sys.exit(main())
