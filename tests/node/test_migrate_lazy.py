"""Lazy (post-copy) live migration between two fabric hosts: `criu-shim migrate --mode lazy`.

The source's runc dumps everything but the lazy memory; the target restores at once and its page
daemon pulls the memory from the source's CRIU page server through a mutual-TLS tunnel. Checked
with real containerd, runc, CRIU and CNI on both hosts: memory arrives whole (the counter checks a
pattern in every page on every tick and exits 70 on a wrong one), a TCP client keeps its
connection, a source that dies mid-fill ends the target's task, refusals stop nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.checkpoint.netlock import TABLE
from shim.handoff import LAZY_WORK, RESTORE_DIR
from shim.node import procs
from tests.node.fabric_pods import (
    FABRIC,
    PIPE_MAX_SIZE,
    REPO,
    STOP_AFTER,
    TCP,
    Host,
    client_on_router,
    fabric_hosts,
    largest_gap,
    page_daemon,
    pipe_max_size,
    pod_ip,
    router_routes,
    seqs,
    slow_link,
)
from tests.node.pods import Pod, wait_for

pytestmark = pytest.mark.node


# Node B on containerd 1.7, then on 2.4 (its restore goes through criu-shim's handler the same way).
@pytest.fixture(scope="module", params=["1.7", "2.4"], ids=["1.7-to-1.7", "1.7-to-2.4"])
def hosts(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[tuple[Host, Host]]:
    with fabric_hosts(tmp_path_factory, ["1.7", request.param]) as up, pipe_max_size(4 << 20):
        yield up[0], up[1]


def _exit_status(host: Host, ctr: str) -> int:
    status = host.cri.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr), timeout=30).status
    return int(status.exit_code)


def _no_lazy_leftovers(host: Host) -> None:
    """No page daemon, runc dump or tunnel of a migration is left on the host, and no staging dir."""
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [p for p in procs.splitlines() if "lazy-pages" in p and host.env["CHECKPOINTS_DIR"] in p], procs
    assert not [n for n in host.archives() if n.endswith((".lazy", ".page-server", ".part"))], host.archives()


def _page_daemon_log(host: Host, ctr: str) -> str:
    """The restored container's page daemon log (its restore's work dir, kept while the container is)."""
    status = host.cri.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr), timeout=30).status
    return (Path(status.annotations[RESTORE_DIR]) / LAZY_WORK / "lazy-pages.log").read_text(errors="replace")


# The target's page daemon: criu-shim's own (the default: it asks the source's page server itself,
# pipelined) and CRIU's `criu lazy-pages --page-server` ([restore] page_daemon = "criu").
@pytest.mark.parametrize("daemon", ["criu-shim", "criu"])
def test_lazy_migration_moves_memory_whole_and_ends_the_source(hosts: tuple[Host, Host], daemon: str) -> None:
    a, b = hosts
    with (page_daemon(b, daemon),
          a.cri.pod(STOP_AFTER) as source_pod, b.cri.pod() as target_pod):
        ctr = a.cri.container(source_pod, ["/usr/local/bin/counter"], {"INTERVAL_MS": "50", "MEM_MB": "128"},
                              name="counter")
        wait_for(lambda: a.cri.count(ctr) >= 20, timeout=60)
        page_port = 7549  # our daemon dials the source at the port asked for (firewalls), in node A's netns
        out = a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", "lazy",
                        "--page-port", str(page_port)).stdout
        assert "migrated to container" in out and "served lazily" in out, out
        served = float(re.search(r"memory ([\d.]+) MiB served lazily", out).group(1))  # type: ignore[union-attr]
        assert served >= 100, out  # the 128 MiB crossed as pages, not in the archive
        assert float(re.search(r"archive ([\d.]+) MiB", out).group(1)) < 32, out  # type: ignore[union-attr]
        assert a.cri.state(ctr) == "CONTAINER_EXITED"  # CRIU ended it once every page was served
        moved = b.container_in(target_pod)
        first = b.cri.count(moved)
        assert first >= 20, "the count restarted instead of resuming"
        wait_for(lambda: b.cri.count(moved) > first + 10, timeout=60)  # each tick checks every page
        assert b.cri.state(moved) == "CONTAINER_RUNNING", b.cri.log(moved)[-500:]
        daemon_log = _page_daemon_log(b, moved)
        if daemon == "criu-shim":  # ours asked the source itself, at the port asked for, and had it all
            assert "memory in place" in daemon_log and "from the source node" in daemon_log, daemon_log[-2000:]
            assert f":{page_port} (TLS, pinned)" in daemon_log, daemon_log[-2000:]
        else:  # CRIU's own (its log at -v2 may be empty; ours always says it was ready)
            assert "page-daemon:" not in daemon_log, daemon_log[-2000:]
        assert not list(Path(a.env["CHECKPOINTS_DIR"]).glob("migrate-*")), "the source keeps nothing"
        assert not list(Path(b.env["CHECKPOINTS_DIR"]).glob("migrate-*")), "a memoryless archive is not kept"
        _no_lazy_leftovers(a)
        _no_lazy_leftovers(b)


def test_lazy_migration_keeps_the_tcp_client_connection(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = hosts
    log = tmp_path / "client.log"
    with a.cri.pod(TCP) as source_pod, b.cri.pod(TCP) as target_pod:
        ip = pod_ip(a, source_pod)
        server = a.cri.container(source_pod, ["/usr/local/bin/tcpserver"],
                                 {"PORT": "7000", "BIND_ADDR": ip, "MEM_MB": "64"}, name="server")
        with client_on_router(ip, log, interval_ms=10) as client:
            wait_for(lambda: len(seqs(log.read_text())) >= 20, timeout=60)
            out = a.migrate(server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id,
                            "--mode", "lazy").stdout
            assert f"pod IPs {ip} now routed" in out and f"{ip} via {b.env['HOST_IP']}" in router_routes()
            last = seqs(log.read_text())[-1][1]
            wait_for(lambda: seqs(log.read_text())[-1][1] >= last + 20, timeout=60)
            assert client.poll() is None
        text = log.read_text()
        assert text.count("connected ") == 1 and "error" not in text and "reconnect" not in text, text[-1000:]
        assert a.cri.state(server) == "CONTAINER_EXITED"
        assert b.cri.state(b.container_in(target_pod)) == "CONTAINER_RUNNING"
        print(f"lazy, 64 MiB: the client's largest gap {largest_gap(text):.3f} s\n{out}")


def _pod_nft_tables(host: Host, pod_id: str) -> str:
    """`nft list tables` in the pod's network namespace (its path from the runtime spec)."""
    reply = host.cri.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True),
                                              timeout=30)
    spec = json.loads(reply.info["info"])["runtimeSpec"]
    netns = next(n["path"] for n in spec["linux"]["namespaces"] if n["type"] == "network")
    return subprocess.run(["nsenter", f"--net={netns}", "nft", "list", "tables"], capture_output=True,
                          text=True).stdout


# With tcp-established, our TCP lock is on the source pod while CRIU holds it: the dead migrate
# process's guard must remove it, or the source would run on with its connections locked.
@pytest.mark.parametrize("annotations", [STOP_AFTER, TCP], ids=["plain", "tcp-established"])
def test_the_source_killed_mid_fill_ends_the_target_task(hosts: tuple[Host, Host],
                                                         annotations: dict[str, str]) -> None:
    a, b = hosts
    with a.cri.pod(annotations) as source_pod, b.cri.pod(annotations) as target_pod:
        ctr = a.cri.container(source_pod, ["/usr/local/bin/counter"], {"INTERVAL_MS": "50", "MEM_MB": "256"},
                              name="counter")
        wait_for(lambda: a.cri.count(ctr) >= 5, timeout=60)
        with slow_link(b, "20mbit"):  # 256 MiB at 20 Mbit/s: about 100 s of fill to be cut into
            proc = subprocess.Popen(a.migrate_argv(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id,
                                                   "--mode", "lazy"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            try:
                wait_for(lambda: bool(b.containers()) and b.cri.state(b.containers()[0]) == "CONTAINER_RUNNING",
                         timeout=120)
                moved = b.containers()[0]
                proc.send_signal(signal.SIGKILL)  # the source's criu-shim dies mid-fill
                proc.communicate(timeout=30)
                # Its page stream is gone: the target's page daemon fails and the task is ended.
                wait_for(lambda: b.cri.state(moved) == "CONTAINER_EXITED", timeout=90)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        # Killed (137) before it could read a missing page: the counter checks every page on every
        # tick and exits 70 on one that is not its pattern (a zero page, were the daemon gone first).
        assert _exit_status(b, moved) == 137, b.cri.log(moved)[-500:]
        # The source: CRIU's page server lost its client, so the dump failed and CRIU let it run again.
        wait_for(lambda: a.cri.state(ctr) == "CONTAINER_RUNNING", timeout=60)
        wait_for(lambda: TABLE not in _pod_nft_tables(a, source_pod.id), timeout=30)
        count = a.cri.count(ctr)
        wait_for(lambda: a.cri.count(ctr) > count, timeout=30)
        # And it can be migrated again (the dead migration's staging dir is swept on the way).
        with b.cri.pod(annotations) as retry_pod:
            out = a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", retry_pod.id, "--mode", "lazy").stdout
            assert "served lazily" in out
            moved = b.container_in(retry_pod)
            assert b.cri.count(moved) >= count
    _no_lazy_leftovers(a)
    _no_lazy_leftovers(b)


def test_a_create_refused_on_the_target_stops_nothing_at_the_source(hosts: tuple[Host, Host]) -> None:
    """The target creates the container from the checkpoint's first part before anything stops at the source
    (shim.restore.second_part): refused there (the name is taken in the target pod), the migration ends
    before the switch-over; the source was never frozen nor locked, nothing moved, nothing was created."""
    a, b = hosts
    with a.cri.pod(STOP_AFTER) as source_pod, b.cri.pod() as target_pod:
        ctr = a.cri.container(source_pod, ["/usr/local/bin/counter"], {"INTERVAL_MS": "50", "MEM_MB": "32"},
                              name="counter")
        taken = b.cri.container(target_pod, ["/usr/local/bin/counter"], name="counter")  # the name is taken there
        wait_for(lambda: a.cri.count(ctr) >= 5, timeout=60)
        proc = a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", "lazy",
                         check=False)
        assert proc.returncode == 1, proc.stderr
        assert "the target node could not create the container from the checkpoint's first part" in proc.stderr
        assert "is reserved for" in proc.stderr, proc.stderr  # containerd's own words, passed on
        wait_for(lambda: not _dumping(a), timeout=60)  # CRIU, waiting in its hook, was told to give up
        count = a.cri.count(ctr)
        wait_for(lambda: a.cri.count(ctr) > count, timeout=30)
        assert a.cri.state(ctr) == "CONTAINER_RUNNING"
        assert TABLE not in _pod_nft_tables(a, source_pod.id)
        assert b.containers() == [taken]
    _no_lazy_leftovers(a)
    _no_lazy_leftovers(b)


def test_lazy_refusals_stop_nothing(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = hosts
    no_uffd = tmp_path / "criu"  # a CRIU new enough by version, without userfaultfd
    no_uffd.write_text("#!/bin/sh\ncase \"$1\" in --version) echo 'Version: 4.2.1';; "
                       "*) echo 'Error (criu/cr-check.c:1): UFFD is not supported'; exit 1;; esac\n")
    no_uffd.chmod(0o755)
    config = tmp_path / "no-uffd.toml"
    config.write_text(f'[checkpoint]\ncriu = "{no_uffd}"\n')
    e = b.env
    address = f"{e['HOST_IP']}:7545"
    receiver = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{e['NODE_NETNS']}", "--", sys.executable, "-m", "shim", "migrate-receiver",
         "--listen", address, "--runtime-endpoint", e["CRI_ENDPOINT"], "--config", str(config),
         "--checkpoints-dir", e["CHECKPOINTS_DIR"], "--address-hook", e["ADDRESS_HOOK"],
         "--cert", e["MIGRATE_CERT"], "--key", e["MIGRATE_KEY"], "--ca", e["MIGRATE_CA"]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        listening = ["nsenter", f"--net=/run/netns/{e['NODE_NETNS']}", "ss", "-Hltn", f"src {e['HOST_IP']}"]
        wait_for(lambda: ":7545" in subprocess.run(listening, capture_output=True, text=True).stdout)
        with a.cri.pod(STOP_AFTER) as pod, b.cri.pod() as target, _archives_unchanged(a, b):
            ctr = a.cri.container(pod, ["/usr/local/bin/counter"], name="counter")
            to = ["--to-pod", target.id, "--mode", "lazy"]
            cases = [
                (a.migrate_argv(ctr, "--to", address, *to), "cannot run a page daemon (UFFD is not supported)"),
                (a.migrate_argv(ctr, "--to", b.env["MIGRATE_ADDRESS"], *to, "--checkpoint", "/nonexistent.tar"),
                 "a lazy migration keeps none"),
                ([*a.migrate_argv(ctr, "--to", b.env["MIGRATE_ADDRESS"], *to), "--config", str(config)],
                 "this node's CRIU cannot serve lazy pages"),
                (a.migrate_argv(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target.id, "--mode", "later"),
                 "invalid choice: 'later'"),
            ]
            for argv, expected in cases:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
                assert proc.returncode != 0 and expected in proc.stderr, (argv[-6:], proc.stderr)
                assert a.cri.state(ctr) == "CONTAINER_RUNNING"
            before = PIPE_MAX_SIZE.read_text()
            PIPE_MAX_SIZE.write_text("1048576")  # the kernel's default, and no CAP_SYS_RESOURCE here
            try:
                proc = a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], *to, check=False)
            finally:
                PIPE_MAX_SIZE.write_text(before)
            assert proc.returncode != 0 and "sysctl -w fs.pipe-max-size=4194304" in proc.stderr, proc.stderr
            assert a.cri.state(ctr) == "CONTAINER_RUNNING"
            assert not b.containers(), "nothing was created on the target"
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)


@contextlib.contextmanager
def _archives_unchanged(a: Host, b: Host) -> Iterator[None]:
    before = (a.archives(), b.archives())
    yield
    assert (a.archives(), b.archives()) == before, "nothing was written on either node"


@pytest.mark.parametrize("fault", ["migrate-predump", "migrate-frozen"])
def test_migrate_killed_before_criu_goes_on_leaves_the_source_running_and_unlocked(hosts: tuple[Host, Host],
                                                                                 fault: str) -> None:
    """runc and CRIU start before the switch-over and wait in CRIU's pre-dump hook. `migrate` dying (SIGKILL)
    there (migrate-predump: before the switch-over, our lock and our freeze), or once it switched over,
    locked the pod's connections and froze the container (migrate-frozen), ends the hook's FIFO: CRIU
    fails the dump before it touched anything, and the guard left behind thaws the container and removes
    the lock once runc has ended; the receiver, its control connection gone, releases the addresses it
    claimed and removes what it created from the first part. The source counts on; a retry moves it."""
    a, b = hosts
    with a.cri.pod(TCP) as source_pod, b.cri.pod(TCP) as target_pod:
        ctr, ip = _counting(a, source_pod)
        argv = a.migrate_argv(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", "lazy")
        killed = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO,
                                env={**os.environ, "CRIU_SHIM_FAULT": fault})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        wait_for(lambda: not _dumping(a), timeout=60)  # CRIU read the end of its hook's FIFO and gave up
        wait_for(lambda: _freezer_state(a, ctr) == "THAWED", timeout=30)  # the guard thaws once runc has ended
        count = a.cri.count(ctr)
        wait_for(lambda: a.cri.count(ctr) > count, timeout=30)  # it counts on
        assert a.cri.state(ctr) == "CONTAINER_RUNNING"
        wait_for(lambda: TABLE not in _pod_nft_tables(a, source_pod.id), timeout=30)  # never came, or unlocked
        wait_for(lambda: not routed_to_target(ip, b), timeout=30)  # never moved, or let go by the receiver
        wait_for(lambda: b.containers() == [], timeout=30)  # the receiver removes what it created from the first part
        a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", "lazy")
        wait_for(lambda: len(b.containers()) == 1, timeout=60)
    _no_lazy_leftovers(a)
    _no_lazy_leftovers(b)


def _counts_on_at_the_source_then_moves(a: Host, b: Host, ctr: str, ip: str, source_pod: Pod, target_pod: Pod) -> None:
    """After a failed migration: the source counts on, unlocked, its IP routed to it; a retry moves it."""
    count = a.cri.count(ctr)
    wait_for(lambda: a.cri.count(ctr) > count, timeout=30)
    assert a.cri.state(ctr) == "CONTAINER_RUNNING"
    assert TABLE not in _pod_nft_tables(a, source_pod.id)
    assert not routed_to_target(ip, b), router_routes()
    a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", "lazy")
    wait_for(lambda: len(b.containers()) == 1, timeout=60)


def test_a_receiver_killed_after_the_first_part_leaves_no_container_once_back(hosts: tuple[Host, Host]) -> None:
    """The target's receiver dies (SIGKILL, fault point migrate-prepared) right after it created the container
    from the checkpoint's first part: the source, its answer gone, ends the dump before the switch-over (runs
    on, never frozen); the container stays CREATED until the next receiver, which removes it at its start."""
    a, b = hosts
    with a.cri.pod(TCP) as source_pod, b.cri.pod(TCP) as target_pod:
        ctr, ip = _counting(a, source_pod)
        receiver = procs.read_pid(b.layout.pid_dir / "receiver.pid")
        assert receiver is not None
        procs.stop(receiver)
        os.environ["CRIU_SHIM_FAULT"] = "migrate-prepared"
        try:
            b.start_receiver()
        finally:
            del os.environ["CRIU_SHIM_FAULT"]
        try:
            proc = a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", "lazy",
                             check=False)
            assert proc.returncode == 1, proc.stderr
            left = b.containers()
            assert len(left) == 1 and b.cri.state(left[0]) == "CONTAINER_CREATED", left
        finally:
            if not procs.alive(procs.read_pid(b.layout.pid_dir / "receiver.pid") or 0):
                b.start_receiver()
        wait_for(lambda: b.containers() == [], timeout=30)  # the new receiver's start-up sweep
        wait_for(lambda: not _dumping(a), timeout=60)
        _counts_on_at_the_source_then_moves(a, b, ctr, ip, source_pod, target_pod)
    _no_lazy_leftovers(a)
    _no_lazy_leftovers(b)


def test_the_targets_proxy_killed_before_the_second_part_leaves_nothing_once_back(hosts: tuple[Host, Host]) -> None:
    """The target's criu-shim dies (SIGKILL, fault point restore-second-part) in the restore's StartContainer,
    before it unpacks the second part: the source has dumped, so the migration fails there with nothing
    moved, and CRIU, its page stream reset, lets the source run on. The container created from the first part
    cannot be removed while the target's criu-shim is down; the receiver's sweep removes it once it is back."""
    from shim import faults
    from shim.node import fabric, local

    a, b = hosts
    enter = fabric.NodeHost(b.layout, fabric.Fabric(FABRIC)).enter()
    with a.cri.pod(TCP) as source_pod, b.cri.pod(TCP) as target_pod:
        ctr, ip = _counting(a, source_pod)
        proxy = procs.read_pid(b.layout.pid_dir / "proxy.pid")
        assert proxy is not None
        procs.stop(proxy)
        os.environ[faults.VARIABLE] = faults.Point.RESTORE_SECOND_PART.value
        try:
            local._start_proxy(b.layout, b.layout.proxy_config_file, enter)
        finally:
            del os.environ[faults.VARIABLE]
        try:
            proc = a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", "lazy",
                             check=False)
            assert proc.returncode == 1, proc.stderr
            assert "the target node could not restore it" in proc.stderr, proc.stderr
            assert f"nothing moved: the source container {ctr} is running again" in proc.stderr, proc.stderr
            dead = procs.read_pid(b.layout.pid_dir / "proxy.pid")
            assert dead is not None and not procs.alive(dead)  # it hit the point
        finally:
            local._start_proxy(b.layout, b.layout.proxy_config_file, enter)
        wait_for(lambda: b.containers() == [], timeout=45)  # the sweep, every claims interval (10 s)
        assert "created for a migration that ended before its restore" in \
            (b.layout.log_dir / "migrate-receiver.log").read_text(errors="replace")
        _counts_on_at_the_source_then_moves(a, b, ctr, ip, source_pod, target_pod)
    _no_lazy_leftovers(a)
    _no_lazy_leftovers(b)


# Speaks the migration protocol as a source would, then sends a hostile first part: argv host, pod, part (hex),
# size (JSON: what "prepare" says it is; "auto" for the part's own length).
_HOSTILE_FIRST_PART = """
import asyncio, json, sys
from pathlib import Path
from shim.migrate import channel
async def main():
    address, pod, cert, key, ca, part, size = sys.argv[1:]
    data = bytes.fromhex(part)
    reader, writer = await channel.connect(address, channel.Credentials(Path(cert), Path(key), Path(ca)), 10, 10)
    await channel.send(writer, {"protocol": channel.PROTOCOL, "op": "preflight", "pod": pod, "name": "intruder",
                                "addresses": [], "mode": "lazy"})
    ready = await channel.receive(reader)
    assert ready.get("prepare") is True, ready
    await channel.send(writer, {"op": "prepare", "size": len(data) if size == "auto" else json.loads(size)})
    writer.write(data)
    await writer.drain()
    print(json.dumps(await channel.receive(reader)))
asyncio.run(main())
"""


@pytest.mark.parametrize(("part", "size", "says"), [
    (b"not a tar archive at all" * 40, "auto", "INVALID_ARGUMENT"),
    (None, "auto", "holds checkpoint/ or rootfs-diff.tar, which only its second part"),  # a first part with images
    (b"", "0", "INVALID_ARGUMENT: first part size 0 out of range (1 byte to 16 MiB)"),
    (b"", str((16 << 20) + 1), "INVALID_ARGUMENT: first part size 16777217 out of range (1 byte to 16 MiB)"),
    (b"", '"512"', "INVALID_ARGUMENT: migration message field 'size': expected int, got '512'"),
], ids=["not-a-tar", "with-images", "size-zero", "size-over-bound", "size-not-a-number"])
def test_a_hostile_first_part_is_refused_and_leaves_nothing(hosts: tuple[Host, Host], tmp_path: Path,
                                                            part: bytes | None, size: str, says: str) -> None:
    """The receiver's "prepare" fed what no source sends: refused with the proxy's reason, nothing created,
    no file left in the target's checkpoints directory."""
    from shim.checkpoint.archive import Member, write_archive

    a, b = hosts
    if part is None:
        archive = tmp_path / "first.tar"
        write_archive(archive, [Member("spec.dump", data=b"{}"), Member("config.dump", data=b"{}"),
                                Member("checkpoint/inventory.img", data=b"x")])
        part = archive.read_bytes()
    with b.cri.pod(TCP) as target_pod:
        before = b.archives()
        e = a.env
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{e['NODE_NETNS']}", "--", sys.executable, "-c",
                               _HOSTILE_FIRST_PART, b.env["MIGRATE_ADDRESS"], target_pod.id, e["MIGRATE_CERT"],
                               e["MIGRATE_KEY"], e["MIGRATE_CA"], part.hex(), size],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
        assert answer["ok"] is False and says in f"{answer.get('code')}: {answer.get('error')}", answer
        assert b.containers() == []
        assert b.archives() == before


def _counting(host: Host, pod: Pod) -> tuple[str, str]:
    """A counter with 32 MiB of memory in `pod`, counting; its id and the pod's IP."""
    ctr = host.cri.container(pod, ["/usr/local/bin/counter"], {"INTERVAL_MS": "50", "MEM_MB": "32"}, name="counter")
    wait_for(lambda: host.cri.count(ctr) >= 5, timeout=60)
    return ctr, pod_ip(host, pod)


def _freezer_state(host: Host, ctr: str) -> str:
    """The container's cgroup v1 freezer state (FROZEN, FREEZING or THAWED)."""
    pid = host.cri.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr, verbose=True)).info["info"]
    init = json.loads(pid)["pid"]
    for line in Path(f"/proc/{init}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return (Path("/sys/fs/cgroup/freezer") / path.lstrip("/") / "freezer.state").read_text().strip()
    raise AssertionError(f"no freezer cgroup for {ctr}")


def _dumping(host: Host) -> bool:
    """A runc checkpoint of this host's still runs (its image path is under the host's checkpoints dir)."""
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return any("checkpoint" in p and host.env["CHECKPOINTS_DIR"] in p for p in procs.splitlines())


def routed_to_target(ip: str, target: Host) -> bool:
    return f"{ip} via {target.env['HOST_IP']}" in router_routes()
