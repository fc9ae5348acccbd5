"""Live migration between two nodes that are two hosts (`node up --fabric`): `criu-shim migrate`.

Each node's containerd, CNI bridge, pods, proxy and migration receiver live in the node's own
network namespace; a router namespace routes each node's pod subnet. The migrate command runs
on the source host (in its namespace), the archive crosses the fabric over mutual TLS to the
target's receiver, which restores it into a prepared pod. A TCP client outside both nodes (in
the router namespace) keeps its connection while the server moves A -> B -> A.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.node import fabric
from shim.node.layout import NodeLayout
from tests.node.conftest import criu_shim
from tests.node.fabric_pods import (
    FABRIC,
    REPO,
    STOP_AFTER,
    TCP,
    TCPCLIENT,
    Host,
    client_on_router,
    fabric_hosts,
    kept_checkpoint,
    largest_gap,
    pod_ip,
    remove_pod,
    router_routes,
    run_pod,
    seqs,
    slow_link,
)
from tests.node.pods import wait_for

pytestmark = pytest.mark.node

# Node B on containerd 1.7, then on 2.4 (a node upgrade: containers move from the old version's node
# to the new one's, and back).
@pytest.fixture(scope="module", params=["1.7", "2.4"], ids=["1.7-to-1.7", "1.7-to-2.4"])
def hosts(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[tuple[Host, Host]]:
    with fabric_hosts(tmp_path_factory, ["1.7", request.param]) as (a, b):
        yield a, b


def test_nodes_are_hosts_joined_only_by_routes(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    assert a.env["NODE_NETNS"] != b.env["NODE_NETNS"] and a.env["POD_SUBNET"] != b.env["POD_SUBNET"]
    routes = router_routes()
    assert f"{a.env['POD_SUBNET']} via {a.env['HOST_IP']}" in routes
    assert f"{b.env['POD_SUBNET']} via {b.env['HOST_IP']}" in routes
    with a.cri.pod() as pod:
        ip = pod_ip(a, pod)
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


@dataclass(frozen=True)
class Client:
    text: Callable[[], str]  # its output so far
    alive: Callable[[], bool]


@contextlib.contextmanager
def _client(where: str, b: Host, ip: str, log: Path) -> Iterator[Client]:
    """A TCP client outside both nodes (the router's namespace) or in a pod of node B."""
    if where == "router":
        with client_on_router(ip, log) as proc:
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
        ip = pod_ip(a, first_pod)
        server = a.cri.container(first_pod, ["/usr/local/bin/tcpserver"], {"PORT": "7000", "BIND_ADDR": ip},
                                 name="server")
        client = stack.enter_context(_client(where, b, ip, tmp_path / "client.log"))
        wait_for(lambda: len(seqs(client.text())) >= 10)

        pod_b = stack.enter_context(b.cri.pod(TCP))
        out = a.migrate(server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", pod_b.id).stdout
        assert f"pod IPs {ip} now routed" in out
        assert f"{ip} via {b.env['HOST_IP']}" in router_routes()
        reservation = a.layout.cni_ipam_dir / a.layout.network_name / ip  # A's host-local IPAM file of the IP
        assert reservation.read_text().split() == [fabric.IPAM_RESERVED], "A's IPAM should keep the IP reserved"
        before = seqs(client.text())[-1][1]
        wait_for(lambda: seqs(client.text())[-1][1] >= before + 10, timeout=60)
        gap_ab = largest_gap(client.text())
        on_b = b.container_in(pod_b)
        assert f"inet {ip}/32" in b.cri.exec(on_b, "ip", "-4", "addr", "show", "eth0")

        source_pod.close()  # the old pod on A goes: its CNI DEL leaves the reserved address alone
        assert reservation.read_text().split() == [fabric.IPAM_RESERVED]
        pod_a2 = stack.enter_context(a.cri.pod(TCP))
        assert pod_ip(a, pod_a2) != ip
        b.migrate(on_b, "--to", a.env["MIGRATE_ADDRESS"], "--to-pod", f"tests/{pod_a2.config.metadata.name}")
        assert f"{ip} via {a.env['HOST_IP']}" in router_routes()
        before = seqs(client.text())[-1][1]
        wait_for(lambda: seqs(client.text())[-1][1] >= before + 10, timeout=60)
        text = client.text()
        assert text.count("connected ") == 1 and "error" not in text and "reconnect" not in text, text[-2000:]
        assert client.alive()  # never reset
        counts = [int(c) for c in re.findall(r"reply=conn=(\d+)", text)]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)  # one server state throughout
        back = a.container_in(pod_a2)
        assert a.cri.state(back) == "CONTAINER_RUNNING"
        a.restart_receiver()  # the claim it made for `back` is the next receiver's to release (kept on disk)
        print(f"client in {where}: largest gap A->B {gap_ab:.2f} s, overall {largest_gap(text):.2f} s")
    # Every pod gone: A's (restarted) receiver saw the container restored here removed, released the IP, freed it.
    wait_for(lambda: not reservation.exists(), timeout=40)
    assert f"{ip} via" not in router_routes()


def test_refused_before_anything_stops(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    archives_before, sources_before = b.archives(), a.archives()
    with a.cri.pod(TCP) as source_pod, b.cri.pod(STOP_AFTER) as no_tcp_pod, a.cri.pod() as plain_pod:
        ip = pod_ip(a, source_pod)
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
        assert ip not in router_routes()


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


@pytest.mark.parametrize("fault", ["target pod deleted", "link cut"])
def test_a_failed_transfer_keeps_the_checkpoint_and_a_retry_completes_it(hosts: tuple[Host, Host], fault: str) -> None:
    a, b = hosts
    archives_before = b.archives()
    with a.cri.pod(STOP_AFTER) as source_pod, b.cri.pod() as retry_pod:
        ctr = a.cri.container(source_pod, ["/usr/local/bin/counter"], {"INTERVAL_MS": "50", "MEM_MB": "64"},
                              name="counter")
        wait_for(lambda: a.cri.count(ctr) >= 10)
        target = run_pod(b)
        try:
            with slow_link(b):  # about 14 s for the 64 MiB archive
                proc = subprocess.Popen(a.migrate_argv(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target.id,
                                                       "--idle-timeout", "5"),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
                wait_for(lambda: a.cri.state(ctr) == "CONTAINER_EXITED", timeout=120)  # now the archive flows
                wait_for(lambda: any(n.endswith(".part") for n in b.archives()), timeout=30)
                router = ["ip", "-n", f"csr-{FABRIC}", "link", "set", b.router_link]
                if fault == "target pod deleted":
                    remove_pod(b, target)
                else:
                    subprocess.run([*router, "down"], check=True)
                try:
                    _, stderr = proc.communicate(timeout=180)
                finally:
                    subprocess.run([*router, "up"], check=True)
        finally:
            with contextlib.suppress(Exception):
                remove_pod(b, target)
        assert proc.returncode == 1, stderr
        expected = "was deleted during the migration" if fault == "target pod deleted" else "the transfer (stalled|broke)"
        assert re.search(expected, stderr) and f"the source container {ctr} is stopped" in stderr, stderr
        kept = kept_checkpoint(stderr)
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
        assert pod_ip(a, pod)


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
