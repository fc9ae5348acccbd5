"""The target's hold: peers' packets to the moving addresses wait in the kernel during the switch-over.

The receiver claims the addresses (their route moves to this node) before the source stops the
container, so the peers' packets reach this host while the dump and the restore run. A rule in
this host's network namespace queues them at PREROUTING (raw table, before the routing decision),
and the same rule at OUTPUT holds what this host itself sends them (a node-local client, a probe):

    iptables -t raw -I PREROUTING -d IP -m comment --comment criu-shim-hold:PID:START:QUEUE \\
        -j NFQUEUE --queue-num QUEUE --queue-bypass

(the kernel has the xtables NFQUEUE target, not nft's `queue`) and a listener of ours on the queue
(nfqueue.py's messages; blocking netlink I/O in a thread of its own) holds them. Once the restored
container runs with its sockets, every held packet is accepted: it re-enters routing, now to the
restored pod, which answers at once instead of at the peer's next retransmission. On any other
end every held packet is dropped (the peers retransmit, as without a hold) and the route goes back.

Why --queue-bypass: with no listener bound (the receiver died), the rule lets packets through to
routing instead of dropping them. Dropping would blackhole the address on this host until a
receiver started again and swept the rule, even after a restore that had succeeded; going through
is what happens without a hold (the source's failure path routes the address back to it).
Bounds: at most MAX_PACKETS queued (the kernel drops the rest: the peers retransmit), held at
most MAX_SECONDS (then everything held and arriving is dropped, as without a hold). Rules name
their receiver by pid and start time: `sweep` removes those whose receiver is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import logging
import os
import queue
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass

from shim.errors import FailedPrecondition
from shim.migrate import nfqueue

log = logging.getLogger(__name__)

MAX_PACKETS = 4096
MAX_SECONDS = 60.0
TAG = "criu-shim-hold"
QUEUE_BASE = 31000  # queue numbers tried from here; one per hold, EBUSY means another socket has it
QUEUE_SPAN = 512
TIMEOUT = 10.0
_next_queue = itertools.count()


@dataclass(frozen=True)
class Counts:
    held: int  # packets held until the migration settled
    after: int  # packets decided one by one once it had (before the rule was gone)
    accepted: bool


def _start_time(pid: int) -> str | None:
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115,PTH123 - one small read
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # from field 3 (the state), counted after the command's ")"
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a killed receiver nobody reaped yet is gone too
        return None
    return fields[19]  # field 22: the start time


def owner_tag(queue: int) -> str:
    pid = os.getpid()
    return f"{TAG}:{pid}:{_start_time(pid)}:{queue}"


def _tool(ip: str) -> str:
    return "ip6tables" if ipaddress.ip_address(ip).version == 6 else "iptables"


CHAINS = ("PREROUTING", "OUTPUT")  # what reaches this host for the address, and what this host sends it


def rule(ip: str, queue: int, tag: str, chain: str = "PREROUTING") -> list[str]:
    return ["-t", "raw", chain, "-d", ip, "-m", "comment", "--comment", tag,
            "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]


def dead_rules(listing: str) -> list[list[str]]:
    """From `iptables -t raw -S` (a chain of CHAINS, or the table): the deletions (argv after the tool) of
    our rules whose receiver is gone (no such pid, or a pid reused by a later process)."""
    gone = []
    for line in listing.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:  # not a rule of ours (those are written by us, quoted as iptables does)
            continue
        if len(words) < 2 or words[0] != "-A" or words[1] not in CHAINS or "--comment" not in words:
            continue
        tag = words[words.index("--comment") + 1]
        parts = tag.split(":")
        if len(parts) != 4 or parts[0] != TAG or not parts[1].isdigit():
            continue
        if _start_time(int(parts[1])) != parts[2]:
            gone.append(["-t", "raw", "-D", *words[1:]])
    return gone


async def _run(tool: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(tool, "-w", "5", *args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise FailedPrecondition(f"`{tool} {' '.join(args)}` did not finish in {TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        raise FailedPrecondition(f"`{tool} {' '.join(args)}` failed: {err.decode(errors='replace').strip()[:300]}")
    return out.decode(errors="replace")


async def sweep() -> int:
    """Remove the hold rules of receivers that are gone (in this network namespace); how many."""
    removed = 0
    for tool in ("iptables", "ip6tables"):
        try:
            listing = await _run(tool, "-t", "raw", "-S")
        except (FailedPrecondition, OSError) as exc:
            log.warning("cannot list %s hold rules: %s", tool, exc)
            continue
        for deletion in dead_rules(listing):
            with contextlib.suppress(FailedPrecondition, OSError):
                await _run(tool, *deletion)
                removed += 1
    if removed:
        log.warning("removed %d packet hold rule(s) left by a migration receiver that is gone", removed)
    return removed


class _Listener:
    """The queue's socket and the thread that reads it; commands come through a pipe."""

    def __init__(self, sock: socket.socket, number: int, max_seconds: float) -> None:
        self.sock, self.state, self.max_seconds = sock, nfqueue.HoldState(number), max_seconds
        self.wake_r, self.wake_w = os.pipe()
        self.commands: queue.SimpleQueue[str] = queue.SimpleQueue()  # "accept", "drop", "close", in order
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"hold-{number}", daemon=True)

    def _loop(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            while True:
                wait = max(0.0, deadline - time.monotonic()) if self.state.mode == "hold" else None
                readable, _, _ = select.select([self.sock.fileno(), self.wake_r], [], [], wait)
                if self.sock.fileno() in readable:
                    self._drain()
                if self.state.mode == "hold" and time.monotonic() >= deadline:
                    log.warning("packet hold on queue %d past %.0f s: dropping what it holds", self.state.queue,
                                self.max_seconds)
                    self._send(self.state.settle(accept=False))
                if self.wake_r in readable:
                    os.read(self.wake_r, 64)
                    while not self.commands.empty():
                        command = self.commands.get()
                        if command == "close":
                            self._drain()  # queued before the rule went: decided as the hold settled
                            return
                        self._send(self.state.settle(accept=command == "accept"))
        except (OSError, nfqueue.ProtocolError) as exc:
            log.error("packet hold on queue %d failed: %s (the rule lets packets through once its socket is "
                      "closed)", self.state.queue, exc)
        finally:
            self.sock.close()
            os.close(self.wake_r)
            self.done.set()

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # our socket's buffer overflowed: those packets stay queued
                    continue
                raise
            for event in nfqueue.parse(data):
                if event.packet_id is not None:
                    self._send(self.state.on_packet(event.packet_id))

    def _send(self, message: bytes | None) -> None:
        if message is not None:
            self.sock.send(message)

    def tell(self, command: str) -> None:
        self.commands.put(command)
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")


def _open(max_packets: int) -> tuple[socket.socket, int]:
    """A netlink socket bound to a queue number nobody else has (per network namespace)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, nfqueue.NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.settimeout(TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for _ in range(QUEUE_SPAN):
            number = QUEUE_BASE + next(_next_queue) % QUEUE_SPAN
            if _request(sock, nfqueue.bind(number, 1)) == 0:
                if (code := _request(sock, nfqueue.configure(number, 2, max_packets))) != 0:
                    raise FailedPrecondition(f"cannot configure netfilter queue {number}: {os.strerror(code)}")
                sock.settimeout(None)
                return sock, number
        raise FailedPrecondition(f"no free netfilter queue in {QUEUE_BASE}-{QUEUE_BASE + QUEUE_SPAN - 1}")
    except BaseException:
        sock.close()
        raise


def _request(sock: socket.socket, message: bytes) -> int:
    """Send one config request; its errno (0: done)."""
    sock.send(message)
    while True:
        for event in nfqueue.parse(sock.recv(1 << 16)):
            if event.errno is not None:
                return event.errno


class Hold:
    """One migration's hold: `start` before the claim, then `settle(accept)` once, whatever happens."""

    def __init__(self, addresses: list[str], max_packets: int = MAX_PACKETS, max_seconds: float = MAX_SECONDS):
        self.addresses, self.max_packets, self.max_seconds = addresses, max_packets, max_seconds
        self.queue = -1
        self._listener: _Listener | None = None
        self._rules: list[tuple[str, list[str]]] = []
        self.counts: Counts | None = None

    async def start(self) -> None:
        sock, self.queue = await asyncio.to_thread(_open, self.max_packets)
        self._listener = _Listener(sock, self.queue, self.max_seconds)
        self._listener.thread.start()
        tag = owner_tag(self.queue)
        try:
            for ip in self.addresses:
                for chain in CHAINS:
                    spec = rule(ip, self.queue, tag, chain)
                    await _run(_tool(ip), *spec[:2], "-I", *spec[2:])
                    self._rules.append((_tool(ip), spec))
        except BaseException:
            await self.settle(accept=False)
            raise

    async def settle(self, accept: bool) -> Counts | None:
        """Accept (restored) or drop (anything else) what is held, remove the rules, close the queue.
        Idempotent: later calls return the first one's counts."""
        listener, self._listener = self._listener, None
        if listener is None:
            return self.counts
        listener.tell("accept" if accept else "drop")  # first: held packets go on while the rules are removed
        for tool, spec in self._rules:
            try:
                await _run(tool, *spec[:2], "-D", *spec[2:])
            except (FailedPrecondition, OSError) as exc:  # left behind: the next sweep removes it
                log.error("cannot remove packet hold rule %s: %s", " ".join(spec), exc)
        self._rules.clear()
        listener.tell("close")
        await asyncio.to_thread(listener.done.wait, TIMEOUT)
        os.close(listener.wake_w)
        self.counts = Counts(listener.state.held, listener.state.after, accept)
        log.info("packet hold on queue %d %s %d packet(s) held, %d after", self.queue,
                 "accepted" if accept else "dropped", self.counts.held, self.counts.after)
        return self.counts
