"""The packet hold (shim/migrate/hold.py) against the real kernel, in a scratch network namespace.

No fabric: datagrams the namespace sends to 127.0.0.1 are this host's own traffic to the address,
held by the OUTPUT rule (once accepted they pass PREROUTING on the loopback, where the settled hold
lets them through at once), so the hold's iptables rules and its nfnetlink_queue listener see them. Checked: held packets are delivered on accept and never on
drop, the packet bound (the kernel drops past it), the time bound (what is held is dropped), and
that no rule or queue is left. The hold runs in a child (`ip netns exec`): never a namespace switch
in the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.node.fabric_pods import REPO

pytestmark = pytest.mark.node

PROBE = r"""
import asyncio, json, socket, sys, time
from shim.migrate import hold

SENT, ACCEPT, MAX_PACKETS, MAX_SECONDS = int(sys.argv[1]), sys.argv[2] == "accept", int(sys.argv[3]), float(sys.argv[4])


def queued() -> tuple[int, int]:
    # queue_num portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
    line = open("/proc/net/netfilter/nfnetlink_queue").read().split()
    return (int(line[2]), int(line[5])) if line else (0, 0)


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def main() -> None:
    inbox = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inbox.bind(("127.0.0.1", 0))
    inbox.setblocking(False)
    held = hold.Hold(["127.0.0.1"], max_packets=MAX_PACKETS, max_seconds=MAX_SECONDS)
    await held.start()
    rules = open("/proc/net/netfilter/nfnetlink_queue").read()
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(SENT):
        out.sendto(b"%d" % i, inbox.getsockname())
    await until(lambda: sum(queued()) >= SENT)  # each one queued or dropped by the kernel
    waiting, dropped = queued()
    arrived_early = 0
    try:
        while inbox.recv(16):
            arrived_early += 1
    except BlockingIOError:
        pass
    if MAX_SECONDS < 60:  # the time bound: what is held is dropped once it passes
        await until(lambda: queued()[0] == 0)
    counts = await held.settle(accept=ACCEPT)
    # The verdict is taken in the listener's send: by now what was accepted is delivered or on its way.
    expected = waiting if ACCEPT and MAX_SECONDS >= 60 else 0
    received, deadline = 0, time.monotonic() + 10
    while True:
        try:
            inbox.recv(16)
            received += 1
            continue
        except BlockingIOError:
            pass
        if received >= expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    print(json.dumps({"waiting": waiting, "kernel_dropped": dropped, "arrived_early": arrived_early,
                      "held": counts.held, "received": received, "queue_had_instance": bool(rules.strip())}))


asyncio.run(main())
"""


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"hold-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def probe(netns: str, sent: int, accept: bool, max_packets: int = 4096, max_seconds: float = 60.0) -> dict[str, int]:
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE, str(sent),
                           "accept" if accept else "drop", str(max_packets), str(max_seconds)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    # nothing left: no rule of ours, no queue instance
    rules = subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "raw", "-S", "PREROUTING"],
                           capture_output=True, text=True, check=True).stdout
    assert "criu-shim-hold" not in rules, rules
    queues = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/netfilter/nfnetlink_queue"],
                            capture_output=True, text=True, check=True).stdout
    assert not queues.strip(), queues
    return result


def test_held_packets_are_delivered_on_accept(netns: str) -> None:
    got = probe(netns, sent=5, accept=True)
    assert got["queue_had_instance"] and got["waiting"] == 5 and got["arrived_early"] == 0, got
    assert got["held"] == 5 and got["received"] == 5, got


def test_held_packets_are_dropped_on_drop(netns: str) -> None:
    got = probe(netns, sent=5, accept=False)
    assert got["waiting"] == 5 and got["held"] == 5 and got["received"] == 0, got


def test_past_the_packet_bound_the_kernel_drops(netns: str) -> None:
    got = probe(netns, sent=8, accept=True, max_packets=3)
    assert got["waiting"] == 3 and got["kernel_dropped"] == 5, got
    assert got["held"] == 3 and got["received"] == 3, got


def test_past_the_time_bound_what_is_held_is_dropped(netns: str) -> None:
    got = probe(netns, sent=4, accept=True, max_seconds=0.5)
    assert got["waiting"] == 4 and got["held"] == 4, got
    assert got["received"] == 0, got  # dropped at the bound, so the later accept had nothing left
