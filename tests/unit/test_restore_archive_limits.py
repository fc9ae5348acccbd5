"""A checkpoint archive over the kernel's name limits, the member limit, or the disk: a clear error, nothing left."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from shim.errors import ResourceExhausted
from shim.restore import tar_reader
from shim.restore.checkpoint_unpack import CHECKPOINT_MAX_MEMBERS, open_checkpoint
from shim.restore.tar_reader import NAME_MAX
from tests.unit.test_restore_archive import checkpoint_entries, refused, reg, write_tar


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "unpacked"
    path.mkdir(mode=0o700)
    return path


@pytest.mark.parametrize("name, fragment", [
    ("checkpoint/" + "n" * 4000, "name limit (255 bytes)"),
    ("checkpoint/" + "n" * (NAME_MAX + 1), "name limit (255 bytes)"),
    ("/".join(["d" * 200] * 21), "path limit (4095 bytes)"),
])
def test_names_over_the_kernels_limits_are_invalid(tmp_path: Path, dest: Path, name: str, fragment: str) -> None:
    path = write_tar(tmp_path / "a.tar", [*checkpoint_entries(), reg(name)])
    message = refused(lambda: open_checkpoint(path, dest), fragment)
    assert len(message) < 600  # the name is shortened in the message
    assert os.listdir(dest) == []


def test_a_name_at_the_limit_is_fine(tmp_path: Path, dest: Path) -> None:
    path = write_tar(tmp_path / "a.tar", [*checkpoint_entries(), reg("checkpoint/" + "n" * NAME_MAX)])
    open_checkpoint(path, dest)
    assert (dest / "checkpoint" / ("n" * NAME_MAX)).is_file()


def test_the_member_limit_is_checked_before_anything_is_written(tmp_path: Path, dest: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [*checkpoint_entries(), *(reg(f"checkpoint/x{i}") for i in range(20))]
    path = write_tar(tmp_path / "a.tar", entries)
    created: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (created.append(str(p)), real_open(p, *a, **k))[1])
    refused(lambda: open_checkpoint(path, dest, max_members=10), "more than 10 members", "checkpoint archive")
    assert not [p for p in created if p.startswith("x")]
    assert os.listdir(dest) == []
    assert CHECKPOINT_MAX_MEMBERS == 100_000


def test_many_tiny_members_unpack_in_reasonable_time(tmp_path: Path, dest: Path) -> None:
    entries = [*checkpoint_entries(), *(reg(f"checkpoint/x{i}", b"a") for i in range(5000))]
    path = write_tar(tmp_path / "a.tar", entries)
    started = time.monotonic()
    open_checkpoint(path, dest)
    # Generous (shared CI machines); before, every member also made and opened its directory again.
    assert time.monotonic() - started < 10
    assert len(os.listdir(dest / "checkpoint")) >= 5000


def test_disk_full_is_resource_exhausted_with_the_path(tmp_path: Path, dest: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tar(tmp_path / "a.tar", [*checkpoint_entries(), reg("checkpoint/big", b"x" * 4096)])

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tar_reader, "_copy_range", full)
    with pytest.raises(ResourceExhausted, match="no space left") as caught:
        open_checkpoint(path, dest)
    assert str(path) in caught.value.message and f"writing {dest}/" in caught.value.message
    assert os.listdir(dest) == []


def test_disk_full_making_a_directory_is_resource_exhausted_with_the_path(tmp_path: Path, dest: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tar(tmp_path / "a.tar", checkpoint_entries())
    real_mkdir = os.mkdir

    def full(p: object, *args: object, **kwargs: object) -> None:
        if p == "checkpoint":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_mkdir(p, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", full)
    with pytest.raises(ResourceExhausted, match=f"filesystem of {dest}"):
        open_checkpoint(path, dest)
