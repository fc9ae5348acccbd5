"""The audit log: one JSON line per attempt, 0600, append-only, never through a symlink, never fatal."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from shim.checkpoint import audit
from shim.checkpoint.audit import AuditRecord

_ZERO = {"str": "", "int": 0, "float": 0.0, "Action": audit.Action.CHECKPOINT}


def record(**values: object) -> AuditRecord:
    """A record with every field set: given values, zero values for the rest (fields may be added)."""
    filled = {f.name: values.pop(f.name, _ZERO[str(f.type)]) for f in fields(AuditRecord)}
    assert not values, f"AuditRecord has no fields {sorted(values)}"
    return AuditRecord(**filled)  # type: ignore[arg-type]


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """With umask 0 the file mode is exactly what the code asks for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def lines(path: Path) -> list[dict[str, object]]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_line_per_call_appended(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    first = record(action="checkpoint", caller_uid=0, caller_pid=1234, pod="web-0", namespace="default",
                   container="web", container_id="abc", location="/var/cp.tar", size=4096, duration_s=1.5,
                   frozen_s=0.25, result="ok")
    audit.append(path, first)
    audit.append(path, record(action="checkpoint", container_id="def",
                              result='error: UNKNOWN: CRIU said "no"\nsecond line'))
    logged = lines(path)
    assert len(logged) == 2
    assert {k: v for k, v in logged[0].items() if k != "time"} == {
        f.name: getattr(first, f.name) for f in fields(AuditRecord)}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(logged[0]["time"]))
    assert logged[1]["container_id"] == "def"
    assert logged[1]["result"] == 'error: UNKNOWN: CRIU said "no"\nsecond line'  # escaped, still one line


def test_appends_to_an_existing_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"old": true}\n')
    audit.append(path, record(result="ok"))
    assert path.read_text().startswith('{"old": true}\n')
    assert len(lines(path)) == 2


@pytest.mark.usefixtures("umask_zero")
def test_file_is_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit.append(path, record(result="ok"))
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.usefixtures("umask_zero")
def test_creates_the_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "var" / "log" / "criu-shim" / "audit.log"
    audit.append(path, record(result="ok"))
    assert len(lines(path)) == 1
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_does_not_write_through_a_symlink(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    victim = tmp_path / "shadow"
    victim.write_text("root:x:0:0\n")
    path = tmp_path / "audit.log"
    path.symlink_to(victim)
    with caplog.at_level(logging.ERROR, logger=audit.__name__):
        audit.append(path, record(container_id="abc", result="ok"))  # must not raise
    assert victim.read_text() == "root:x:0:0\n"
    assert path.is_symlink()
    assert any("cannot write audit log" in r.getMessage() and '"abc"' in r.getMessage() for r in caplog.records)


def test_dangling_symlink_is_not_followed_to_create_a_file(tmp_path: Path) -> None:
    target = tmp_path / "created-elsewhere"
    path = tmp_path / "audit.log"
    path.symlink_to(target)
    audit.append(path, record(result="ok"))
    assert not target.exists()


def test_unwritable_location_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "audit.log"  # parent is a regular file
    with caplog.at_level(logging.ERROR, logger=audit.__name__):
        audit.append(path, record(container_id="xyz", result="error: INTERNAL: boom"))
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(path) in m and "error: INTERNAL: boom" in m for m in messages)
