"""Nodes as hosts on one fabric (`node up --fabric`), for the migration tests and bench/migrate.py.

A `Host` is one node in its own network namespace: its CRI client, what `node up` printed and
`criu-shim migrate` run on it. `fabric_hosts` brings up several on one fabric (distinct pod
subnets) and takes them down again, checking that nothing is left on the machine. The TCP
client helpers run tcpclient outside every node (in the router's namespace) and read its log.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.node import cleanup, fabric, local, procs
from shim.node.layout import NodeLayout
from tests.node import leaks
from tests.node.conftest import criu_shim
from tests.node.pods import Cri, Pod

REPO = Path(__file__).resolve().parents[2]
TCPCLIENT = REPO / "build" / "images" / "bin" / "tcpclient"
FABRIC = "mtest"
STOP_AFTER = {"checkpoint.criu-shim.io/stop-after": "true"}
TCP = {**STOP_AFTER, "checkpoint.criu-shim.io/tcp-established": "true"}


@dataclass(frozen=True)
class Host:
    dir: Path
    env: dict[str, str]  # what `node up --fabric` printed
    cri: Cri

    def migrate_argv(self, *args: str) -> list[str]:
        """`criu-shim migrate` run on this host (in its network namespace), with its credentials."""
        e = self.env
        return ["nsenter", f"--net=/run/netns/{e['NODE_NETNS']}", "--", sys.executable, "-m", "shim", "migrate",
                *args, "--runtime-endpoint", e["CRI_ENDPOINT"], "--checkpoints-dir", e["CHECKPOINTS_DIR"],
                "--cert", e["MIGRATE_CERT"], "--key", e["MIGRATE_KEY"], "--ca", e["MIGRATE_CA"],
                "--address-hook", e["ADDRESS_HOOK"], "--config", str(NodeLayout(self.dir).proxy_config_file)]

    def migrate(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.migrate_argv(*args), capture_output=True, text=True, timeout=300, cwd=REPO)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    @property
    def layout(self) -> NodeLayout:
        return NodeLayout(self.dir.resolve())

    def start_receiver(self) -> None:
        """The node's migration receiver, started again (as `node up` starts it)."""
        local._start_receiver(self.layout, fabric.NodeHost(self.layout, fabric.Fabric(FABRIC)),
                              self.layout.proxy_config_file)

    def restart_receiver(self) -> None:
        """The node's migration receiver stopped and started again: what it keeps must carry over."""
        pid = procs.read_pid(self.layout.pid_dir / "receiver.pid")
        assert pid is not None and procs.alive(pid), f"the receiver of {self.dir} is not running"
        procs.stop(pid)
        self.start_receiver()

    @property
    def router_link(self) -> str:
        return "cf" + self.env["NODE_NETNS"].removeprefix("csh-")  # the router's end of this host's link

    def archives(self) -> set[str]:
        return {p.name for p in Path(self.env["CHECKPOINTS_DIR"]).iterdir()}

    def containers(self) -> list[str]:
        listed = self.cri.runtime.ListContainers(cri.ListContainersRequest(), timeout=30).containers
        return [str(c.id) for c in listed]

    def container_in(self, pod: Pod) -> str:
        listed = self.cri.runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(pod_sandbox_id=pod.id)), timeout=30).containers
        assert len(listed) == 1, listed
        return str(listed[0].id)


@contextlib.contextmanager
def page_daemon(host: Host, daemon: str) -> Iterator[None]:
    """The host's proxy (in the host's network namespace) restarted with `[restore] page_daemon = DAEMON`
    (the proxy plans a restore's page daemon at CreateContainer), put back afterwards; the default
    ("criu-shim") leaves it alone."""
    if daemon == "criu-shim":
        yield
        return
    layout = host.layout
    original = layout.proxy_config_file.read_text()

    def restart(text: str) -> None:
        pid = procs.read_pid(layout.pid_dir / "proxy.pid")
        assert pid is not None
        procs.stop(pid)
        layout.proxy_config_file.write_text(text)
        local._start_proxy(layout, layout.proxy_config_file, ["nsenter", f"--net=/run/netns/{host.env['NODE_NETNS']}",
                                                              "--"])

    restart(original.replace("[restore]\n", f'[restore]\npage_daemon = "{daemon}"\n'))
    try:
        yield
    finally:
        restart(original)


def up(directory: Path, log_root: Path, version: str = "1.7") -> Host:
    proc = criu_shim("node", "up", "--dir", str(directory), "--fabric", FABRIC, "--containerd", version, check=False)
    assert proc.returncode == 0, f"node up --dir {directory} --fabric {FABRIC}: {proc.stderr}"
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return Host(directory, env, Cri(env["CRI_ENDPOINT"], log_root))


def distinct_dirs(make: Callable[[str], Path], count: int = 2) -> list[Path]:
    """Node directories whose pod subnets all differ and none of which the host routes already.

    A fabric node's subnet comes from its directory's hash, and `node up` refuses one another live
    node holds (a host node up for the whole session takes the first free subnet, so any hash can
    meet it)."""
    dirs: list[Path] = []
    while len(dirs) < count:
        candidate = make(f"host-{chr(ord('a') + len(dirs))}")
        layout = NodeLayout(candidate.resolve())
        taken = {NodeLayout(d.resolve()).subnet for d in dirs}
        if layout.subnet not in taken and cleanup.subnet_in_use(layout.subnet, layout.bridge) is None:
            dirs.append(candidate)
    return dirs


@contextlib.contextmanager
def fabric_hosts(factory: pytest.TempPathFactory, versions: Sequence[str]) -> Iterator[list[Host]]:
    """One fabric host per containerd version; all taken down (purged) at the end, and the machine checked
    for anything they left (processes, mounts, netns, links, loop devices, the router)."""
    if os.geteuid() != 0:
        pytest.skip("node tests need root")
    before = leaks.snapshot()
    dirs = distinct_dirs(lambda name: factory.mktemp(name), len(versions))
    logs = factory.mktemp("pod-logs")
    hosts: list[Host] = []
    try:
        for directory, version in zip(dirs, versions, strict=True):
            hosts.append(up(directory, logs, version))
        yield hosts
    finally:
        for host in hosts:
            host.cri.close()
        for d in dirs:
            criu_shim("node", "down", "--dir", str(d), "--purge", check=False)
    leaks.assert_nothing_left(before, leaks.settled_snapshot(before, directory=dirs), dirs)
    assert not Path(f"/run/netns/csr-{FABRIC}").exists()


def pod_ip(host: Host, pod: Pod) -> str:
    status = host.cri.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id), timeout=30)
    return str(status.status.network.ip)


def router_routes() -> str:
    return subprocess.run(["ip", "-n", f"csr-{FABRIC}", "route"], capture_output=True, text=True).stdout


def seqs(log: str) -> list[tuple[float, int]]:
    # tcpclient's own time stamp (a CRI log line has its own in front)
    return [(float(t), int(s)) for t, s in re.findall(r"(?:^| )(\d+\.\d+) seq=(\d+)", log, re.M)]


@contextlib.contextmanager
def client_on_router(ip: str, log: Path, interval_ms: int = 20,
                     reply_timeout_ms: int = 60000) -> Iterator[subprocess.Popen[bytes]]:
    """tcpclient outside every node (in the router's namespace), one connection, a request every 20 ms."""
    with log.open("wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", f"csr-{FABRIC}", str(TCPCLIENT), ip, "7000"], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={"INTERVAL_MS": str(interval_ms), "REPLY_TIMEOUT_MS": str(reply_timeout_ms)})
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def largest_gap(log: str) -> float:
    times = [t for t, _ in seqs(log)]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


@contextlib.contextmanager
def slow_link(host: Host, rate: str = "40mbit") -> Iterator[None]:
    """Throttle the router's link to `host` (tbf): a transfer then lasts long enough to be hit mid-way."""
    tc = ["ip", "netns", "exec", f"csr-{FABRIC}", "tc", "qdisc"]
    subprocess.run([*tc, "add", "dev", host.router_link, "root", "tbf", "rate", rate, "burst", "64kb",
                    "latency", "500ms"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([*tc, "del", "dev", host.router_link, "root"], capture_output=True)


PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")


@contextlib.contextmanager
def pipe_max_size(value: int) -> Iterator[None]:
    """This machine's root lacks CAP_SYS_RESOURCE: CRIU's lazy page server needs pipes over the
    default 1 MiB (fs.pipe-max-size raised for the block, put back after)."""
    before = PIPE_MAX_SIZE.read_text()
    PIPE_MAX_SIZE.write_text(str(max(value, int(before))))
    try:
        yield
    finally:
        PIPE_MAX_SIZE.write_text(before)


def kept_checkpoint(stderr: str) -> Path:
    """The archive a failed migration names as kept: there, 0600."""
    match = re.search(r"its checkpoint is kept at (\S+):", stderr)
    assert match, stderr
    path = Path(match.group(1))
    assert path.is_file() and path.stat().st_mode & 0o777 == 0o600
    return path


def run_pod(host: Host, annotations: dict[str, str] | None = None) -> Pod:
    """A pod the test removes itself, mid-way (Cri.pod removes its pod only at the end of a with block)."""
    name = f"p-{uuid.uuid4().hex[:8]}"
    (host.cri.log_root / name).mkdir(parents=True, exist_ok=True)
    config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="tests", uid=name),
                                  log_directory=str(host.cri.log_root / name), annotations=annotations or {})
    reply = host.cri.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=60)
    return Pod(reply.pod_sandbox_id, config)


def remove_pod(host: Host, pod: Pod) -> None:
    host.cri.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
    host.cri.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
