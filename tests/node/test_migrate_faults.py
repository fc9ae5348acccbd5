"""Faults during a migration between two fabric hosts (issue 11, "Faults"), eager direct mode.

Node A (containerd 1.7) is the source, node B (containerd 2.4) the target. Each case hits one
part of the way while it works (the source's criu-shim proxy, the source's `criu-shim migrate`,
the target's containerd, the target's proxy or receiver), then checks: a clear error naming what
happened and the source's state; no half-running container; nothing left on either node
(processes, mounts, loop devices, netns, links, cgroups, partial archives); the checkpoint kept
when the source was stopped, and the retry (`--checkpoint`, or a plain migrate when nothing was
stopped) completing the migration with the container's count intact.

Elsewhere: the target pod deleted and the fabric link cut mid-transfer, and a target whose CRIU is
older, are in test_migrate.py.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim import faults
from shim.api.cri.v1 import api_pb2 as cri
from shim.node import fabric, local, procs
from shim.node.tools import tools_for
from tests.node import leaks
from tests.node.fabric_pods import (
    FABRIC,
    REPO,
    STOP_AFTER,
    TCP,
    Host,
    fabric_hosts,
    kept_checkpoint,
    pipe_max_size,
    pod_ip,
    router_routes,
    slow_link,
)
from tests.node.pods import Pod, wait_for

pytestmark = pytest.mark.node

VERSIONS = ("1.7", "2.4")
COUNTER = ["/usr/local/bin/counter"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host]]:
    with fabric_hosts(tmp_path_factory, VERSIONS) as (a, b):
        yield a, b


# --- what a node runs, stopped and started again -------------------------------------------------

def _pid(host: Host, daemon: str) -> int:
    pid = procs.read_pid(host.layout.pid_dir / f"{daemon}.pid")
    assert pid is not None and procs.alive(pid), f"{daemon} of {host.dir} is not running"
    return pid


def _enter(host: Host) -> list[str]:
    return fabric.NodeHost(host.layout, fabric.Fabric(FABRIC)).enter()


def _start_proxy(host: Host) -> None:
    local._start_proxy(host.layout, host.layout.proxy_config_file, _enter(host))


def _start_containerd(host: Host, version: str) -> None:
    local._start_containerd(host.layout, tools_for(version), _enter(host))




@contextlib.contextmanager
def _stopped(host: Host, daemon: str, start: Callable[[], None]) -> Iterator[None]:
    """The daemon stopped for the block and started again on every path (the node needs it)."""
    procs.stop(_pid(host, daemon))
    try:
        yield
    finally:
        start()


# --- nothing left --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Before:
    host: leaks.HostState
    cgroups: frozenset[str]
    archives: tuple[set[str], set[str]]


def _cgroups() -> frozenset[str]:
    out = subprocess.run(["find", "/sys/fs/cgroup", "-maxdepth", "4", "-type", "d"], capture_output=True,
                         text=True).stdout
    return frozenset(out.split())


def _daemons(a: Host, b: Host) -> set[str]:
    pids = (procs.read_pid(h.layout.pid_dir / f"{d}.pid") for h in (a, b) for d in ("containerd", "proxy", "receiver"))
    return {str(p) for p in pids if p is not None}


@contextlib.contextmanager
def _nothing_left(a: Host, b: Host) -> Iterator[None]:
    """The machine as it was after the block (the nodes' own daemons may have been restarted): no
    process, mount, loop device, netns, link, cgroup, relay file; no partial archive on B and only the
    archive of the one migration that completed (the restored container's image; retention deletes
    it later), none on A beyond what the test itself kept and retried."""
    before = _Before(leaks.snapshot(), _cgroups(), (a.archives(), b.archives()))
    yield
    # the receiver drops a partial copy in its own time (a cut transfer: after its idle timeout)
    wait_for(lambda: not [n for n in b.archives() - before.archives[1] if n.startswith(".")], timeout=30)
    arrived = b.archives() - before.archives[1]
    assert len(arrived) <= 1 and all(n.startswith("migrate-counter-") for n in arrived), arrived
    assert a.archives() == before.archives[0], "the source's checkpoint of a completed retry is deleted"
    # A relay that did not live to remove its files (a restore ended mid-fill) leaves them to the proxy's
    # recovery, which passes every 30 s.
    wait_for(lambda: leaks.snapshot().relay_files == before.host.relay_files, timeout=45)
    after = leaks.settled_snapshot(before.host)
    daemons = _daemons(a, b)
    ours = [str(h.dir) for h in (a, b)] + [str(h.layout.run_dir) for h in (a, b)]
    new = {p for p in after.processes - before.host.processes
           if p.split()[0] not in daemons and any(o in p for o in ours)}  # not another helper's
    # a node keeps one spare restore relay ready once it has restored (the node's, not a leak)
    for host in (a, b):
        spares = {p for p in new if "relay-spare" in p and f" {host.dir}/" in p}
        assert len(spares) <= 1, spares
        new -= spares
    assert not new, f"processes left: {sorted(new)}"
    assert after.mounts == before.host.mounts, sorted(after.mounts ^ before.host.mounts)
    assert after.loops == before.host.loops, "loop devices changed"
    assert after.netns == before.host.netns and after.links == before.host.links
    assert after.relay_files == before.host.relay_files
    if not procs.wait_until(lambda: _cgroups() == before.cgroups, 20):
        raise AssertionError(f"cgroups changed: {sorted(_cgroups() ^ before.cgroups)}")
    for name in arrived:
        (Path(b.env["CHECKPOINTS_DIR"]) / name).unlink()


# --- the cases -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _counter(a: Host, mem_mb: int = 64) -> Iterator[tuple[Pod, str]]:
    with a.cri.pod(STOP_AFTER) as pod:
        ctr = a.cri.container(pod, COUNTER, {"INTERVAL_MS": "50", "MEM_MB": str(mem_mb)}, name="counter")
        wait_for(lambda: a.cri.count(ctr) >= 10)
        yield pod, ctr


def _migrating(a: Host, b: Host, ctr: str, to_pod: Pod, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(a.migrate_argv(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", to_pod.id, *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


@contextlib.contextmanager
def _target_containerd_stopped_mid_transfer(a: Host, b: Host, ctr: str, target: Pod) -> Iterator[subprocess.Popen[str]]:
    """A migration under way through a slow link, with the target's containerd down while the body
    runs (started again after it)."""
    with slow_link(b):
        proc = _migrating(a, b, ctr, target)
        _wait_mid_transfer(a, b, ctr)
        with _stopped(b, "containerd", lambda: _start_containerd(b, VERSIONS[1])):
            yield proc


def _wait_mid_transfer(a: Host, b: Host, ctr: str) -> None:
    """The source is checkpointed and stopped, and the archive is arriving on B."""
    wait_for(lambda: a.cri.state(ctr) == "CONTAINER_EXITED", timeout=120)
    wait_for(lambda: any(n.endswith(".part") for n in b.archives()), timeout=30)


def _arrived(b: Host, pod: Pod, at_least: int) -> None:
    moved = b.container_in(pod)
    assert b.cri.state(moved) == "CONTAINER_RUNNING"
    first = b.cri.count(moved)
    assert first >= at_least, "the count restarted instead of resuming"
    wait_for(lambda: b.cri.count(moved) > first)


def _retry(a: Host, b: Host, ctr: str, kept: Path, to_pod: Pod) -> None:
    out = a.migrate(ctr, "--checkpoint", str(kept), "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", to_pod.id).stdout
    assert "migrated to container" in out and not kept.exists()
    _arrived(b, to_pod, 10)


# A stop-after checkpoint is held at CRIU's gate like any other (shim.checkpoint.dumpgate): the gate's
# pipe is full from before the dump, so a proxy killed with CRIU there (every page written) fails CRIU's
# write of its last image (EPIPE, the kernel closing the proxy's descriptors): CRIU lets the container run
# on instead of ending it with no archive ever written. Killed earlier, CRIU fails on a page FIFO or is
# made to fail by the proxy's start-up recovery (shim.checkpoint.orphandump).
@pytest.mark.parametrize("point", [faults.Point.CHECKPOINT_FROZEN, faults.Point.CHECKPOINT_DUMPED],
                         ids=lambda p: str(p.value))
def test_source_proxy_killed_mid_checkpoint_leaves_the_container_running(
        hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch, point: faults.Point) -> None:
    """The proxy that takes the checkpoint dies while CRIU holds the container for the dump (a fault point):
    the migration says so and sends nothing; the proxy, once back, lets the container run; a plain retry
    works."""
    a, b = hosts
    with _nothing_left(a, b), _counter(a) as (_, ctr), b.cri.pod() as target:
        procs.stop(_pid(a, "proxy"))
        monkeypatch.setenv(faults.VARIABLE, point.value)
        try:
            _start_proxy(a)
        finally:
            monkeypatch.delenv(faults.VARIABLE)
        proc = a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target.id, check=False)
        _start_proxy(a)  # the dead one's pid file names a gone process
        assert proc.returncode == 1, proc.stderr
        assert "checkpoint failed" in proc.stderr and "nothing was sent" in proc.stderr, proc.stderr
        assert f"the source container {ctr} is in an unknown state (this node's criu-shim at" in proc.stderr
        assert "does not answer" in proc.stderr, proc.stderr

        wait_for(lambda: a.cri.state(ctr) == "CONTAINER_RUNNING")
        seen = a.cri.count(ctr)
        wait_for(lambda: a.cri.count(ctr) > seen)  # thawed: counting on the source again
        assert not b.containers() and not [n for n in a.archives() if n.startswith("migrate-")]
        a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target.id)
        _arrived(b, target, seen)


def test_source_proxy_killed_mid_transfer_does_not_stop_the_migration(hosts: tuple[Host, Host]) -> None:
    """Once the archive is written the transfer needs only the migrate command: the source's proxy
    dying then changes nothing, and after its restart the source container still reads EXITED."""
    a, b = hosts
    with _nothing_left(a, b), _counter(a) as (_, ctr), b.cri.pod() as target:
        with slow_link(b):
            proc = _migrating(a, b, ctr, target)
            _wait_mid_transfer(a, b, ctr)
            with _stopped(a, "proxy", lambda: _start_proxy(a)):
                out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert "migrated to container" in out
        assert a.cri.state(ctr) == "CONTAINER_EXITED"
        _arrived(b, target, 10)


def test_migrate_killed_mid_transfer_keeps_the_checkpoint_for_a_retry(hosts: tuple[Host, Host]) -> None:
    """The source's `criu-shim migrate` killed (SIGKILL) while it sends: the target drops its partial
    copy (after its idle timeout), creates nothing; the source's archive stays, and a retry sends it."""
    a, b = hosts
    with _nothing_left(a, b), _counter(a) as (_, ctr), b.cri.pod() as target:
        archives = a.archives()
        with slow_link(b):
            proc = _migrating(a, b, ctr, target)
            _wait_mid_transfer(a, b, ctr)
            proc.send_signal(signal.SIGKILL)  # nsenter execs the command: this is criu-shim migrate itself
            proc.communicate(timeout=30)
        wait_for(lambda: not any(n.endswith(".part") for n in b.archives()), timeout=60)
        assert not b.containers() and a.cri.state(ctr) == "CONTAINER_EXITED"
        (kept,) = [Path(a.env["CHECKPOINTS_DIR"]) / n for n in a.archives() - archives]
        assert kept.name.startswith(f"migrate-{ctr[:12]}-") and kept.stat().st_mode & 0o777 == 0o600
        _retry(a, b, ctr, kept, target)


def test_target_containerd_restarted_mid_transfer(hosts: tuple[Host, Host]) -> None:
    """containerd on the target stops and starts again while the archive arrives: the restore that
    follows finds it back, and the migration completes."""
    a, b = hosts
    with _nothing_left(a, b), _counter(a) as (_, ctr), b.cri.pod() as target:
        with _target_containerd_stopped_mid_transfer(a, b, ctr, target) as proc:
            pass
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert "migrated to container" in out
        _arrived(b, target, 10)


def test_target_containerd_restarted_mid_lazy_fill_is_survived(hosts: tuple[Host, Host]) -> None:
    """A lazy migration: containerd on the target stops and starts again while the memory is still
    being pulled from the source. The restored task's relay and page daemon outlive it like a shim,
    the fill completes, and the container keeps running with every page right (the counter checks a
    pattern in every page on every tick and exits 70 on a wrong one)."""
    a, b = hosts
    with pipe_max_size(4 << 20), _nothing_left(a, b), _counter(a, mem_mb=128) as (_, ctr), b.cri.pod() as target:
        with slow_link(b, "40mbit"):  # 128 MiB at 40 Mbit/s: about 27 s of fill to restart containerd in
            proc = _migrating(a, b, ctr, target, "--mode", "lazy")
            try:
                wait_for(lambda: bool(b.containers()) and b.cri.state(b.containers()[0]) == "CONTAINER_RUNNING",
                         timeout=120)
                # The restore over (StartContainer answered, the source told): a restart before that breaks the
                # restore itself, which is the eager case's, not this one.
                receiver_log = b.layout.log_dir / "migrate-receiver.log"
                wait_for(lambda: f"restored container {b.containers()[0]}" in receiver_log.read_text(), timeout=60)
                assert proc.poll() is None, "the fill ended before containerd could be restarted"
                with _stopped(b, "containerd", lambda: _start_containerd(b, VERSIONS[1])):
                    pass
                out, err = proc.communicate(timeout=300)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        assert proc.returncode == 0, err
        assert "served lazily" in out, out
        _arrived(b, target, 10)
        assert a.cri.state(ctr) == "CONTAINER_EXITED"


@contextlib.contextmanager
def _link_cut(host: Host) -> Iterator[None]:
    """The router's link to `host` down for the block (up again on every path)."""
    link = ["ip", "-n", f"csr-{FABRIC}", "link", "set", host.router_link]
    subprocess.run([*link, "down"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([*link, "up"], check=True, capture_output=True)


def test_the_link_cut_mid_lazy_fill_ends_the_target_task_and_the_source_runs_on(hosts: tuple[Host, Host]) -> None:
    """A lazy migration whose page stream goes silent (the target's link cut) while memory is still
    missing there: the restored task is ended before it can read a page that never came, the source's
    CRIU sees the stream fail and lets the source run again, and `migrate` says so."""
    a, b = hosts
    with pipe_max_size(4 << 20), _nothing_left(a, b), _counter(a, mem_mb=256) as (_, ctr), b.cri.pod() as target:
        with slow_link(b, "20mbit"):  # 256 MiB at 20 Mbit/s: about 100 s of fill to cut into
            proc = _migrating(a, b, ctr, target, "--mode", "lazy")
            try:
                wait_for(lambda: bool(b.containers()) and b.cri.state(b.containers()[0]) == "CONTAINER_RUNNING",
                         timeout=120)
                moved = b.containers()[0]
                assert proc.poll() is None, "the fill ended before the link could be cut"
                with _link_cut(b):
                    # Nothing answers on either side now: each end gives up once its peer is silent for its
                    # idle timeout (unacknowledged data or keepalive probes), the receiver's 10 s here.
                    wait_for(lambda: b.cri.state(moved) == "CONTAINER_EXITED", timeout=120)
                    out, err = proc.communicate(timeout=180)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        assert proc.returncode == 1, out
        # The cut lands before or after the target's answer that it restored reached the source: either
        # way `migrate` says the copy is gone and the source runs again.
        assert ("the memory did not reach the target" in err or "the migration peer stopped answering" in err), err
        assert f"the source container {ctr} is running again" in err, err
        status = b.cri.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=moved), timeout=30).status
        assert status.exit_code == 137, b.cri.log(moved)[-500:]  # ended by us, never a missing page read (70)
        wait_for(lambda: a.cri.state(ctr) == "CONTAINER_RUNNING", timeout=60)
        count = a.cri.count(ctr)
        wait_for(lambda: a.cri.count(ctr) > count, timeout=30)


def test_target_containerd_down_at_restore_keeps_the_checkpoint_and_the_retry_works(
        hosts: tuple[Host, Host]) -> None:
    """containerd on the target is down when the archive has arrived: the restore fails, the target
    keeps nothing (no container, no archive), the source says it is stopped and where its checkpoint is."""
    a, b = hosts
    with _nothing_left(a, b), _counter(a) as (_, ctr), b.cri.pod() as target:
        with _target_containerd_stopped_mid_transfer(a, b, ctr, target) as proc:
            _, err = proc.communicate(timeout=240)
        assert proc.returncode == 1, err
        assert "the target node could not restore it" in err and f"the source container {ctr} is stopped" in err, err
        assert "could not look up target pod" in err and "was deleted" not in err, err  # said as it is
        kept = kept_checkpoint(err)
        wait_for(lambda: not b.containers() and not [n for n in b.archives() if n.startswith(("migrate-", "."))])
        _retry(a, b, ctr, kept, target)


@pytest.mark.parametrize("down", ["proxy", "receiver"])
def test_a_target_without_criu_shim_is_refused_before_anything_stops(hosts: tuple[Host, Host], down: str) -> None:
    """The target's criu-shim proxy (or its migration receiver) is not running: refused at preflight,
    naming it; the source goes on running; once it is back, a plain migrate works."""
    a, b = hosts
    start = (lambda: _start_proxy(b)) if down == "proxy" else b.start_receiver
    with _nothing_left(a, b), _counter(a, mem_mb=16) as (_, ctr), b.cri.pod() as target:
        with _stopped(b, down, start):
            proc = a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target.id, check=False)
        assert proc.returncode == 1, proc.stderr
        expected = ("the target node refused the migration (nothing was stopped): UNAVAILABLE" if down == "proxy"
                    else f"cannot reach the migration receiver at {b.env['MIGRATE_ADDRESS']}")
        assert expected in proc.stderr, proc.stderr
        assert a.cri.state(ctr) == "CONTAINER_RUNNING" and not b.containers()
        assert not [n for n in a.archives() if n.startswith("migrate-")]
        seen = a.cri.count(ctr)
        a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target.id)
        _arrived(b, target, seen)


def test_an_answer_lost_after_the_restore_leaves_the_addresses_with_the_target(
        hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver restored the container and claimed its addresses, then died before it could say so
    (a fault point): the source cannot know the outcome, so it must not claim the addresses back (that
    would take the route from the running copy to the stopped source). `migrate` says the outcome is
    unknown; the restored container runs on with its address; the receiver started again keeps its claim."""
    a, b = hosts
    with _nothing_left(a, b), a.cri.pod(TCP) as pod, b.cri.pod(TCP) as target:
        ctr = a.cri.container(pod, COUNTER, {"INTERVAL_MS": "50", "MEM_MB": "32"}, name="counter")
        wait_for(lambda: a.cri.count(ctr) >= 10)
        ip = pod_ip(a, pod)
        procs.stop(_pid(b, "receiver"))
        monkeypatch.setenv(faults.VARIABLE, faults.Point.MIGRATE_RESTORED.value)
        try:
            b.start_receiver()
        finally:
            monkeypatch.delenv(faults.VARIABLE)
        try:
            proc = a.migrate(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target.id, check=False)
        finally:
            b.start_receiver()  # the dead one's pid file names a gone process
        assert proc.returncode == 1, proc.stderr
        assert "whether the target restored it is unknown: the pod IPs stay with the target node" in proc.stderr
        moved = b.containers()
        assert len(moved) == 1 and b.cri.state(moved[0]) == "CONTAINER_RUNNING", moved
        seen = b.cri.count(moved[0])
        wait_for(lambda: b.cri.count(moved[0]) > seen)  # the copy runs, with its memory
        assert f"{ip} via {b.env['HOST_IP']}" in router_routes(), router_routes()  # not claimed back
        archive = kept_checkpoint(proc.stderr)
        b.cri.runtime.StopContainer(cri.StopContainerRequest(container_id=moved[0], timeout=0), timeout=60)
        b.cri.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=moved[0]), timeout=60)
        archive.unlink()  # kept for a retry that this test does not need
        # removed on the target: its receiver releases the claim it kept
        wait_for(lambda: f"{ip} via {b.env['HOST_IP']}" not in router_routes(), timeout=60)
