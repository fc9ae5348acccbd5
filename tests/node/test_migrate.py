"""Live migration between two nodes that are two hosts (`node up --fabric`): `criu-shim migrate`.

Each node's containerd, CNI bridge, pods, proxy and migration receiver live in the node's own
network namespace; a router namespace routes each node's pod subnet. The migrate command runs
on the source host (in its namespace), the archive crosses the fabric over mutual TLS to the
target's receiver, which restores it into a prepared pod. A TCP client outside both nodes (in
the router namespace) keeps its connection while the server moves A -> B -> A.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.node.layout import NodeLayout
from tests.node import leaks
from tests.node.conftest import criu_shim
from tests.node.pods import Cri, Pod, wait_for

pytestmark = pytest.mark.node

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
    def router_link(self) -> str:
        return "cf" + self.env["NODE_NETNS"].removeprefix("csh-")  # the router's end of this host's link

    def archives(self) -> set[str]:
        return {p.name for p in Path(self.env["CHECKPOINTS_DIR"]).iterdir()}

    def container_in(self, pod: Pod) -> str:
        listed = self.cri.runtime.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(pod_sandbox_id=pod.id)), timeout=30).containers
        assert len(listed) == 1, listed
        return str(listed[0].id)


def _up(directory: Path, log_root: Path, version: str = "1.7") -> Host:
    proc = criu_shim("node", "up", "--dir", str(directory), "--fabric", FABRIC, "--containerd", version, check=False)
    assert proc.returncode == 0, f"node up --dir {directory} --fabric {FABRIC}: {proc.stderr}"
    out = proc.stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return Host(directory, env, Cri(env["CRI_ENDPOINT"], log_root))


def distinct_dirs(make: Callable[[str], Path]) -> list[Path]:
    """Two node directories whose pod subnets differ (the subnet is derived from the directory's hash)."""
    first = make("host-a")
    while True:
        second = make("host-b")
        if NodeLayout(second).subnet != NodeLayout(first).subnet:
            return [first, second]


# Node B on containerd 1.7, then on 2.4 (a node upgrade: containers move from the old version's node
# to the new one's, and back).
@pytest.fixture(scope="module", params=["1.7", "2.4"], ids=["1.7-to-1.7", "1.7-to-2.4"])
def hosts(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[tuple[Host, Host]]:
    if os.geteuid() != 0:
        pytest.skip("node tests need root")
    before = leaks.snapshot()
    dirs = distinct_dirs(lambda name: tmp_path_factory.mktemp(name))
    logs = tmp_path_factory.mktemp("pod-logs")
    up: list[Host] = []
    try:
        up = [_up(dirs[0], logs), _up(dirs[1], logs, request.param)]
        yield up[0], up[1]
    finally:
        for host in up:
            host.cri.close()
        for d in dirs:
            criu_shim("node", "down", "--dir", str(d), "--purge", check=False)
    after = leaks.settled_snapshot(before)
    leaks.assert_nothing_left(before, after, dirs[0])
    assert not Path(f"/run/netns/csr-{FABRIC}").exists()


def _pod_ip(host: Host, pod: Pod) -> str:
    status = host.cri.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id), timeout=30)
    return str(status.status.network.ip)


def _router_routes() -> str:
    return subprocess.run(["ip", "-n", f"csr-{FABRIC}", "route"], capture_output=True, text=True).stdout


def test_nodes_are_hosts_joined_only_by_routes(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    assert a.env["NODE_NETNS"] != b.env["NODE_NETNS"] and a.env["POD_SUBNET"] != b.env["POD_SUBNET"]
    routes = _router_routes()
    assert f"{a.env['POD_SUBNET']} via {a.env['HOST_IP']}" in routes
    assert f"{b.env['POD_SUBNET']} via {b.env['HOST_IP']}" in routes
    with a.cri.pod() as pod:
        ip = _pod_ip(a, pod)
        assert ip.startswith(a.env["POD_SUBNET"].rsplit(".", 1)[0] + ".")
        # No route in the machine's own namespace: node A's pods exist only on its host.
        assert a.env["POD_SUBNET"] not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
        ping = subprocess.run(["nsenter", f"--net=/run/netns/{b.env['NODE_NETNS']}", "--", str(TCPCLIENT), ip,
                               "9"], capture_output=True, text=True, env={"CONNECT_TIMEOUT_MS": "300"})
        assert "Connection refused" in ping.stdout + ping.stderr  # reachable through the router, a RST


def test_counter_keeps_its_count_on_the_other_node(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    with a.cri.pod(STOP_AFTER) as source_pod, b.cri.pod() as target_pod:
        ctr = a.cri.container(source_pod, ["/usr/local/bin/counter"], {"INTERVAL_MS": "50", "MEM_MB": "16"},
                              name="counter")
        wait_for(lambda: a.cri.count(ctr) >= 20)
        out = a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id).stdout
        assert "migrated to container" in out and "pause" in out
        assert a.cri.state(ctr) == "CONTAINER_EXITED"  # stop-after
        moved = b.container_in(target_pod)
        assert b.cri.state(moved) == "CONTAINER_RUNNING"
        first = b.cri.count(moved)
        assert first >= 20, "the count restarted instead of resuming"
        wait_for(lambda: b.cri.count(moved) > first)
        assert not list(Path(a.env["CHECKPOINTS_DIR"]).glob("migrate-*")), "the source's checkpoint is deleted"
        kept = list(Path(b.env["CHECKPOINTS_DIR"]).glob("migrate-counter-*.tar"))
        assert len(kept) == 1 and kept[0].stat().st_mode & 0o777 == 0o600


def _seqs(log: str) -> list[tuple[float, int]]:
    # tcpclient's own time stamp (a CRI log line has its own in front)
    return [(float(t), int(s)) for t, s in re.findall(r"(?:^| )(\d+\.\d+) seq=(\d+)", log, re.M)]


@contextlib.contextmanager
def _client_on_router(ip: str, log: Path, interval_ms: int = 20) -> Iterator[subprocess.Popen[bytes]]:
    """tcpclient outside both nodes (in the router's namespace), one connection, a request every 20 ms."""
    with log.open("wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", f"csr-{FABRIC}", str(TCPCLIENT), ip, "7000"], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={"INTERVAL_MS": str(interval_ms), "REPLY_TIMEOUT_MS": "60000"})
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _largest_gap(log: str) -> float:
    times = [t for t, _ in _seqs(log)]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


@dataclass(frozen=True)
class Client:
    text: Callable[[], str]  # its output so far
    alive: Callable[[], bool]


@contextlib.contextmanager
def _client(where: str, b: Host, ip: str, log: Path) -> Iterator[Client]:
    """A TCP client outside both nodes (the router's namespace) or in a pod of node B."""
    if where == "router":
        with _client_on_router(ip, log) as proc:
            yield Client(log.read_text, lambda: proc.poll() is None)
        return
    with b.cri.pod() as pod:
        ctr = b.cri.container(pod, ["/usr/local/bin/tcpclient"], {"HOST": ip, "PORT": "7000", "INTERVAL_MS": "20",
                                                                   "REPLY_TIMEOUT_MS": "60000"}, name="client")
        yield Client(lambda: b.cri.log(ctr), lambda: b.cri.state(ctr) == "CONTAINER_RUNNING")


# The client outside both nodes sees the route move on the router; the client in a pod of node B
# sees the server arrive on its own node (reached through B's /32 route), then leave it again.
@pytest.mark.parametrize("where", ["router", "pod on node B"])
def test_tcp_client_keeps_its_connection_as_the_server_moves_a_to_b_and_back(
        hosts: tuple[Host, Host], tmp_path: Path, where: str) -> None:
    a, b = hosts
    with contextlib.ExitStack() as stack:
        source_pod = stack.enter_context(contextlib.ExitStack())
        first_pod = source_pod.enter_context(a.cri.pod(TCP))
        ip = _pod_ip(a, first_pod)
        server = a.cri.container(first_pod, ["/usr/local/bin/tcpserver"], {"PORT": "7000", "BIND_ADDR": ip},
                                 name="server")
        client = stack.enter_context(_client(where, b, ip, tmp_path / "client.log"))
        wait_for(lambda: len(_seqs(client.text())) >= 10)

        pod_b = stack.enter_context(b.cri.pod(TCP))
        out = a.migrate(server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", pod_b.id).stdout
        assert f"pod IPs {ip} now routed" in out
        assert f"{ip} via {b.env['HOST_IP']}" in _router_routes()
        before = _seqs(client.text())[-1][1]
        wait_for(lambda: _seqs(client.text())[-1][1] >= before + 10, timeout=60)
        gap_ab = _largest_gap(client.text())
        on_b = b.container_in(pod_b)
        assert f"inet {ip}/32" in b.cri.exec(on_b, "ip", "-4", "addr", "show", "eth0")

        source_pod.close()  # the old pod on A goes (its address is free there again for the way back)
        pod_a2 = stack.enter_context(a.cri.pod(TCP))
        b.migrate(on_b, "--to", a.env["MIGRATE_ADDRESS"], "--to-pod", f"tests/{pod_a2.config.metadata.name}")
        assert f"{ip} via {a.env['HOST_IP']}" in _router_routes()
        before = _seqs(client.text())[-1][1]
        wait_for(lambda: _seqs(client.text())[-1][1] >= before + 10, timeout=60)
        text = client.text()
        assert text.count("connected ") == 1 and "error" not in text and "reconnect" not in text, text[-2000:]
        assert client.alive()  # never reset
        counts = [int(c) for c in re.findall(r"reply=conn=(\d+)", text)]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)  # one server state throughout
        back = a.container_in(pod_a2)
        assert a.cri.state(back) == "CONTAINER_RUNNING"
        print(f"client in {where}: largest gap A->B {gap_ab:.2f} s, overall {_largest_gap(text):.2f} s")


def test_refused_before_anything_stops(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    archives_before, sources_before = b.archives(), a.archives()
    with a.cri.pod(TCP) as source_pod, b.cri.pod(STOP_AFTER) as no_tcp_pod, a.cri.pod() as plain_pod:
        ip = _pod_ip(a, source_pod)
        server = a.cri.container(source_pod, ["/usr/local/bin/tcpserver"], {"PORT": "7000"}, name="server")
        plain = a.cri.container(plain_pod, ["/usr/local/bin/counter"], name="counter")
        to = ["--to", b.env["MIGRATE_ADDRESS"]]
        cases = [
            ([server, *to, "--to-pod", no_tcp_pod.id], "lacks annotation checkpoint.criu-shim.io/tcp-established"),
            ([server, *to, "--to-pod", "tests/no-such-pod"], "pod 'tests/no-such-pod': no such pod"),
            ([plain, *to, "--to-pod", no_tcp_pod.id], 'lacks annotation checkpoint.criu-shim.io/stop-after: "true"'),
            (["no-such-container", *to, "--to-pod", no_tcp_pod.id], "find container \"no-such-container\": not found"),
            ([server, "--to", "nonsense", "--to-pod", no_tcp_pod.id], "expected HOST:PORT"),
            ([server, "--to", f"{a.env['HOST_IP']}:1", "--to-pod", no_tcp_pod.id], "cannot reach the migration receiver"),
        ]
        for args, expected in cases:
            proc = a.migrate(*args, check=False)
            assert proc.returncode != 0 and expected in proc.stderr, (args, proc.stderr)
            assert a.cri.state(server) == "CONTAINER_RUNNING" and a.cri.state(plain) == "CONTAINER_RUNNING"
        listed = b.cri.runtime.ListContainers(cri.ListContainersRequest(), timeout=30).containers
        assert not listed, "nothing was created on the target"
        assert b.archives() == archives_before, "no archive reached the target"
        assert a.archives() == sources_before, "no checkpoint was taken"
        assert ip not in _router_routes()


def test_a_stranger_certificate_is_refused(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    from shim.node import pki

    a, b = hosts
    ca = pki.create_ca(tmp_path / "other", "another cluster")
    mine = pki.issue(ca, pki.CertPair(tmp_path / "n.crt", tmp_path / "n.key"), "intruder", client=True)
    e = a.env
    argv = ["nsenter", f"--net=/run/netns/{e['NODE_NETNS']}", "--", sys.executable, "-m", "shim", "migrate",
            "whatever", "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", "x", "--runtime-endpoint", e["CRI_ENDPOINT"],
            "--cert", str(mine.cert), "--key", str(mine.key), "--ca", str(ca.cert)]
    with a.cri.pod(STOP_AFTER) as pod:
        ctr = a.cri.container(pod, ["/usr/local/bin/counter"], name="counter")
        argv[argv.index("whatever")] = ctr
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 1 and "is not a node of this cluster" in proc.stderr, proc.stderr
        assert a.cri.state(ctr) == "CONTAINER_RUNNING"


@contextlib.contextmanager
def _slow_link(host: Host, rate: str = "40mbit") -> Iterator[None]:
    """Throttle the router's link to `host` (tbf): a transfer then lasts long enough to be hit mid-way."""
    tc = ["ip", "netns", "exec", f"csr-{FABRIC}", "tc", "qdisc"]
    subprocess.run([*tc, "add", "dev", host.router_link, "root", "tbf", "rate", rate, "burst", "64kb",
                    "latency", "500ms"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([*tc, "del", "dev", host.router_link, "root"], capture_output=True)


def _kept_checkpoint(stderr: str) -> Path:
    match = re.search(r"its checkpoint is kept at (\S+):", stderr)
    assert match, stderr
    path = Path(match.group(1))
    assert path.is_file() and path.stat().st_mode & 0o777 == 0o600
    return path


def _run_pod(host: Host) -> Pod:
    """A pod the test removes itself, mid-way (Cri.pod removes its pod only at the end of a with block)."""
    name = f"p-{uuid.uuid4().hex[:8]}"
    config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="tests", uid=name),
                                  log_directory=str(host.cri.log_root / name))
    reply = host.cri.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=60)
    return Pod(reply.pod_sandbox_id, config)


def _remove_pod(host: Host, pod: Pod) -> None:
    host.cri.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
    host.cri.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)


@pytest.mark.parametrize("fault", ["target pod deleted", "link cut"])
def test_a_failed_transfer_keeps_the_checkpoint_and_a_retry_completes_it(hosts: tuple[Host, Host], fault: str) -> None:
    a, b = hosts
    archives_before = b.archives()
    with a.cri.pod(STOP_AFTER) as source_pod, b.cri.pod() as retry_pod:
        ctr = a.cri.container(source_pod, ["/usr/local/bin/counter"], {"INTERVAL_MS": "50", "MEM_MB": "64"},
                              name="counter")
        wait_for(lambda: a.cri.count(ctr) >= 10)
        target = _run_pod(b)
        try:
            with _slow_link(b):  # about 14 s for the 64 MiB archive
                proc = subprocess.Popen(a.migrate_argv(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target.id,
                                                       "--idle-timeout", "5"),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
                wait_for(lambda: a.cri.state(ctr) == "CONTAINER_EXITED", timeout=120)  # now the archive flows
                wait_for(lambda: any(n.endswith(".part") for n in b.archives()), timeout=30)
                router = ["ip", "-n", f"csr-{FABRIC}", "link", "set", b.router_link]
                if fault == "target pod deleted":
                    _remove_pod(b, target)
                else:
                    subprocess.run([*router, "down"], check=True)
                try:
                    _, stderr = proc.communicate(timeout=180)
                finally:
                    subprocess.run([*router, "up"], check=True)
        finally:
            with contextlib.suppress(Exception):
                _remove_pod(b, target)
        assert proc.returncode == 1, stderr
        expected = "was deleted during the migration" if fault == "target pod deleted" else "the transfer (stalled|broke)"
        assert re.search(expected, stderr) and f"the source container {ctr} is stopped" in stderr, stderr
        kept = _kept_checkpoint(stderr)
        # The target removes its partial copy (a cut link: once its own idle timeout has passed).
        wait_for(lambda: b.archives() == archives_before, timeout=60)
        assert not b.cri.runtime.ListContainers(cri.ListContainersRequest(), timeout=30).containers
        out = a.migrate(ctr, "--checkpoint", str(kept), "--to", b.env["MIGRATE_ADDRESS"], "--to-pod",
                        retry_pod.id).stdout
        assert "migrated to container" in out and not kept.exists()
        moved = b.container_in(retry_pod)
        assert b.cri.count(moved) >= 10


def test_a_node_whose_subnet_is_taken_on_the_fabric_is_refused_and_leaves_nothing(
        hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, _ = hosts
    subnet = NodeLayout(a.dir).subnet
    clash = next(d for d in (tmp_path / f"n{i}" for i in range(10_000)) if NodeLayout(d).subnet == subnet)
    netns_before = set(Path("/run/netns").iterdir())
    links_before = subprocess.run(["ip", "-n", f"csr-{FABRIC}", "-o", "link"], capture_output=True, text=True).stdout
    proc = criu_shim("node", "up", "--dir", str(clash), "--fabric", FABRIC, check=False)
    assert proc.returncode == 1 and f"pod subnet {subnet}" in proc.stderr and "already routed" in proc.stderr
    assert set(Path("/run/netns").iterdir()) == netns_before
    assert subprocess.run(["ip", "-n", f"csr-{FABRIC}", "-o", "link"], capture_output=True,
                          text=True).stdout == links_before
    assert not (Path("/run/criu-shim") / NodeLayout(clash).tag).exists()
    criu_shim("node", "down", "--dir", str(clash), "--purge")
    with a.cri.pod() as pod:  # the node already there is untouched
        assert _pod_ip(a, pod)


def test_a_target_whose_criu_is_older_is_refused_before_anything_stops(hosts: tuple[Host, Host],
                                                                         tmp_path: Path) -> None:
    a, b = hosts
    old_criu = tmp_path / "criu"
    old_criu.write_text("#!/bin/sh\necho 'Version: 4.1'\n")
    old_criu.chmod(0o755)
    config = tmp_path / "old.toml"
    config.write_text(f'[checkpoint]\ncriu = "{old_criu}"\n')
    e = b.env
    address = f"{e['HOST_IP']}:7544"
    argv = ["nsenter", f"--net=/run/netns/{e['NODE_NETNS']}", "--", sys.executable, "-m", "shim",
            "migrate-receiver", "--listen", address, "--runtime-endpoint", e["CRI_ENDPOINT"], "--config", str(config),
            "--checkpoints-dir", e["CHECKPOINTS_DIR"], "--address-hook", e["ADDRESS_HOOK"],
            "--cert", e["MIGRATE_CERT"], "--key", e["MIGRATE_KEY"], "--ca", e["MIGRATE_CA"]]
    receiver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        listening = ["nsenter", f"--net=/run/netns/{e['NODE_NETNS']}", "ss", "-Hltn", f"src {e['HOST_IP']}"]
        wait_for(lambda: ":7544" in subprocess.run(listening, capture_output=True, text=True).stdout)
        with a.cri.pod(STOP_AFTER) as pod, b.cri.pod() as target:
            ctr = a.cri.container(pod, ["/usr/local/bin/counter"], name="counter")
            proc = a.migrate(ctr, "--to", address, "--to-pod", target.id, check=False)
            assert proc.returncode == 1 and "CRIU 4.1 is older than the source's" in proc.stderr, proc.stderr
            assert "nothing was stopped" in proc.stderr and a.cri.state(ctr) == "CONTAINER_RUNNING"
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
