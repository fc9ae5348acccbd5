"""Live migration between two nodes (`node up --fabric`): the client's largest gap, direct eager.

A tcpserver holding MEM_MB of touched memory runs in a pod of node A (tcp-established +
stop-after); a tcpclient outside both nodes (the fabric's router namespace) sends a request
every 10 ms on one connection; `criu-shim migrate` moves the server into a prepared pod of
node B. Reported per size: the largest gap between two answers the client saw, and the
migration's own split (checkpoint, transfer + restore, the pause it measured).

    sudo .venv/bin/python bench/migrate.py --sizes 64 512 --reps 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.node.fabric_pods import (  # noqa: E402
    FABRIC,
    TCP,
    Host,
    client_on_router,
    distinct_dirs,
    largest_gap,
    pod_ip,
    seqs,
    up,
)
from tests.node.pods import wait_for  # noqa: E402


def one(a: Host, b: Host, mem_mb: int, log: Path) -> tuple[float, str]:
    with a.cri.pod(TCP) as pod_a, b.cri.pod(TCP) as pod_b:
        ip = pod_ip(a, pod_a)
        server = a.cri.container(pod_a, ["/usr/local/bin/tcpserver"],
                                 {"PORT": "7000", "BIND_ADDR": ip, "MEM_MB": str(mem_mb)}, name="server")
        with client_on_router(ip, log, interval_ms=10):
            wait_for(lambda: len(seqs(log.read_text())) >= 20, timeout=60)
            out = a.migrate(server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", pod_b.id).stdout
            last = seqs(log.read_text())[-1][1]
            wait_for(lambda: seqs(log.read_text())[-1][1] >= last + 20, timeout=120)
        text = log.read_text()
        assert text.count("connected ") == 1 and "error" not in text, text[-1000:]
        return largest_gap(text), out.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512], metavar="MiB")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as tmp:
        made = iter(range(100))
        dirs = distinct_dirs(lambda name: Path(tmp) / f"{name}{next(made)}")
        hosts: list[Host] = []
        try:
            hosts = [up(d, Path(tmp) / "logs") for d in dirs]
            for size in args.sizes:
                gaps = []
                for rep in range(args.reps):
                    gap, split = one(hosts[0], hosts[1], size, Path(tmp) / f"client-{size}-{rep}.log")
                    gaps.append(gap)
                    print(f"{size} MiB rep {rep}: client gap {gap:.2f} s; {split}", flush=True)
                print(f"{size} MiB: median client gap {statistics.median(gaps):.2f} s", flush=True)
        finally:
            for host in hosts:
                host.cri.close()
            for d in dirs:
                subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(d), "--purge"],
                               capture_output=True, cwd=HERE.parent)
    assert not Path(f"/run/netns/csr-{FABRIC}").exists()
    return 0


if __name__ == "__main__":
    sys.exit(main())
