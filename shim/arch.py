"""This machine's architecture, named as OCI and Go name it (amd64, arm64...).

The one table from the kernel's and Python's names (`uname -m`) to GOARCH, used for the
checkpoint's recorded architecture, the platform picked from an image index, and the images
scripts/build-images.py writes. Go names map to themselves.
"""

from __future__ import annotations

import os

GO_NAMES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
            "armv6l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
            "riscv64": "riscv64"}


def go_name(machine: str) -> str:
    """`uname -m` (or platform.machine()) in Go's spelling; unknown names pass unchanged."""
    return GO_NAMES.get(machine, machine)


def go_arch() -> str:
    return go_name(os.uname().machine)
