"""The command line: bad input gets a clear one-line error and exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _shim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim", *args], capture_output=True, text=True, timeout=60)


def test_serve_refuses_a_missing_or_broken_config_before_listening(tmp_path: Path) -> None:
    listen = tmp_path / "p.sock"
    missing = _shim("serve", "--listen", f"unix://{listen}", "--runtime-endpoint", "unix:///x.sock",
                    "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and "nope.toml" in missing.stderr and "Traceback" not in missing.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[checkpoint]\ntcp_established = maybe\n")
    refused = _shim("serve", "--listen", f"unix://{listen}", "--runtime-endpoint", "unix:///x.sock",
                    "--config", str(broken))
    assert refused.returncode == 1 and "broken.toml" in refused.stderr and "Traceback" not in refused.stderr
    assert not listen.exists()


def test_help_explains_the_commands() -> None:
    helped = _shim("--help")
    assert helped.returncode == 0
    for word in ("serve", "check", "node", "checkpoint-image", "CheckpointContainer", "examples:"):
        assert word in helped.stdout


def test_unknown_command_is_an_argparse_error() -> None:
    wrong = _shim("frobnicate")
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr
