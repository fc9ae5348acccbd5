"""Lazy restore through the CRI: page images read in place, memory filled in after the process runs.

The counter fills MEM_MB of memory with a pattern and re-checks one word per
page on every tick, exiting 70 on a mismatch: a page lost or misplaced by the
lazy path stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.handoff import LAZY_WORK, RESTORE_DIR, SHIM_DIR, criu_config
from shim.node import procs
from shim.node.layout import NodeLayout
from shim.restore import lazy, loopdev
from tests.node import proxy_config
from tests.node.conftest import FULL, Node, node_down, node_up, on
from tests.node.pods import Cri, Pod, wait_for
from tests.node.proxy_config import proxy_with
from tests.node.test_restore import _restore, assert_restore_refused

pytestmark = pytest.mark.node

COUNTER = ["/usr/local/bin/counter"]
MEM_MB = 48
CRIUS = 'page_daemon = "criu"'
OURS = 'page_daemon = "criu-shim"'


def _checkpoint(client: Cri, node: Node, name: str, mem_mb: int = MEM_MB) -> Path:
    archive = node.dir / "checkpoints" / f"{name}.tar"
    with client.pod() as pod:
        ctr = client.container(pod, COUNTER, {"MEM_MB": str(mem_mb), "INTERVAL_MS": "50"})
        wait_for(lambda: client.count(ctr) >= 5)
        client.checkpoint(ctr, str(archive))
    return archive


def _restore_dir(client: Cri, ctr: str) -> Path:
    status = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
    return Path(status.annotations[RESTORE_DIR])


def _criu_config(work: Path) -> Path:
    return criu_config(work)


def _our_loop_devices(work: Path) -> list[str]:
    return [f"/dev/{d.name}" for d in Path("/sys/block").glob("loop*") if loopdev.tag_of(f"/dev/{d.name}") == lazy.tag(work)]


def criu_page_daemon(node: Node) -> contextlib.AbstractContextManager[None]:
    """The node's proxy with `[restore] page_daemon = "criu"`: CRIU's own daemon over a loop device."""
    return proxy_with(node, "admission", "", edit=lambda text: text.replace("[restore]\n", f"[restore]\n{CRIUS}\n"))


def our_page_daemon(node: Node) -> contextlib.AbstractContextManager[None]:
    """The node's proxy with `[restore] page_daemon = "criu-shim"`: criu-shim's own daemon."""
    return proxy_with(node, "admission", "", edit=lambda text: text.replace("[restore]\n", f"[restore]\n{OURS}\n"))


def _page_daemons(work: Path) -> list[int]:
    """The page daemon of the restore in `work`: CRIU's names <work>/lazy-work in its command line;
    ours, started ahead of need by a spare relay, works in it (its cwd)."""
    mine = work / LAZY_WORK
    return [pid for pid in set(procs.processes_mentioning(str(mine))) | set(procs.processes_mentioning("page_daemon"))
            if str(mine) in _cmdline(pid) or procs.cwd_under(pid, mine)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pages_size(archive: Path) -> int:
    with tarfile.open(archive) as tar:
        return tar.getmember("checkpoint/pages-1.img").size


@on(*FULL)
def test_large_memory_is_restored_lazily_and_in_full(client: Cri, node: Node) -> None:
    archive = _checkpoint(client, node, "lazy")
    with client.pod() as pod:
        ctr = _restore(client, pod, archive)
        work = _restore_dir(client, ctr)
        pages = work / "checkpoint" / "pages-1.img"
        # The memory image was not copied out of the archive: the unpacked file is a sparse shell.
        assert pages.stat().st_size == _pages_size(archive) >= MEM_MB << 20
        assert pages.stat().st_blocks * 512 < pages.stat().st_size // 8
        first = client.count(ctr)
        # The page daemon is done when the relay takes "lazy-pages" out of the CRIU config.
        wait_for(lambda: "lazy-pages" not in _criu_config(work).read_text(), timeout=60)
        assert _our_loop_devices(work) == []  # released with the daemon, not at container removal
        wait_for(lambda: client.count(ctr) >= first + 3)  # every tick re-checks every page
        assert client.state(ctr) == "CONTAINER_RUNNING"


def test_checkpoint_right_after_a_lazy_restore_waits_for_all_memory(client: Cri, node: Node) -> None:
    # Big enough that filling it in takes longer than a checkpoint takes to start.
    archive = _checkpoint(client, node, "lazy-first", mem_mb=384)
    again = node.dir / "checkpoints" / "lazy-again.tar"
    with client.pod() as pod:
        ctr = _restore(client, pod, archive)
        counted = client.count(ctr)
        client.checkpoint(ctr, str(again))  # at once: the relay holds it until the daemon is done
    # Had the dump run early, pages not yet filled in would be missing from it.
    assert _pages_size(again) >= _pages_size(archive) - (1 << 20)
    with client.pod() as pod:
        ctr = _restore(client, pod, again)
        assert client.count(ctr) >= counted
        wait_for(lambda: client.count(ctr) >= counted + 3)
        assert client.state(ctr) == "CONTAINER_RUNNING"


def test_memory_image_inconsistent_with_its_pagemap_is_refused(client: Cri, node: Node, tmp_path: Path) -> None:
    archive = _checkpoint(client, node, "lazy-source")
    broken = node.dir / "checkpoints" / "lazy-broken.tar"
    with tarfile.open(archive) as src, tarfile.open(broken, "w") as dst:
        for member in src:
            data = src.extractfile(member) if member.isreg() else None
            if member.name == "checkpoint/pages-1.img":
                member.size -= 4096  # one page short of what the pagemap lists
            dst.addfile(member, data)
    assert_restore_refused(client, node, broken, grpc.StatusCode.INVALID_ARGUMENT, "pages-1.img", "inconsistent")
    tags = [loopdev.tag_of(f"/dev/{d.name}") for d in Path("/sys/block").glob("loop*")]
    assert not [t for t in tags if t is not None and t.startswith(lazy.tag_prefix(node.dir / "restore"))]


def test_node_down_releases_what_a_dead_relay_left(node: Node, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A relay killed mid-restore leaves CRIU's page daemon and its loop device behind: `node down` takes both.

    (criu-shim's own daemon needs no loop device; it ends itself once memory is complete.)
    On a node whose proxy lives, the proxy's recovery undoes the dead relay's restore (its journal
    record) first; `node down` is the line behind it, for a node whose proxy is gone too. So the
    proxy is killed here, and the page daemon held so the fill cannot finish and let go on its own.
    """
    directory = tmp_path_factory.mktemp("lazy-node")
    other = node_up(directory)
    client = Cri(other.cri, directory / "pod-logs")
    try:
        # Not `criu_page_daemon(other)`: it would start the proxy again on the way out, before `node down`.
        layout = NodeLayout(directory.resolve())
        proxy_config.restart_proxy(layout, layout.proxy_config_file.read_text().replace("[restore]\n",
                                                                                         f"[restore]\n{CRIUS}\n"))
        archive = _checkpoint(client, other, "orphan", mem_mb=256)
        pod_config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="orphan", namespace="tests",
                                                                          uid="orphan"))
        pod_id = client.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config)).pod_sandbox_id
        # The pod is left to `node down`, which removes every pod.
        work = _restore_dir(client, _restore(client, Pod(pod_id, pod_config), archive))
        daemons = _page_daemons(work)
        assert len(daemons) == 1, "the page daemon should still be filling in memory"
        os.kill(daemons[0], signal.SIGSTOP)  # `node down` must stop it: a stopped process takes SIGKILL
        proxy = procs.read_pid(layout.pid_dir / "proxy.pid")
        assert proxy is not None
        os.kill(proxy, signal.SIGKILL)  # no recovery pass of its own can take the restore first
        relay = int((SHIM_DIR / f"{work.name}.pid").read_text())
        os.kill(relay, signal.SIGKILL)  # no clean-up of its own; containerd's task stays
        assert _our_loop_devices(work), "the restore's loop device should still be attached"
        assert procs.alive(daemons[0])
    finally:
        client.close()
        report = node_down(directory)
    assert _our_loop_devices(work) == []
    assert f"stopped leftover lazy-pages daemon {daemons[0]}" in report
    assert "released loop device" in report
    assert not [pid for pid in procs.processes_mentioning(str(directory))]


def test_containerd_restart_in_the_middle_of_the_lazy_fill_is_survived(client: Cri, node: Node) -> None:
    """The relay and its page daemon outlive containerd like a shim; the restarted containerd finds them.

    The page daemon is held (SIGSTOP) right after StartContainer, so the restart
    deterministically lands while memory is still being filled in.
    """
    archive = _checkpoint(client, node, "fill-restart", mem_mb=1024)
    again = node.dir / "checkpoints" / "fill-restart-again.tar"
    try:
        with client.pod() as pod:
            ctr = _restore(client, pod, archive)
            work = _restore_dir(client, ctr)
            daemons = _page_daemons(work)
            assert len(daemons) == 1, "the page daemon should still be filling in memory"
            with _held(daemons[0]), _containerd_restarted(node) as restart:
                assert "lazy-pages" in _criu_config(work).read_text(), "the fill ended before it could be held"
                relay = int((SHIM_DIR / f"{work.name}.pid").read_text())
                restart.stop()
                # A relay that left with containerd would be gone well within this (its grace: 0.5 s).
                assert not procs.wait_until(lambda: not procs.alive(relay), 2.0), "the relay exited with containerd"
                restart.start()
                assert procs.alive(daemons[0])
                with ThreadPoolExecutor(1) as pool:
                    # Through the relay again: the checkpoint waits for the fill, held until we let it go.
                    dump = pool.submit(client.checkpoint, ctr, str(again))
                    assert not procs.wait_until(dump.done, 1.0), "the checkpoint did not wait for the fill"
                    os.kill(daemons[0], signal.SIGCONT)
                    dump.result(timeout=120)
            assert _pages_size(again) >= _pages_size(archive) - (1 << 20)  # every page was in place
            wait_for(lambda: "lazy-pages" not in _criu_config(work).read_text(), timeout=60)
            counted = client.count(ctr)
            wait_for(lambda: client.count(ctr) >= counted + 3)  # every tick re-checks every page
            assert client.state(ctr) == "CONTAINER_RUNNING"
            assert client.exec(ctr, "echo", "still here").strip() == "still here"
            client.runtime.StopContainer(cri.StopContainerRequest(container_id=ctr, timeout=10))
            stopped = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
            assert cri.ContainerState.Name(stopped.state) == "CONTAINER_EXITED"
            assert stopped.exit_code == 0
    finally:
        again.unlink(missing_ok=True)
        archive.unlink(missing_ok=True)


@contextlib.contextmanager
def _held(pid: int) -> Iterator[None]:
    """SIGSTOP a process for the block (SIGCONT on every path)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


class _Restart:
    def __init__(self, node: Node) -> None:
        from shim.node.layout import NodeLayout

        self.layout = NodeLayout(node.dir.resolve())

    def stop(self) -> None:
        pid = procs.read_pid(self.layout.pid_dir / "containerd.pid")
        assert pid is not None
        procs.stop(pid)

    def start(self) -> None:
        from shim.node import local
        from shim.node.tools import tools_for

        pid = procs.read_pid(self.layout.pid_dir / "containerd.pid")
        if pid is None or not procs.alive(pid):
            local._start_containerd(self.layout, tools_for("1.7"))


@contextlib.contextmanager
def _containerd_restarted(node: Node) -> Iterator[_Restart]:
    """containerd stopped and started by the block; started again on every path (the node needs it)."""
    restart = _Restart(node)
    try:
        yield restart
    finally:
        restart.start()
