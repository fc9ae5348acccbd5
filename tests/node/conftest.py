"""Fixtures for tests on a real local node (root, containerd, runc, CRIU, CNI)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.node import leaks

pytestmark = pytest.mark.node


@dataclass(frozen=True)
class Node:
    dir: Path
    containerd: str  # unix://... containerd's own CRI socket
    cri: str  # unix://... the proxy


def criu_shim(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim", *args], capture_output=True, text=True, check=check,
                          timeout=300)


def node_up(directory: Path, version: str = "1.7") -> Node:
    out = criu_shim("node", "up", "--dir", str(directory), "--containerd", version).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return Node(directory, values["CONTAINERD_ENDPOINT"], values["CRI_ENDPOINT"])


def node_down(directory: Path) -> str:
    return criu_shim("node", "down", "--dir", str(directory), "--purge").stdout


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("node tests need root")
    before = leaks.snapshot()
    directory = tmp_path_factory.mktemp("node")
    try:
        yield node_up(directory)
    finally:
        node_down(directory)
    leaks.assert_nothing_left(before, leaks.settled_snapshot(before), directory)
