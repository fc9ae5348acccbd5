"""The rootfs diff from an overlayfs upperdir: entries, whiteouts, opaque dirs, no following."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import tarfile
from pathlib import Path

import pytest

from shim.checkpoint.rootfs import RootfsDiff, deleted_files_json, write_rootfs_diff

# VFS_CAP_REVISION_2 with the effective bit, permitting CAP_NET_RAW (13).
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    """What a container that edited, added, removed and linked files leaves in its upperdir."""
    root = tmp_path / "fs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("changed\n")
    whiteout(root / "etc" / "removed")
    (root / "etc" / "alternative").symlink_to("/usr/bin/tool")
    (root / "usr" / "bin").mkdir(parents=True)
    tool = root / "usr" / "bin" / "tool"
    tool.write_bytes(b"\x7fELF" + bytes(1000))
    os.chown(tool, 1000, 2000)
    os.chmod(tool, 0o4755)  # after chown, which clears set-uid
    os.utime(tool, (1_600_000_000, 1_600_000_000))
    os.link(tool, root / "usr" / "bin" / "tool-hardlink")
    (root / "host").symlink_to("/etc")  # a link to a host-looking directory: never descended
    (root / "var" / "cache").mkdir(parents=True)
    os.setxattr(root / "var" / "cache", "trusted.overlay.opaque", b"y")
    (root / "var" / "cache" / "fresh").write_text("new")
    (root / "var" / "empty").mkdir()
    whiteout(root / "var" / "gone-dir")
    os.mkfifo(root / "var" / "fifo")
    return root


def read(out: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(out) as tar:
        return {info.name: info for info in tar.getmembers()}


def test_entries_names_and_kinds(upper: Path, tmp_path: Path) -> None:
    out = tmp_path / "rootfs-diff.tar"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(upper / "var" / "sock"))  # skipped: a restore could not use it
        diff = write_rootfs_diff(upper, out)

    assert diff == RootfsDiff(out.stat().st_size, ["/etc/removed", "/var/gone-dir"], ["/var/cache"])
    with tarfile.open(out) as tar:
        assert tar.getnames() == [
            "etc",
            "etc/alternative",
            "etc/motd",
            "host",
            "usr",
            "usr/bin",
            "usr/bin/tool",
            "usr/bin/tool-hardlink",
            "var",
            "var/cache",
            "var/cache/fresh",
            "var/empty",
            "var/fifo",
        ]
    entries = read(out)
    assert entries["etc/alternative"].issym() and entries["etc/alternative"].linkname == "/usr/bin/tool"
    assert entries["host"].issym() and entries["host"].linkname == "/etc"
    assert entries["var/cache"].isdir() and entries["var/fifo"].isfifo()
    assert entries["usr/bin/tool-hardlink"].isreg()  # content duplicated, no hardlink entry
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_raw_names_have_no_dot_slash(upper: Path, tmp_path: Path) -> None:
    out = tmp_path / "rootfs-diff.tar"
    write_rootfs_diff(upper, out)
    with tarfile.open(out) as tar, out.open("rb") as raw:
        for info in tar.getmembers():
            raw.seek(info.offset)
            name = raw.read(100).rstrip(b"\0").decode()
            assert not name.startswith(("./", "/"))
            assert name.endswith("/") == info.isdir()


def test_file_metadata_and_content_are_kept(upper: Path, tmp_path: Path) -> None:
    out = tmp_path / "rootfs-diff.tar"
    write_rootfs_diff(upper, out)
    with tarfile.open(out) as tar:
        tool = tar.getmember("usr/bin/tool")
        assert (tool.mode, tool.uid, tool.gid, tool.mtime) == (0o4755, 1000, 2000, 1_600_000_000)
        assert (tool.uname, tool.gname) == ("", "")  # numeric ids only
        for name in ("usr/bin/tool", "usr/bin/tool-hardlink", "etc/motd"):
            data = tar.extractfile(name)
            assert data is not None and data.read() == (upper / name).read_bytes()


def test_security_capability_is_kept(upper: Path, tmp_path: Path) -> None:
    tool = upper / "usr" / "bin" / "tool"
    try:
        os.setxattr(tool, "security.capability", CAPABILITY)
    except OSError as exc:
        pytest.skip(f"cannot set file capabilities here: {exc}")
    out = tmp_path / "rootfs-diff.tar"
    write_rootfs_diff(upper, out)
    info = read(out)["usr/bin/tool"]
    value = info.pax_headers["SCHILY.xattr.security.capability"]
    assert value.encode("utf-8", "surrogateescape") == CAPABILITY


def test_xattr_whiteout_counts_as_deleted(upper: Path, tmp_path: Path) -> None:
    marker = upper / "etc" / "xattr-whiteout"
    marker.write_bytes(b"")
    os.setxattr(marker, "trusted.overlay.whiteout", b"")
    out = tmp_path / "rootfs-diff.tar"
    diff = write_rootfs_diff(upper, out)
    assert "/etc/xattr-whiteout" in diff.deleted
    assert "etc/xattr-whiteout" not in read(out)


def test_other_character_devices_are_archived(upper: Path, tmp_path: Path) -> None:
    os.mknod(upper / "etc" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    out = tmp_path / "rootfs-diff.tar"
    diff = write_rootfs_diff(upper, out)
    null = read(out)["etc/null"]
    assert null.ischr() and (null.devmajor, null.devminor) == (1, 3)
    assert "/etc/null" not in diff.deleted


@pytest.mark.parametrize("xattr", ["trusted.overlay.redirect", "trusted.overlay.metacopy"])
def test_redirect_and_metacopy_are_refused(upper: Path, tmp_path: Path, xattr: str) -> None:
    os.setxattr(upper / "usr" / "bin" / "tool" if "meta" in xattr else upper / "var", xattr, b"/x")
    out = tmp_path / "rootfs-diff.tar"
    with pytest.raises(ValueError, match=xattr.rsplit(".", 1)[1]):
        write_rootfs_diff(upper, out)
    assert not out.exists()


def test_existing_output_is_not_overwritten(upper: Path, tmp_path: Path) -> None:
    out = tmp_path / "rootfs-diff.tar"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        write_rootfs_diff(upper, out)
    assert out.read_bytes() == b"keep"


def test_upperdir_symlink_is_refused(upper: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(upper)
    with pytest.raises(OSError):
        write_rootfs_diff(tmp_path / "link", tmp_path / "rootfs-diff.tar")
    assert not (tmp_path / "rootfs-diff.tar").exists()


def test_empty_upperdir(tmp_path: Path) -> None:
    (tmp_path / "fs").mkdir()
    out = tmp_path / "rootfs-diff.tar"
    diff = write_rootfs_diff(tmp_path / "fs", out)
    assert diff == RootfsDiff(out.stat().st_size, [], [])
    assert read(out) == {}


def test_undecodable_names_survive_byte_for_byte(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    root.mkdir()
    (Path(os.fsdecode(bytes(root) + b"/caf\xe9"))).write_bytes(b"x")
    out = tmp_path / "rootfs-diff.tar"
    write_rootfs_diff(root, out)
    with tarfile.open(out, encoding="utf-8", errors="surrogateescape") as tar:
        assert [os.fsencode(name) for name in tar.getnames()] == [b"caf\xe9"]


def test_deep_tree_does_not_recurse(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(600):  # deeper than PATH_MAX allows by path, and than a naive recursion likes
        os.mkdir("dddddddd", dir_fd=fd)
        child = os.open("dddddddd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    out = tmp_path / "rootfs-diff.tar"
    write_rootfs_diff(root, out)
    with tarfile.open(out) as tar:
        assert len(tar.getmembers()) == 600


def test_deleted_files_json() -> None:
    data = deleted_files_json(["/etc/motd", "/var/a&b"])
    assert data == b'["/etc/motd","/var/a\\u0026b"]'
    assert json.loads(data) == ["/etc/motd", "/var/a&b"]
