"""The pod's /dev/shm in a checkpoint: what is saved, Podman's layout, and a hostile member refused."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from shim.checkpoint import devshm
from shim.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from shim.restore.devshm import apply_devshm, restore_devshm

SANDBOX = "5f0c" * 16
ROOT = os.geteuid() == 0


def _spec(*mounts: tuple[str, str], sandbox: str | None = SANDBOX) -> dict[str, object]:
    annotations = {devshm.SANDBOX_ID_ANNOTATION: sandbox} if sandbox else {}
    return {"ociVersion": "1.1.0", "annotations": annotations,
            "mounts": [{"destination": d, "type": "bind", "source": s, "options": ["rbind"]} for d, s in mounts]}


def _pod_shm(tmp_path: Path, name: str = "state") -> Path:
    shm = tmp_path / name / "io.containerd.grpc.v1.cri" / "sandboxes" / SANDBOX / "shm"
    shm.mkdir(parents=True)
    return shm


# --- whose /dev/shm ------------------------------------------------------------


def test_the_pods_own_tmpfs_is_found_in_the_spec() -> None:
    source = f"/run/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/shm"
    assert devshm.pod_shm_dir(_spec(("/proc", "proc"), ("/dev/shm", source))) == Path(source)


@pytest.mark.parametrize("spec", [
    _spec(("/dev/shm", "/dev/shm")),  # host IPC: the node's /dev/shm is not the pod's to save
    _spec(("/dev/shm", "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/dshm")),  # a volume
    _spec(("/dev/shm", f"/run/x/sandboxes/{'0' * 64}/shm")),  # another sandbox's
    _spec(("/dev/shm", f"/run/x/sandboxes/{SANDBOX}/shm"), sandbox=None),  # not a CRI container
    _spec(("/dev/shm", f"run/x/sandboxes/{SANDBOX}/shm")),  # relative
    _spec(("/tmp", f"/run/x/sandboxes/{SANDBOX}/shm")),
    # The last mount at a destination is what the container sees: a volume over the pod's tmpfs.
    _spec(("/dev/shm", f"/run/x/sandboxes/{SANDBOX}/shm"), ("/dev/shm", "/var/lib/kubelet/pods/u/v")),
])
def test_anything_else_is_not_the_pods(spec: dict[str, object]) -> None:
    assert devshm.pod_shm_dir(spec) is None


def test_a_container_without_a_pod_tmpfs_saves_nothing(tmp_path: Path) -> None:
    out = tmp_path / devshm.MEMBER
    assert devshm.save(json.dumps(_spec(("/dev/shm", "/dev/shm"))).encode(), out) is False
    assert devshm.save(b"not json", out) is False
    assert not out.exists()


# --- saving -----------------------------------------------------------------------


def _fill(shm: Path) -> None:
    (shm / "PostgreSQL.1234").write_bytes(b"segment" * 1000)
    os.chmod(shm / "PostgreSQL.1234", 0o600)
    sparse = os.open(shm / "sparse", os.O_CREAT | os.O_WRONLY, 0o640)
    os.pwrite(sparse, b"tail", (4 << 20) - 4)  # 4 MiB apparent, one page of data
    os.close(sparse)
    (shm / "dir" / "sub").mkdir(parents=True)
    (shm / "dir" / "sub" / "note").write_text("note\n")
    os.symlink("/etc/passwd", shm / "link")
    os.mkfifo(shm / "fifo")


def test_saved_as_podman_lays_it_out(tmp_path: Path) -> None:
    shm = _pod_shm(tmp_path)
    _fill(shm)
    out = tmp_path / devshm.MEMBER
    assert devshm.save(json.dumps(_spec(("/dev/shm", str(shm)))).encode(), out) is True
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with tarfile.open(out) as tar:
        names = tar.getnames()
        # tarfile drops a directory's trailing slash when reading; the raw header keeps it (below).
        assert names == [".", "PostgreSQL.1234", "dir", "dir/sub", "dir/sub/note", "sparse"]
        segment = tar.getmember("PostgreSQL.1234")
        assert stat.S_IMODE(segment.mode) == 0o600
        assert tar.extractfile(segment).read() == b"segment" * 1000  # type: ignore[union-attr]
    # Only what a restore accepts is written: the symlink and the fifo are left out.
    assert out.read_bytes()[:100].rstrip(b"\0") == b"./"  # Podman's first entry, the directory itself


def test_over_the_size_limit_the_checkpoint_fails_and_leaves_no_file(tmp_path: Path) -> None:
    shm = _pod_shm(tmp_path)
    (shm / "big").write_bytes(b"x" * 5000)
    out = tmp_path / devshm.MEMBER
    with pytest.raises(FailedPrecondition, match="more than 4096 bytes"):
        devshm.write_devshm(shm, out, max_size=4096)
    assert not out.exists()
    with pytest.raises(FailedPrecondition, match="entries"):
        devshm.write_devshm(shm, out, max_entries=1)
    assert not out.exists()


def test_a_deep_tree_is_refused(tmp_path: Path) -> None:
    shm = _pod_shm(tmp_path)
    deep = shm.joinpath(*(["d"] * (devshm.MAX_DEPTH + 2)))
    deep.mkdir(parents=True)
    with pytest.raises(FailedPrecondition, match="deeper"):
        devshm.write_devshm(shm, tmp_path / devshm.MEMBER)
    assert not (tmp_path / devshm.MEMBER).exists()


# --- restoring --------------------------------------------------------------------


def test_round_trip_into_a_new_pod(tmp_path: Path) -> None:
    old = _pod_shm(tmp_path, "old")
    _fill(old)
    if ROOT:
        os.chown(old / "PostgreSQL.1234", 999, 999)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    devshm.write_devshm(old, unpacked / devshm.MEMBER)
    new = _pod_shm(tmp_path, "new")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(_spec(("/dev/shm", str(new)))))

    outcome = restore_devshm(unpacked, bundle)

    assert outcome is not None and outcome.kept == []
    assert (new / "PostgreSQL.1234").read_bytes() == b"segment" * 1000
    assert stat.S_IMODE((new / "PostgreSQL.1234").stat().st_mode) == 0o600
    if ROOT:
        assert ((new / "PostgreSQL.1234").stat().st_uid, (new / "PostgreSQL.1234").stat().st_gid) == (999, 999)
    assert (new / "dir" / "sub" / "note").read_text() == "note\n"
    sparse = (new / "sparse").stat()
    assert sparse.st_size == 4 << 20 and sparse.st_blocks * 512 <= 64 << 10  # holes stayed holes
    assert (new / "sparse").read_bytes()[-4:] == b"tail"
    assert not (new / "link").exists() and not (new / "fifo").exists()


def test_no_member_no_change(tmp_path: Path) -> None:
    assert restore_devshm(tmp_path, tmp_path) is None


def test_never_into_a_dev_shm_that_is_not_the_pods(tmp_path: Path) -> None:
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    _tar(unpacked / devshm.MEMBER, [_reg("x")])
    host = tmp_path / "host-shm"
    host.mkdir()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(_spec(("/dev/shm", str(host)))))
    assert restore_devshm(unpacked, bundle) is None
    assert list(host.iterdir()) == []


def test_what_the_new_pod_has_wins(tmp_path: Path) -> None:
    target = tmp_path / "shm"
    target.mkdir()
    (target / "a").write_text("the sibling's")
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", target / "d")  # planted by another container of the pod
    member = tmp_path / devshm.MEMBER
    _tar(member, [_dir("./"), _reg("a", b"old"), _dir("d/"), _reg("d/f", b"through the link"), _reg("b", b"new")])

    outcome = apply_devshm(member, target)

    assert (target / "a").read_text() == "the sibling's"
    assert list((tmp_path / "outside").iterdir()) == []  # the symlink was never followed
    assert (target / "b").read_bytes() == b"new"
    assert outcome.created == ["b"] and sorted(outcome.kept) == ["a", "d", "d/f"]


# --- hostile members ----------------------------------------------------------------

Entry = tuple[tarfile.TarInfo, bytes]


def _reg(name: str, data: bytes = b"data", uid: int = 0) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.mtime = len(data), 0o644, uid, 1_600_000_000
    return info, data


def _dir(name: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, b""


def _special(name: str, kind: bytes, linkname: str = "") -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, b""


def _tar(path: Path, entries: list[Entry]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)


@pytest.mark.parametrize(("entries", "message"), [
    ([_special("l", tarfile.SYMTYPE, "/etc/shadow")], "is a symlink"),
    ([_reg("a"), _special("h", tarfile.LNKTYPE, "a")], "is a hard link"),
    ([_special("null", tarfile.CHRTYPE)], "is a character device"),
    ([_special("sda", tarfile.BLKTYPE)], "is a block device"),
    ([_special("p", tarfile.FIFOTYPE)], "is a fifo"),
    ([_reg("../escape")], "'..'"),
    ([_reg("a/../../escape")], "'..'"),
    ([_reg("/etc/escape")], "absolute"),
    ([_reg("a"), _reg("a")], "appears twice"),
    ([_reg("dir/f")], "comes before its directory"),
    ([_reg("a", uid=(1 << 32) - 1)], "owner"),
    ([_reg("big", b"x" * 5000)], "over the limit"),
])
def test_hostile_member_is_refused_and_nothing_is_written(tmp_path: Path, entries: list[Entry],
                                                          message: str) -> None:
    target = tmp_path / "shm"
    target.mkdir()
    member = tmp_path / devshm.MEMBER
    _tar(member, [_reg("first", b"written only if all is well"), *entries])
    with pytest.raises(InvalidArgument, match=message):
        apply_devshm(member, target, max_size=4096)
    assert list(target.iterdir()) == []


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "shm"
    target.mkdir()
    member = tmp_path / devshm.MEMBER
    _tar(member, [_reg(f"f{i}") for i in range(5)])
    with pytest.raises(InvalidArgument, match="more than 4 members"):
        apply_devshm(member, target, max_entries=4)
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("corrupt", [
    lambda data: data[:700],  # truncated inside a member
    lambda data: b"\x01" * 1024,  # not a tar
    lambda data: data[:1024] + b"\xff" * 512 + data[1536:],  # a garbage header after the first
])
def test_corrupt_member_is_refused(tmp_path: Path, corrupt: Callable[[bytes], bytes]) -> None:
    target = tmp_path / "shm"
    target.mkdir()
    member = tmp_path / devshm.MEMBER
    _tar(member, [_reg("a", b"x" * 100), _reg("b", b"y" * 100)])
    member.write_bytes(corrupt(member.read_bytes()))
    with pytest.raises(InvalidArgument, match="truncated or corrupt"):
        apply_devshm(member, target)
    assert list(target.iterdir()) == []


def test_a_full_tmpfs_undoes_what_was_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "shm"
    target.mkdir()
    (target / "theirs").write_text("kept")
    member = tmp_path / devshm.MEMBER
    _tar(member, [_dir("d/"), _reg("d/a", b"a"), _reg("z", b"z")])
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if data == b"z":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(ResourceExhausted, match="has no room"):
        apply_devshm(member, target)
    assert sorted(p.name for p in target.iterdir()) == ["theirs"]
