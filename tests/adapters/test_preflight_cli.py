"""`criu-shim check` end to end: the CLI runs the real probes on this host (runc, containerd,
the kernel) with a fake `criu` program, in-process and as `python -m shim`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shim import cli, preflight
from tests.support.criu import fake_criu


def test_cli_old_criu_on_new_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(preflight, "probe_kernel", lambda: "6.18.0-test")  # the rule must not depend on the host
    assert cli.main(["check", "--criu", str(fake_criu(tmp_path, "4.1.1"))]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["AREA", "|", "STATUS", "|", "DETAIL"]
    assert "CRIU older than 4.2 cannot dump INET sockets (TCP/UDP) on kernel >= 6.16" in out
    assert out.splitlines()[-1].startswith("checkpoint/restore: NOT available: CRIU binary not found or too old")


def test_cli_new_criu_row_is_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(preflight, "probe_kernel", lambda: "6.18.0-test")
    script = fake_criu(tmp_path, "4.2.1")
    cli.main(["check", "--criu", str(script), "--json"])
    document = json.loads(capsys.readouterr().out)
    (row,) = [f for f in document["findings"] if f["area"] == "criu"]
    assert row == {"area": "criu", "status": "ok", "detail": f"CRIU 4.2.1 at {script}"}
    assert document["facts"]["criu"]["tool"]["path"] == str(script)
    assert document["available"] == document["summary"].startswith("checkpoint/restore: available")


def test_cli_nonexistent_criu(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-criu"
    done = subprocess.run([sys.executable, "-m", "shim", "check", "--criu", str(missing)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert f"CRIU binary not found or too old: not found at {missing}" in done.stdout
    assert "checkpoint/restore: NOT available" in done.stdout


def test_cli_bad_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", "--no-such-flag"])
    assert exit_info.value.code == 2
