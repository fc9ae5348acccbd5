"""Real applications: checkpoint and restore time per app, next to the CRIU floor.

The apps and clients of tests/node/test_apps.py (Debian's Redis 7.0 with 200,000 keys, nginx
1.22 with one keep-alive connection, PostgreSQL 15 with 200,000 rows where non-root processes
can be dumped). For each app and rep, alternately lazy and eager:

  checkpoint  CRI CheckpointContainer through criu-shim (tcp-established + stop-after), with the
              client's connection open and the data loaded
  restore     CreateContainer + StartContainer of the archive in a new pod (the old pod deleted)
  answer      from the start of the checkpoint to the client's first answer on its old
              connection after the restore (what the client sees, pod removal included)
  floor       the same app and data in another pod, no connection open, checkpointed by
              containerd 1.7's task Checkpoint (`runc checkpoint --leave-running`): CRIU alone,
              no freeze of ours, no archive
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the clients and pods of the node tests

from checkpoint import floor_checkpoint  # noqa: E402  (bench/checkpoint.py)

from tests.node.app_clients import (  # noqa: E402
    EAGER,
    MIGRATE,
    NGINX,
    NON_ROOT_DUMPS,
    POSTGRES,
    REDIS,
    App,
    Http,
    Postgres,
    Redis,
    import_app_images,
    pod_ip,
    port_open,
    restore,
    run_as,
    start,
)
from tests.node.pods import Cri, wait_for  # noqa: E402


@dataclass
class Workload:
    """An app, how to start it, load it and ask it something that proves its state."""
    app: App
    args: list[str]
    uid: int
    connect: Callable[[str], object]
    load: Callable[[object], None]
    probe: Callable[[object], object]  # the same answer before and after a move


def redis_load(c: object) -> None:
    assert isinstance(c, Redis)
    c.call("DEBUG", "POPULATE", 200_000, "key", 64)


def nginx_probe(c: object) -> object:
    assert isinstance(c, Http)
    return hashlib.sha256(c.get("/blob.bin")[0]).hexdigest()


def pg_load(c: object) -> None:
    assert isinstance(c, Postgres)
    c.run("CREATE TABLE items (id int PRIMARY KEY, payload text NOT NULL)")
    c.run("INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 200000) g")


def pg_probe(c: object) -> object:
    assert isinstance(c, Postgres)
    return c.one("SELECT pg_backend_pid(), count(*), md5(string_agg(payload, ',' ORDER BY id)) FROM items")


def workloads() -> list[Workload]:
    nginx_user = "www-data" if NON_ROOT_DUMPS else "root"
    found = [
        Workload(REDIS, [], run_as(REDIS), Redis, redis_load, lambda c: c.call("DEBUG", "DIGEST")),  # type: ignore[attr-defined]
        Workload(NGINX, ["-g", f"daemon off; user {nginx_user};"], 0, Http, lambda c: None, nginx_probe),
    ]
    if NON_ROOT_DUMPS:  # PostgreSQL refuses root; other users' processes need CAP_SYS_RESOURCE to dump
        found.append(Workload(POSTGRES, [], POSTGRES.user, Postgres, pg_load, pg_probe))
    return found


def connect(w: Workload, client: Cri, ctr: str, ip: str) -> object:
    deadline = time.monotonic() + 60
    while True:
        assert client.state(ctr) == "CONTAINER_RUNNING", client.log(ctr)
        if port_open(ip, w.app.port):
            try:
                return w.connect(ip)
            except Exception:  # PostgreSQL: "the database system is starting up"
                if time.monotonic() > deadline:
                    raise
        assert time.monotonic() < deadline, f"{w.app.name} did not start"
        time.sleep(0.1)


@dataclass
class Times:
    checkpoint: list[float] = field(default_factory=list)
    dump: list[float] = field(default_factory=list)  # runc/CRIU's dump inside our checkpoint (audit log)
    restore: dict[str, list[float]] = field(default_factory=lambda: {"lazy": [], "eager": []})
    answer: dict[str, list[float]] = field(default_factory=lambda: {"lazy": [], "eager": []})
    floor: list[float] = field(default_factory=list)
    archive: int = 0


def move_once(w: Workload, client: Cri, archive: Path, mode: str, times: Times, audit: Path) -> None:
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(contextlib.ExitStack())
        pod_a = source.enter_context(client.pod(MIGRATE))
        ip = pod_ip(client, pod_a)
        ctr = start(client, pod_a, w.app, w.args, uid=w.uid)
        conn = connect(w, client, ctr, ip)
        stack.callback(conn.close)  # type: ignore[attr-defined]
        w.load(conn)
        expected = w.probe(conn)
        began = time.perf_counter()
        client.checkpoint(str(ctr), str(archive), timeout=600)
        times.checkpoint.append(time.perf_counter() - began)
        times.dump.append(json.loads(audit.read_text().splitlines()[-1])["dump_s"])
        times.archive = archive.stat().st_size
        wait_for(lambda: client.state(ctr) == "CONTAINER_EXITED")
        source.close()
        pod_b = stack.enter_context(client.pod(MIGRATE | (EAGER if mode == "eager" else {})))
        restoring = time.perf_counter()
        restore(client, pod_b, str(archive), w.app.name, w.uid)
        times.restore[mode].append(time.perf_counter() - restoring)
        assert w.probe(conn) == expected, f"{w.app.name}: state differs after the restore"
        times.answer[mode].append(time.perf_counter() - began)
        archive.unlink()


def floor_once(w: Workload, client: Cri, containerd: Path, work: Path, times: Times, reps: int) -> None:
    with client.pod() as pod:
        ip = pod_ip(client, pod)
        ctr = start(client, pod, w.app, w.args, uid=w.uid)
        conn = connect(w, client, ctr, ip)
        w.load(conn)
        conn.close()  # type: ignore[attr-defined]
        for rep in range(reps):
            out = work / f"floor-{w.app.name}-{rep}"
            out.mkdir()
            began = time.perf_counter()
            floor_checkpoint(containerd, ctr, out)
            times.floor.append(time.perf_counter() - began)
            shutil.rmtree(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2, help="moves per app and mode (median shown)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-bench-apps"))
    args = parser.parse_args()
    out = subprocess.run([sys.executable, "-m", "shim", "node", "up", "--dir", str(args.dir)], check=True,
                         capture_output=True, text=True).stdout
    endpoints = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    work = Path(tempfile.mkdtemp(prefix="criu-shim-bench-apps-", dir="/var/tmp"))
    import_app_images(endpoints["CONTAINERD_ENDPOINT"])
    client = Cri(endpoints["CRI_ENDPOINT"], work / "logs")
    results: dict[str, Times] = {}
    try:
        for w in workloads():
            times = results[w.app.name] = Times()
            for rep in range(args.reps):
                for mode in ("lazy", "eager"):
                    move_once(w, client, args.dir.resolve() / "checkpoints" / f"{w.app.name}-{rep}.tar", mode, times,
                              args.dir.resolve() / "logs" / "audit.log")
            floor_once(w, client, Path(endpoints["CONTAINERD_ENDPOINT"].removeprefix("unix://")), work, times,
                       args.reps)
    finally:
        client.close()
        subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(args.dir), "--purge"],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    report(results, args.reps)
    return 0


def report(results: dict[str, Times], reps: int) -> None:
    med = statistics.median
    print(f"{'app':>9} {'checkpoint':>10} {'its dump':>8} {'floor':>7} {'ckpt/floor':>10} {'restore lazy':>12} "
          f"{'restore eager':>13} {'answer lazy':>11} {'answer eager':>12} {'archive':>8}")
    for name, t in results.items():
        c, f = med(t.checkpoint), med(t.floor)
        print(f"{name:>9} {c:>9.3f}s {med(t.dump):>7.3f}s {f:>6.3f}s {c / f:>9.2f}x {med(t.restore['lazy']):>11.3f}s "
              f"{med(t.restore['eager']):>12.3f}s {med(t.answer['lazy']):>10.3f}s {med(t.answer['eager']):>11.3f}s "
              f"{t.archive / 2**20:>6.1f}Mi")
    users = "own users" if NON_ROOT_DUMPS else "root (no CAP_SYS_RESOURCE here: PostgreSQL left out)"
    print(f"(median of {reps} moves per app and mode and {reps} floor checkpoints; apps run as {users})")


if __name__ == "__main__":
    sys.exit(main())
