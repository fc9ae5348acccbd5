"""A lazy migration's page path alone, on the loopback: where its CPU goes, next to one plain TLS stream.

Ours: a page server answering as CRIU's does (PS_IOV_GET in order, clamped at an 819-page iovec)
-> the source's page end and relay (shim.migrate.tunnel.SourceEnd, the pump of shim.migrate.lazy)
-> TLS 1.3 with the node contexts -> the target's page daemon transport (shim.restore.remote_pages,
pinned, 4 MiB requests with 8 MiB on the way, read as the daemon's loop reads, each reply copied into
fresh anonymous memory, as UFFDIO_COPY puts it into the process). No container and no CRIU: what the
relay and the daemon cost, per GiB.
The reference: the same bytes through one TLS connection between two Python processes with blocking
sockets (what bench/link_rate.py measures between the nodes). Each rep runs both, alternately.

    .venv/bin/python bench/page_path.py --mib 1024 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import mmap
import multiprocessing as mp
import os
import select
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shim import node_tls  # noqa: E402
from shim.migrate import lazy, tunnel  # noqa: E402
from shim.node import pki  # noqa: E402
from shim.restore.pageserver import HEADER, PAGE, PS_IOV_CLOSE, REPLY, STATUS  # noqa: E402
from shim.restore.remote_pages import Pinned, RemotePages  # noqa: E402

TOKEN = "ab" * 16
IOVEC = 819 * PAGE
REQUEST = 4 << 20
WINDOW = 8 << 20
MIB = 1 << 20
Queue = Any  # multiprocessing queues


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def page_server(ports: Queue, out: Queue) -> None:
    """One client; GETs answered from a 64 MiB pattern, in order, clamped at the iovec; PS_IOV_CLOSE ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    memory = memoryview(bytes(range(256)) * (64 * MIB // 256))
    header = bytearray(HEADER.size)
    while True:
        view, got = memoryview(header), 0
        while got < HEADER.size:
            count = conn.recv_into(view[got:])
            if not count:
                out.put(("page server", _cpu()))
                return
            got += count
        cmd, pages, vaddr, pid = HEADER.unpack(header)
        if cmd == PS_IOV_CLOSE:
            conn.sendall(STATUS.pack(0))
            conn.recv(1)
            out.put(("page server", _cpu()))
            return
        length = min(pages * PAGE, IOVEC - vaddr % IOVEC)
        at = vaddr % (64 * MIB - IOVEC)
        conn.sendall(HEADER.pack(REPLY, length // PAGE, vaddr, pid))
        conn.sendall(memory[at:at + length])


def source(creds: node_tls.Credentials, target: str, server_port: int, ports: Queue, out: Queue) -> None:
    async def run() -> None:
        end = tunnel.SourceEnd(target, TOKEN, 30.0)
        await end.open("127.0.0.1", creds)
        ports.put(end.port)
        criu_end = await asyncio.open_connection("127.0.0.1", server_port)
        pumped = await lazy._Direct(end).pump(criu_end, None, 60.0)  # type: ignore[arg-type]
        assert pumped.ended_by == "remote", pumped
        out.put(("source relay", _cpu()))

    asyncio.run(run())


def daemon(creds: node_tls.Credentials, source_cert: str, port: int, total: int, out: Queue) -> None:
    remote: RemotePages[None] = RemotePages("127.0.0.1", port, Pinned(creds, source_cert, TOKEN, 30.0))
    started, asked, landed = time.monotonic(), 0, [0]
    process = mmap.mmap(-1, total)  # the process's memory: each page faulted in by its copy, as UFFDIO_COPY does
    base = ctypes.addressof(ctypes.c_char.from_buffer(process))

    def on(tag: None, address: int, length: int) -> None:
        ctypes.memmove(base + landed[0], address, length)
        landed[0] += length

    while landed[0] < total:
        while asked < total and remote.in_flight < WINDOW:
            length = min(REQUEST, IOVEC - asked % IOVEC, total - asked)
            remote.request(1, asked, length, None)
            asked += length
        if not remote.pending():
            select.select([remote], [], [], 10)
        remote.receive(on)
    out.put(("rate", total / (time.monotonic() - started) / 1e6))
    remote.finish()
    out.put(("page daemon", _cpu()))


def tls_sender(creds: node_tls.Credentials, ports: Queue, total: int, out: Queue) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    with node_tls.server_context(creds).wrap_socket(conn, server_side=True) as tls:
        chunk = memoryview(bytes(range(256)) * (MIB // 256))
        for _ in range(total // MIB):
            tls.sendall(chunk)
        tls.recv(1)
    out.put(("TLS sender", _cpu()))


def tls_receiver(creds: node_tls.Credentials, port: int, total: int, out: Queue) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock, \
            node_tls.client_context(creds, check_hostname=False).wrap_socket(sock) as tls:
        view, got, started = memoryview(bytearray(4 * MIB)), 0, time.monotonic()
        while got < total:
            got += tls.recv_into(view)
        out.put(("rate", total / (time.monotonic() - started) / 1e6))
    out.put(("TLS receiver", _cpu()))


def ours(nodes: dict[str, node_tls.Credentials], pins: dict[str, str], total: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    ports, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=page_server, args=(ports, out))]
    procs[-1].start()
    procs.append(ctx.Process(target=source, args=(nodes["source"], pins["target"], ports.get(timeout=30), ports, out)))
    procs[-1].start()
    procs.append(ctx.Process(target=daemon, args=(nodes["target"], pins["source"], ports.get(timeout=30), total, out)))
    procs[-1].start()
    return _collect(procs, out, 4)


def reference(nodes: dict[str, node_tls.Credentials], total: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    ports, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=tls_sender, args=(nodes["source"], ports, total, out))]
    procs[-1].start()
    procs.append(ctx.Process(target=tls_receiver, args=(nodes["target"], ports.get(timeout=30), total, out)))
    procs[-1].start()
    return _collect(procs, out, 3)


def _collect(procs: list[Any], out: Queue, expect: int) -> dict[str, float]:
    results = dict(out.get(timeout=300) for _ in range(expect))
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0, f"{proc.name} exited {proc.exitcode}"
    return results


def _nodes(directory: Path) -> tuple[dict[str, node_tls.Credentials], dict[str, str]]:
    ca = pki.create_ca(directory / "ca", "page path bench")
    nodes, pins = {}, {}
    for name in ("source", "target"):
        pair = pki.issue(ca, pki.CertPair(directory / f"{name}.crt", directory / f"{name}.key"), name, server=True,
                         client=True, ips=("127.0.0.1",))
        nodes[name] = node_tls.Credentials(pair.cert, pair.key, ca.cert)
        pins[name] = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pair.cert.read_text())).hexdigest()
    return nodes, pins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="memory moved per rep (default 1024)")
    parser.add_argument("--reps", type=int, default=3, help="each runs ours, then the reference (default 3)")
    args = parser.parse_args()
    total = args.mib * MIB
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        nodes, pins = _nodes(Path(tmp))
        for rep in range(args.reps):
            for name, got in (("ours", ours(nodes, pins, total)), ("reference", reference(nodes, total))):
                print(f"rep {rep} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()), flush=True)
                for key, value in got.items():
                    per_gib = value if key == "rate" else value / (args.mib / 1024)
                    rows.setdefault(f"{name}: {key}", []).append(per_gib)
    print(f"\n| {args.mib} MiB on the loopback, median of {args.reps} | MB/s or CPU s per GiB |\n|---|---|")
    for key, values in rows.items():
        unit = "MB/s" if key.endswith("rate") else "s of CPU per GiB"
        print(f"| {key} | {statistics.median(values):.2f} {unit} |")


if __name__ == "__main__":
    main()
