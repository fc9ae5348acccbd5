"""criu-shim's own page daemon (shim.runtime.page_daemon) under real CRIU, containerd and runc.

The lazy restore tests (test_lazy_restore.py, test_restore.py) run with it, the
default; these add what only it does or must survive: a forking workload
that checksums every byte of its memory while the fill goes on, the daemon
dying mid-fill (the task must end, never run on zero pages), and the
`[restore] page_daemon = "criu"` fallback.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.handoff import RESTORE_DIR, criu_config
from shim.node import procs
from tests.node.conftest import Node
from tests.node.pods import Cri, wait_for
from tests.node.test_lazy_restore import (
    _our_loop_devices,
    _page_daemons,
    _pages_size,
    criu_page_daemon,
    our_page_daemon,
)
from tests.node.test_restore import _restore, _work_dirs
from tests.node.test_signatures import imported

pytestmark = pytest.mark.node

# A shell holding ~50 MiB of distinct numbers in one variable. A copy of it (a background subshell)
# forks every few milliseconds (usleep runs in a child), so forks land in the middle of the fill; the
# shell itself pipes the whole variable through md5sum again and again, each time from a freshly forked
# child: every byte of the lazily filled memory, read through a child's own userfaultfd.
FORKER = r"""
x=$(seq 1 6000000)
want=$(echo "$x" | md5sum)
echo "want=$want"
(while true; do usleep 2000; done) &
while true; do
  got=$(echo "$x" | md5sum)
  [ "$got" = "$want" ] || { echo "BAD=$got"; exit 70; }
  echo "sum=$got"
done
"""


@pytest.fixture
def ours(node: Node) -> Iterator[None]:
    """The node's proxy with `[restore] page_daemon = "criu-shim"` (the default, said explicitly)."""
    with our_page_daemon(node):
        yield


def _work(client: Cri, ctr: str) -> Path:
    status = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
    return Path(status.annotations[RESTORE_DIR])


def _lines(client: Cri, ctr: str, key: str) -> list[str]:
    return re.findall(rf"\b{key}=(\S+)", client.log(ctr))


def _filled(work: Path) -> bool:
    return "lazy-pages" not in criu_config(work).read_text()


@pytest.mark.usefixtures("ours")
def test_forking_workload_checksums_all_its_memory_during_and_after_the_fill(client: Cri, node: Node) -> None:
    archive = node.dir / "checkpoints" / "forker.tar"
    try:
        with client.pod() as pod:
            ctr = client.container(pod, ["sh", "-c", FORKER])
            wait_for(lambda: len(_lines(client, ctr, "sum")) >= 2, timeout=120)
            want = _lines(client, ctr, "want")[0]
            client.checkpoint(ctr, str(archive))
        assert _pages_size_any(archive) >= 32 << 20, "the shell's memory should be restored lazily"
        with client.pod() as pod:
            ctr = _restore(client, pod, archive)
            work = _work(client, ctr)
            assert (work / "lazy-pages.json").exists()
            before = len(_lines(client, ctr, "sum"))
            wait_for(lambda: _filled(work), timeout=120)
            report = (work / "lazy-work" / "lazy-pages.log").read_text()
            wait_for(lambda: len(_lines(client, ctr, "sum")) >= before + 3, timeout=120)
            assert client.state(ctr) == "CONTAINER_RUNNING"
            sums = _lines(client, ctr, "sum")
            assert set(sums) == {want}, "a checksum after the restore differs from the checkpointed memory's"
            assert not _lines(client, ctr, "BAD")
            forks = int(re.search(r"(\d+) forks", report).group(1))  # type: ignore[union-attr]
            assert forks > 0, f"no fork happened during the fill; the daemon's report: {report}"
    finally:
        archive.unlink(missing_ok=True)


def _pages_size_any(archive: Path) -> int:
    """The largest memory image in the archive (the shell's, with its page id)."""
    import tarfile

    with tarfile.open(archive) as tar:
        return max(m.size for m in tar if m.name.startswith("checkpoint/pages-"))


@pytest.mark.usefixtures("ours")
def test_page_daemon_killed_mid_fill_ends_the_restored_task(client: Cri, node: Node) -> None:
    """Pages the daemon never filled would read as zeros: the relay kills the task instead, and says so."""
    archive = node.dir / "checkpoints" / "daemon-dies.tar"
    logs = node.dir / "state" / "logs"
    try:
        with client.pod() as pod:
            # A long tick: after the restore the counter sleeps, so the relay, not its own check, ends it.
            ctr = client.container(pod, ["/usr/local/bin/counter"], {"MEM_MB": "1024", "INTERVAL_MS": "3000"})
            wait_for(lambda: client.count(ctr) >= 1, timeout=60)
            client.checkpoint(ctr, str(archive))
        with client.pod() as pod:
            ctr = _restore(client, pod, archive)
            work = _work(client, ctr)
            daemons = _page_daemons(work)
            assert len(daemons) == 1, "the page daemon should still be filling in memory"
            os.kill(daemons[0], signal.SIGSTOP)
            with contextlib.suppress(ProcessLookupError):
                assert not _filled(work), "the fill ended before the daemon could be stopped"
                os.kill(daemons[0], signal.SIGKILL)
            wait_for(lambda: client.state(ctr) == "CONTAINER_EXITED", timeout=30)
            status = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
            assert status.exit_code == 128 + signal.SIGKILL, client.log(ctr)[-500:]
            kept = list((logs / ctr).glob("lazy-pages-*"))
            assert kept, "the dead daemon's log should be kept for the operator"
            assert not procs.alive(daemons[0])
        wait_for(lambda: not work.exists(), timeout=30)
    finally:
        archive.unlink(missing_ok=True)


@pytest.mark.usefixtures("ours")
def test_checkpoint_image_is_restored_lazily_from_its_exported_layer(client: Cri, node: Node, tmp_path: Path) -> None:
    """A plain checkpoint image: its layer is exported beside the work dir and deleted once unpacked,
    long before CRIU hands the daemon a process; the daemon serves memory from a link of its own."""
    archive = node.dir / "checkpoints" / "for-lazy-image.tar"
    ref = "localhost/criu-shim/lazy-image:1"
    try:
        with client.pod() as pod:
            ctr = client.container(pod, ["/usr/local/bin/counter"], {"MEM_MB": "64", "INTERVAL_MS": "50"})
            wait_for(lambda: client.count(ctr) >= 3)
            client.checkpoint(ctr, str(archive))
            counted = client.count(ctr)
        with imported(node, archive, ref, tmp_path), client.pod() as pod:
            ctr = _restore(client, pod, Path(ref))
            work = _work(client, ctr)
            assert (work / "lazy-pages.json").exists(), "the image's memory should be restored lazily"
            assert not work.with_name(f"{work.name}.layer").exists(), "the exported layer is deleted once unpacked"
            # Not copied: the blob of containerd's content store, linked (same file system on the node).
            assert "linked from containerd's content store" in (node.dir / "logs" / "criu-shim.log").read_text()
            wait_for(lambda: _filled(work), timeout=60)
            report = (work / "lazy-work" / "lazy-pages.log").read_text()
            assert "Error" not in report and "memory in place" in report, report
            assert not list(work.glob("*.layer")), "the daemon's link to the layer is gone with the fill"
            wait_for(lambda: client.count(ctr) >= counted + 3)  # every tick re-checks every page
            assert client.state(ctr) == "CONTAINER_RUNNING"
        assert not [p for p in _work_dirs(node) if p.endswith(".layer")]
    finally:
        archive.unlink(missing_ok=True)


def test_criu_page_daemon_still_serves_when_chosen(client: Cri, node: Node) -> None:
    """`[restore] page_daemon = "criu"`: CRIU's own daemon over a loop device, released when memory is complete."""
    archive = node.dir / "checkpoints" / "criu-daemon.tar"
    try:
        with criu_page_daemon(node):
            with client.pod() as pod:
                ctr = client.container(pod, ["/usr/local/bin/counter"], {"MEM_MB": "64", "INTERVAL_MS": "50"})
                wait_for(lambda: client.count(ctr) >= 3)
                client.checkpoint(ctr, str(archive))
            with client.pod() as pod:
                ctr = _restore(client, pod, archive)
                work = _work(client, ctr)
                assert '"daemon": "criu"' in (work / "lazy-pages.json").read_text()
                counted = client.count(ctr)
                wait_for(lambda: _filled(work), timeout=60)
                assert _our_loop_devices(work) == []  # released with the daemon
                wait_for(lambda: client.count(ctr) >= counted + 3)  # every tick re-checks every page
                assert client.state(ctr) == "CONTAINER_RUNNING"
        assert _pages_size(archive) >= 64 << 20
    finally:
        archive.unlink(missing_ok=True)
