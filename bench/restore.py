"""Restore time: our CRI restore against CRIU's own restore and a cold start, in one run.

For each memory size a counter holding that much memory is checkpointed once
through criu-shim on containerd 1.7; then, repeatedly and interleaved:

  ours     CreateContainer (image = the archive) + StartContainer into a new pod,
           until StartContainer returns: the process runs again; under the default
           lazy restore its memory is still being filled in (userfaultfd)
  resident the same restore until all its memory is in place (the page daemon is
           done: it takes "lazy-pages" out of the task's CRIU config), with criu-shim's
           own page daemon (the default)
  resident-criu the same with CRIU's `criu lazy-pages` (`[restore] page_daemon = "criu"`:
           the proxy is restarted with it for these runs, then back)
  eager    our restore with lazy pages off (pod annotation
           restore.criu-shim.io/lazy-pages=false): memory in place before it runs
  criu     CRIU's own restore time of those images in the eager restore (its
           stats-restore): the floor for a restore with all memory in place
  criu-lazy CRIU's own restore time in our lazy restore: the floor for "until it runs"
  dd       reading the memory image (the archive's largest pages-N.img member) with
           `dd`: "hot" as our restore finds it (the page cache), "cold" after dropping
           that file's pages from the cache (the disk's rate); the floor for "resident"
  cold     CreateContainer + StartContainer of the same program from its image,
           until it is ready (its memory allocated and touched: first count)
  2.x      containerd 2.x's native restore of its own checkpoint of the same program
           (CreateContainer with the archive + StartContainer), images from a loopback
           registry as on a real node (2.x resolves the base image by repo digest)

Also: what the criu handler costs a container that is NOT restored (create+start
with handler "criu" against handler "runc").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc

from shim import handoff
from shim.annotations import LAZY_PAGES
from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc

TESTPROGS = "localhost/criu-shim/testprogs:1"


def criu_shim(*args: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "shim", *args], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@contextlib.contextmanager
def node_up(directory: Path, work: Path, proxy_config: Path | None = None) -> Iterator[dict[str, str]]:
    """A node up in `directory` (its `node up` values) for the block; then down and purged, and the
    bench's own `work` dir removed, whatever happened."""
    try:
        config = ["--proxy-config", str(proxy_config)] if proxy_config is not None else []
        yield criu_shim("node", "up", "--dir", str(directory), *config)
    finally:
        subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(directory), "--purge"],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            directory.rmdir()


class Node:
    def __init__(self, directory: Path, endpoint: str, image: str = TESTPROGS) -> None:
        self.dir = directory
        self.image = image
        channel = grpc.insecure_channel(endpoint)
        self.stub = api_pb2_grpc.RuntimeServiceStub(channel)
        self.images = api_pb2_grpc.ImageServiceStub(channel)
        self.created_s = 0.0
        self.warm_up: Path | None = None  # a tiny checkpoint restored once after a proxy restart

    def use_page_daemon(self, kind: str) -> None:
        """Restart this node's proxy with `[restore] page_daemon = kind` (a no-op if it has it already)."""
        from shim.node import local, procs
        from shim.node.layout import NodeLayout

        layout = NodeLayout(self.dir)
        text = layout.proxy_config_file.read_text()
        wanted = re.sub(r'(?m)^page_daemon = .*\n', "", text).replace("[restore]\n", f'[restore]\npage_daemon = "{kind}"\n')
        if wanted == text:
            return
        pid = procs.read_pid(layout.pid_dir / "proxy.pid")
        assert pid is not None
        procs.stop(pid)
        layout.proxy_config_file.write_text(wanted)
        local._start_proxy(layout, layout.proxy_config_file)
        if self.warm_up is not None:  # a restarted proxy has no spare relay yet: not what a node sees
            timed_restore(self, self.warm_up, lazy=False)

    def pull(self, image: str) -> None:
        self.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)), timeout=300)

    def pod(self, handler: str = "", annotations: dict[str, str] | None = None) -> tuple[str, cri.PodSandboxConfig]:
        name = f"b-{uuid.uuid4().hex[:8]}"
        logs = self.dir / "bench-logs" / name
        logs.mkdir(parents=True)
        config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="bench", uid=name),
                                      log_directory=str(logs), annotations=annotations or {})
        request = cri.RunPodSandboxRequest(config=config, runtime_handler=handler)
        return self.stub.RunPodSandbox(request).pod_sandbox_id, config

    def remove(self, pod: str) -> None:
        self.stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        self.stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))

    def run(self, pod: str, config: cri.PodSandboxConfig, image: str, env: dict[str, str]) -> str:
        ctr = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="counter"), image=cri.ImageSpec(image=image),
                                  log_path="counter.log", envs=[cri.KeyValue(key=k, value=v) for k, v in env.items()])
        if not image.startswith("/"):
            ctr.command.append("/usr/local/bin/counter")
        started = time.perf_counter()
        cid = self.stub.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=ctr, sandbox_config=config), timeout=300).container_id
        self.created_s = time.perf_counter() - started  # the CreateContainer share, for the split
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


def checkpointed(node: Node, mem_mb: int, archive: Path) -> None:
    """Run the counter with `mem_mb` MiB in a pod of `node`, checkpoint it to `archive`, remove the pod."""
    pod, config = node.pod()
    try:
        node.run(pod, config, node.image, {"MEM_MB": str(mem_mb)})
        wait_counting(Path(config.log_directory) / "counter.log")
        ctr = node.stub.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(pod_sandbox_id=pod))).containers[0].id
        node.stub.CheckpointContainer(cri.CheckpointContainerRequest(container_id=ctr, location=str(archive)),
                                      timeout=600)
    finally:
        node.remove(pod)


def pages_member(archive: Path) -> tuple[int, int]:
    """(offset, size) of the archive's largest memory image."""
    with tarfile.open(archive) as tar:
        member = max((m for m in tar if m.name.lstrip("./").startswith("checkpoint/pages-")), key=lambda m: m.size)
        return member.offset_data, member.size


def timed_dd(archive: Path, cold: bool) -> float:
    """Seconds for `dd` to read the memory image out of the archive (after dropping it from the cache: cold)."""
    offset, size = pages_member(archive)
    if cold:
        fd = os.open(archive, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    start = time.perf_counter()
    subprocess.run(["dd", f"if={archive}", "of=/dev/null", "bs=4M", "iflag=skip_bytes,count_bytes",
                    f"skip={offset}", f"count={size}", "status=none"], check=True)
    return time.perf_counter() - start


def timed_restore(node: Node, archive: Path, lazy: bool = True) -> tuple[float, float, float]:
    """Seconds to restore `archive` into a new pod; until its memory is all in place; CRIU's own share."""
    pod, config = node.pod(annotations={} if lazy else {LAZY_PAGES: "false"})
    start = time.perf_counter()
    restored = node.run(pod, config, str(archive), {})
    elapsed = time.perf_counter() - start
    resident = wait_resident(node, restored, start) if lazy else elapsed
    criu = criu_restore_s(node.dir, restored)  # before the task dir goes
    node.remove(pod)
    return elapsed, resident, criu


def wait_resident(node: Node, container_id: str, start: float, timeout: float = 120) -> float:
    """Seconds from `start` until the lazy restore's page daemon is done (the config loses "lazy-pages")."""
    status = node.stub.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id)).status
    work = Path(status.annotations[handoff.RESTORE_DIR])
    config = handoff.criu_config(work)
    deadline = time.monotonic() + timeout
    while handoff.LAZY_CRIU_OPTION in config.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{container_id}: lazy restore not done after {timeout}s")
        time.sleep(0.002)
    return time.perf_counter() - start


def one_size(node: Node, native: Node, mem_mb: int, reps: int, fill_only: bool = False) -> dict[str, float]:
    archive = node.dir / "checkpoints" / f"bench-{mem_mb}.tar"
    native_archive = native.dir / f"bench-{mem_mb}.tar"
    checkpointed(node, mem_mb, archive)
    checkpointed(native, mem_mb, native_archive)
    times: dict[str, list[float]] = {k: [] for k in ("ours", "resident", "resident_criu", "running_criu", "eager", "criu",
                                                      "criu_lazy", "cold", "native", "ours_create",
                                                      "native_create", "dd_cold", "dd_hot", "load")}
    os.sync()  # the archive on disk, so that "cold" reads the disk
    for _ in range(reps):
        times["load"].append(os.getloadavg()[0])
        times["dd_cold"].append(timed_dd(archive, cold=True))
        times["dd_hot"].append(timed_dd(archive, cold=False))
        times["native"].append(timed_restore(native, native_archive, lazy=False)[0])
        times["native_create"].append(native.created_s)
        node.use_page_daemon("criu")
        running_criu, resident_criu, _ = timed_restore(node, archive)
        times["running_criu"].append(running_criu)
        times["resident_criu"].append(resident_criu)
        node.use_page_daemon("criu-shim")
        elapsed, resident, criu_lazy = timed_restore(node, archive)
        times["ours_create"].append(node.created_s)
        times["ours"].append(elapsed)
        times["criu_lazy"].append(criu_lazy)
        times["resident"].append(resident)
        if fill_only:
            continue
        eager, _, criu = timed_restore(node, archive, lazy=False)
        times["eager"].append(eager)
        times["criu"].append(criu)
        pod, config = node.pod()
        start = time.perf_counter()
        node.run(pod, config, node.image, {"MEM_MB": str(mem_mb)})
        wait_counting(Path(config.log_directory) / "counter.log")
        times["cold"].append(time.perf_counter() - start)
        node.remove(pod)
    archive.unlink()
    native_archive.unlink()
    return {k: statistics.median(v) for k, v in times.items() if v}


def handler_cost(node: Node, reps: int) -> dict[str, float]:
    """Create+start of a plain container under handler "criu" (launcher) and "runc" (stock)."""
    times: dict[str, list[float]] = {"criu": [], "runc": []}
    for _ in range(reps):
        for handler in times:
            pod, config = node.pod(handler)
            start = time.perf_counter()
            node.run(pod, config, node.image, {})
            times[handler].append(time.perf_counter() - start)
            node.remove(pod)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    from shim.node import registry

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512,1024,4096")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-bench-restore"))
    parser.add_argument("--fill-only", action="store_true",
                        help="only the lazy fill: both page daemons, 2.x's eager restore and dd (no eager, cold, handler rows)")
    args = parser.parse_args()
    ours_dir, native_dir = args.dir / "ours", args.dir / "native"
    try:
        ours = criu_shim("node", "up", "--dir", str(ours_dir))
        native = criu_shim("node", "up", "--dir", str(native_dir), "--containerd", "2.x")
        reg = registry.start_registry(args.dir / "registry")
        image = {p.name: p for p in registry.push_images(reg)}["testprogs"].ref
        node = Node(ours_dir.resolve(), ours["CRI_ENDPOINT"], image)
        other = Node(native_dir.resolve(), native["CONTAINERD_ENDPOINT"], image)  # 2.x itself, no proxy
        for n in (node, other):
            n.pull(image)
        node.warm_up = node.dir / "checkpoints" / "bench-warm-up.tar"
        checkpointed(node, 0, node.warm_up)
        rows = [(int(s), one_size(node, other, int(s), args.reps, args.fill_only)) for s in args.sizes.split(",")]
        handlers = {} if args.fill_only else handler_cost(node, max(args.reps, 5))
    finally:
        registry.stop_registry(args.dir / "registry")
        for d in (ours_dir, native_dir):
            subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(d), "--purge"],
                           capture_output=True)
        remove_made(args.dir, ("registry",))  # the registry's blobs; `node down --purge` took the nodes'
    report(rows, handlers, args.reps)
    return 0


def remove_made(directory: Path, made: tuple[str, ...]) -> None:
    """Remove what a run made under `directory`, then `directory` if that left it empty.

    Never the whole of `--dir`: it may name a directory that holds other things (`--dir /var/tmp`).
    """
    for name in made:
        shutil.rmtree(directory / name, ignore_errors=True)
    for leftover in (directory / "ours", directory / "native", directory):
        try:
            leftover.rmdir()
        except OSError:
            pass  # missing, or not empty: not ours to empty


def report(rows: list[tuple[int, dict[str, float]]], handlers: dict[str, float], reps: int) -> None:
    fill_report(rows, reps)
    if not handlers:
        return
    print(f"{'memory':>7} {'ours':>8} {'resident':>8} {'eager':>8} {'2.x':>8} {'CRIU':>8} {'CRIU lazy':>9} "
          f"{'dd hot':>8} {'dd cold':>8} {'cold':>8} {'ours/2.x':>8} {'resident/2.x':>12} {'eager/2.x':>9} "
          f"{'eager/CRIU':>10}")
    for mem_mb, t in rows:
        print(f"{mem_mb:>5}Mi {t['ours']:>7.3f}s {t['resident']:>7.3f}s {t['eager']:>7.3f}s {t['native']:>7.3f}s "
              f"{t['criu']:>7.3f}s {t['criu_lazy']:>8.3f}s {t['dd_hot']:>7.3f}s {t['dd_cold']:>7.3f}s "
              f"{t['cold']:>7.3f}s {t['ours'] / t['native']:>7.2f}x "
              f"{t['resident'] / t['native']:>11.2f}x {t['eager'] / t['native']:>8.2f}x {t['eager'] / t['criu']:>9.2f}x")
    print(f"(median of {reps}, interleaved; ours/eager/2.x = CreateContainer+StartContainer until the process "
          "runs; resident = ours until all its memory is in place; CRIU = its own restore time in the eager "
          "restore, CRIU lazy = in the lazy one; cold = a fresh start until the program has allocated and touched its memory)")
    print("split, CreateContainer + StartContainer: " + ", ".join(
        f"{mem_mb} MiB ours {t['ours_create']:.3f}+{t['ours'] - t['ours_create']:.3f}s, "
        f"2.x {t['native_create']:.3f}+{t['native'] - t['native_create']:.3f}s" for mem_mb, t in rows))
    added = (handlers["criu"] - handlers["runc"]) * 1e3
    print(f"a container that is not restored: create+start {handlers['runc'] * 1e3:.1f} ms with handler runc, "
          f"{handlers['criu'] * 1e3:.1f} ms with handler criu ({added:+.1f} ms)")


def fill_report(rows: list[tuple[int, dict[str, float]]], reps: int) -> None:
    """Until all memory is in place: our page daemon, CRIU's, containerd 2.x's eager restore, and dd."""
    print(f"{'memory':>7} {'ours':>8} {'CRIU daemon':>11} {'2.x eager':>9} {'dd hot':>8} {'dd cold':>8} "
          f"{'ours/2.x':>8} {'ours/CRIU':>9} {'running':>8} {'(CRIU)':>7} {'load':>5}")
    for mem_mb, t in rows:
        print(f"{mem_mb:>5}Mi {t['resident']:>7.3f}s {t['resident_criu']:>10.3f}s {t['native']:>8.3f}s "
              f"{t['dd_hot']:>7.3f}s {t['dd_cold']:>7.3f}s {t['resident'] / t['native']:>7.2f}x "
              f"{t['resident'] / t['resident_criu']:>8.2f}x {t['ours']:>7.3f}s {t['running_criu']:>6.3f}s "
              f"{t['load']:>5.2f}")
    print(f"(until all memory is in place, CreateContainer to the page daemon's end; median of {reps}, interleaved; "
          "ours = criu-shim's page daemon, CRIU daemon = criu lazy-pages over a loop device; 2.x eager = containerd "
          "2.x's own restore (all in place when it runs); dd = reading the memory image out of the archive, page "
          "cache / disk; running = ours until the process runs (with CRIU's daemon in brackets); load = 1-min load average at each rep's start)")


if __name__ == "__main__":
    sys.exit(main())
