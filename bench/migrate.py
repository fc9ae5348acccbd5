"""Live migration between two nodes (`node up --fabric`): the client's largest gap, eager, lazy and registry.

A tcpserver holding MEM_MB of touched memory runs in a pod of node A (tcp-established +
stop-after); a tcpclient outside both nodes (the fabric's router namespace) sends a request
every 10 ms on one connection; `criu-shim migrate` moves the server into a prepared pod of
node B, direct eager (the whole checkpoint crosses, then the restore) or direct lazy (the
target restores at once, the memory follows from the source's page server) or through the
fabric's registry (the checkpoint pushed as an image, the target's containerd pulls it: docker-registry
in the router's namespace, HTTPS, on the same fabric links). The modes are
interleaved rep by rep on the same two hosts. Reported per size and mode: the largest gap
between two answers the client saw (median and worst), and the migration's own split; next to
it, in the same run and interleaved, the CRIU floor: the same server dumped and restored by hand
on one machine (bench/criu_floor.py), CRIU's dump + restore time and its client's gap, and the
link's own rate from node A to node B, plain TCP and inside the nodes' TLS (bench/link_rate.py):
what the lazy fill's memory rate is to be compared with.

    sudo flock /tmp/criu-shim-node.lock .venv/bin/python bench/migrate.py --sizes 64 512 --reps 3
    # the target's packet hold against claiming after the restore, interleaved:
    sudo flock /tmp/criu-shim-node.lock .venv/bin/python bench/migrate.py --modes lazy --holds on off --no-floor
    # lazy: the target's create from the checkpoint's first part against its create after the dump:
    sudo flock /tmp/criu-shim-node.lock .venv/bin/python bench/migrate.py --modes lazy --first-parts on off
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.criu_floor import one as criu_floor  # noqa: E402
from bench.link_rate import measure as link_rate  # noqa: E402
from shim.api.cri.v1 import api_pb2 as cri  # noqa: E402
from shim.api.cri.v1 import api_pb2_grpc  # noqa: E402
from shim.node import fabric, fabric_registry  # noqa: E402
from tests.node.fabric_pods import (  # noqa: E402
    FABRIC,
    TCP,
    Host,
    client_on_router,
    distinct_dirs,
    largest_gap,
    page_daemon,
    pod_ip,
    seqs,
    up,
)
from tests.node.pods import wait_for  # noqa: E402

PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")
LAZY_PIPE = 4 << 20  # CRIU's lazy page server pipe, over the default without CAP_SYS_RESOURCE (shim.migrate.lazy)


def one(a: Host, b: Host, mem_mb: int, mode: str, log: Path, daemon: str = "criu-shim",
        flags: tuple[str, ...] = ()) -> tuple[float, str]:
    with page_daemon(b, daemon), a.cri.pod(TCP) as pod_a, b.cri.pod(TCP) as pod_b:
        ip = pod_ip(a, pod_a)
        server = a.cri.container(pod_a, ["/usr/local/bin/tcpserver"],
                                 {"PORT": "7000", "BIND_ADDR": ip, "MEM_MB": str(mem_mb)}, name="server")
        # a registry migration of gigabytes pauses longer than the client's usual 60 s patience
        with client_on_router(ip, log, interval_ms=10, reply_timeout_ms=600_000):
            wait_for(lambda: len(seqs(log.read_text())) >= 20, timeout=120)
            image = ["--image", f"{fabric.REGISTRY_HOST}/bench/server"] if mode == "registry" else []
            out = a.migrate(server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", pod_b.id, "--mode", mode,
                            *image, *flags).stdout
            last = seqs(log.read_text())[-1][1]
            wait_for(lambda: seqs(log.read_text())[-1][1] >= last + 20, timeout=300)  # TCP's backoff after a long pause
        text = log.read_text()
        assert text.count("connected ") == 1 and "error" not in text, text[-1000:]
        if mode == "registry":  # node B's pulled checkpoint images (content and snapshot) would fill its disk
            remove_pulled(b)
        return largest_gap(text), " | ".join(out.strip().splitlines()[1:]) + client_stages(out, text)


def remove_pulled(host: Host) -> None:
    images = api_pb2_grpc.ImageServiceStub(host.cri.channel)
    for image in images.ListImages(cri.ListImagesRequest(), timeout=30).images:
        if any(d.startswith(fabric.REGISTRY_HOST + "/") for d in image.repo_digests):
            images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image.id)), timeout=60)


def client_stages(out: str, log: str) -> str:
    """The client's side of the pause on the stages' clock: its last answer before the largest gap
    and its first after it, in seconds from the dump's start (`migrate` prints its wall-clock time)."""
    found = re.search(r"stages \(s from the dump's start, ([\d.]+)\)", out)
    times = [t for t, _ in seqs(log)]
    if not found or len(times) < 2:
        return ""
    start = float(found.group(1))
    before, after = max(zip(times, times[1:], strict=False), key=lambda ab: ab[1] - ab[0])
    return f"; client: last answer {before - start:+.3f}, first answer after {after - start:.3f}"


def fill_rate(split: str) -> float | None:
    """The lazy fill's MB/s from migrate's line `memory ... served lazily in S s after the restore (R MB/s)`."""
    for part in split.split(" | "):
        if "served lazily" in part and "(" in part:
            return float(part.split("(", 1)[1].split(" MB/s", 1)[0])
    return None


def runs(modes: list[str], daemons: list[str], holds: list[str], first_parts: list[str] | None = None,
         ) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(label, mode, node B's page daemon, migrate's flags) of each migration a rep makes: lazy once per page
    daemon and per first-part setting (`--no-first-part`: the target creates after the dump), eager and lazy
    once per hold setting (`migrate --no-hold`: the target claims after the restore)."""
    first_parts = first_parts or ["on"]
    return [((f"lazy, {d} daemon" if mode == "lazy" and len(daemons) > 1 else mode)
             + (f", {'hold' if h == 'on' else 'no hold'}" if len(holds) > 1 and mode != "registry" else "")
             + (f", {'first part' if f == 'on' else 'created after the dump'}" if len(first_parts) > 1
                and mode == "lazy" else ""),
             mode, d, (*([] if h == "on" else ["--no-hold"]), *([] if f == "on" else ["--no-first-part"])))
            for mode in modes for d in (daemons if mode == "lazy" else ["criu-shim"])
            for h in (holds if mode != "registry" else ["on"])
            for f in (first_parts if mode == "lazy" else ["on"])]


def link(a: Host, b: Host, mib: int) -> tuple[float, float]:
    """The fabric's rate from node A to node B (MB/s): plain TCP, then inside the nodes' TLS."""
    enter = [["nsenter", f"--net=/run/netns/{h.env['NODE_NETNS']}", "--"] for h in (a, b)]
    host = b.env["MIGRATE_ADDRESS"].rpartition(":")[0]
    tls = {k: b.env[k] for k in ("MIGRATE_CERT", "MIGRATE_KEY", "MIGRATE_CA")}
    return link_rate(enter[0], enter[1], host, mib, None), link_rate(enter[0], enter[1], host, mib, tls)


def pause(split: str) -> float | None:
    """migrate's own pause (`...; pause S s`): the source's lock to the target's answer."""
    found = re.search(r"pause ([\d.]+) s", split)
    return float(found.group(1)) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512], metavar="MiB")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=("eager", "lazy", "registry"),
                        default=["eager", "lazy", "registry"])
    parser.add_argument("--target-containerd", default="1.7", metavar="VERSION",
                        help="node B's containerd (node A runs 1.7): 1.7 or 2.4 (default %(default)s)")
    parser.add_argument("--no-floor", action="store_true", help="skip the CRIU floor (dump + restore by hand)")
    parser.add_argument("--no-link", action="store_true",
                        help="skip the link's own rate (the size's MiB from node A to B, TCP and TLS)")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR",
                        help="copy both nodes' logs (proxy, relays, containerd, receiver) to DIR before they go")
    parser.add_argument("--page-daemons", nargs="+", choices=("criu-shim", "criu"), default=["criu-shim"],
                        help="node B's page daemon for lazy mode ([restore] page_daemon), each interleaved: "
                             "criu-shim's own or CRIU's criu lazy-pages (default %(default)s)")
    parser.add_argument("--first-parts", nargs="+", choices=("on", "off"), default=["on"],
                        help="lazy: the target creates the container from the checkpoint's first part before "
                             "anything stops (on, the default) or after the dump (off: `migrate --no-first-part`), "
                             "each interleaved")
    parser.add_argument("--holds", nargs="+", choices=("on", "off"), default=["on"],
                        help="eager/lazy: the target holds the peers' packets from the switch-over (on, the "
                             "default) or claims the pod IP after the restore (off: `migrate --no-hold`), each "
                             "interleaved")
    args = parser.parse_args()
    pipe_before = PIPE_MAX_SIZE.read_text()
    if "lazy" in args.modes and int(pipe_before) < LAZY_PIPE:
        PIPE_MAX_SIZE.write_text(str(LAZY_PIPE))
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as tmp:
        made = iter(range(100))
        dirs = distinct_dirs(lambda name: Path(tmp) / f"{name}{next(made)}")
        hosts: list[Host] = []
        try:
            hosts = [up(dirs[0], Path(tmp) / "logs"), up(dirs[1], Path(tmp) / "logs", args.target_containerd)]
            if "registry" in args.modes:  # migrate's push trusts the registry's certificate (the fabric's CA)
                fabric_registry.start(fabric.Fabric(FABRIC), Path(tmp) / "registry")
                os.environ.update(fabric_registry.client_env(fabric.Fabric(FABRIC)))
            table = []
            for size in args.sizes:
                plan = runs(args.modes, args.page_daemons, args.holds, args.first_parts)
                gaps: dict[str, list[float]] = {label: [] for label, _, _, _ in plan}
                pauses: dict[str, list[float]] = {label: [] for label in gaps}
                fills: dict[str, list[float]] = {label: [] for label in gaps}
                floors: list[tuple[float, float]] = []  # (dump + restore, client gap)
                links: list[tuple[float, float]] = []  # MB/s (TCP, TLS)
                for rep in range(args.reps):
                    if not args.no_floor:
                        floor = criu_floor(size, Path(tmp))
                        floors.append((floor.dump_s + floor.restore_s, floor.client_gap_s))
                        print(f"{size} MiB CRIU floor rep {rep}: dump {floor.dump_s:.3f} s + restore "
                              f"{floor.restore_s:.3f} s; client gap {floor.client_gap_s:.3f} s", flush=True)
                    if not args.no_link:
                        links.append(link(hosts[0], hosts[1], size))
                        print(f"{size} MiB link A -> B rep {rep}: TCP {links[-1][0]:.0f} MB/s, TLS "
                              f"{links[-1][1]:.0f} MB/s", flush=True)
                    # interleaved: a drift of the machine hits every mode alike
                    for label, mode, daemon, flags in plan:
                        gap, split = one(hosts[0], hosts[1], size, mode,
                                         Path(tmp) / f"client-{size}-{mode}-{daemon}{''.join(flags)}-{rep}.log", daemon,
                                         flags)
                        gaps[label].append(gap)
                        if (paused := pause(split)) is not None:
                            pauses[label].append(paused)
                        if (rate := fill_rate(split)) is not None:
                            fills[label].append(rate)
                        print(f"{size} MiB {label} rep {rep}: client gap {gap:.3f} s; {split}", flush=True)
                for label, values in gaps.items():
                    fill = f"{statistics.median(fills[label]):.0f} MB/s" if fills[label] else "-"
                    middle = f"{statistics.median(pauses[label]):.2f} s" if pauses[label] else "-"
                    table.append(f"| {size} MiB | {label} | {statistics.median(values):.2f} s | {max(values):.2f} s "
                                 f"| {middle} | {fill} |")
                if floors:
                    table.append(f"| {size} MiB | CRIU floor: dump + restore by hand, "
                                 f"{statistics.median(f for f, _ in floors):.2f} s | "
                                 f"{statistics.median(g for _, g in floors):.2f} s | {max(g for _, g in floors):.2f} s "
                                 "| - | - |")
                if links:
                    table.append(f"| {size} MiB | the link A -> B (Python ends, blocking sockets): TCP / TLS | - | - "
                                 f"| - | {statistics.median(t for t, _ in links):.0f} / "
                                 f"{statistics.median(t for _, t in links):.0f} MB/s |")
            print("| memory | mode | client gap, median | worst | pause, median | lazy fill, median |\n"
                  "|---|---|---|---|---|---|\n"
                  + "\n".join(table), flush=True)
            print(f"load average: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
        finally:
            PIPE_MAX_SIZE.write_text(pipe_before)
            fabric_registry.stop(fabric.Fabric(FABRIC), Path(tmp) / "registry")  # before the fabric goes
            for host in hosts:
                host.cri.close()
            for d in dirs:
                if args.keep_logs is not None and (d / "logs").is_dir():
                    shutil.copytree(d / "logs", args.keep_logs / d.name, dirs_exist_ok=True)
                subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(d), "--purge"],
                               capture_output=True, cwd=HERE.parent)
    assert not Path(f"/run/netns/csr-{FABRIC}").exists()
    return 0


if __name__ == "__main__":
    sys.exit(main())
