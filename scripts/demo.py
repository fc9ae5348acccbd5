"""`make demo`: a local node, the proxy in front, a pod with a stateful container.

Every CRI call goes through criu-shim; the output shows what happened so a
person can see it work. The node is taken down at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import grpc

from shim import handoff
from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc
from shim.paths_env import load_paths

TESTPROGS = "localhost/criu-shim/testprogs:1"
DEMO_MEM_MB = 256


def sh(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "shim", *args], check=True, capture_output=True, text=True).stdout


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_pod(runtime: api_pb2_grpc.RuntimeServiceStub, logs: Path) -> tuple[str, str]:
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="demo", namespace="default", uid="demo-uid-1"),
        log_directory=str(logs), hostname="demo")
    pod = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="counter"), image=cri.ImageSpec(image=TESTPROGS),
        # 256 MiB of memory, re-checked on every tick: a restore that lost a page would stop it.
        command=["/usr/local/bin/counter"], envs=[cri.KeyValue(key="INTERVAL_MS", value="200"),
                                                  cri.KeyValue(key="MEM_MB", value=str(DEMO_MEM_MB))],
        log_path="counter.log")
    ctr = runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=container, sandbox_config=config)).container_id
    runtime.StartContainer(cri.StartContainerRequest(container_id=ctr))
    return pod, ctr


def show(runtime: api_pb2_grpc.RuntimeServiceStub, pod: str, ctr: str) -> None:
    sandbox = runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    print(f"pod       {sandbox.metadata.namespace}/{sandbox.metadata.name}  id={pod[:13]}  "
          f"state={cri.PodSandboxState.Name(sandbox.state)}  ip={sandbox.network.ip}")
    status = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
    print(f"container {status.metadata.name}  id={ctr[:13]}  state={cri.ContainerState.Name(status.state)}  "
          f"image={status.image.image}")
    time.sleep(1.0)  # let the counter count a few times, for the person watching
    out = runtime.ExecSync(cri.ExecSyncRequest(container_id=ctr, cmd=["cat", "/tmp/count"], timeout=10))
    print(f"exec      cat /tmp/count -> {out.stdout.decode().strip()!r} (exit {out.exit_code})")
    print("log tail  " + " | ".join(Path(status.log_path).read_text().splitlines()[-3:]))


def checkpoint(runtime: api_pb2_grpc.RuntimeServiceStub, ctr: str, directory: Path) -> Path:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    archive = directory / f"checkpoint-demo_default-counter-{time.strftime('%Y-%m-%dT%H:%M:%S')}.tar"
    step("CheckpointContainer through the proxy (what the kubelet's checkpoint API calls)")
    started = time.monotonic()
    runtime.CheckpointContainer(cri.CheckpointContainerRequest(container_id=ctr, location=str(archive)),
                                timeout=120)
    print(f"archive   {archive} ({archive.stat().st_size / 2**20:.1f} MiB, mode "
          f"{archive.stat().st_mode & 0o777:o}) in {time.monotonic() - started:.2f}s")
    print(subprocess.run([load_paths()["CHECKPOINTCTL_BIN"], "show", str(archive)], capture_output=True,
                         text=True).stdout.strip())
    before = int(runtime.ExecSync(cri.ExecSyncRequest(container_id=ctr, cmd=["cat", "/tmp/count"])).stdout)
    time.sleep(0.5)
    after = int(runtime.ExecSync(cri.ExecSyncRequest(container_id=ctr, cmd=["cat", "/tmp/count"])).stdout)
    print(f"the container kept running: count {before} -> {after}")
    return archive


def report_lazy(work: Path, started: float) -> None:
    """Say whether the memory came back lazily, and when it was all in place."""
    if not (work / handoff.LAZY_PLAN).exists():
        print("memory    restored before the process ran (eager)")
        return
    config = handoff.criu_config(work)  # the relay takes "lazy-pages" out when the daemon is done
    deadline = time.monotonic() + 120
    while handoff.LAZY_CRIU_OPTION in config.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    print(f"memory    {DEMO_MEM_MB} MiB image read in place from the archive (loop device), restored lazily: "
          f"all in place {time.monotonic() - started:.2f}s after CreateContainer")


def restore(runtime: api_pb2_grpc.RuntimeServiceStub, archive: Path, logs: Path) -> None:
    step("restore into a NEW pod: CreateContainer with the archive as its image, then StartContainer")
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="demo-restored", namespace="default", uid="demo-uid-2"),
        log_directory=str(logs), hostname="demo-restored")
    pod = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    container = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="counter"),
                                    image=cri.ImageSpec(image=str(archive)), log_path="counter-restored.log")
    started = time.monotonic()
    ctr = runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=container, sandbox_config=config)).container_id
    runtime.StartContainer(cri.StartContainerRequest(container_id=ctr))
    print(f"restored  in {time.monotonic() - started:.2f}s (CreateContainer + StartContainer)")
    status = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
    report_lazy(Path(status.annotations[handoff.RESTORE_DIR]), started)
    show(runtime, pod, ctr)
    marks = {k: status.annotations[k] for k in ("restored", "checkpointedAt") if k in status.annotations}
    print(f"status    {marks}")
    print("the count went on from where the checkpoint left it, in the new pod's network")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-demo"))
    args = parser.parse_args()
    step(f"starting a local containerd 1.7 node in {args.dir} (criu-shim node up)")
    out = sh("node", "up", "--dir", str(args.dir))
    print(out.strip())
    endpoints = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    try:
        channel = grpc.insecure_channel(endpoints["CRI_ENDPOINT"])
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        version = runtime.Version(cri.VersionRequest())
        step(f"through the proxy: {version.runtime_name} {version.runtime_version} (CRI {version.runtime_api_version})")
        pod, ctr = run_pod(runtime, args.dir / "pod-logs")
        show(runtime, pod, ctr)
        archive = checkpoint(runtime, ctr, args.dir / "checkpoints")
        restore(runtime, archive, args.dir / "pod-logs")
        channel.close()
    finally:
        step("taking the node down (criu-shim node down)")
        print(sh("node", "down", "--dir", str(args.dir), "--purge").strip() or "nothing to clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
