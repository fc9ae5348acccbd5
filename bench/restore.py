"""Restore time: our CRI restore against CRIU's own restore and a cold start, in one run.

For each memory size a counter holding that much memory is checkpointed once
through criu-shim on containerd 1.7; then, repeatedly and interleaved:

  ours     CreateContainer (image = the archive) + StartContainer into a new pod,
           until StartContainer returns (the process runs again, memory and all)
  criu     CRIU's own restore time for those same images (its stats-restore),
           the floor: what the engine around it costs is the difference
  cold     CreateContainer + StartContainer of the same program from its image,
           until it is ready (its memory allocated and touched: first count)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc

TESTPROGS = "localhost/criu-shim/testprogs:1"


def criu_shim(*args: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "shim", *args], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


class Node:
    def __init__(self, directory: Path, endpoint: str) -> None:
        self.dir = directory
        self.stub = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(endpoint))

    def pod(self) -> tuple[str, cri.PodSandboxConfig]:
        name = f"b-{uuid.uuid4().hex[:8]}"
        logs = self.dir / "bench-logs" / name
        logs.mkdir(parents=True)
        config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="bench", uid=name),
                                      log_directory=str(logs))
        return self.stub.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id, config

    def remove(self, pod: str) -> None:
        self.stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        self.stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))

    def run(self, pod: str, config: cri.PodSandboxConfig, image: str, env: dict[str, str]) -> str:
        ctr = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="counter"), image=cri.ImageSpec(image=image),
                                  log_path="counter.log", envs=[cri.KeyValue(key=k, value=v) for k, v in env.items()])
        if not image.startswith("/"):
            ctr.command.append("/usr/local/bin/counter")
        cid = self.stub.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=ctr, sandbox_config=config), timeout=300).container_id
        self.stub.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=300)
        return str(cid)


def wait_counting(log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while "count=" not in (log.read_text() if log.exists() else ""):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log}: no count")
        time.sleep(0.002)


def criu_restore_s(node_dir: Path, container_id: str) -> float:
    """CRIU's own restore time, from the stats-restore runc's CRIU left in the task's work dir."""
    import pycriu.images

    stats = node_dir / "root" / "io.containerd.runtime.v2.task" / "k8s.io" / container_id / "stats-restore"
    with open(stats, "rb") as f:
        entry = pycriu.images.load(f)["entries"][0]["restore"]
    return float(entry["restore_time"]) / 1e6


def one_size(node: Node, mem_mb: int, reps: int) -> dict[str, float]:
    pod, config = node.pod()
    archive = node.dir / "checkpoints" / f"bench-{mem_mb}.tar"
    try:
        node.run(pod, config, TESTPROGS, {"MEM_MB": str(mem_mb)})
        wait_counting(Path(config.log_directory) / "counter.log")
        ctr = node.stub.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(pod_sandbox_id=pod))).containers[0].id
        node.stub.CheckpointContainer(cri.CheckpointContainerRequest(container_id=ctr, location=str(archive)),
                                      timeout=600)
    finally:
        node.remove(pod)
    times: dict[str, list[float]] = {"ours": [], "criu": [], "cold": []}
    for _ in range(reps):
        pod, config = node.pod()
        start = time.perf_counter()
        restored = node.run(pod, config, str(archive), {})
        times["ours"].append(time.perf_counter() - start)
        times["criu"].append(criu_restore_s(node.dir, restored))
        node.remove(pod)
        pod, config = node.pod()
        start = time.perf_counter()
        node.run(pod, config, TESTPROGS, {"MEM_MB": str(mem_mb)})
        wait_counting(Path(config.log_directory) / "counter.log")
        times["cold"].append(time.perf_counter() - start)
        node.remove(pod)
    archive.unlink()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512,1024")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-bench-restore"))
    args = parser.parse_args()
    endpoints = criu_shim("node", "up", "--dir", str(args.dir))
    try:
        node = Node(args.dir.resolve(), endpoints["CRI_ENDPOINT"])
        rows = [(int(s), one_size(node, int(s), args.reps)) for s in args.sizes.split(",")]
    finally:
        subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(args.dir), "--purge"],
                       capture_output=True)
    print(f"{'memory':>7} {'ours':>8} {'CRIU':>8} {'cold start':>10} {'ours/CRIU':>9} {'cold/ours':>9} "
          f"{'2.x (issue)':>11} {'2.x/ours':>8}")
    native = {64: 0.31, 512: 0.93, 1024: 1.85}  # containerd 2.x native restore on these machines (issue 4)
    for mem_mb, t in rows:
        ref = native.get(mem_mb)
        print(f"{mem_mb:>5}Mi {t['ours']:>7.3f}s {t['criu']:>7.3f}s {t['cold']:>9.3f}s {t['ours'] / t['criu']:>8.1f}x "
              f"{t['cold'] / t['ours']:>8.2f}x " + (f"{ref:>10.2f}s {ref / t['ours']:>7.2f}x" if ref else ""))
    print(f"(median of {args.reps}; ours = CreateContainer+StartContainer until the process runs; cold = until the "
          "fresh program has allocated its memory; 2.x column: the issue's figures, not measured in this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
