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
from tests.node.image_gc_node import image_gc_node  # noqa: F401 - a fixture, used by name
from tests.node.pods import Cri

pytestmark = pytest.mark.node


EARLY = "image_gc_node"  # started first, checked last: its kubelet's 5-minute GC clock runs meanwhile


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the early node run last, so that they wait only for what is left of its clock."""
    items.sort(key=lambda item: EARLY in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session", autouse=True)
def _early_nodes(request: pytest.FixtureRequest) -> None:
    if any(EARLY in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue(EARLY)


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


# The containerd matrix (issue 15): every scenario of the matrix in full on these...
FULL = ("1.7", "2.4")
# ...and a smoke set (checkpoint, restore, pass-through) on these ("2.1" is Debian's 2.1 with our handler).
SMOKE = ("1.6", "2.1", "2.3")


def on(*versions: str) -> pytest.MarkDecorator:
    """Run a test that takes `node` once on the node of each containerd variant (shim.node.tools)."""
    return pytest.mark.parametrize("node", versions, indirect=True)


class Nodes:
    """One node per containerd variant for the whole session, started on first use (3-5 s each),
    so the matrix's versions share their nodes across test modules."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._up: dict[str, Node] = {}

    def get(self, version: str) -> Node:
        for attempt in range(3):
            if version in self._up:
                break
            directory = self._factory.mktemp(f"node-{version}")
            try:
                self._up[version] = node_up(directory, version)
            except subprocess.CalledProcessError as exc:
                node_down(directory)
                # A node's /24 comes from a hash of its directory: with several nodes up, two may
                # collide, which `node up` refuses; another directory gives another subnet.
                if "is already routed" not in exc.stderr or attempt == 2:
                    raise
        return self._up[version]

    def down(self) -> list[Path]:
        for up in self._up.values():
            node_down(up.dir)
        return [up.dir for up in self._up.values()]


@pytest.fixture(scope="session")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    if os.geteuid() != 0:
        pytest.skip("node tests need root")
    before = leaks.snapshot()
    pool = Nodes(tmp_path_factory)
    try:
        yield pool
    finally:
        directories = pool.down()
    leaks.assert_nothing_left(before, leaks.settled_snapshot(before), directories[0].parent if directories
                              else tmp_path_factory.getbasetemp())


@pytest.fixture
def node(request: pytest.FixtureRequest, nodes: Nodes) -> Node:
    """The session's node of containerd 1.7, or of the variant a test is parametrised with (`on`)."""
    return nodes.get(getattr(request, "param", "1.7"))


@pytest.fixture
def client(node: Node, tmp_path: Path) -> Iterator[Cri]:
    """A CRI client of the node's proxy, its pods' logs under the test's own directory."""
    c = Cri(node.cri, tmp_path / "pod-logs")
    yield c
    c.close()
