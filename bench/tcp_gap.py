"""Client-visible gap of a live migration of a TCP server into a new pod, and where it goes.

A server pod (tcpserver holding N MiB) serves a client pod over one TCP
connection that sends a line every 20 ms. The server is checkpointed with
tcp-established + stop-after, its pod removed (freeing the IP), the archive
moved to another directory (the transfer, here a local copy: both pods are
on this node), and restored into a new pod that keeps the old IP. The gap is
the time between the last reply before and the first reply after, as the
client logged them; the split is what each step took.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc
from shim.checkpoint.options import annotation

TESTPROGS = "localhost/criu-shim/testprogs:1"
MIGRATE = {annotation("tcp-established"): "true", annotation("stop-after"): "true"}


class Cluster:
    def __init__(self, endpoint: str, directory: Path) -> None:
        self.stub = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(endpoint))
        self.dir = directory

    def pod(self, annotations: dict[str, str]) -> tuple[str, cri.PodSandboxConfig]:
        name = f"g-{uuid.uuid4().hex[:8]}"
        logs = self.dir / "gap-logs" / name
        logs.mkdir(parents=True)
        config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="bench", uid=name),
                                      log_directory=str(logs), annotations=annotations)
        return self.stub.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id, config

    def ip(self, pod: str) -> str:
        return str(self.stub.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status.network.ip)

    def run(self, pod: str, config: cri.PodSandboxConfig, name: str, image: str, command: list[str],
            env: dict[str, str]) -> str:
        ctr = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image),
                                  command=command, log_path=f"{name}.log",
                                  envs=[cri.KeyValue(key=k, value=v) for k, v in env.items()])
        cid = self.stub.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod, config=ctr,
                                                                   sandbox_config=config), timeout=300).container_id
        self.stub.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=300)
        return str(cid)

    def remove(self, pod: str) -> None:
        self.stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        self.stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))


def replies(log: Path) -> list[tuple[float, int]]:
    """(client wall-clock time, seq) of every reply the client logged."""
    found = re.findall(r"(\d+\.\d+) seq=(\d+) ", log.read_text() if log.exists() else "")
    return [(float(t), int(s)) for t, s in found]


def wait(condition: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def migrate(c: Cluster, mem_mb: int) -> dict[str, float]:
    pod_a, config_a = c.pod(MIGRATE)
    ip = c.ip(pod_a)
    server = c.run(pod_a, config_a, "server", TESTPROGS, ["/usr/local/bin/tcpserver"],
                   {"PORT": "7000", "MEM_MB": str(mem_mb)})
    pod_c, config_c = c.pod({})
    client_log = Path(config_c.log_directory) / "client.log"
    c.run(pod_c, config_c, "client", TESTPROGS, ["/usr/local/bin/tcpclient"],
          {"HOST": ip, "PORT": "7000", "INTERVAL_MS": "20", "REPLY_TIMEOUT_MS": "60000"})
    try:
        wait(lambda: len(replies(client_log)) >= 20)
        archive = c.dir / "gap-source" / f"server-{mem_mb}.tar"
        archive.parent.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        c.stub.CheckpointContainer(cri.CheckpointContainerRequest(container_id=server, location=str(archive)),
                                   timeout=600)
        t1 = time.perf_counter()
        c.remove(pod_a)
        t2 = time.perf_counter()
        moved = c.dir / "checkpoints" / archive.name
        shutil.copyfile(archive, moved)  # the transfer (same node here)
        t3 = time.perf_counter()
        pod_b, config_b = c.pod(MIGRATE)
        restore = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="server"),
                                      image=cri.ImageSpec(image=str(moved)), log_path="server.log")
        cid = c.stub.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod_b, config=restore,
                                                                sandbox_config=config_b), timeout=300).container_id
        c.stub.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=300)
        t4 = time.perf_counter()
        before = replies(client_log)[-1]
        wait(lambda: replies(client_log)[-1][1] > before[1] + 1)
        seen = replies(client_log)
        gap = max(b[0] - a[0] for a, b in zip(seen, seen[1:], strict=False))
        c.remove(pod_b)
        archive.unlink()
        moved.unlink()
        return {"gap": gap, "dump": t1 - t0, "release": t2 - t1, "transfer": t3 - t2, "restore": t4 - t3}
    finally:
        c.remove(pod_c)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-bench-gap"))
    args = parser.parse_args()
    out = subprocess.run([sys.executable, "-m", "shim", "node", "up", "--dir", str(args.dir)],
                         check=True, capture_output=True, text=True).stdout
    endpoints = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    try:
        c = Cluster(endpoints["CRI_ENDPOINT"], args.dir.resolve())
        rows = {int(s): [migrate(c, int(s)) for _ in range(args.reps)] for s in args.sizes.split(",")}
    finally:
        subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(args.dir), "--purge"],
                       capture_output=True)
    print(f"{'server memory':>13} {'client gap':>10} {'dump':>8} {'pod removal':>11} {'transfer':>9} {'restore':>8}")
    for mem_mb, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{mem_mb:>11}Mi {med['gap']:>9.3f}s {med['dump']:>7.3f}s {med['release']:>10.3f}s "
              f"{med['transfer']:>8.3f}s {med['restore']:>7.3f}s")
    print(f"(median of {args.reps}; the gap also holds TCP retransmission back-off: the client's next try after "
          "the server is back)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
