"""The fabric link's own rate between two nodes, the reference for a migration's memory rate.

A sender in node A's network namespace sends N MiB to a receiver in node B's over the fabric
(veth pairs through the router namespace, as the migration's streams go), plain TCP and inside
the nodes' mutual TLS (the migration channel's contexts, `shim.migrate.channel`), with blocking
sockets and one 1 MiB buffer: the most a Python end can carry, with nothing else in its way.
bench/migrate.py runs it next to the migrations, in the same run.

    sudo .venv/bin/python bench/link_rate.py --mib 1024   # on the hosts of a running `node up --fabric` bench
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from shim.migrate import channel  # noqa: E402

MIB = 1 << 20


def _contexts(env: dict[str, str] | None) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    if env is None:
        return None
    creds = channel.Credentials(Path(env["MIGRATE_CERT"]), Path(env["MIGRATE_KEY"]), Path(env["MIGRATE_CA"]))
    return channel.server_context(creds), channel.client_context(creds)


def serve(host: str, tls: dict[str, str] | None) -> None:
    """Prints its port, takes one connection, prints what it received and in how long."""
    contexts = _contexts(tls)
    with socket.create_server((host, 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
        if contexts is not None:
            conn = contexts[0].wrap_socket(conn, server_side=True)
        buffer = bytearray(MIB)
        got, started = 0, 0.0
        while count := conn.recv_into(buffer):
            started = started or time.monotonic()
            got += count
        print(json.dumps({"bytes": got, "seconds": time.monotonic() - started}), flush=True)
        conn.close()


def send(host: str, port: int, mib: int, tls: dict[str, str] | None) -> None:
    contexts = _contexts(tls)
    conn = socket.create_connection((host, port), timeout=30)
    if contexts is not None:
        conn = contexts[1].wrap_socket(conn, server_hostname=host)
    block = bytes(range(256)) * (MIB // 256)
    for _ in range(mib):
        conn.sendall(block)
    # End our side, then wait for the receiver's end: closing at once, with TLS 1.3's session tickets
    # unread in our socket, would reset the connection and lose the stream's tail.
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(MIB):
        pass
    conn.close()


def measure(a_enter: list[str], b_enter: list[str], b_host: str, mib: int, tls: dict[str, str] | None) -> float:
    """MB/s from node A to node B (`*_enter`: the argv prefix that runs in each node's namespace)."""
    extra = ["--tls", json.dumps(tls)] if tls is not None else []
    receiver = subprocess.Popen([*b_enter, sys.executable, __file__, "--serve", b_host, *extra],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        subprocess.run([*a_enter, sys.executable, __file__, "--send", f"{b_host}:{port}", "--mib", str(mib), *extra],
                       check=True, timeout=600)
        result: dict[str, Any] = json.loads(receiver.stdout.readline())
        receiver.wait(timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    if result["bytes"] != mib * MIB:
        raise RuntimeError(f"the link carried {result['bytes']} of {mib * MIB} bytes")
    return float(result["bytes"]) / result["seconds"] / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", metavar="HOST")
    parser.add_argument("--send", metavar="HOST:PORT")
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--tls", type=json.loads, metavar="JSON", help="MIGRATE_CERT/KEY/CA of the node's env")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.tls)
    elif args.send:
        host, port = channel.parse_address(args.send)
        send(host, port, args.mib, args.tls)
    else:
        parser.error("--serve or --send (bench/migrate.py calls both, one in each node's namespace)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
