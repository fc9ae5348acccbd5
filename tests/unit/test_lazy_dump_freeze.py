"""The lazy dump freezes the source's cgroup itself (CRIU's own freeze polls every 100 ms) and thaws
it on every path where CRIU never took the tasks (shim.migrate.lazy_dump)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from shim import freezer
from shim.errors import FailedPrecondition
from shim.migrate.lazy_dump import LazyDump, _freezer_of


def _v1(tmp_path: Path, state: str = "THAWED") -> Path:
    directory = tmp_path / "freezer" / "k8s.io" / "abc"
    directory.mkdir(parents=True)
    (directory / "freezer.state").write_text(state)
    return directory


def _dump(ended: int | None) -> LazyDump:
    dump = LazyDump.__new__(LazyDump)
    dump._ended = ended
    return dump


def test_the_freezer_comes_from_the_spec_and_only_where_it_exists(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _v1(tmp_path)
    monkeypatch.setattr(freezer, "cgroup_dir", lambda path: tmp_path / "freezer" / path.lstrip("/"))
    assert _freezer_of(json.dumps({"linux": {"cgroupsPath": "/k8s.io/abc"}}).encode()) == directory
    assert _freezer_of(json.dumps({"linux": {"cgroupsPath": "/k8s.io/gone"}}).encode()) is None
    assert _freezer_of(json.dumps({"linux": {}}).encode()) is None
    assert _freezer_of(b"not json") is None


@pytest.mark.parametrize("ended", [None, 1, -9])
def test_a_dump_that_did_not_complete_thaws_the_container(tmp_path: Path, ended: int | None) -> None:
    directory = _v1(tmp_path, "FROZEN")
    asyncio.run(_dump(ended)._thaw_unless_ended(directory))
    assert (directory / "freezer.state").read_text() == "THAWED"


def test_a_complete_dump_leaves_the_cgroup_alone(tmp_path: Path) -> None:
    directory = _v1(tmp_path, "FROZEN")  # CRIU ended the tasks: nothing to thaw
    asyncio.run(_dump(0)._thaw_unless_ended(directory))
    assert (directory / "freezer.state").read_text() == "FROZEN"


def test_a_container_that_cannot_be_thawed_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _v1(tmp_path, "FROZEN")

    def stuck(*_: object, **__: object) -> None:
        raise freezer.FreezerError("the freezer is FREEZING after 10s")

    monkeypatch.setattr(freezer, "set_state", stuck)
    dump = _dump(None)
    dump.source = type("S", (), {"target": type("T", (), {"status": type("St", (), {"id": "c1"})()})()})()
    with pytest.raises(FailedPrecondition, match="could not be thawed after the lazy dump.*echo THAWED"):
        asyncio.run(dump._thaw_unless_ended(directory))
    (directory / "freezer.state").unlink()
    directory.rmdir()
    asyncio.run(dump._thaw_unless_ended(directory))  # gone with its container: nothing to say
