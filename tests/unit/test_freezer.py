"""The cgroup freezer facade, on a directory that stands in for cgroupfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim import freezer


def test_cgroupfs_paths_map_under_the_v1_freezer_hierarchy(tmp_path: Path) -> None:
    (tmp_path / "freezer").mkdir()
    assert freezer.cgroup_dir("/k8s.io/abc", tmp_path) == tmp_path / "freezer/k8s.io/abc"
    assert freezer.cgroup_dir("/kubepods/besteffort/pod1/abc", tmp_path) == \
        tmp_path / "freezer/kubepods/besteffort/pod1/abc"


def test_systemd_paths_expand_their_slices(tmp_path: Path) -> None:
    assert freezer.cgroup_dir("kubepods-besteffort-pod1.slice:cri-containerd:abc", tmp_path) == \
        tmp_path / "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
    assert freezer.cgroup_dir(":cri-containerd:abc", tmp_path) == tmp_path / "system.slice/cri-containerd-abc.scope"


def test_v1_state_is_read_and_set(tmp_path: Path) -> None:
    (tmp_path / "freezer.state").write_text("FROZEN\n")
    assert freezer.state(tmp_path) is freezer.State.FROZEN
    freezer.set_state(tmp_path, freezer.State.THAWED)  # a file: the "kernel" settles at once
    assert freezer.state(tmp_path) is freezer.State.THAWED


def test_v2_state_is_read_and_set(tmp_path: Path) -> None:
    (tmp_path / "cgroup.freeze").write_text("0\n")
    assert freezer.state(tmp_path) is freezer.State.THAWED
    freezer.set_state(tmp_path, freezer.State.FROZEN)
    assert (tmp_path / "cgroup.freeze").read_text() == "1"


def test_a_missing_cgroup_is_a_freezer_error(tmp_path: Path) -> None:
    with pytest.raises(freezer.FreezerError, match="cannot read the freezer"):
        freezer.state(tmp_path / "gone")
    with pytest.raises(freezer.FreezerError, match="cannot set the freezer"):
        freezer.set_state(tmp_path / "gone", freezer.State.THAWED)


def test_a_freezer_that_never_settles_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cgroup.freeze").write_text("0")
    monkeypatch.setattr(freezer, "state", lambda d: freezer.State.FREEZING)  # a kernel that stays put
    with pytest.raises(freezer.FreezerError, match="FREEZING after 0s"):
        freezer.set_state(tmp_path, freezer.State.FROZEN, timeout=0.05)


def test_thaw_file_v1_and_v2(tmp_path: Path) -> None:
    v1 = tmp_path / "freezer" / "k8s.io" / "abc"
    v1.mkdir(parents=True)
    (v1 / "freezer.state").write_text("THAWED")
    assert freezer.thaw_file(v1) == (str(tmp_path / "freezer/k8s.io/abc/freezer.state"), "THAWED")
    v2 = tmp_path / "v2"
    v2.mkdir()
    assert freezer.thaw_file(v2) == (str(v2 / "cgroup.freeze"), "0")


def test_v2_freeze_waits_for_the_kernel_to_say_frozen(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.freeze").write_text("0")
    (v2 / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    with pytest.raises(freezer.FreezerError, match="did not freeze"):
        freezer.freeze(v2, timeout=0.05)
    (v2 / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    freezer.freeze(v2, timeout=0.05)
    assert (v2 / "cgroup.freeze").read_text() == "1"
