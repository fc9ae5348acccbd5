"""Checkpoint time: our CRI CheckpointContainer against the CRIU floor and containerd 2.x, one run.

For each memory size, one counter container per path, all alive at once, and
the paths measured round-robin so machine noise hits them alike:

  ours     CRI CheckpointContainer through criu-shim on containerd 1.7 (archive written)
  sealed   the same, encrypted at rest (pod annotation checkpoint.criu-shim.io/encrypt; the node's
           [encryption] key): AES-256-GCM chunks sealed while the pages stream in
  floor    containerd 1.7 task Checkpoint with an image path: `runc checkpoint
           --leave-running` of the same kind of container, no archive (the CRIU floor)
  native   containerd 2.x's own CRI CheckpointContainer (archive written)
  dd       `dd` writing as many bytes as the memory to a file beside the archives (page
           cache, no fsync, as the others): what writing the pages alone costs

Also reported: the container's frozen time in our path against CRIU's own frozen
time for its dump. Both are CRIU's `frozen_time` (stats-dump): ours is read from our
dump (the audit line's frozen_s; it includes the wait at the gate while the rootfs
diff is taken), CRIU's from the floor's dump. And archive sizes.

Then restore (CreateContainer + StartContainer into a new pod, until the process
runs; lazy, the node's default) from each rep's unencrypted and sealed archive,
interleaved, and the decryption alone (`shim.sealed.decrypt_to` of the sealed
archive into a file in the page cache): what a sealed restore adds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from shim.api.containerd.runtime.v2.runc.options import oci_pb2 as runc_options
from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc
from shim.containerd import Containerd
from shim.sealed import Keyring, decrypt_to

TESTPROGS = "localhost/criu-shim/testprogs:1"
ENCRYPT = "checkpoint.criu-shim.io/encrypt"


def criu_shim(*args: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "shim", *args], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


class Counter:
    """A pod with one counter container holding `mem_mb` MiB."""

    def __init__(self, endpoint: str, log_dir: Path, mem_mb: int, name: str, image: str = TESTPROGS,
                 annotations: dict[str, str] | None = None) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = api_pb2_grpc.RuntimeServiceStub(self.channel)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="bench", uid=name),
                                           log_directory=str(log_dir), annotations=annotations or {})
        self.pod = self.stub.RunPodSandbox(cri.RunPodSandboxRequest(config=self.config)).pod_sandbox_id
        ctr = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="counter"), image=cri.ImageSpec(image=image),
                                  command=["/usr/local/bin/counter"], log_path="counter.log",
                                  envs=[cri.KeyValue(key="MEM_MB", value=str(mem_mb))])
        self.id = self.stub.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=self.pod, config=ctr, sandbox_config=self.config)).container_id
        self.stub.StartContainer(cri.StartContainerRequest(container_id=self.id))
        self.log = log_dir / "counter.log"
        deadline = time.monotonic() + 120
        while "count=" not in (self.log.read_text() if self.log.exists() else ""):  # memory is touched
            assert time.monotonic() < deadline, "counter did not start"
            time.sleep(0.05)

    def restore(self, archive: Path, name: str) -> float:
        """A new pod restoring `archive`: seconds of Create + Start (until the process runs); removed after."""
        config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="bench", uid=name),
                                      log_directory=self.config.log_directory)
        pod = self.stub.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
        try:
            ctr = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="restored"),
                                      image=cri.ImageSpec(image=str(archive)), log_path=f"{name}.log")
            started = time.perf_counter()
            restored = self.stub.CreateContainer(cri.CreateContainerRequest(
                pod_sandbox_id=pod, config=ctr, sandbox_config=config), timeout=600).container_id
            self.stub.StartContainer(cri.StartContainerRequest(container_id=restored), timeout=600)
            return time.perf_counter() - started
        finally:
            self.stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
            self.stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))

    def cri_checkpoint(self, location: Path) -> None:
        self.stub.CheckpointContainer(cri.CheckpointContainerRequest(container_id=self.id, location=str(location)),
                                      timeout=600)

    def remove(self) -> None:
        self.stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=self.pod))
        self.stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=self.pod))
        self.channel.close()


def floor_checkpoint(socket: Path, container_id: str, image_dir: Path) -> None:
    async def run() -> None:
        containerd = Containerd(socket)
        try:
            await containerd.checkpoint_task(container_id, runc_options.CheckpointOptions(
                exit=False, image_path=str(image_dir / "checkpoint"), work_path=str(image_dir / "work")), None)
        finally:
            await containerd.close()
    asyncio.run(run())


def criu_frozen_s(work_dir: Path) -> float:
    import pycriu.images

    with open(work_dir / "stats-dump", "rb") as f:
        entry = pycriu.images.load(f)["entries"][0]["dump"]
    return float(entry["frozen_time"]) / 1e6


def dd_write(out: Path, mem_mb: int) -> None:
    subprocess.run(["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={mem_mb}", "status=none"], check=True)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_size(mem_mb: int, ours: dict[str, str], native: dict[str, str], work: Path, reps: int,
             audit: Path, keyring: Keyring) -> dict[str, object]:
    ctrs = {
        "ours": Counter(ours["CRI_ENDPOINT"], work / "logs" / f"o{mem_mb}", mem_mb, f"ours-{mem_mb}"),
        "sealed": Counter(ours["CRI_ENDPOINT"], work / "logs" / f"s{mem_mb}", mem_mb, f"sealed-{mem_mb}",
                          annotations={ENCRYPT: "true"}),
        "floor": Counter(ours["CONTAINERD_ENDPOINT"], work / "logs" / f"f{mem_mb}", mem_mb, f"floor-{mem_mb}"),
        "native": Counter(native["CONTAINERD_ENDPOINT"], work / "logs" / f"n{mem_mb}", mem_mb, f"native-{mem_mb}"),
    }
    times: dict[str, list[float]] = {k: [] for k in (*ctrs, "dd", "restore", "restore_sealed", "decrypt")}
    frozen_ours: list[float] = []
    frozen_criu: list[float] = []
    sizes: dict[str, int] = {}
    socket = Path(ours["CONTAINERD_ENDPOINT"].removeprefix("unix://"))
    try:
        for rep in range(reps):
            for path, ctr in ctrs.items():
                # Start each measurement with nothing dirty in the page cache, so no path
                # pays for the write-back of the one before it.
                os.sync()
                out = work / f"{path}-{mem_mb}-{rep}"
                if path == "floor":
                    out.mkdir()
                    times[path].append(timed(lambda out=out, ctr=ctr: floor_checkpoint(socket, ctr.id, out)))
                    frozen_criu.append(criu_frozen_s(out / "work"))
                    sizes[path] = sum(f.stat().st_size for f in (out / "checkpoint").iterdir())
                else:
                    archive = out.with_suffix(".tar")
                    times[path].append(timed(lambda archive=archive, ctr=ctr: ctr.cri_checkpoint(archive)))
                    sizes[path] = archive.stat().st_size
                    if path == "ours":
                        frozen_ours.append(json.loads(audit.read_text().splitlines()[-1])["frozen_s"])
                shutil.rmtree(out, ignore_errors=True)
                if path not in ("ours", "sealed"):  # kept for the restores below
                    out.with_suffix(".tar").unlink(missing_ok=True)
            restore_both(ctrs["ours"], work, mem_mb, rep, times, keyring)
            os.sync()
            written = work / f"dd-{mem_mb}-{rep}"
            times["dd"].append(timed(functools.partial(dd_write, written, mem_mb)))
            written.unlink()
    finally:
        for ctr in ctrs.values():
            ctr.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"mem_mb": mem_mb, **med, "frozen_ours": statistics.median(frozen_ours),
            "frozen_criu": statistics.median(frozen_criu), "sizes": sizes}


def restore_both(ctr: Counter, work: Path, mem_mb: int, rep: int, times: dict[str, list[float]],
                 keyring: Keyring) -> None:
    """Restore this rep's unencrypted and sealed archives (then delete them); time the decryption alone."""
    plain, sealed = (work / f"{path}-{mem_mb}-{rep}.tar" for path in ("ours", "sealed"))
    try:
        for key, archive in (("restore", plain), ("restore_sealed", sealed)):
            os.sync()
            times[key].append(ctr.restore(archive, f"r-{key}-{mem_mb}-{rep}"))
        os.sync()
        decrypted = work / f"decrypted-{mem_mb}-{rep}.tar"
        fd = os.open(decrypted, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            times["decrypt"].append(timed(functools.partial(decrypt_to, sealed, keyring, fd)))
        finally:
            os.close(fd)
            decrypted.unlink()
    finally:
        plain.unlink(missing_ok=True)
        sealed.unlink(missing_ok=True)


def sealing_config(node_dir: Path, work: Path) -> tuple[Path, Keyring]:
    """The ours node's proxy config with an [encryption] key (pods opt in by annotation), and its keyring."""
    from shim.node.layout import NodeLayout
    from shim.node.render import proxy_config
    from shim.node.tools import tools_for

    key = work / "bench.key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    config = work / "proxy.toml"
    config.write_text(proxy_config(NodeLayout(node_dir.resolve()), tools_for("1.7").criu, extra_dirs=[work])
                      + f'\n[encryption]\nkey_id = "bench"\nkey_file = "{key}"\n')
    return config, Keyring({"bench": key})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512,1024,4096", help="MiB per container, comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="checkpoints per path and size (median shown)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-bench-cp"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="criu-shim-bench-", dir="/var/tmp"))
    config, keyring = sealing_config(args.dir / "ours", work)
    ours = criu_shim("node", "up", "--dir", str(args.dir / "ours"), "--proxy-config", str(config))
    try:
        native = criu_shim("node", "up", "--dir", str(args.dir / "native"), "--containerd", "2.x")
        audit = args.dir.resolve() / "ours" / "logs" / "audit.log"
        rows = [one_size(int(s), ours, native, work, args.reps, audit, keyring) for s in args.sizes.split(",")]
    finally:
        for node in ("ours", "native"):
            subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(args.dir / node), "--purge"],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            args.dir.rmdir()  # empty by now; left alone otherwise
    report(rows, args.reps)
    return 0


def report(rows: list[dict[str, object]], reps: int) -> None:
    print(f"{'memory':>7} {'ours':>8} {'floor':>8} {'dd':>8} {'2.x':>8} {'ours/floor':>10} {'ours/dd':>8} "
          f"{'2.x/floor':>9} {'2.x/ours':>8} {'frozen ours':>11} {'CRIU frozen':>11} {'frozen +':>9} "
          f"{'archive ours':>12} {'archive 2.x':>11}")
    for r in rows:
        o, f, n = float(r["ours"]), float(r["floor"]), float(r["native"])  # type: ignore[arg-type]
        d = float(r["dd"])  # type: ignore[arg-type]
        fo, fc = float(r["frozen_ours"]), float(r["frozen_criu"])  # type: ignore[arg-type]
        sizes: dict[str, int] = r["sizes"]  # type: ignore[assignment]
        print(f"{r['mem_mb']:>5}Mi {o:>7.3f}s {f:>7.3f}s {d:>7.3f}s {n:>7.3f}s {o / f:>9.2f}x {o / d:>7.2f}x "
              f"{n / f:>8.2f}x {n / o:>7.2f}x {fo:>10.3f}s {fc:>10.3f}s {(fo - fc) * 1e3:>+7.0f}ms "
              f"{sizes['ours'] / 2**20:>10.1f}Mi {sizes['native'] / 2**20:>9.1f}Mi")
    print(f"(median of {reps} checkpoints per path and size, paths interleaved; goal: ours <= 1.1x floor from "
          "512 MiB up, frozen ours <= CRIU's own dump + 20 ms)")
    print("\nEncryption at rest (same run): checkpoint and restore (lazy, until the process runs), unencrypted vs sealed")
    print(f"{'memory':>7} {'ckpt ours':>9} {'sealed':>8} {'sealed/ours':>11} {'restore':>8} {'sealed':>8} "
          f"{'sealed/ours':>11} {'decrypt':>8} {'archive ours':>12} {'sealed':>9}")
    for r in rows:
        o, e = float(r["ours"]), float(r["sealed"])  # type: ignore[arg-type]
        ro, rs, dec = float(r["restore"]), float(r["restore_sealed"]), float(r["decrypt"])  # type: ignore[arg-type]
        sizes = r["sizes"]  # type: ignore[assignment]
        print(f"{r['mem_mb']:>5}Mi {o:>8.3f}s {e:>7.3f}s {e / o:>10.2f}x {ro:>7.3f}s {rs:>7.3f}s {rs / ro:>10.2f}x "
              f"{dec:>7.3f}s {sizes['ours'] / 2**20:>10.1f}Mi {sizes['sealed'] / 2**20:>7.1f}Mi")
    print("(goal: sealed checkpoint <= 1.25x ours at 1 GiB; decrypt = the sealed archive decrypted alone)")


if __name__ == "__main__":
    sys.exit(main())
