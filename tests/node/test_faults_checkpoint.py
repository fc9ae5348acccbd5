"""Fault injection on the checkpoint path: CRIU or criu-shim killed mid-way, then a restart.

Each case checks the fault really hit (the container is frozen, or the staging
directory with the memory image is on disk) before it checks the recovery:
the container running and thawed for containerd and the kernel, manageable
(exec, a new checkpoint), no staging directory, no journal record, no
network lock, and an audit line saying what was undone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim import faults
from shim.annotations import COMPRESSION
from shim.api.cri.v1 import api_pb2 as cri
from shim.checkpoint.location import STAGING_PREFIX
from shim.checkpoint.rollforward import MARKER
from shim.checkpoint.stream_archive import ARCHIVE_NAME
from shim.node import procs
from shim.node.tools import load_paths
from tests.node.conftest import Node
from tests.node.pods import Cri, Pod, wait_for

pytestmark = pytest.mark.node

COUNTER = ["/usr/local/bin/counter"]


class PrivateProxy:
    """A criu-shim of the test's own in front of the node's containerd, to kill and restart."""

    def __init__(self, node: Node, directory: Path) -> None:
        self.node = node
        self.dir = directory
        self.listen = directory / "proxy.sock"
        self.state = directory / "state"
        self.audit = directory / "audit.log"
        self.config = directory / "proxy.toml"
        self.config.write_text(f'state_dir = "{self.state}"\n[checkpoint]\ncriu = "{load_paths()["CRIU_BIN"]}"\n'
                               f'audit_log = "{self.audit}"\n')
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, fault: faults.Point | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
        if fault is not None:
            env[faults.VARIABLE] = fault.value
        self.listen.unlink(missing_ok=True)
        self.process = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--listen", f"unix://{self.listen}",
                                         "--runtime-endpoint", self.node.containerd, "--config", str(self.config)],
                                        env=env)
        assert procs.wait_until(self.listen.exists, 20)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def journal(self) -> list[str]:
        directory = self.state / "journal"
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def audit_lines(self) -> list[dict[str, object]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


@pytest.fixture
def proxy(node: Node, tmp_path: Path) -> Iterator[PrivateProxy]:
    own = PrivateProxy(node, tmp_path)
    yield own
    own.stop()


@pytest.fixture
def direct(node: Node, tmp_path: Path) -> Iterator[Cri]:
    """Pods are made straight on containerd: only the checkpoint goes through the proxy under test."""
    client = Cri(node.containerd, tmp_path / "pod-logs")
    yield client
    client.close()


def _task_fields(node: Node, ctr: str) -> list[str]:
    ctr_bin = Path(load_paths()["CONTAINERD_1_7"]) / "ctr"
    out = subprocess.run([str(ctr_bin), "--address", node.containerd.removeprefix("unix://"), "-n", "k8s.io",
                          "tasks", "ls"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == ctr:
            return fields
    return []


def task_status(node: Node, ctr: str) -> str:
    fields = _task_fields(node, ctr)
    return fields[-1] if fields else "NONE"


def held_by_criu(direct: Cri, ctr: str) -> bool:
    """The container's init is stopped under CRIU's ptrace: CRIU holds it (no pause of ours)."""
    verbose = direct.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr, verbose=True), timeout=30)
    pid = int(json.loads(verbose.info["info"])["pid"])
    status = Path(f"/proc/{pid}/status").read_text()
    tracer = int(status.split("TracerPid:")[1].split()[0])
    return tracer != 0 and Path(f"/proc/{tracer}/comm").read_text().strip() == "criu"


def counts_on(direct: Cri, ctr: str, within: float = 2.0) -> bool:
    """Whether the counter prints a new line within `within` seconds (a negative check spans the window)."""
    seen = direct.log(ctr).count("count=")
    try:
        wait_for(lambda: direct.log(ctr).count("count=") > seen, timeout=within)
    except AssertionError:
        return False
    return True


def staging_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(STAGING_PREFIX))


def checkpoint_in_background(proxy: PrivateProxy, ctr: str, location: Path) -> threading.Thread:
    """The call dies with its proxy: its error is expected and not the point."""
    def run() -> None:
        client = Cri(f"unix://{proxy.listen}", proxy.dir / "client-logs")
        try:
            client.checkpoint(ctr, str(location), timeout=60)
        except grpc.RpcError:
            pass
        finally:
            client.close()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def assert_recovered(node: Node, direct: Cri, proxy: PrivateProxy, ctr: str, out: Path) -> None:
    wait_for(lambda: task_status(node, ctr) == "RUNNING", timeout=30)
    seen = direct.count(ctr)
    wait_for(lambda: direct.count(ctr) > seen, timeout=30)  # thawed: it counts again, and exec works
    wait_for(lambda: staging_dirs(out) == [] and proxy.journal() == [], timeout=30)
    recoveries = [a for a in proxy.audit_lines() if a["action"] == "recover-checkpoint"]
    assert recoveries and str(recoveries[-1]["result"]).startswith("interrupted"), proxy.audit_lines()
    assert recoveries[-1]["container_id"] == ctr
    # Manageable: checkpointed again through the restarted proxy.
    client = Cri(f"unix://{proxy.listen}", proxy.dir / "client-logs")
    try:
        client.checkpoint(ctr, str(out / "again.tar"))
    finally:
        client.close()
    assert (out / "again.tar").stat().st_size > 0
    assert direct.state(ctr) == "CONTAINER_RUNNING"


@pytest.mark.parametrize("fault", [faults.Point.CHECKPOINT_FROZEN, faults.Point.CHECKPOINT_DUMPED])
def test_proxy_killed_while_the_container_is_frozen(node: Node, direct: Cri, proxy: PrivateProxy, tmp_path: Path,
                                                    fault: faults.Point) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with direct.pod() as pod:
        ctr = direct.container(pod, COUNTER, {"MEM_MB": "32"})
        wait_for(lambda: direct.count(ctr) >= 1)
        proxy.start(fault)
        call = checkpoint_in_background(proxy, ctr, out / "x.tar")
        assert proxy.process is not None
        assert proxy.process.wait(timeout=60) == -signal.SIGKILL
        call.join(timeout=60)
        # The fault hit while CRIU held the container (no pause of ours: containerd never saw PAUSED).
        # At the gate ("dumped": every page written, CRIU's write of its last image asleep on the gate's
        # full pipe) the kernel closing the dead proxy's descriptors fails that write (EPIPE): CRIU lets
        # the container run on before any recovery, and never finishes the dump. Earlier ("frozen", CRIU
        # still on its pages) it fails on a page FIFO, or sleeps opening the next one until recovery.
        journal = proxy.journal()
        released = fault is not faults.Point.CHECKPOINT_DUMPED or _released_without_recovery(direct, ctr)
        proxy.start()  # first: CRIU must not be left holding the container if an assertion fails
        assert released, "CRIU still holds the container at the gate of a dead proxy"
        assert journal, "the interrupted checkpoint left no journal record"
        assert_recovered(node, direct, proxy, ctr, out)
        assert not (out / "x.tar").exists()


def _released_without_recovery(direct: Cri, ctr: str) -> bool:
    try:
        wait_for(lambda: not held_by_criu(direct, ctr), timeout=30)
    except AssertionError:
        return False
    return counts_on(direct, ctr, within=10)


def test_proxy_killed_in_the_archive_phase_leaves_no_memory_image(node: Node, direct: Cri, proxy: PrivateProxy,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with direct.pod() as pod:
        ctr = direct.container(pod, COUNTER, {"MEM_MB": "32"})
        wait_for(lambda: direct.count(ctr) >= 1)
        proxy.start(faults.Point.CHECKPOINT_ARCHIVE)
        call = checkpoint_in_background(proxy, ctr, out / "x.tar")
        assert proxy.process is not None
        assert proxy.process.wait(timeout=60) == -signal.SIGKILL
        call.join(timeout=60)
        staged = staging_dirs(out)
        # The secrets are on disk: the memory streamed into the unfinished archive (or CRIU's own file).
        memory = [*(out / staged[0]).glob(ARCHIVE_NAME), *(out / staged[0] / "checkpoint").glob("pages-*.img")]
        assert memory and sum(p.stat().st_size for p in memory) >= 32 << 20
        proxy.start()
        assert_recovered(node, direct, proxy, ctr, out)
        assert not (out / "x.tar").exists()


def test_proxy_killed_mid_dump_thaws_once_the_dump_has_ended(node: Node, direct: Cri, proxy: PrivateProxy,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with direct.pod() as pod:
        ctr = direct.container(pod, COUNTER, {"MEM_MB": "1024"})  # a dump long enough to catch mid-way
        wait_for(lambda: direct.count(ctr) >= 1, timeout=60)
        proxy.start()
        for _ in range(3):  # the kill must land inside the dump (0.8 s here): one done before it is caught goes again
            call = checkpoint_in_background(proxy, ctr, out / "x.tar")
            while call.is_alive() and not _runc_dumping(out):
                call.join(timeout=0.005)
            if call.is_alive():
                break
            assert (out / "x.tar").exists(), "the checkpoint failed before its runc was seen dumping"
            (out / "x.tar").unlink()
        else:
            pytest.fail("every checkpoint ended before its runc was seen dumping")
        assert proxy.process is not None
        proxy.process.kill()
        proxy.process.wait(timeout=20)
        call.join(timeout=60)
        proxy.start()  # runc may still be dumping: recovery waits for it, then thaws
        assert_recovered(node, direct, proxy, ctr, out)


def test_criu_killed_mid_dump_leaves_the_container_running_and_manageable(node: Node, direct: Cri,
                                                                          proxy: PrivateProxy,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with direct.pod() as pod:
        ctr = direct.container(pod, COUNTER, {"MEM_MB": "1024"})  # a dump long enough to catch mid-way
        wait_for(lambda: direct.count(ctr) >= 1, timeout=60)
        proxy.start()
        client = Cri(f"unix://{proxy.listen}", tmp_path / "client-logs")
        errors: list[grpc.RpcError] = []

        def run() -> None:
            try:
                client.checkpoint(ctr, str(out / "x.tar"), timeout=60)
            except grpc.RpcError as exc:
                errors.append(exc)

        for _ in range(3):  # the kill must land inside the dump: a dump done before it is caught goes again
            thread = threading.Thread(target=run)
            thread.start()
            killed = False
            while thread.is_alive() and not killed:
                killed = _kill_criu_under(out)
                thread.join(timeout=0.005)
            thread.join(timeout=90)
            if killed:
                break
            assert not errors, f"the checkpoint failed before CRIU could be killed: {errors[0].details()}"
            (out / "x.tar").unlink()
        else:
            pytest.fail("every checkpoint ended before its CRIU was seen holding the container")
        assert errors, "the checkpoint succeeded although CRIU was killed"
        assert task_status(node, ctr) == "RUNNING"
        seen = direct.count(ctr)  # exec works: not "cannot exec in a paused state"
        wait_for(lambda: direct.count(ctr) > seen)
        assert staging_dirs(out) == [] and not (out / "x.tar").exists() and proxy.journal() == []
        client.checkpoint(ctr, str(out / "again.tar"))  # not "cannot pause a paused container"
        client.close()
        assert direct.state(ctr) == "CONTAINER_RUNNING"


def _dumping_pids(out: Path) -> list[int]:
    """runc checkpoint processes writing into a staging directory under `out`."""
    needle = f"{out}/{STAGING_PREFIX}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if needle in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _runc_dumping(out: Path) -> bool:
    return bool(_dumping_pids(out)) and any(_criu_children(pid) for pid in _dumping_pids(out))


def _criu_children(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in map(int, children):
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == "criu":
                found.append(child)
        except OSError:
            continue
    return found


def _kill_criu_under(out: Path) -> bool:
    """SIGKILL every CRIU process of the dump (as the OOM killer would), once CRIU holds the tasks."""
    criu = [c for pid in _dumping_pids(out) for c in _criu_descendants(pid)]
    # Let CRIU get into the dump (it has seized the tasks and thawed the cgroup) before the kill.
    if not any(_criu_has_seized(c) for c in criu):
        return False
    for pid in criu:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def _criu_descendants(pid: int) -> list[int]:
    """CRIU processes under `pid` (runc's `criu swrk` and whatever it forked)."""
    found = []
    for child in _criu_children(pid):
        found += [child, *_criu_descendants(child)]
    return found


def _criu_has_seized(criu: int) -> bool:
    """CRIU traces the container's tasks once it has seized them."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                status = Path(f"/proc/{entry.name}/status").read_text()
            except OSError:
                continue
            if f"TracerPid:\t{criu}\n" in status:
                return True
    return False


STOP_AFTER = {"checkpoint.criu-shim.io/stop-after": "true"}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.mark.parametrize("zstd", [False, True], ids=["tar", "zstd"])
def test_proxy_killed_after_the_gate_opened_rolls_the_archive_forward(node: Node, direct: Cri, client: Cri,
                                                                      proxy: PrivateProxy, zstd: bool) -> None:
    """Stop-after, criu-shim killed once CRIU's gate opened: CRIU ends the container, and only recovery's
    roll-forward keeps the workload, as the archive asked for, restorable with its state (a zstd archive:
    continued with a new frame)."""
    archive = node.dir / "checkpoints" / f"rollforward-{uuid.uuid4().hex[:8]}.tar"
    annotations = {**STOP_AFTER, COMPRESSION: "zstd"} if zstd else STOP_AFTER
    try:
        with direct.pod(annotations) as pod:
            ctr = direct.container(pod, COUNTER, {"MEM_MB": "32", "INTERVAL_MS": "50"})
            wait_for(lambda: direct.count(ctr) >= 20)
            proxy.start(faults.Point.CHECKPOINT_COMMITTED)
            call = checkpoint_in_background(proxy, ctr, archive)
            assert proxy.process is not None
            assert proxy.process.wait(timeout=60) == -signal.SIGKILL
            call.join(timeout=60)
            # The fault hit past the gate: CRIU ends the container, and no archive exists yet.
            wait_for(lambda: direct.state(ctr) == "CONTAINER_EXITED", timeout=30)
            staged = staging_dirs(archive.parent)
            assert not archive.exists() and len(staged) == 1
            assert (archive.parent / staged[0] / MARKER).is_file()
            last = max(int(line.split("count=")[1].split()[0]) for line in direct.log(ctr).splitlines()
                       if "count=" in line)
            proxy.start()
            wait_for(lambda: archive.exists() and proxy.journal() == [] and staging_dirs(archive.parent) == [],
                     timeout=60)
        facts = archive.stat()
        assert stat.S_IMODE(facts.st_mode) == 0o600 and facts.st_uid == 0
        with archive.open("rb") as f:
            assert (f.read(4) == ZSTD_MAGIC) == zstd
        recoveries = [a for a in proxy.audit_lines() if a["action"] == "recover-checkpoint"]
        assert recoveries and recoveries[-1]["container_id"] == ctr, proxy.audit_lines()
        assert "rolled forward: archive" in str(recoveries[-1]["result"]), recoveries[-1]
        with client.pod() as target:
            restored = _restore(client, target, archive)
            first = client.count(restored)
            assert first >= last, f"restored at {first}, the source had counted to {last}"
            wait_for(lambda: client.count(restored) > first)  # it runs on from there
    finally:
        archive.unlink(missing_ok=True)


def test_proxy_killed_with_the_marker_written_and_the_gate_shut_completes_nothing(node: Node, direct: Cri,
                                                                                 proxy: PrivateProxy,
                                                                                 tmp_path: Path) -> None:
    """Stop-after, criu-shim killed after it wrote the archive's first part and the marker, the gate not yet
    open: CRIU's dump fails at the gate, the container runs on, and recovery completes no archive."""
    out = tmp_path / "out"
    out.mkdir()
    with direct.pod(STOP_AFTER) as pod:
        ctr = direct.container(pod, COUNTER, {"MEM_MB": "32"})
        wait_for(lambda: direct.count(ctr) >= 1)
        proxy.start(faults.Point.CHECKPOINT_DUMPED)
        call = checkpoint_in_background(proxy, ctr, out / "x.tar")
        assert proxy.process is not None
        assert proxy.process.wait(timeout=60) == -signal.SIGKILL
        call.join(timeout=60)
        staged = staging_dirs(out)
        marked = len(staged) == 1 and (out / staged[0] / MARKER).is_file()
        released = _released_without_recovery(direct, ctr)
        proxy.start()
        assert marked, "the fault hit before the marker was written"
        assert released, "CRIU still holds the container at the gate of a dead proxy"
        wait_for(lambda: staging_dirs(out) == [] and proxy.journal() == [], timeout=30)
        recoveries = [a for a in proxy.audit_lines() if a["action"] == "recover-checkpoint"]
        assert recoveries and recoveries[-1]["container_id"] == ctr, proxy.audit_lines()
        result = str(recoveries[-1]["result"])
        assert f"archive {out / 'x.tar'} not completed: CRIU's dump did not go through" in result, result
        assert "containerd reports the container CONTAINER_RUNNING" in result, result
        assert not (out / "x.tar").exists() and task_status(node, ctr) == "RUNNING"
        assert counts_on(direct, ctr, within=10)


def _restore(client: Cri, pod: Pod, archive: Path) -> str:
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="restored"),
                                 image=cri.ImageSpec(image=str(archive)), log_path="restored.log")
    ctr = str(client.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=120).container_id)
    client.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=120)
    return ctr
