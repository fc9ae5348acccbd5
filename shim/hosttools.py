"""What the host's programs say: run one without raising, read a version out of its answer.

Shared by `criu-shim check` (shim.preflight) and the CRIU facade (shim.criu), which apply
the same rules on the hot path. A program that cannot run is an answer, never an exception.
"""

from __future__ import annotations

import re
import subprocess

Version = tuple[int, ...]

PROBE_TIMEOUT = 30.0
NUMBERS = r"v?(\d+)\.(\d+)(?:\.(\d+))?"


def run_probe(argv: list[str]) -> tuple[int | None, str]:
    """(exit code, stdout+stderr); exit code None when the program could not run at all."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return None, f"{argv[0]} did not answer within {PROBE_TIMEOUT:.0f}s"
    except OSError as exc:
        return None, f"cannot run {argv[0]}: {exc.strerror or exc}"
    return done.returncode, done.stdout + done.stderr


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def version_in(pattern: str, text: str) -> Version | None:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def parse_kernel_release(release: str) -> Version | None:
    """`uname -r`: "6.18.44-fc-v669", "6.1.0-31-amd64"."""
    return version_in(r"^" + NUMBERS, release.strip())


def show(version: Version) -> str:
    return ".".join(str(part) for part in version)
