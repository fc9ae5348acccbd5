"""Is the CRIU that runc will run new enough? (The kubelet e2e test matches our wording.)

The rules are the CRIU facade's (shim.criu), shared with `criu-shim check`; this module applies them on
the hot path, probing the binary once per change of its mtime.
"""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path

from shim.criu import CRIU_FLOOR, CRIU_INET_FIX, CRIU_MISSING, KERNEL_INET_BREAK, parse_criu_version
from shim.errors import Unknown
from shim.hosttools import Version, parse_kernel_release, show


def required_version(kernel_release: str) -> Version:
    """CRIU before 4.2 cannot dump INET sockets on kernels >= 6.16 (SO_PASSCRED refused)."""
    kernel = parse_kernel_release(kernel_release)
    return CRIU_INET_FIX if kernel is None or kernel >= KERNEL_INET_BREAK else CRIU_FLOOR


@cache
def _probe(path: Path, mtime: float) -> Version | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_criu_version(out)


def installed_version(path: Path | None) -> Version | None:
    if path is None or not path.exists():
        return None
    return _probe(path, path.stat().st_mtime)


def require(path: Path | None, container_id: str) -> Version:
    """The CRIU version, or `Unknown` with the message the ecosystem recognises."""
    need = required_version(os.uname().release)
    found = installed_version(path)
    if found is not None and found >= need:
        return found
    need_int = need[0] * 10000 + need[1] * 100
    seen = f"found CRIU {show(found)} at {path}" if found else f"no usable CRIU at {path or '$PATH'}"
    raise Unknown(f"{CRIU_MISSING} (<{need_int}). Failed to checkpoint container {container_id!r}: {seen}; "
                  f"this node (kernel {os.uname().release}) needs CRIU >= {show(need)}")
