"""The checkpoint archive writer: names and headers readers rely on, atomicity, no leftovers."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shim import fileio
from shim.api.cri.v1 import api_pb2
from shim.checkpoint.archive import (
    Member,
    SourceChangedError,
    directory_members,
    write_archive,
)
from shim.checkpoint.metadata import config_dump, spec_dump, status_dump

CHECKPOINTCTL = Path("/opt/criu-shim/bin/checkpointctl")
TEMP_NAME = re.compile(r"^\.out\.tar\.criu-shim-[0-9a-f]{16}\.tmp$")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A CRIU-like image directory: flat files, one nested directory, a multi-block file."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "inventory.img").write_bytes(b"inventory")
    (root / "pages-1.img").write_bytes(bytes(range(256)) * 41)  # 10496 bytes: not block-aligned
    (root / "descriptors.json").write_text("[]")
    (root / "sub" / "x.img").write_bytes(b"x")
    return root


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def header_names(path: Path) -> list[str]:
    """Names exactly as stored in the ustar header (tarfile strips a directory's "/")."""
    with tarfile.open(path) as tar:
        return [_raw_name(path, member.offset) for member in tar.getmembers()]


def _raw_name(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(100).rstrip(b"\0").decode()


def test_names_headers_and_contents(images: Path, out_dir: Path) -> None:
    location = out_dir / "out.tar"
    members = [
        Member("spec.dump", data=b'{"ociVersion":"1.1.0"}'),
        Member("config.dump", data=b"{}"),
        *directory_members("checkpoint", images),
    ]

    size = write_archive(location, members)

    assert size == location.stat().st_size
    assert size % tarfile.RECORDSIZE == 0
    assert header_names(location) == [
        "spec.dump",
        "config.dump",
        "checkpoint/",
        "checkpoint/descriptors.json",
        "checkpoint/inventory.img",
        "checkpoint/pages-1.img",
        "checkpoint/sub/",
        "checkpoint/sub/x.img",
    ]
    with tarfile.open(location) as tar:
        for info in tar.getmembers():
            assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "root", "root")
            assert info.mode == (0o700 if info.isdir() else 0o600)
        assert tar.getmember("checkpoint").isdir()
        for name in ("inventory.img", "pages-1.img", "sub/x.img"):
            extracted = tar.extractfile(f"checkpoint/{name}")
            assert extracted is not None
            assert extracted.read() == (images / name).read_bytes()
        spec = tar.extractfile("spec.dump")
        assert spec is not None and spec.read() == b'{"ociVersion":"1.1.0"}'
    assert stat.S_IMODE(location.stat().st_mode) == 0o600
    assert os.listdir(out_dir) == ["out.tar"]


@pytest.mark.parametrize("umask", [0o000, 0o277, 0o777])
def test_final_mode_is_0600_whatever_the_umask(out_dir: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_archive(out_dir / "out.tar", [Member("a", data=b"x")])
    finally:
        os.umask(old)
    assert stat.S_IMODE((out_dir / "out.tar").stat().st_mode) == 0o600


def test_existing_file_is_replaced(out_dir: Path) -> None:
    location = out_dir / "out.tar"
    location.write_bytes(b"old")
    write_archive(location, [Member("a", data=b"new")])
    with tarfile.open(location) as tar:
        assert tar.getnames() == ["a"]


def test_temp_file_is_private_and_removed_when_members_fail(out_dir: Path) -> None:
    seen: list[tuple[str, int]] = []

    def members() -> Iterator[Member]:
        yield Member("spec.dump", data=b"{}")
        (temp,) = os.listdir(out_dir)
        seen.append((temp, stat.S_IMODE(os.stat(out_dir / temp).st_mode)))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_archive(out_dir / "out.tar", members())

    assert len(seen) == 1
    assert TEMP_NAME.match(seen[0][0])
    assert seen[0][1] == 0o600
    assert os.listdir(out_dir) == []


def test_keyboard_interrupt_propagates_and_leaves_nothing(out_dir: Path) -> None:
    def members() -> Iterator[Member]:
        yield Member("a", data=b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_archive(out_dir / "out.tar", members())
    assert os.listdir(out_dir) == []


def test_failure_keeps_an_existing_file_untouched(out_dir: Path) -> None:
    location = out_dir / "out.tar"
    location.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        write_archive(location, [Member("a", source=out_dir / "missing")])
    assert location.read_bytes() == b"old"
    assert os.listdir(out_dir) == ["out.tar"]


def test_vanished_source_leaves_nothing(images: Path, out_dir: Path) -> None:
    members = directory_members("checkpoint", images)
    (images / "pages-1.img").unlink()
    with pytest.raises(FileNotFoundError):
        write_archive(out_dir / "out.tar", members)
    assert os.listdir(out_dir) == []


def _enospc(*args: object) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_in_copy_file_range_leaves_nothing(
    images: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "copy_file_range", _enospc)
    with pytest.raises(OSError) as caught:
        write_archive(out_dir / "out.tar", directory_members("checkpoint", images))
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(out_dir) == []


def test_enospc_in_write_leaves_nothing(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "write", _enospc)
    with pytest.raises(OSError) as caught:
        write_archive(out_dir / "out.tar", [Member("a", data=b"x")])
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(out_dir) == []


def test_enospc_in_fsync_leaves_nothing(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError):
        write_archive(out_dir / "out.tar", [Member("a", data=b"x")])
    assert os.listdir(out_dir) == []


def test_failed_directory_fsync_removes_the_renamed_archive(
    out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "directory fsync failed")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="directory fsync"):
        write_archive(out_dir / "out.tar", [Member("a", data=b"x")])
    assert os.listdir(out_dir) == []


def test_sendfile_fallback_when_copy_file_range_cannot(
    images: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exdev(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", exdev)
    location = out_dir / "out.tar"
    write_archive(location, directory_members("checkpoint", images))
    with tarfile.open(location) as tar:
        pages = tar.extractfile("checkpoint/pages-1.img")
        assert pages is not None and pages.read() == (images / "pages-1.img").read_bytes()


def test_sendfile_failure_after_fallback_leaves_nothing(
    images: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exdev(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", exdev)
    monkeypatch.setattr(os, "sendfile", _enospc)
    with pytest.raises(OSError) as caught:
        write_archive(out_dir / "out.tar", directory_members("checkpoint", images))
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(out_dir) == []


def test_source_that_shrinks_fails_and_leaves_nothing(
    images: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)  # EOF before the header's size
    with pytest.raises(SourceChangedError, match="checkpoint/descriptors.json"):
        write_archive(out_dir / "out.tar", directory_members("checkpoint", images))
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize(
    "name", ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a/", "a/./b", ".", "..", "a\0b"]
)
def test_invalid_member_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        Member(name, data=b"")


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"data": b"", "is_dir": True}, {"data": b"", "source": Path("/x")}],
)
def test_member_needs_exactly_one_kind(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Member("a", **kwargs)  # type: ignore[arg-type]


def test_duplicate_names_are_refused(out_dir: Path) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        write_archive(out_dir / "out.tar", [Member("a", data=b""), Member("a", is_dir=True)])
    assert os.listdir(out_dir) == []


def test_symlink_source_is_not_followed(tmp_path: Path, out_dir: Path) -> None:
    (tmp_path / "secret").write_text("host")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(OSError) as caught:
        write_archive(out_dir / "out.tar", [Member("a", source=tmp_path / "link")])
    assert caught.value.errno == errno.ELOOP
    assert os.listdir(out_dir) == []


def test_fifo_source_is_refused_without_blocking(tmp_path: Path, out_dir: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="fifo"):
        write_archive(out_dir / "out.tar", [Member("a", source=tmp_path / "fifo")])
    assert os.listdir(out_dir) == []


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_archive(tmp_path / "nope" / "out.tar", [Member("a", data=b"")])


def test_directory_members_order_and_kinds(images: Path) -> None:
    members = directory_members("checkpoint", images)
    assert [(m.name, m.is_dir) for m in members] == [
        ("checkpoint", True),
        ("checkpoint/descriptors.json", False),
        ("checkpoint/inventory.img", False),
        ("checkpoint/pages-1.img", False),
        ("checkpoint/sub", True),
        ("checkpoint/sub/x.img", False),
    ]
    assert members[2].source == images / "inventory.img"


def test_directory_members_refuses_symlinks(images: Path) -> None:
    link = images / "sub" / "link.img"
    link.symlink_to("/etc/shadow")
    with pytest.raises(ValueError, match=re.escape(f"{link}: is a symlink")):
        directory_members("checkpoint", images)


def test_directory_members_refuses_sockets_and_fifos(images: Path) -> None:
    os.mkfifo(images / "fifo")
    with pytest.raises(ValueError, match="fifo"):
        directory_members("checkpoint", images)
    os.unlink(images / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(images / "sock"))
        with pytest.raises(ValueError, match="socket"):
            directory_members("checkpoint", images)


def test_directory_members_root_must_be_a_real_directory(images: Path, tmp_path: Path) -> None:
    (tmp_path / "root-link").symlink_to(images)
    with pytest.raises(ValueError, match="not a directory"):
        directory_members("checkpoint", tmp_path / "root-link")


def show(archive_path: Path) -> subprocess.CompletedProcess[str]:
    argv = [str(CHECKPOINTCTL), "show", str(archive_path)]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


@pytest.mark.skipif(not CHECKPOINTCTL.exists(), reason=f"{CHECKPOINTCTL} is not installed")
def test_checkpointctl_shows_the_archive(images: Path, out_dir: Path) -> None:
    annotations = {
        "io.kubernetes.cri.container-name": "web",
        "io.kubernetes.cri.sandbox-name": "pod-1",
        "io.kubernetes.cri.sandbox-namespace": "ns-1",
    }
    spec = json.dumps({"ociVersion": "1.1.0", "annotations": annotations}).encode()
    status = api_pb2.ContainerStatus(id="c0ffee", state=api_pb2.CONTAINER_RUNNING)
    status.metadata.name = "web"
    status.image.image = "docker.io/library/busybox:latest"
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    config = config_dump(
        "c0ffee", "web", "docker.io/library/busybox:latest", "docker.io/library/busybox@sha256:00",
        "io.containerd.runc.v2", created, datetime.now(UTC),
    )
    location = out_dir / "out.tar"
    write_archive(location, [
        Member("spec.dump", data=spec_dump(spec)),
        Member("config.dump", data=config),
        Member("status.dump", data=status_dump(status)),
        *directory_members("checkpoint", images),
    ])

    shown = show(location)

    assert shown.returncode == 0, shown.stderr
    assert "web" in shown.stdout
    assert "containerd" in shown.stdout


@pytest.mark.skipif(not CHECKPOINTCTL.exists(), reason=f"{CHECKPOINTCTL} is not installed")
def test_checkpointctl_needs_the_directory_entry(images: Path, tmp_path: Path) -> None:
    """Why `checkpoint/` is written explicitly: without the header checkpointctl refuses."""
    location = tmp_path / "no-dir.tar"
    spec = b'{"ociVersion":"1.1.0","annotations":{}}'
    now = datetime.now(UTC)
    write_archive(location, [
        Member("spec.dump", data=spec),
        Member("config.dump", data=config_dump("i", "n", "", "", "", now, now)),
        Member("checkpoint/inventory.img", source=images / "inventory.img"),
    ])
    shown = show(location)
    assert shown.returncode != 0
    assert "checkpoint directory is missing" in shown.stderr


def test_large_member_streams_through_the_kernel(
    tmp_path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi-chunk file is copied by copy_file_range calls, never read into Python."""
    source = tmp_path / "big"
    with source.open("wb") as f:
        f.truncate(3 * 1024 * 1024 + 7)
    calls: list[int] = []
    real = os.copy_file_range

    def spy(src: int, dst: int, count: int, offset_src: int | None = None) -> int:
        done = real(src, dst, min(count, 1024 * 1024), offset_src)
        calls.append(done)
        return done

    monkeypatch.setattr(os, "copy_file_range", spy)
    monkeypatch.setattr(fileio, "_CHUNK", 1024 * 1024)
    location = out_dir / "out.tar"
    write_archive(location, [Member("big", source=source)])
    assert sum(calls) == source.stat().st_size and len(calls) == 4
    with tarfile.open(location) as tar:
        assert tar.getmember("big").size == source.stat().st_size
