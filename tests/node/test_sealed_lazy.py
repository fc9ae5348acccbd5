"""Lazy restore of a sealed (encrypted) archive with criu-shim's page daemon, on a real node: the
memory is decrypted chunk by chunk by the daemon after the process runs (shim.restore.unseal_lazy,
shim.restore.sealed_pages), never as a whole before it; a workload checksumming its memory sees
every byte intact; a tampered memory chunk ends the task (never wrong memory), a truncated or
otherwise tampered archive is refused before anything is created; nothing is left behind."""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.node import procs
from shim.sealed import is_encrypted, read_header
from shim.sealed.chunks import ChunkIndex
from tests.node.conftest import Node
from tests.node.pods import Cri, wait_for
from tests.node.proxy_config import proxy_with
from tests.node.test_encryption import KEY_ID, _enabled, _leftovers, keys  # noqa: F401  (keys: a fixture)
from tests.node.test_lazy_restore import OURS, _our_loop_devices, _page_daemons
from tests.node.test_page_daemon import FORKER, _filled, _lines, _work
from tests.node.test_restore import _restore, assert_restore_refused

pytestmark = pytest.mark.node

_DECRYPTED = re.compile(r"sealed (pages-\d+\.img): (\d+) of (\d+) chunks decrypted (when the restore finished|"
                        r"with memory in place)")


@contextlib.contextmanager
def _sealing_node(node: Node, keys: Path, command: bool = False) -> Iterator[None]:  # noqa: F811
    """Archives sealed, restores lazy with our page daemon (the default, said explicitly); the key from
    its file or from the key-provider command (the page daemon then runs the command itself)."""
    section = f'enabled = true\nkey_id = "{KEY_ID}"\nkey_command = ["{keys / "kms"}"]\n' if command else _enabled(keys)
    with proxy_with(node, "encryption", section,
                    edit=lambda text: text.replace("[restore]\n", f"[restore]\n{OURS}\n")):
        yield


def _index(archive: Path) -> ChunkIndex:
    with open(archive, "rb") as f:
        return ChunkIndex.scan(f.fileno(), str(archive))


def _flip(archive: Path, at: int, name: str) -> Path:
    data = bytearray(archive.read_bytes())
    data[at] ^= 0x10
    damaged = archive.with_name(name)
    damaged.write_bytes(data)
    damaged.chmod(0o600)
    return damaged


def _decrypted(report: str, when: str) -> dict[str, tuple[int, int]]:
    """Per sealed memory image, the daemon's counters: (chunks decrypted, chunks in all)."""
    return {image: (int(a), int(b)) for image, a, b, w in _DECRYPTED.findall(report) if w == when}


@pytest.mark.parametrize("key", ["key-file", "key-command"])
def test_sealed_archive_is_served_chunk_by_chunk_and_memory_is_intact(client: Cri, node: Node, keys: Path,  # noqa: F811
                                                                     key: str) -> None:
    archive = node.dir / "checkpoints" / f"sealed-lazy-forker-{key}.tar"
    try:
        with _sealing_node(node, keys, command=key == "key-command"):
            with client.pod() as pod:
                ctr = client.container(pod, ["sh", "-c", FORKER])
                wait_for(lambda: len(_lines(client, ctr, "sum")) >= 2, timeout=120)
                want = _lines(client, ctr, "want")[0]
                client.checkpoint(ctr, str(archive))
            assert is_encrypted(archive) and read_header(archive).version == 2
            with client.pod() as pod:
                ctr = _restore(client, pod, archive)
                work = _work(client, ctr)
                assert (work / "lazy-pages.json").exists()
                assert "sealed" in (work / "lazy-pages.json").read_text()
                before = len(_lines(client, ctr, "sum"))
                wait_for(lambda: _filled(work), timeout=120)
                report = (work / "lazy-work" / "lazy-pages.log").read_text()
                wait_for(lambda: len(_lines(client, ctr, "sum")) >= before + 3, timeout=120)
                assert client.state(ctr) == "CONTAINER_RUNNING"
                sums = _lines(client, ctr, "sum")
                assert set(sums) == {want}, "a checksum after the restore differs from the checkpointed memory's"
                assert not _lines(client, ctr, "BAD")
                # The processes ran (CRIU's "restore finished") with most chunks of their memory still
                # sealed, and a process that lives on had every chunk decrypted when memory was complete
                # (the shell's children, md5sum and usleep, exit before theirs is: their rest is never opened).
                at_run = _decrypted(report, "when the restore finished")
                at_end = _decrypted(report, "with memory in place")
                assert at_run and at_end, report
                assert any(total >= 32 and at_run[image][0] < total // 2 and at_end[image][0] == total
                           for image, (_, total) in at_end.items()), \
                    f"no image ran with most chunks still sealed and ended decrypted whole: {at_run} / {at_end}"
                assert not _leftovers(node)  # no decrypted copy: the memory never was on disk in the clear
        assert not _leftovers(node)
    finally:
        archive.unlink(missing_ok=True)


def test_tampered_memory_chunk_ends_the_task_never_wrong_memory(client: Cri, node: Node,
                                                               keys: Path) -> None:  # noqa: F811
    """A chunk of the memory image is opened only when the daemon needs it: its tag fails there, the
    daemon fails, and the relay kills the restored process (pages never filled would read as zeros)."""
    archive = node.dir / "checkpoints" / "sealed-lazy-tamper.tar"
    damaged: Path | None = None
    logs = node.dir / "state" / "logs"
    try:
        with _sealing_node(node, keys):
            with client.pod() as pod:
                # A long tick: after the restore the counter sleeps, so the relay, not its own check, ends it.
                ctr = client.container(pod, ["/usr/local/bin/counter"], {"MEM_MB": "256", "INTERVAL_MS": "3000"})
                wait_for(lambda: client.count(ctr) >= 1, timeout=60)
                client.checkpoint(ctr, str(archive))
            index = _index(archive)
            k = index.count * 3 // 4  # well inside the 256 MiB memory image
            damaged = _flip(archive, index.words[k] + 100, "sealed-lazy-tampered.tar")
            with client.pod() as pod:
                ctr = _restore(client, pod, damaged)
                work = _work(client, ctr)
                wait_for(lambda: client.state(ctr) == "CONTAINER_EXITED", timeout=60)
                status = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=ctr)).status
                assert status.exit_code == 128 + signal.SIGKILL, client.log(ctr)[-500:]
                kept = list((logs / ctr).glob("lazy-pages-*"))
                assert kept, "the failed daemon's log should be kept for the operator"
                said = kept[0].read_text()
                assert f"chunk {k} at byte {index.words[k]} fails authentication" in said, said[-2000:]
                assert not _page_daemons(work)
            wait_for(lambda: not work.exists(), timeout=30)
            assert not _our_loop_devices(work)
            assert not _leftovers(node)
            assert not any(procs.processes_mentioning(str(work)))
    finally:
        archive.unlink(missing_ok=True)
        if damaged is not None:
            damaged.unlink(missing_ok=True)


def test_truncated_or_tampered_outside_memory_is_refused_before_anything(client: Cri, node: Node,
                                                                        keys: Path) -> None:  # noqa: F811
    archive = node.dir / "checkpoints" / "sealed-lazy-bad.tar"
    made: list[Path] = []
    try:
        with _sealing_node(node, keys):
            with client.pod() as pod:
                ctr = client.container(pod, ["/usr/local/bin/counter"], {"MEM_MB": "64", "INTERVAL_MS": "50"})
                wait_for(lambda: client.count(ctr) >= 5, timeout=60)
                client.checkpoint(ctr, str(archive))
            index = _index(archive)
            data = archive.read_bytes()
            cut_inside = archive.with_name("sealed-lazy-cut-inside.tar")
            cut_inside.write_bytes(data[:index.words[index.count // 2] + 1000])  # inside the memory image
            cut_boundary = archive.with_name("sealed-lazy-cut-boundary.tar")
            cut_boundary.write_bytes(data[:index.words[index.count - 1]])  # the final chunk dropped
            made += [cut_inside, cut_boundary]
            for path in made:
                path.chmod(0o600)
            last = _flip(archive, index.words[index.count - 1] + 6, "sealed-lazy-final.tar")  # the tar's end
            first = _flip(archive, index.words[0] + 6, "sealed-lazy-first.tar")  # CRIU's small images
            made += [last, first]
            for damaged, fragments in (
                    (cut_inside, ("is truncated at byte", f"inside chunk {index.count // 2}")),
                    (cut_boundary, ("is truncated at byte", "before the final chunk")),
                    (last, (f"chunk {index.count - 1} at byte", "fails authentication")),
                    (first, ("chunk 0 at byte", "fails authentication"))):
                assert_restore_refused(client, node, damaged, grpc.StatusCode.INVALID_ARGUMENT, str(damaged),
                                       *fragments)
                assert not _leftovers(node)
    finally:
        archive.unlink(missing_ok=True)
        for path in made:
            path.unlink(missing_ok=True)
