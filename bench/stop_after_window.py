"""The stop-after window: from CRIU's gate opening (CRIU ends the container) to the archive's rename.

A counter holding MEM_MB of memory in a stop-after pod, checkpointed through a criu-shim proxy of
each source tree in turn (rep by rep, interleaved, on one node); the window is read from the
proxy's log line `stop-after archive complete N s after CRIU's gate opened (...)`. Compare a tree
of an older commit (`git archive REV | tar -x -C DIR`, plus shim/api and build/ from this one)
with this one; `--fsync` turns on `checkpoint.fsync` (the bulk fsync lands before the gate now).

    sudo flock /tmp/criu-shim-node.lock .venv/bin/python bench/stop_after_window.py --tree before=/tmp/old \
        --tree after=. --sizes 64 512 --reps 3 [--fsync]
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shim.paths_env import load_paths  # noqa: E402
from tests.node.conftest import Node, node_down, node_up  # noqa: E402
from tests.node.pods import Cri, wait_for  # noqa: E402

LINE = re.compile(r"stop-after archive complete ([0-9.]+) s after CRIU's gate opened(.*)")


def proxy(name: str, tree: str, node: Node, work: Path, fsync: bool) -> tuple[subprocess.Popen[bytes], Path, Path]:
    sock, logf = work / f"{name}.sock", work / f"{name}.log"
    cfg = work / f"{name}.toml"
    cfg.write_text(f'state_dir = "{work}/state-{name}"\n[checkpoint]\ncriu = "{load_paths()["CRIU_BIN"]}"\n'
                   f'audit_log = "{work}/audit.log"\n' + ("fsync = true\n" if fsync else ""))
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    p = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--listen", f"unix://{sock}",
                          "--runtime-endpoint", node.containerd, "--config", str(cfg)], cwd=tree, env=env,
                         stderr=open(logf, "ab"))  # noqa: SIM115 - the proxy's own log, closed with it
    wait_for(sock.exists, 20)
    return p, sock, logf


def _counting(direct: Cri, ctr: str) -> bool:
    return direct.count(ctr) >= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=DIR of a criu-shim source tree")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fsync", action="store_true")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    base = Path(tempfile.mkdtemp(prefix="stop-after-window-", dir="/var/tmp"))
    node = node_up(base / "node")
    procs = {}
    try:
        direct = Cri(node.containerd, base / "pod-logs")
        procs = {name: proxy(name, tree, node, base, args.fsync) for name, tree in trees.items()}
        results: dict[tuple[str, int], list[float]] = {}
        for size in args.sizes:
            for rep in range(args.reps):
                for name, (_, sock, logf) in procs.items():
                    seen = len(LINE.findall(logf.read_text(errors="replace")))
                    with direct.pod({"checkpoint.criu-shim.io/stop-after": "true"}) as pod:
                        ctr = direct.container(pod, ["/usr/local/bin/counter"], {"MEM_MB": str(size)})
                        wait_for(functools.partial(_counting, direct, ctr), timeout=120)
                        client = Cri(f"unix://{sock}", base / "client-logs")
                        out = base / f"{name}-{size}-{rep}.tar"
                        started = time.monotonic()
                        client.checkpoint(ctr, str(out), timeout=300)
                        took = time.monotonic() - started
                        client.close()
                        found = LINE.findall(logf.read_text(errors="replace"))
                        window, detail = (float(found[seen][0]), found[seen][1].strip()) if len(found) > seen \
                            else (float("nan"), "")
                        results.setdefault((name, size), []).append(window)
                        print(f"{name:6} {size:4} MiB rep {rep}: window {window:.3f} s, checkpoint {took:.2f} s, "
                              f"load {os.getloadavg()[0]:.2f} {detail}", flush=True)
                        out.unlink()
        for (name, size), values in sorted(results.items()):
            print(f"{name} {size} MiB{' fsync' if args.fsync else ''}: windows {' '.join(f'{v:.3f}' for v in values)} s")
        direct.close()
    finally:
        for p, _, _ in procs.values():
            p.terminate()
            p.wait(20)
        node_down(base / "node")


if __name__ == "__main__":
    main()
