"""This machine's architecture, named as OCI and Go name it (amd64, arm64...)."""

from __future__ import annotations

import os

_GO_NAMES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def go_arch() -> str:
    machine = os.uname().machine
    return _GO_NAMES.get(machine, machine)
