"""A container migrated again and again: A -> B -> C -> A across three fabric hosts (issue 11, item 4).

Three nodes, each its own host on one routed fabric, on three containerd versions (1.7, 2.4, 1.6:
each hop crosses versions). A tcpserver with touched memory moves A -> B -> C -> A with its pod IP;
a client outside every node (the router's namespace) keeps one connection throughout and sends a
line every 20 ms. What must hold after the third hop: one connection, never reset; the server's
per-connection count went on without a restart or a skip at every hop (its state is the process's
memory); each source reads EXITED as soon as its `migrate` returned; the old pod IP is routed to
wherever the server is, and no node it left keeps a route for it.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node.fabric_pods import (
    FABRIC,
    TCP,
    Host,
    client_on_router,
    fabric_hosts,
    pod_ip,
    remove_pod,
    router_routes,
    run_pod,
    seqs,
)
from tests.node.pods import Pod, wait_for

pytestmark = pytest.mark.node

VERSIONS = ("1.7", "2.4", "1.6")


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Host]]:
    with fabric_hosts(tmp_path_factory, VERSIONS) as hosts:
        yield hosts


def _host_route(host: Host, ip: str) -> str:
    """This host's own route for the moved /32 (its address hook adds it on claim, drops it on release)."""
    argv = ["ip", "-n", host.env["NODE_NETNS"], "route", "show", "exact", f"{ip}/32"]
    return subprocess.run(argv, capture_output=True, text=True).stdout.strip()


def _replies(text: str) -> list[tuple[int, int]]:
    """(conn, total) of every answer the client printed: the server's counters, in its memory."""
    return [(int(c), int(t)) for c, t in re.findall(r"reply=conn=(\d+) total=(\d+)", text)]


def test_a_server_moved_a_to_b_to_c_and_back_keeps_its_state_and_its_client(three: list[Host],
                                                                           tmp_path: Path) -> None:
    a, b, c = three
    log = tmp_path / "client.log"
    with contextlib.ExitStack() as stack:
        def pod_on(host: Host) -> Pod:
            pod = run_pod(host, TCP)
            stack.callback(lambda: _remove_quietly(host, pod))
            return pod

        first = pod_on(a)
        ip = pod_ip(a, first)
        server = a.cri.container(first, ["/usr/local/bin/tcpserver"],
                                 {"PORT": "7000", "BIND_ADDR": ip, "MEM_MB": "32"}, name="server")
        stack.enter_context(client_on_router(ip, log))
        wait_for(lambda: len(seqs(log.read_text())) >= 10)

        where, pod, ctr = a, first, server
        moved_ips: set[str] = set()
        for hop, target in enumerate((b, c, a), start=1):
            target_pod = pod_on(target)
            out = where.migrate(ctr, "--to", target.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id).stdout
            # the first pod's IP, and from the second hop on also the pod IPs of the nodes passed through
            routed = re.search(r"pod IPs (.*) now routed", out)
            assert routed and ip in routed.group(1).split(", "), out
            moved_ips |= set(routed.group(1).split(", "))
            # stop-after: the source reads EXITED as soon as migrate returned, not a moment later
            assert where.cri.state(ctr) == "CONTAINER_EXITED", f"hop {hop}"
            assert f"{ip} via {target.env['HOST_IP']}" in router_routes(), f"hop {hop}"
            moved = target.container_in(target_pod)
            assert target.cri.state(moved) == "CONTAINER_RUNNING"
            _wait_answers(log, 10)  # answered from there
            assert not _host_route(where, ip), f"hop {hop}: {where.dir} still routes {ip}"
            # the source pod goes (on A: its address is free there again for the way back)
            remove_pod(where, pod)
            where, pod, ctr = target, target_pod, moved

        text = log.read_text()
        assert text.count("connected ") == 1 and "error" not in text and "reconnect" not in text, text[-2000:]
        replies = _replies(text)
        conns = [conn for conn, _ in replies]
        assert conns == list(range(conns[0], conns[0] + len(conns))), "the server's count restarted or skipped"
        assert [t for _, t in replies] == sorted(t for _, t in replies)
        assert where is a and a.cri.state(ctr) == "CONTAINER_RUNNING"
        assert f"inet {ip}/32" in a.cri.exec(ctr, "ip", "-4", "addr", "show", "eth0")
        for left in (b, c):
            assert not _host_route(left, ip), f"{left.dir} still routes {ip}"
        for host in three:
            assert not list(Path(host.env["CHECKPOINTS_DIR"]).glob(".*.part")), "a partial archive was left"
        print(f"A -> B -> C -> A: {len(replies)} answers on one connection, count {conns[0]}..{conns[-1]}")

        # The server ends here for good: once its pod is removed, A's receiver releases what it claimed
        # (claims.py), so no /32 of the addresses it carried stays routed, on the router or any host.
        assert all(_router_route(m) for m in moved_ips)
        remove_pod(a, pod)
        wait_for(lambda: not any(_router_route(m) or _host_route(h, m) for m in moved_ips for h in three),
                 timeout=60)


def _router_route(ip: str) -> str:
    argv = ["ip", "-n", f"csr-{FABRIC}", "route", "show", "exact", f"{ip}/32"]
    return subprocess.run(argv, capture_output=True, text=True).stdout.strip()


def _wait_answers(log: Path, more: int) -> None:
    last = seqs(log.read_text())[-1][1]
    wait_for(lambda: seqs(log.read_text())[-1][1] >= last + more, timeout=60)


def _remove_quietly(host: Host, pod: Pod) -> None:
    with contextlib.suppress(Exception):
        remove_pod(host, pod)
