"""Reading checkpoint archives for restore: hostile members refused, nothing left behind, nothing outside touched."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import struct
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.checkpoint.archive import Member, directory_members, write_archive
from shim.checkpoint.metadata import config_dump
from shim.checkpoint.rootfs import deleted_files_json, write_rootfs_diff
from shim.errors import InvalidArgument, NotFound
from shim.restore.checkpoint_unpack import open_checkpoint, parse_deleted_files
from shim.restore.rootfs_diff import apply_deleted_files, apply_rootfs_diff

SPEC = {"ociVersion": "1.0.2", "process": {"args": ["/counter"], "cwd": "/"},
        "annotations": {"io.kubernetes.cri.container-name": "counter"}}
CONFIG = config_dump("0123abcd", "counter", "docker.io/library/busybox:1.36",
                     "docker.io/library/busybox@sha256:" + "a" * 64, "io.containerd.runc.v2",
                     1_700_000_000_000_000_000, 1_700_000_100_500_000_000)
# Not a name that could exist: an escape into /etc would be visible as this file.
HOST_PROBE = "/etc/criu-shim-restore-test-probe"
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


# --- building archives -------------------------------------------------------

Entry = tuple[tarfile.TarInfo, bytes]


def reg(name: str, data: bytes = b"data", mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, gid, 1_600_000_000
    return info, data


def special(name: str, kind: bytes, linkname: str = "", mode: int = 0o755) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, linkname, mode, 1_600_000_000
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 8, 0
    return info, b""


def directory(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    info, _ = special(name, tarfile.DIRTYPE, mode=mode)
    info.uid, info.gid = uid, gid
    return info, b""


def symlink(name: str, target: str) -> Entry:
    return special(name, tarfile.SYMTYPE, target, 0o777)


def hardlink(name: str, target: str) -> Entry:
    return special(name, tarfile.LNKTYPE, target)


def tar_bytes(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def write_tar(path: Path, entries: list[Entry], compress: bool = False) -> Path:
    data = tar_bytes(entries)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def checkpoint_entries(**extra: bytes) -> list[Entry]:
    """The smallest archive restore accepts, plus named extra files."""
    entries = [reg("spec.dump", json.dumps(SPEC).encode()), reg("config.dump", CONFIG),
               directory("checkpoint"), reg("checkpoint/inventory.img", b"inventory"),
               reg("checkpoint/pages-1.img", bytes(range(256)) * 20)]
    return entries + [reg(name, data) for name, data in extra.items()]


# --- the world around the archive -------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything observable about a tree, symlinks not followed."""
    seen: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            detail: object = None
            if stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                detail = hashlib.sha256(path.read_bytes()).hexdigest()
            seen[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                                 st.st_mtime_ns, detail)
    return seen


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory standing for the host: a sentinel file in it must never change."""
    host = tmp_path / "outside"
    host.mkdir()
    (host / "sentinel").write_text("host data\n")
    before = snapshot(tmp_path / "outside")
    assert not os.path.lexists(HOST_PROBE)
    yield host
    assert snapshot(tmp_path / "outside") == before
    assert (host / "sentinel").read_text() == "host data\n"
    assert not os.path.lexists(HOST_PROBE)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "unpacked"
    path.mkdir(mode=0o700)
    return path


def refused(call: Callable[[], object], *fragments: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        call()
    for fragment in fragments:
        assert fragment in info.value.message
    return info.value.message


# --- open_checkpoint: hostile members -----------------------------------------------


@pytest.mark.parametrize(("entry", "reason"), [
    (reg("../x"), "has a '..' component"),
    (reg("../outside/sentinel", b"pwned"), "has a '..' component"),
    (reg("checkpoint/../../outside/sentinel", b"pwned"), "has a '..' component"),
    (reg("a/../../x"), "has a '..' component"),
    (reg(HOST_PROBE), "has an absolute name"),
    (reg("/etc/x"), "has an absolute name"),
    (symlink("checkpoint/criu.log", "/etc/shadow"), "is a symlink"),
    (symlink("container.log", "/var/log/syslog"), "is a symlink"),
    (hardlink("checkpoint/core-1.img", "spec.dump"), "is a hard link"),
    (special("checkpoint/tty", tarfile.CHRTYPE), "is a character device"),
    (special("checkpoint/disk", tarfile.BLKTYPE), "is a block device"),
    (special("checkpoint/pipe", tarfile.FIFOTYPE), "is a fifo"),
    (special("checkpoint/next-volume", b"V"), "is a tar entry of type b'V'"),
])
def test_hostile_member_refused_and_nothing_left(tmp_path: Path, dest: Path, outside: Path,
                                                 entry: Entry, reason: str) -> None:
    # After the legitimate members, so that there is something to clean up.
    path = write_tar(tmp_path / "evil.tar", [*checkpoint_entries(), entry])
    message = refused(lambda: open_checkpoint(path, dest), f"checkpoint archive {path}", reason)
    assert repr(entry[0].name) in message
    assert list(dest.iterdir()) == []
    assert dest.stat().st_mode & 0o777 == 0o700


def test_symlink_then_file_through_it_refused(tmp_path: Path, dest: Path, outside: Path) -> None:
    path = write_tar(tmp_path / "evil.tar",
                     [symlink("logs", str(outside)), reg("logs/sentinel", b"pwned"), *checkpoint_entries()])
    refused(lambda: open_checkpoint(path, dest), "'logs' is a symlink")
    assert list(dest.iterdir()) == []


def test_file_then_directory_of_same_name_refused(tmp_path: Path, dest: Path) -> None:
    path = write_tar(tmp_path / "a.tar", [reg("checkpoint"), reg("checkpoint/inventory.img")])
    refused(lambda: open_checkpoint(path, dest), "'checkpoint/inventory.img' needs 'checkpoint' to be a directory")
    assert list(dest.iterdir()) == []


def test_duplicate_member_refused(tmp_path: Path, dest: Path) -> None:
    path = write_tar(tmp_path / "a.tar", [*checkpoint_entries(), reg("spec.dump", b"{}")])
    refused(lambda: open_checkpoint(path, dest), "'spec.dump' appears twice")
    assert list(dest.iterdir()) == []


def test_size_and_member_limits(tmp_path: Path, dest: Path) -> None:
    entries = checkpoint_entries()
    total = sum(info.size for info, _ in entries)
    path = write_tar(tmp_path / "a.tar", entries)
    refused(lambda: open_checkpoint(path, dest, max_size=total - 1),
            f"'checkpoint/pages-1.img' takes the unpacked size over the limit of {total - 1} bytes")
    assert list(dest.iterdir()) == []
    refused(lambda: open_checkpoint(path, dest, max_members=3), "has more than 3 members")
    assert list(dest.iterdir()) == []
    assert open_checkpoint(path, dest, max_size=total, max_members=len(entries)).spec == SPEC


# --- open_checkpoint: damaged archives --------------------------------------------------


def _end_of_last_member(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


@pytest.mark.parametrize("cut", ["inside a header", "inside data", "before the end marker", "half"])
def test_truncated_archive(tmp_path: Path, dest: Path, cut: str) -> None:
    data = tar_bytes(checkpoint_entries())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        pages = tar.getmember("checkpoint/pages-1.img")
    length = {"inside a header": pages.offset + 100, "inside data": pages.offset_data + 1000,
              "before the end marker": _end_of_last_member(data), "half": len(data) // 2}[cut]
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:length])
    refused(lambda: open_checkpoint(path, dest), f"checkpoint archive {path} is truncated or corrupt: ")
    assert list(dest.iterdir()) == []


def test_corrupt_header_after_the_first(tmp_path: Path, dest: Path) -> None:
    data = bytearray(tar_bytes(checkpoint_entries()))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        offset = tar.getmember("checkpoint/inventory.img").offset
    data[offset + 3] ^= 0xFF  # tarfile alone would take the bad checksum as the end of the archive
    path = tmp_path / "bad.tar"
    path.write_bytes(bytes(data))
    refused(lambda: open_checkpoint(path, dest), "is truncated or corrupt: invalid header")
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 100, gzip.compress(b"x" * 5000)[:-10]])
def test_not_a_tar(tmp_path: Path, dest: Path, content: bytes) -> None:
    path = tmp_path / "junk.tar"
    path.write_bytes(content)
    refused(lambda: open_checkpoint(path, dest), "is truncated or corrupt")
    assert list(dest.iterdir()) == []


def test_truncated_gzip(tmp_path: Path, dest: Path) -> None:
    packed = gzip.compress(tar_bytes(checkpoint_entries()))
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(packed[: len(packed) - 40])
    refused(lambda: open_checkpoint(path, dest), "is truncated or corrupt")
    assert list(dest.iterdir()) == []


def test_zstd_without_the_module(tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes the import fail
    path = tmp_path / "a.tar.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    refused(lambda: open_checkpoint(path, dest), "is zstd-compressed", "zstd -d")
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(("missing", "text"), [
    (("spec.dump",), "has no spec.dump: not a checkpoint archive"),
    (("spec.dump", "config.dump"), "has no spec.dump, config.dump: not a checkpoint archive"),
    (("checkpoint/inventory.img",), "has no checkpoint/inventory.img: not a checkpoint archive"),
])
def test_required_member_missing(tmp_path: Path, dest: Path, missing: tuple[str, ...], text: str) -> None:
    entries = [entry for entry in checkpoint_entries() if entry[0].name not in missing]
    path = write_tar(tmp_path / "a.tar", entries)
    refused(lambda: open_checkpoint(path, dest), text)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(("name", "content", "text"), [
    ("spec.dump", b"{not json", "spec.dump is not valid JSON"),
    ("spec.dump", b"[1, 2]", "spec.dump is not a JSON object"),
    ("config.dump", b'{"a": NaN}', "config.dump is not valid JSON"),
    ("status.dump", b"\xff\xfe", "status.dump is not valid JSON"),
    ("deleted.files", b'["../../etc/passwd"]', "deleted.files entry '../../etc/passwd' is not an absolute path"),
    ("deleted.files", b'["/a/../../etc/passwd"]', "is not a normalised path"),
    ("deleted.files", b'["/"]', "is not a normalised path below /"),
    ("deleted.files", b'{"/etc": 1}', "is not a JSON array"),
    ("deleted.files", b"[7]", "deleted.files entry 7 is not a string"),
])
def test_bad_side_files(tmp_path: Path, dest: Path, name: str, content: bytes, text: str) -> None:
    entries = [entry for entry in checkpoint_entries() if entry[0].name != name]
    path = write_tar(tmp_path / "a.tar", [*entries, reg(name, content)])
    refused(lambda: open_checkpoint(path, dest), text)
    assert list(dest.iterdir()) == []


def test_not_a_regular_file_or_missing(tmp_path: Path, dest: Path) -> None:
    refused(lambda: open_checkpoint(tmp_path, dest), "is not a regular file")
    with pytest.raises(NotFound):
        open_checkpoint(tmp_path / "absent.tar", dest)


def test_destination_must_be_empty(tmp_path: Path, dest: Path) -> None:
    (dest / "leftover").write_text("x")
    path = write_tar(tmp_path / "a.tar", checkpoint_entries())
    with pytest.raises(ValueError, match="must be empty"):
        open_checkpoint(path, dest)
    assert [p.name for p in dest.iterdir()] == ["leftover"]


# --- open_checkpoint: valid archives ------------------------------------------------------


def test_our_own_archive_round_trips(tmp_path: Path, dest: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "inventory.img").write_bytes(b"inventory")
    (images / "pages-1.img").write_bytes(os.urandom(70_000))
    (images / "descriptors.json").write_text("[]")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_text("changed\n")
    (tmp_path / "staging").mkdir()
    diff = write_rootfs_diff(upper, tmp_path / "staging" / "rootfs-diff.tar")
    log = tmp_path / "ctr.log"
    log.write_text("2026-01-01T00:00:00Z stdout F hello\n")
    location = tmp_path / "checkpoint.tar"
    write_archive(location, [
        Member("spec.dump", data=json.dumps(SPEC).encode()), Member("config.dump", data=CONFIG),
        Member("status.dump", data=b'{"id":"0123abcd","state":1}'),
        *directory_members("checkpoint", images),
        Member("rootfs-diff.tar", source=tmp_path / "staging" / "rootfs-diff.tar"),
        Member("deleted.files", data=deleted_files_json(["/etc/removed", "/var/cache"])),
        Member("container.log", source=log),
    ], durable=False)

    unpacked = open_checkpoint(location, dest)

    assert unpacked.dir == dest
    assert unpacked.spec == SPEC
    assert unpacked.config["rootfsImageRef"].endswith("a" * 64)
    assert unpacked.status == {"id": "0123abcd", "state": 1}
    assert unpacked.images_dir == dest / "checkpoint"
    assert (dest / "checkpoint" / "pages-1.img").read_bytes() == (images / "pages-1.img").read_bytes()
    assert unpacked.rootfs_diff == dest / "rootfs-diff.tar"
    assert unpacked.rootfs_diff.stat().st_size == diff.size
    assert unpacked.deleted_files == ["/etc/removed", "/var/cache"]
    assert unpacked.log == dest / "container.log"
    assert unpacked.log.read_text() == log.read_text()
    assert unpacked.producer == "containerd"


def test_modes_and_owners_from_the_archive_are_ignored(tmp_path: Path, dest: Path) -> None:
    entries = [*checkpoint_entries()[:2], directory("checkpoint", mode=0o777, uid=1234),
               reg("checkpoint/inventory.img", b"i", mode=0o4777, uid=1234, gid=99)]
    unpacked = open_checkpoint(write_tar(tmp_path / "a.tar", entries), dest)
    for path, mode in ((unpacked.images_dir, 0o700), (unpacked.images_dir / "inventory.img", 0o600)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, os.geteuid(), os.getegid())


def test_gzip_archive_from_podman(tmp_path: Path, dest: Path) -> None:
    spec = {**SPEC, "annotations": {"io.container.manager": "libpod"}}
    entries = [reg("./spec.dump", json.dumps(spec).encode()), directory("./"),
               *checkpoint_entries()[1:], reg("ctr.log", b"log"), reg("network.status", b"{}")]
    unpacked = open_checkpoint(write_tar(tmp_path / "a.tar.gz", entries, compress=True), dest)
    assert unpacked.producer == "podman"
    assert unpacked.log == dest / "ctr.log"
    assert (dest / "checkpoint" / "pages-1.img").read_bytes() == bytes(range(256)) * 20
    assert unpacked.status is None and unpacked.rootfs_diff is None and unpacked.deleted_files == []


def test_cri_o_archive(tmp_path: Path, dest: Path) -> None:
    spec = {**SPEC, "annotations": {"io.container.manager": "cri-o"}}
    entries = [reg("spec.dump", json.dumps(spec).encode()), *checkpoint_entries()[1:],
               reg("io.kubernetes.cri-o.LogPath", b"log"), reg("bind.mounts", b"[]"),
               reg("deleted.files", b'["/etc/motd"]')]
    unpacked = open_checkpoint(write_tar(tmp_path / "a.tar", entries), dest)
    assert unpacked.producer == "cri-o"
    assert unpacked.log == dest / "io.kubernetes.cri-o.LogPath"
    assert unpacked.deleted_files == ["/etc/motd"]


class CopyCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls = 0
        self.bytes = 0
        self._real = getattr(os, name)
        monkeypatch.setattr(os, name, self)

    def __call__(self, *args: Any) -> int:
        self.calls += 1
        done: int = self._real(*args)
        self.bytes += done
        return done


def test_large_member_is_copied_in_the_kernel(tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "inventory.img").write_bytes(b"inventory")
    big = 200 << 20
    with (images / "pages-1.img").open("wb") as f:
        f.truncate(big)
        f.seek(big - 5)
        f.write(b"tail!")
    location = tmp_path / "big.tar"
    write_archive(location, [Member("spec.dump", data=b"{}"), Member("config.dump", data=CONFIG),
                             *directory_members("checkpoint", images)], durable=False)
    copies = CopyCounter(monkeypatch, "copy_file_range")

    def no_python_copy(*args: object) -> None:
        raise AssertionError("member data went through Python")

    monkeypatch.setattr(tarfile.TarFile, "extractfile", no_python_copy)

    unpacked = open_checkpoint(location, dest)

    pages = unpacked.images_dir / "pages-1.img"
    assert pages.stat().st_size == big
    with pages.open("rb") as unpacked_pages:
        unpacked_pages.seek(big - 5)
        assert unpacked_pages.read() == b"tail!"
    assert copies.bytes == big + len("inventory") + len(CONFIG) + 2
    assert copies.calls < 10


def test_sendfile_when_copy_file_range_cannot(tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(*args: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    sends = CopyCounter(monkeypatch, "sendfile")
    unpacked = open_checkpoint(write_tar(tmp_path / "a.tar", checkpoint_entries()), dest)
    assert (unpacked.images_dir / "pages-1.img").read_bytes() == bytes(range(256)) * 20
    assert sends.calls >= 4 and sends.bytes == sum(entry[0].size for entry in checkpoint_entries())


# --- apply_rootfs_diff ------------------------------------------------------------------


@pytest.fixture
def rootfs(tmp_path: Path, outside: Path) -> Path:
    """A container rootfs from an image: a few files, and symlinks an image may well hold."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("image motd\n")
    (root / "etc" / "hostname").write_text("image\n")
    (root / "var" / "cache" / "apt").mkdir(parents=True)
    (root / "var" / "cache" / "apt" / "pkgcache.bin").write_bytes(b"cache")
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "host").symlink_to(outside)  # what a hostile image could ship
    return root


def test_our_own_rootfs_diff_applies(tmp_path: Path, rootfs: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_text("changed\n")
    os.mknod(upper / "etc" / "hostname", stat.S_IFCHR, os.makedev(0, 0))  # an overlay whiteout
    (upper / "usr" / "bin").mkdir(parents=True)
    tool = upper / "usr" / "bin" / "tool"
    tool.write_bytes(b"\x7fELF" + bytes(1000))
    os.chown(tool, 1000, 2000)
    os.chmod(tool, 0o4755)
    os.utime(tool, (1_600_000_000, 1_600_000_000))
    try:
        os.setxattr(tool, "security.capability", CAPABILITY)
        capability = True
    except OSError:
        capability = False
    (upper / "usr" / "bin" / "alias").symlink_to("/usr/bin/tool")
    os.mkfifo(upper / "usr" / "bin" / "pipe", 0o640)
    diff_path = tmp_path / "rootfs-diff.tar"
    diff = write_rootfs_diff(upper, diff_path)

    apply_rootfs_diff(diff_path, rootfs)
    apply_deleted_files(diff.deleted, rootfs)

    assert (rootfs / "etc" / "motd").read_text() == "changed\n"
    assert not (rootfs / "etc" / "hostname").exists()
    installed = rootfs / "usr" / "bin" / "tool"
    st = installed.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o4755, 1000, 2000, 1_600_000_000)
    if capability:
        assert os.getxattr(installed, "security.capability") == CAPABILITY
    assert os.readlink(rootfs / "usr" / "bin" / "alias") == "/usr/bin/tool"
    pipe = (rootfs / "usr" / "bin" / "pipe").lstat()
    assert stat.S_ISFIFO(pipe.st_mode) and stat.S_IMODE(pipe.st_mode) == 0o640
    assert os.readlink(rootfs / "lib") == "usr/lib"


@pytest.mark.parametrize(("entries", "reason"), [
    ([symlink("evil", "OUTSIDE"), reg("evil/sentinel", b"pwned")],
     "'evil/sentinel' would be written through the symlink 'evil'"),
    ([symlink("evil", "OUTSIDE"), directory("evil/sub")],
     "'evil/sub' would be written through the symlink 'evil'"),
    ([reg("host/sentinel", b"pwned")], "'host/sentinel' would be written through the symlink 'host'"),
    ([reg("lib/libc.so.6", b"pwned")], "would be written through the symlink 'lib'"),
    ([reg("etc/motd", b"ok"), reg("host/.wh.sentinel")], "'host/.wh.sentinel' would be written through the symlink"),
    ([directory("host"), reg("etc/motd", b"x"), symlink("etc", "OUTSIDE"), reg("etc/new", b"pwned")],
     "would be written through the symlink 'etc'"),
    ([reg("../outside/sentinel", b"pwned")], "has a '..' component"),
    ([reg("etc/../../outside/sentinel", b"pwned")], "has a '..' component"),
    ([reg("OUTSIDE/sentinel", b"pwned")], "has an absolute name"),
    ([hardlink("etc/passwd", "OUTSIDE/sentinel")], "hard link 'etc/passwd' to"),
    ([hardlink("etc/passwd", "../outside/sentinel")], "has a '..' component"),
    ([hardlink("etc/passwd", "host/sentinel")], "would be written through the symlink 'host'"),
    ([hardlink("etc/passwd", "etc")], "which is a directory"),
    ([special("dev/sda", tarfile.CHRTYPE)], "is a character device"),
    ([special("dev/sda", tarfile.BLKTYPE)], "is a block device"),
    ([reg("etc/.wh..."), reg("x")], "names no file"),
    ([reg("etc/motd", b"ok"), reg("etc/motd/x")], "needs 'etc/motd' to be a directory, not a file"),
])
def test_hostile_rootfs_diff_refused_before_any_write(tmp_path: Path, rootfs: Path, outside: Path,
                                                      entries: list[Entry], reason: str) -> None:
    for info, _ in entries:
        info.name = info.name.replace("OUTSIDE", str(outside))
        info.linkname = info.linkname.replace("OUTSIDE", str(outside))
    diff = write_tar(tmp_path / "diff.tar", entries)
    before = snapshot(rootfs)
    refused(lambda: apply_rootfs_diff(diff, rootfs), f"rootfs diff {diff}", reason)
    assert snapshot(rootfs) == before


def test_truncated_rootfs_diff_changes_nothing(tmp_path: Path, rootfs: Path) -> None:
    data = tar_bytes([reg("etc/motd", b"new"), reg("etc/big", bytes(50_000))])
    diff = tmp_path / "diff.tar"
    diff.write_bytes(data[:20_000])
    before = snapshot(rootfs)
    refused(lambda: apply_rootfs_diff(diff, rootfs), "is truncated or corrupt")
    assert snapshot(rootfs) == before


def test_symlinks_are_created_never_followed(tmp_path: Path, rootfs: Path, outside: Path) -> None:
    (rootfs / "etc" / "shadow").symlink_to(outside / "sentinel")
    (rootfs / "data").symlink_to(outside)
    diff = write_tar(tmp_path / "diff.tar", [
        symlink("etc/alternative", str(outside / "sentinel")),  # a link pointing out is fine: it is never used
        reg("etc/shadow", b"root:x:1:"),  # replaces the symlink, does not write through it
        symlink("tmp", str(outside)), directory("tmp", mode=0o1777), reg("tmp/x", b"x"),  # replaced, then used
        directory("data", mode=0o700), reg("data/db", b"db"),  # a directory where the image had a symlink
        hardlink("etc/motd.orig", "etc/motd"),  # a link to a file of the image
    ])
    apply_rootfs_diff(diff, rootfs)
    assert os.readlink(rootfs / "etc" / "alternative") == str(outside / "sentinel")
    assert not (rootfs / "etc" / "shadow").is_symlink()
    assert (rootfs / "etc" / "shadow").read_bytes() == b"root:x:1:"
    assert stat.S_IMODE((rootfs / "tmp").lstat().st_mode) == 0o1777
    assert (rootfs / "tmp" / "x").read_bytes() == b"x"
    assert (rootfs / "data" / "db").read_bytes() == b"db" and not (rootfs / "data").is_symlink()
    assert (rootfs / "etc" / "motd.orig").stat().st_ino == (rootfs / "etc" / "motd").stat().st_ino


def test_containerd_gzip_diff_with_whiteouts(tmp_path: Path, rootfs: Path) -> None:
    (rootfs / "var" / "cache" / "keep").mkdir()
    diff = write_tar(tmp_path / "rootfs-diff.tar", [
        directory("etc"), reg("etc/.wh.motd"), reg("etc/.wh.absent"), reg("gone/.wh.x"),
        directory("var/cache"), reg("var/cache/new", b"n"), reg("var/cache/.wh..wh..opq"),
        reg("var/.wh..wh.plnk"),  # AUFS metadata: ignored
        reg("usr/lib/x", b"x"),
    ], compress=True)
    apply_rootfs_diff(diff, rootfs)
    assert not (rootfs / "etc" / "motd").exists()
    assert (rootfs / "etc" / "hostname").exists()
    assert sorted(p.name for p in (rootfs / "var" / "cache").iterdir()) == ["new"]
    assert not (rootfs / "gone").exists()
    assert not (rootfs / "var" / ".wh..wh.plnk").exists()
    assert (rootfs / "usr" / "lib" / "x").read_bytes() == b"x"


def test_owner_out_of_range_refused(tmp_path: Path, rootfs: Path) -> None:
    diff = write_tar(tmp_path / "diff.tar", [reg("etc/x", uid=(1 << 32) - 1)])
    refused(lambda: apply_rootfs_diff(diff, rootfs), "has owner 4294967295:0")


# --- apply_deleted_files --------------------------------------------------------------------


@pytest.mark.parametrize(("entries", "reason"), [
    (["../../outside/sentinel"], "'../../outside/sentinel' is not an absolute path"),
    (["/../outside/sentinel"], "is not a normalised path"),
    (["/etc/motd", "/etc/../../outside/sentinel"], "is not a normalised path"),
    (["//outside/sentinel"], "is not a normalised path"),
    (["/"], "below /"),
    (["/etc/motd", "/host/sentinel"], "'/host/sentinel': its path goes through the symlink 'host'"),
    (["/etc/motd", "/lib/x/y"], "its path goes through the symlink 'lib'"),
])
def test_hostile_deleted_files_refused_before_any_removal(rootfs: Path, outside: Path, entries: list[str],
                                                           reason: str) -> None:
    before = snapshot(rootfs)
    refused(lambda: apply_deleted_files(entries, rootfs), reason)
    assert snapshot(rootfs) == before


def test_deleted_files_removes_without_following(rootfs: Path, outside: Path) -> None:
    apply_deleted_files(["/etc/motd", "/host", "/var/cache", "/nothing/here", "/etc/motd/below-a-file"], rootfs)
    assert not (rootfs / "etc" / "motd").exists()
    assert not os.path.lexists(rootfs / "host")  # the link went, its target stayed
    assert not (rootfs / "var" / "cache").exists()
    assert (rootfs / "etc" / "hostname").exists()


def test_deleted_files_must_be_a_list(rootfs: Path) -> None:
    refused(lambda: apply_deleted_files("/etc/motd", rootfs), "not a JSON array")  # type: ignore[arg-type]


def test_parse_deleted_files() -> None:
    assert parse_deleted_files(b'["/etc/motd", "/var/lib/x y"]') == ["/etc/motd", "/var/lib/x y"]
    assert parse_deleted_files(b"[]") == []
    refused(lambda: parse_deleted_files(b'["/etc/"]'), "'/etc/' is not a normalised path")
    refused(lambda: parse_deleted_files(b'["/etc/\\u0000x"]'), "is not an absolute path")
