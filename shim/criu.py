"""The CRIU facade: which CRIU this node needs, how to read its version, what it supports.

One owner for the rules that both `criu-shim check` (shim.preflight) and the checkpoint's
hot-path requirement (shim.checkpoint.criu) apply, and for the feature probe restore uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shim.hosttools import NUMBERS, Version, last_line, run_probe, version_in

# runc and containerd's checkpoint code refuse anything older.
CRIU_FLOOR: Version = (3, 16)
# Kernels >= 6.16 refuse SO_PASSCRED on INET sockets; CRIU before 4.2 then fails to
# dump any process owning one ("Can't get 1:16 opt").
KERNEL_INET_BREAK: Version = (6, 16)
CRIU_INET_FIX: Version = (4, 2)
# The kubelet e2e test matches this phrase: keep it verbatim.
CRIU_MISSING = "CRIU binary not found or too old"


def parse_criu_version(text: str) -> Version | None:
    """`criu --version`: "Version: 4.2.1" (a "GitID: ..." line may follow)."""
    return version_in(r"^\s*Version:\s*" + NUMBERS, text)


@dataclass(frozen=True)
class FeatureProbe:
    name: str
    supported: bool
    detail: str  # CRIU's last output line, e.g. "Dirty tracking is OFF"


def probe_feature(criu: str, name: str) -> FeatureProbe:
    """`criu check --feature NAME` (blocking: call it from a worker thread in the daemon)."""
    code, output = run_probe([criu, "check", "--feature", name])
    # CRIU prefixes its messages with "Warn  (criu/cr-check.c:824): ": keep only the words.
    detail = re.sub(r"^\w+\s+\([^)]*\):\s*", "", last_line(output))
    return FeatureProbe(name, code == 0, detail)
