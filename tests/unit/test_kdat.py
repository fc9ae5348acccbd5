"""CRIU's kernel-probe cache on a machine whose /run is not tmpfs (shim.node.kdat): made by a real
`unshare` with a stand-in CRIU that writes its cache the way CRIU does, kept per boot and CRIU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim import preflight
from shim.node import kdat

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:5 / /dev rw shared:2 - devtmpfs udev rw
26 25 0:23 / /dev/shm rw shared:3 - tmpfs tmpfs rw
27 22 0:24 / /run rw shared:4 - ext4 /dev/sda2 rw
28 22 0:25 / /run rw shared:5 - tmpfs tmpfs rw
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="unshare --mount needs root")


def test_the_type_is_the_deepest_mount_above_the_path_the_last_stacked_one() -> None:
    assert preflight.fs_type_at(Path("/dev/shm/x"), MOUNTINFO) == "tmpfs"
    assert preflight.fs_type_at(Path("/dev/null"), MOUNTINFO) == "devtmpfs"
    assert preflight.fs_type_at(Path("/run"), MOUNTINFO) == "tmpfs"
    assert preflight.fs_type_at(Path("/var/lib"), MOUNTINFO) == "ext4"
    assert kdat.run_is_tmpfs(MOUNTINFO)
    assert not kdat.run_is_tmpfs(MOUNTINFO.replace("28 22 0:25 / /run rw shared:5 - tmpfs tmpfs rw\n", ""))
    assert preflight.fs_type_at(Path("/x"), "garbage\n\n") is None


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(kdat, "CACHE", tmp_path / "criu.kdat")
    monkeypatch.setattr(kdat, "ORIGIN", tmp_path / "state" / "criu.kdat.origin")
    monkeypatch.setattr(kdat, "run_is_tmpfs", lambda mountinfo=None: False)
    return tmp_path


def fake_criu(directory: Path, version: str = "4.2.1", writes: bool = True) -> Path:
    """Answers --version; `check` counts its runs and, like CRIU on a tmpfs /run, writes /run/criu.kdat."""
    criu = directory / f"criu-{version}"
    write = f"printf 'kdat of {version}' > /run/criu.kdat" if writes else "exit 1"
    criu.write_text(f"#!/bin/sh\ncase $1 in\n--version) echo 'Version: {version}';;\n"
                    f"check) echo run >> {directory}/checks; {write};;\nesac\n")
    criu.chmod(0o755)
    return criu


def checks(directory: Path) -> int:
    return len((directory / "checks").read_text().splitlines()) if (directory / "checks").exists() else 0


@needs_root
def test_made_once_per_boot_and_criu_and_never_in_the_machines_run(paths: Path) -> None:
    before = sorted(p.name for p in Path("/run").iterdir())
    criu = fake_criu(paths)
    said = kdat.ensure_cache(criu)
    assert "cached in" in said and (paths / "criu.kdat").read_bytes() == b"kdat of 4.2.1"
    assert oct((paths / "criu.kdat").stat().st_mode & 0o777) == "0o600"
    boot = kdat.BOOT_ID.read_text().strip()
    assert (paths / "state" / "criu.kdat.origin").read_text() == f"boot {boot}, Version: 4.2.1\n"
    assert "already" in kdat.ensure_cache(criu) and checks(paths) == 1
    assert "already" not in kdat.ensure_cache(fake_criu(paths, "4.3")) and checks(paths) == 2  # another CRIU
    assert (paths / "criu.kdat").read_bytes() == b"kdat of 4.3"
    assert sorted(p.name for p in Path("/run").iterdir()) == before  # CRIU's check ran on a tmpfs of its own


@needs_root
def test_a_criu_that_writes_no_cache_leaves_nothing(paths: Path) -> None:
    assert kdat.ensure_cache(fake_criu(paths, writes=False)) == "CRIU's kernel probes not cached"
    assert not (paths / "criu.kdat").exists() and not (paths / "state").exists()


def test_a_missing_criu_is_not_cached_and_not_an_error(paths: Path) -> None:
    assert kdat.ensure_cache(paths / "no-such-criu") == "CRIU's kernel probes not cached"
    assert not (paths / "criu.kdat").exists()


def test_where_run_is_tmpfs_criu_keeps_its_own(paths: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kdat, "run_is_tmpfs", lambda mountinfo=None: True)
    assert "itself" in kdat.ensure_cache(fake_criu(paths)) and checks(paths) == 0
