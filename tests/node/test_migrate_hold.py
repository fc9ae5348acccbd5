"""The target's packet hold during a migration's switch-over (shim/migrate/hold.py), on two fabric hosts.

The receiver claims the pod IP before the source stops the container and holds the peers' packets
to it in its host's network namespace (an iptables NFQUEUE rule, our listener on the queue) until
the restored container runs, then lets them through; on a failure it drops them and the source
claims the IP back. Checked with real containerd, runc, CRIU, CNI and a TCP client outside both
nodes: packets were held and delivered and the connection kept (eager and lazy); a failed restore
leaves no rule and the source answering; a receiver killed while holding leaves no rule once it
is back, and the kept checkpoint then migrates with the client's connection.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.migrate.hold import TAG
from shim.node import procs
from tests.node.fabric_pods import (
    TCP,
    Host,
    client_on_router,
    fabric_hosts,
    kept_checkpoint,
    largest_gap,
    pipe_max_size,
    pod_ip,
    router_routes,
    seqs,
    slow_link,
)
from tests.node.pods import wait_for

pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host]]:
    with fabric_hosts(tmp_path_factory, ["1.7", "1.7"]) as up, pipe_max_size(4 << 20):
        yield up[0], up[1]


def _in_host(host: Host, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", host.env["NODE_NETNS"], *argv], capture_output=True, text=True,
                          check=True).stdout


def hold_rules(host: Host) -> list[str]:
    """Our NFQUEUE rules in the host's network namespace (IPv4 and IPv6, every chain of the raw table)."""
    listed = _in_host(host, "iptables", "-t", "raw", "-S") + _in_host(host, "ip6tables", "-t", "raw", "-S")
    return [line for line in listed.splitlines() if TAG in line]


def queues(host: Host) -> str:
    """The host namespace's nfnetlink_queue instances (one line each: queue, portid, queued, ...)."""
    return _in_host(host, "cat", "/proc/net/netfilter/nfnetlink_queue")


def routed_to(ip: str, host: Host) -> bool:
    return f"{ip} via {host.env['HOST_IP']}" in router_routes()


def _nothing_held(host: Host) -> None:
    assert not hold_rules(host), hold_rules(host)
    assert not queues(host).strip(), queues(host)


def _held(out: str) -> int:
    found = re.search(r"(\d+) packets to the pod IPs held at the target", out)
    assert found, out
    return int(found.group(1))


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_packets_held_during_the_pause_reach_the_restored_server(hosts: tuple[Host, Host], tmp_path: Path,
                                                                  mode: str) -> None:
    a, b = hosts
    log = tmp_path / "client.log"
    with a.cri.pod(TCP) as source_pod, b.cri.pod(TCP) as target_pod:
        ip = pod_ip(a, source_pod)
        server = a.cri.container(source_pod, ["/usr/local/bin/tcpserver"],
                                 {"PORT": "7000", "BIND_ADDR": ip, "MEM_MB": "64"}, name="server")
        with client_on_router(ip, log, interval_ms=10) as client:
            wait_for(lambda: len(seqs(log.read_text())) >= 20, timeout=60)
            out = a.migrate(server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", mode).stdout
            # the client's retransmissions during the pause waited at the target and went on to the restored socket
            assert _held(out) >= 1, out
            assert routed_to(ip, b), router_routes()
            last = seqs(log.read_text())[-1][1]
            wait_for(lambda: seqs(log.read_text())[-1][1] >= last + 20, timeout=60)
            assert client.poll() is None
        text = log.read_text()
        assert text.count("connected ") == 1 and "error" not in text and "reconnect" not in text, text[-1000:]
        assert a.cri.state(server) == "CONTAINER_EXITED"
        assert b.cri.state(b.container_in(target_pod)) == "CONTAINER_RUNNING"
        _nothing_held(b)
        print(f"{mode} with the hold, 64 MiB: the client's largest gap {largest_gap(text):.3f} s\n{out}")


def test_no_hold_claims_after_the_restore_and_holds_nothing(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """`--no-hold`, the behaviour before the hold (for the bench's comparison): nothing held, IP moved."""
    a, b = hosts
    log = tmp_path / "client.log"
    with a.cri.pod(TCP) as source_pod, b.cri.pod(TCP) as target_pod:
        ip = pod_ip(a, source_pod)
        server = a.cri.container(source_pod, ["/usr/local/bin/tcpserver"], {"PORT": "7000", "BIND_ADDR": ip},
                                 name="server")
        with client_on_router(ip, log, interval_ms=10):
            wait_for(lambda: len(seqs(log.read_text())) >= 20, timeout=60)
            out = a.migrate(server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", "lazy",
                            "--no-hold").stdout
            assert "held at the target" not in out and routed_to(ip, b), out
            last = seqs(log.read_text())[-1][1]
            wait_for(lambda: seqs(log.read_text())[-1][1] >= last + 20, timeout=60)
        assert log.read_text().count("connected ") == 1
        _nothing_held(b)


@pytest.mark.parametrize("hold", [True, False], ids=["hold", "no-hold"])
def test_a_failed_restore_leaves_no_rule_and_the_source_answering(hosts: tuple[Host, Host], tmp_path: Path,
                                                                  hold: bool) -> None:
    """A lazy restore that fails on the target after the dump: the source runs on, its IP routed to it (the
    target released its early claim, the source claimed it back), no rule and no queue left on the target,
    and the source answers a client. CRIU's own network lock, which a lazy dump that failed left in
    the source pod (with or without the hold), is removed: before, no new connection was answered.
    (The connection that was locked through the dump is reset by the source once it runs again:
    CRIU's, not the network's; see README, lazy failures.) The failure: the target pod listens on the
    server's port on every address, so CRIU cannot bind the restored listener (the container is created
    before the dump, from the checkpoint's first part: a taken name would be refused before anything stops)."""
    a, b = hosts
    with a.cri.pod(TCP) as source_pod, b.cri.pod(TCP) as target_pod:
        ip = pod_ip(a, source_pod)
        server = a.cri.container(source_pod, ["/usr/local/bin/tcpserver"], {"PORT": "7000", "BIND_ADDR": ip},
                                 name="server")
        taken = b.cri.container(target_pod, ["/usr/local/bin/tcpserver"], {"PORT": "7000"}, name="squatter")
        first = tmp_path / "first.log"
        with client_on_router(ip, first, interval_ms=10):
            wait_for(lambda: len(seqs(first.read_text())) >= 20, timeout=60)
            proc = a.migrate(server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", "lazy",
                             *([] if hold else ["--no-hold"]), check=False)
        assert proc.returncode == 1 and "the target node could not restore it" in proc.stderr, proc.stderr
        assert f"the source container {server} is running again" in proc.stderr, proc.stderr
        assert not routed_to(ip, b), router_routes()  # the target released it, the source claimed it back
        _nothing_held(b)
        second = tmp_path / "second.log"
        with client_on_router(ip, second, interval_ms=10) as client:
            wait_for(lambda: len(seqs(second.read_text())) >= 20, timeout=60)
            assert client.poll() is None
        assert a.cri.state(server) == "CONTAINER_RUNNING"
        assert b.containers() == [taken]


def test_a_receiver_killed_while_holding_leaves_no_rule_once_back(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """Killed mid-transfer (the link throttled, the hold on): the source claims the IP back and keeps its
    checkpoint; the receiver, started again, sweeps the dead one's rule; the retry moves the server
    with its client's connection (no blackhole on the target)."""
    a, b = hosts
    log = tmp_path / "client.log"
    with a.cri.pod(TCP) as source_pod, b.cri.pod(TCP) as target_pod:
        ip = pod_ip(a, source_pod)
        server = a.cri.container(source_pod, ["/usr/local/bin/tcpserver"],
                                 {"PORT": "7000", "BIND_ADDR": ip, "MEM_MB": "64"}, name="server")
        with client_on_router(ip, log, interval_ms=10, reply_timeout_ms=120_000) as client:
            wait_for(lambda: len(seqs(log.read_text())) >= 20, timeout=60)
            with slow_link(b):
                migrating = subprocess.Popen(a.migrate_argv(server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod",
                                                            target_pod.id), stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)
                try:
                    # held, and the source checkpointed (stopped): the transfer is under way on the slow link
                    wait_for(lambda: (bool(hold_rules(b)) and a.cri.state(server) == "CONTAINER_EXITED")
                             or migrating.poll() is not None, timeout=60)
                    assert hold_rules(b), migrating.communicate()
                    receiver = procs.read_pid(b.layout.pid_dir / "receiver.pid")
                    assert receiver is not None
                    os.kill(receiver, signal.SIGKILL)
                    _, err = migrating.communicate(timeout=120)
                finally:
                    if migrating.poll() is None:
                        migrating.kill()
                        migrating.wait()
            assert migrating.returncode == 1 and f"the source container {server} is stopped" in err, err
            assert hold_rules(b), "the dead receiver's rule stays until a receiver sweeps it"
            # held where the peers' packets arrive and where the target host itself sends to the address
            assert {rule.split()[1] for rule in hold_rules(b)} == {"PREROUTING", "OUTPUT"}, hold_rules(b)
            assert not routed_to(ip, b), router_routes()
            host_route = ["nsenter", f"--net=/run/netns/{b.env['NODE_NETNS']}", "ip", "route", "show", f"{ip}/32"]
            assert subprocess.run(host_route, capture_output=True, text=True).stdout.strip(), \
                "the dead receiver's early claim is still routed on its host"
            b.start_receiver()
            wait_for(lambda: not hold_rules(b), timeout=30)
            # ... and the early claim it did not live to settle is released there too (no container came)
            wait_for(lambda: not subprocess.run(host_route, capture_output=True, text=True).stdout.strip(), timeout=30)
            a.migrate(server, "--checkpoint", str(kept_checkpoint(err)), "--to", b.env["MIGRATE_ADDRESS"],
                      "--to-pod", target_pod.id)
            last = seqs(log.read_text())[-1][1]
            wait_for(lambda: seqs(log.read_text())[-1][1] >= last + 20, timeout=120)
            assert client.poll() is None
        assert log.read_text().count("connected ") == 1
        assert routed_to(ip, b)
        _nothing_held(b)
