"""Is the CRIU runc will run new enough for this kernel? Fake `criu` scripts, a fake kernel release."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.checkpoint import criu
from shim.errors import Code, Unknown
from tests.support.criu import fake_criu

CONTAINER_ID = "c0ffee0123456789"


def kernel(monkeypatch: pytest.MonkeyPatch, release: str) -> None:
    real = os.uname()
    fake = os.uname_result((real.sysname, real.nodename, release, real.version, real.machine))
    monkeypatch.setattr(os, "uname", lambda: fake)  # as seen by shim.checkpoint.criu


@pytest.mark.parametrize(("release", "need"), [
    ("6.18.0", (4, 2)),
    ("6.18.44-fc-v669", (4, 2)),
    ("6.16.0", (4, 2)),
    ("7.0", (4, 2)),
    ("6.15.11", (3, 16)),
    ("6.1.0-31-amd64", (3, 16)),
    ("5.15.0-91-generic", (3, 16)),
    ("not-a-kernel", (4, 2)),  # unparsable counts as new: refusing beats a dump that breaks later
])
def test_required_version(release: str, need: tuple[int, ...]) -> None:
    assert criu.required_version(release) == need


def test_new_enough_criu_on_a_new_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel(monkeypatch, "6.18.0")
    assert criu.require(fake_criu(tmp_path, "4.2.1"), CONTAINER_ID) == (4, 2, 1)


def test_version_line_followed_by_gitid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel(monkeypatch, "6.18.0")
    path = tmp_path / "criu"
    path.write_text("#!/bin/sh\necho 'Version: 4.2'\necho 'GitID: v4.2-12-gdeadbeef'\n")
    path.chmod(0o755)
    assert criu.require(path, CONTAINER_ID) == (4, 2)


def test_too_old_criu_on_a_new_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel(monkeypatch, "6.18.0")
    path = fake_criu(tmp_path, "4.1.1")
    with pytest.raises(Unknown) as caught:
        criu.require(path, CONTAINER_ID)
    message = caught.value.message
    assert caught.value.code is Code.UNKNOWN
    assert message.startswith("CRIU binary not found or too old (<40200). ")  # what the kubelet e2e matches
    assert f"found CRIU 4.1.1 at {path}" in message
    assert repr(CONTAINER_ID) in message
    assert "kernel 6.18.0" in message
    assert "needs CRIU >= 4.2" in message


def test_same_criu_is_enough_on_an_older_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel(monkeypatch, "6.1.0-31-amd64")
    assert criu.require(fake_criu(tmp_path, "4.1.1"), CONTAINER_ID) == (4, 1, 1)


def test_below_the_floor_on_an_older_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel(monkeypatch, "6.1.0")
    path = fake_criu(tmp_path, "3.15")
    with pytest.raises(Unknown, match=r"^CRIU binary not found or too old \(<31600\)\. ") as caught:
        criu.require(path, CONTAINER_ID)
    assert f"found CRIU 3.15 at {path}" in caught.value.message
    assert "needs CRIU >= 3.16" in caught.value.message


def test_garbage_version_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel(monkeypatch, "6.18.0")
    path = fake_criu(tmp_path, version_output="criu: command not understood")
    with pytest.raises(Unknown, match="CRIU binary not found or too old") as caught:
        criu.require(path, CONTAINER_ID)
    assert f"no usable CRIU at {path}" in caught.value.message


def test_missing_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel(monkeypatch, "6.18.0")
    path = tmp_path / "no-such-criu"
    with pytest.raises(Unknown, match="CRIU binary not found or too old") as caught:
        criu.require(path, CONTAINER_ID)
    assert f"no usable CRIU at {path}" in caught.value.message


def test_no_configured_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel(monkeypatch, "6.18.0")
    with pytest.raises(Unknown, match=r"CRIU binary not found or too old .*no usable CRIU at \$PATH"):
        criu.require(None, CONTAINER_ID)


def test_not_executable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel(monkeypatch, "6.18.0")
    path = fake_criu(tmp_path, "4.2.1")
    path.chmod(0o644)
    with pytest.raises(Unknown, match=f"no usable CRIU at {path}"):
        criu.require(path, CONTAINER_ID)


def test_probed_once_per_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel(monkeypatch, "6.18.0")
    runs = tmp_path / "runs"
    path = tmp_path / "criu"

    def install(version: str, mtime: int) -> None:
        path.write_text(f"#!/bin/sh\necho run >> {runs}\necho 'Version: {version}'\n")
        path.chmod(0o755)
        os.utime(path, (mtime, mtime))

    install("4.2.1", 1_000_000)
    assert criu.require(path, CONTAINER_ID) == (4, 2, 1)
    assert criu.require(path, CONTAINER_ID) == (4, 2, 1)
    assert runs.read_text().count("run") == 1
    # An upgrade (or downgrade) changes the mtime: probed again.
    install("4.1.1", 2_000_000)
    with pytest.raises(Unknown, match="found CRIU 4.1.1"):
        criu.require(path, CONTAINER_ID)
    assert runs.read_text().count("run") == 2
