"""Can the target restore what the source's CRIU writes? (CRIU versions, compared at preflight.)

CRIU reads images of its own and older releases; images a newer CRIU writes may hold entries an
older one does not know, and fail only in the middle of the restore, after the source was
stopped. So a migration to a node whose CRIU is older (major.minor) than the source's is refused
at preflight, as is one to a node without a usable CRIU.
"""

from __future__ import annotations

from pathlib import Path

from shim.criu import parse_criu_version
from shim.errors import FailedPrecondition
from shim.hosttools import Version, run_probe, show


def installed(criu: Path | None) -> Version | None:
    """`criu --version` of the node's CRIU (blocking; None when it cannot be run or read)."""
    code, out = run_probe([str(criu or "criu"), "--version"])
    return parse_criu_version(out) if code == 0 else None


def parse(text: object) -> Version | None:
    """A version a peer sent ("4.2.1"); None for anything else."""
    if not isinstance(text, str) or not 0 < len(text) <= 32:
        return None
    parts = text.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


def check(source: Version | None, target: Version | None) -> None:
    """FailedPrecondition when the target's CRIU cannot be trusted to restore the source's images."""
    if target is None:
        raise FailedPrecondition("this node has no usable CRIU (`criu --version` failed): it cannot restore")
    if source is not None and source[:2] > target[:2]:
        raise FailedPrecondition(f"this node's CRIU {show(target)} is older than the source's {show(source)}: "
                                 "images a newer CRIU writes may not restore with it; upgrade CRIU here first")
