"""The CRIU floor of a migration's pause: the same server dumped and restored by hand, no criu-shim.

The tcpserver of bench/migrate.py (MEM_MB of touched memory) runs as a plain process in a network
namespace of its own, a tcpclient in the same namespace sends a line every 10 ms on one connection;
CRIU (the node's binary) dumps the server with `--tcp-established` (the connection locked, the
server ended after a good dump) and restores it from the same images in place (`-d`). Reported:
CRIU's dump and restore wall times and the client's largest gap: what stop-and-copy costs with no
container runtime, no archive and no network between two nodes in the way.

    sudo .venv/bin/python bench/criu_floor.py --sizes 64 512
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from shim.node.tools import load_paths  # noqa: E402

BIN = HERE.parent / "build" / "images" / "bin"
CRIU_OPTIONS = ["--tcp-established", "--network-lock", "nftables", "-v4"]


@dataclass(frozen=True)
class Floor:
    dump_s: float
    restore_s: float
    client_gap_s: float


def _gap(log: Path) -> float:
    times = [float(t) for t in re.findall(r"(?:^| )(\d+\.\d+) seq=\d+", log.read_text(), re.M)]
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def _answers(log: Path) -> int:
    return len(re.findall(r" seq=\d+", log.read_text()))


def _wait(condition: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


@contextlib.contextmanager
def _netns(name: str) -> Iterator[list[str]]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield ["nsenter", f"--net=/run/netns/{name}", "--"]  # the network namespace only (CRIU: same mounts)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def one(mem_mb: int, work: Path) -> Floor:
    """Dump and restore one server of `mem_mb` MiB with its client connected; the images deleted after."""
    criu = load_paths()["CRIU_BIN"]
    images = work / f"img-{mem_mb}"
    images.mkdir()
    server_log, client_log = work / f"server-{mem_mb}.log", work / f"client-{mem_mb}.log"
    with _netns(f"csfloor-{os.getpid()}") as enter, server_log.open("wb") as out, client_log.open("wb") as cout:
        server = subprocess.Popen([*enter, "setsid", str(BIN / "tcpserver")], stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, env={"PORT": "7000", "BIND_ADDR": "127.0.0.1",
                                                                 "MEM_MB": str(mem_mb)})
        client = None
        restored_pid: int | None = None
        try:
            _wait(lambda: "listening" in server_log.read_text())
            client = subprocess.Popen([*enter, str(BIN / "tcpclient"), "127.0.0.1", "7000"], stdout=cout,
                                      stderr=subprocess.STDOUT, env={"INTERVAL_MS": "10", "REPLY_TIMEOUT_MS": "60000"})
            _wait(lambda: _answers(client_log) >= 20)
            started = time.monotonic()
            subprocess.run([*enter, criu, "dump", "-t", str(server.pid), "-D", str(images), "-o", "dump.log",
                            *CRIU_OPTIONS], check=True, capture_output=True)
            dumped = time.monotonic()
            server.wait(timeout=30)  # CRIU ended it after the dump
            pidfile = work / "restored.pid"
            pidfile.unlink(missing_ok=True)  # CRIU refuses to write over the last rep's
            restore = subprocess.run([*enter, criu, "restore", "-D", str(images), "-o", "restore.log", "-d",
                                      "--pidfile", str(pidfile), *CRIU_OPTIONS], capture_output=True)
            if restore.returncode != 0:
                tail = (images / "restore.log").read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError("CRIU restore failed:\n" + "\n".join(tail))
            restored = time.monotonic()
            restored_pid = int(pidfile.read_text())
            seen = _answers(client_log)
            _wait(lambda: _answers(client_log) >= seen + 20)
            return Floor(dumped - started, restored - dumped, _gap(client_log))
        finally:
            for pid in (restored_pid, server.pid):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
            with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
                server.wait(timeout=10)
            if client is not None:
                client.kill()
                client.wait(timeout=10)
            shutil.rmtree(images, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512], metavar="MiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-criu-floor-", dir="/var/tmp") as tmp:
        for size in args.sizes:
            floor = one(size, Path(tmp))
            print(f"{size} MiB: CRIU dump {floor.dump_s:.2f} s, restore {floor.restore_s:.2f} s, "
                  f"client gap {floor.client_gap_s:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
