"""Roll-forward of a stop-after archive whose criu-shim died after CRIU's gate opened: the decision and
the completion, with the staging directory as hostile input (everything refused is refused clearly,
nothing is written at the archive's path, and the caller deletes the staging directory)."""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shim import signing
from shim.api.cri.v1 import api_pb2 as cri
from shim.checkpoint import recovery, rollforward
from shim.checkpoint.archive import Member, TarWriter, add_members
from shim.checkpoint.compression import Compression, FileSink, ZstdFile
from shim.checkpoint.sealing import SealedTarWriter
from shim.checkpoint.stream_archive import ARCHIVE_NAME

CONTAINER = "c0ffee"
EARLY = [Member("checkpoint", is_dir=True), Member("spec.dump", data=b"{}"),
         Member("checkpoint/core-1.img", data=b"core" * 100), Member("rootfs-diff.tar", data=bytes(2048))]


def _staging(tmp_path: Path, zstd: bool = False) -> tuple[Path, Path, rollforward.Marker]:
    """What criu-shim leaves when it dies once the gate opened and CRIU went through (`zstd`: compressed)."""
    location = tmp_path / "out.tar"
    staging = tmp_path / ".criu-shim-c0ffee-1234"
    images, work = staging / "checkpoint", staging / "work"
    for directory in (staging, images, work):
        directory.mkdir(mode=0o700)
    (images / "core-1.img").write_bytes(b"core" * 100)
    for name, data in (("inventory.img", b"inventory"), ("files.img", b"files" * 10)):
        (images / name).write_bytes(data)
    (work / "dump.log").write_text("(00.01) Writing stats\n(00.02) Dumping finished successfully\n")
    (work / "stats-dump").write_bytes(b"stats")
    for path in (*images.iterdir(), *work.iterdir()):
        path.chmod(0o600)
    fd = os.open(staging / ARCHIVE_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    stream = ZstdFile(FileSink(fd), Compression(3, threads=0)) if zstd else None
    writer = TarWriter(fd) if stream is None else SealedTarWriter(stream)
    add_members(writer, EARLY)
    writer.flush()
    end = writer.written
    file_end = end if stream is None else stream.resumable_at()
    assert file_end is not None
    os.pwrite(fd, b"half a member after the marker", file_end)  # what a dying criu-shim may have begun
    os.close(fd)
    marker = rollforward.Marker(CONTAINER, location, staging, end, file_end, 3 if zstd else None)
    rollforward.write_marker(marker, durable=False)
    return staging, location, marker


def test_a_compressed_archive_is_continued_with_a_new_zstd_frame(tmp_path: Path) -> None:
    staging, location, _ = _staging(tmp_path, zstd=True)
    size = _roll(staging, location)
    assert location.stat().st_size == size and (location.stat().st_mode & 0o777) == 0o600
    with open(location, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as z, \
            tarfile.open(fileobj=z, mode="r|") as tar:
        contents = {info.name: (tar.extractfile(info).read() if info.isreg() else b"")  # type: ignore[union-attr]
                    for info in tar}
    assert list(contents) == ["checkpoint", "spec.dump", "checkpoint/core-1.img", "rootfs-diff.tar",
                              "checkpoint/files.img", "checkpoint/inventory.img", "stats-dump", "dump.log"]
    assert contents["checkpoint/inventory.img"] == b"inventory" and contents["spec.dump"] == b"{}"


ZSTD_HOSTILE: dict[str, tuple[Breaker, str]] = {
    "decompresses past the marker's end": (lambda s, t: _replace(s / rollforward.MARKER, _zstd_marker(s, t, 1536)),
                                           "the stream goes on past the marker's 1536 bytes"),
    "not zstd at all": (lambda s, t: _replace(s / ARCHIVE_NAME, os.urandom(8192)), "are not a tar"),
}


def _zstd_marker(staging: Path, tmp_path: Path, end: int) -> bytes:
    facts = json.loads((staging / rollforward.MARKER).read_bytes())
    return rollforward.Marker(CONTAINER, tmp_path / "out.tar", staging, end, facts["file_end"], 3).encode()


@pytest.mark.parametrize("case", sorted(ZSTD_HOSTILE))
def test_hostile_compressed_staging_is_refused(tmp_path: Path, case: str) -> None:
    staging, location, _ = _staging(tmp_path, zstd=True)
    breaker, expected = ZSTD_HOSTILE[case]
    breaker(staging, tmp_path)
    with pytest.raises(rollforward.RollForwardError, match=expected):
        _roll(staging, location)
    assert not location.exists()


def _roll(staging: Path, location: Path) -> int:
    return rollforward.complete(rollforward.decide(staging, CONTAINER, str(location)))


def test_a_dump_that_went_through_is_completed_at_the_asked_path(tmp_path: Path) -> None:
    staging, location, _ = _staging(tmp_path)
    size = _roll(staging, location)
    assert location.stat().st_size == size and (location.stat().st_mode & 0o777) == 0o600
    with tarfile.open(location) as tar:
        names = tar.getnames()
        assert names == ["checkpoint", "spec.dump", "checkpoint/core-1.img", "rootfs-diff.tar",
                         "checkpoint/files.img", "checkpoint/inventory.img", "stats-dump", "dump.log"]
        inventory = tar.extractfile("checkpoint/inventory.img")
        assert inventory is not None and inventory.read() == b"inventory"
    assert not (staging / ARCHIVE_NAME).exists()  # renamed, not copied


def test_the_late_members_are_what_criu_writes_last() -> None:
    late = rollforward.late_names({"files.img", "pages-1.img", "something-new.img", "dump.log"})
    assert {"checkpoint/inventory.img", "checkpoint/files.img", "checkpoint/cgroup.img",
            "checkpoint/something-new.img", "stats-dump", "dump.log"} <= late
    assert "checkpoint/core-1.img" not in late


Breaker = Callable[[Path, Path], None]


def _replace(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.unlink()
    path.write_bytes(data)
    path.chmod(mode)


def _symlink(path: Path, to: str) -> None:
    path.unlink()
    path.symlink_to(to)


HOSTILE: dict[str, tuple[Breaker, str]] = {
    "CRIU failed": (lambda s, t: (s / "work" / "dump.log").write_text("(00.02) Dumping FAILED.\n"),
                    "CRIU's dump did not go through"),
    "no CRIU log": (lambda s, t: (s / "work" / "dump.log").unlink(), "CRIU's log of the dump cannot be read"),
    "inventory still the gate": (lambda s, t: ((s / "checkpoint" / "inventory.img").unlink(),
                                               os.mkfifo(s / "checkpoint" / "inventory.img", 0o600)),
                                 "CRIU's inventory never reached a file"),
    "marker garbage": (lambda s, t: _replace(s / rollforward.MARKER, b"\x00garbage{"), "is not a marker of criu-shim"),
    "marker of another version": (lambda s, t: _replace(s / rollforward.MARKER, json.dumps(
        {"version": 99}).encode()), "is not a marker of criu-shim"),
    "marker huge": (lambda s, t: _replace(s / rollforward.MARKER, b" " * (rollforward.MARKER_MAX + 1)),
                    "bytes: not as criu-shim left it"),
    "marker readable by others": (lambda s, t: (s / rollforward.MARKER).chmod(0o644),
                                  "mode 644: not as criu-shim left it"),
    "marker a symlink": (lambda s, t: _symlink(s / rollforward.MARKER, "/etc/passwd"),
                         "rollforward.json: Too many levels of symbolic links"),
    "marker hard-linked": (lambda s, t: os.link(s / rollforward.MARKER, t / "elsewhere"),
                           "2 links: not as criu-shim left it"),
    "marker of another container": (lambda s, t: _replace(s / rollforward.MARKER, rollforward.Marker(
        "other", t / "out.tar", s, 512, 512).encode()), "names another checkpoint than the journal"),
    "marker for elsewhere": (lambda s, t: _replace(s / rollforward.MARKER, rollforward.Marker(
        CONTAINER, Path("/etc/shadow"), s, 512, 512).encode()), "names another checkpoint than the journal"),
    "sealed": (lambda s, t: _replace(s / rollforward.MARKER, rollforward.Marker(
        CONTAINER, t / "out.tar", s, 512, None).encode()), "the archive is sealed: its encrypted stream cannot"),
    "plain tar, file and tar ends apart": (lambda s, t: _replace(s / rollforward.MARKER, rollforward.Marker(
        CONTAINER, t / "out.tar", s, 512, 1024).encode()), "is not a marker of criu-shim"),
    "zstd level out of range": (lambda s, t: _replace(s / rollforward.MARKER, rollforward.Marker(
        CONTAINER, t / "out.tar", s, 512, 100, 99).encode()), "is not a marker of criu-shim"),
    "plain archive said to be zstd": (lambda s, t: _replace(s / rollforward.MARKER, rollforward.Marker(
        CONTAINER, t / "out.tar", s, 2048, 2048, 3).encode()), "are not a tar"),
    "marker past the archive": (lambda s, t: _replace(s / rollforward.MARKER, rollforward.Marker(
        CONTAINER, t / "out.tar", s, 1 << 30, 1 << 30).encode()), "the marker says 1073741824"),
    "marker mid-member": (lambda s, t: _replace(s / rollforward.MARKER, rollforward.Marker(
        CONTAINER, t / "out.tar", s, 3072, 3072).encode()), "first 3072 bytes are not a tar: unexpected end of data"),
    "archive garbage": (lambda s, t: _replace(s / ARCHIVE_NAME, os.urandom(8192)), "are not a tar"),
    "archive a symlink": (lambda s, t: _symlink(s / ARCHIVE_NAME, "/etc/passwd"),
                          "archive.tar: Too many levels of symbolic links"),
    "archive missing": (lambda s, t: (s / ARCHIVE_NAME).unlink(), "archive.tar: No such file or directory"),
    "late image a symlink": (lambda s, t: _symlink(s / "checkpoint" / "files.img", "/etc/shadow"),
                             "is not a file CRIU wrote"),
    "late image a fifo": (lambda s, t: ((s / "checkpoint" / "files.img").unlink(),
                                        os.mkfifo(s / "checkpoint" / "files.img", 0o600)),
                          "is not a file CRIU wrote"),
    "late image writable by others": (lambda s, t: (s / "checkpoint" / "files.img").chmod(0o666),
                                      "is not a file CRIU wrote"),
    "images dir a symlink": (lambda s, t: (os.rename(s / "checkpoint", t / "moved"),
                                           (s / "checkpoint").symlink_to(t / "moved")),
                             "not a directory of criu-shim"),
    "staging open to others": (lambda s, t: s.chmod(0o755), "not a private directory of criu-shim"),
    "asked path a directory": (lambda s, t: (t / "out.tar").mkdir(), "exists and is not a file"),
    "asked path a symlink": (lambda s, t: (t / "out.tar").symlink_to("/etc/passwd"), "exists and is not a file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_incomplete_staging_is_refused(tmp_path: Path, case: str) -> None:
    staging, location, _ = _staging(tmp_path)
    breaker, expected = HOSTILE[case]
    breaker(staging, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(rollforward.RollForwardError, match=expected):
        _roll(staging, location)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new beside the archive's path
    assert not location.is_file() or location.is_symlink()
    assert os.path.realpath("/etc/passwd") == "/etc/passwd" and Path("/etc/passwd").stat().st_size > 0


class Containerd:
    """As much of containerd as the recovery asks: the container's CRI state."""

    def __init__(self, state: int) -> None:
        self.state = state

    async def container_status(self, container_id: str) -> tuple[cri.ContainerStatus, dict[str, object]]:
        return cri.ContainerStatus(id=container_id, state=self.state), {}  # type: ignore[arg-type]


def test_recovery_rolls_forward_and_deletes_the_staging_directory(tmp_path: Path) -> None:
    staging, location, _ = _staging(tmp_path)
    facts = {recovery.CONTAINER: CONTAINER, recovery.LOCATION: str(location), recovery.STAGING: str(staging),
             recovery.DUMPING: True}
    done = asyncio.run(recovery.undo(Containerd(cri.CONTAINER_EXITED), facts))  # type: ignore[arg-type]
    assert done[0].startswith(f"rolled forward: archive {location} completed (") and "gate had opened" in done[0]
    assert "containerd reports the container CONTAINER_EXITED" in done
    assert location.is_file() and not staging.exists()


@pytest.mark.parametrize("log", [
    "Error (criu/cr-dump.c:1): Broken pipe\nDumping FAILED.\n",
    # A path the container chose, in CRIU's level-4 log, is not CRIU saying it is done.
    "(00.01) Dumping path for 7 fd via self 12 [/tmp/Dumping finished successfully]\n"
    "(00.02) Error (criu/cr-dump.c:1): Broken pipe\n(00.03) Dumping FAILED.\n",
], ids=["failed", "the success text in a path, then failed"])
def test_recovery_of_a_failed_dump_says_so_checks_the_container_and_leaves_nothing(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                                  log: str) -> None:
    staging, location, _ = _staging(tmp_path)
    (staging / "work" / "dump.log").write_text(log)
    ensured: list[str] = []

    async def ensure_running(containerd: object, container_id: str) -> str:
        ensured.append(container_id)
        return "the container was running"

    monkeypatch.setattr(recovery, "ensure_running", ensure_running)
    facts = {recovery.CONTAINER: CONTAINER, recovery.LOCATION: str(location), recovery.STAGING: str(staging),
             recovery.DUMPING: True}
    done = asyncio.run(recovery.undo(Containerd(cri.CONTAINER_RUNNING), facts))  # type: ignore[arg-type]
    assert done[0] == (f"archive {location} not completed: CRIU's dump did not go through (its log does not end "
                       "with 'Dumping finished successfully'): the container was not ended by it")
    assert ensured == [CONTAINER]
    assert "containerd reports the container CONTAINER_RUNNING" in done
    assert not location.exists() and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_recovery_signs_the_archive_it_completes_as_the_node_signs(tmp_path: Path) -> None:
    staging, location, _ = _staging(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    facts = {recovery.CONTAINER: CONTAINER, recovery.LOCATION: str(location), recovery.STAGING: str(staging)}
    done = asyncio.run(recovery.undo(Containerd(cri.CONTAINER_EXITED), facts,  # type: ignore[arg-type]
                                     signing_key=key_file))
    assert done[0].endswith(f", signed ({signing.signature_path(location)})"), done
    public = tmp_path / "signing.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    signing.check_archive(location, signing.load_trusted_keys([public]), True, "restore of x")  # verifies
