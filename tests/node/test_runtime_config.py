"""CRI RuntimeConfig through the proxy, asked by the real crictl: answered on 1.6/1.7, relayed on 2.x.

The kubelet 1.38 refuses a runtime that does not answer RuntimeConfig; containerd 1.6/1.7 never
will. crictl is the one built from cri-tools by `make peers` (scripts/peers.lock).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from shim.node.tools import load_paths
from tests.node.conftest import Node, Nodes

pytestmark = pytest.mark.node

# The node's containerd config gives its handlers SystemdCgroup = false (shim/node/render.py).
EXPECTED = "cgroup driver: CGROUPFS"  # crictl's table, whitespace squeezed
ANSWERED = "RuntimeConfig answered for containerd: cgroup driver cgroupfs (from runtime handler 'criu')"
# containerd's own refusals, verbatim (1.7 has the method in its API but not implemented; 1.6 lacks it)
UNIMPLEMENTED = {"1.7": "code = Unimplemented desc = method RuntimeConfig not implemented",
                 "1.6": "code = Unimplemented desc = unknown method RuntimeConfig for service runtime.v1.RuntimeService"}


def crictl(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    binary = Path(load_paths()["CRI_TOOLS_BIN_DIR"]) / "crictl"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: run `make crictl` (or `make peers`) first")
    return subprocess.run([str(binary), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
                           "--timeout", "20s", *args], capture_output=True, text=True, timeout=60, check=False)


def squeezed(text: str) -> str:
    return " ".join(text.split())


def proxy_log(node: Node) -> str:
    return (node.dir / "logs" / "criu-shim.log").read_text()


@pytest.fixture
def node_16(nodes: Nodes) -> Node:
    return nodes.get("1.6")  # the session's, shared with the containerd matrix


@pytest.fixture
def node_2x(nodes: Nodes) -> Node:
    return nodes.get("2.x")


@pytest.mark.parametrize("version", ["1.7", "1.6"])
def test_crictl_runtime_config_is_answered_where_containerd_has_none(
        version: str, request: pytest.FixtureRequest) -> None:
    node: Node = request.getfixturevalue("node" if version == "1.7" else "node_16")
    direct = crictl(node.containerd, "runtime-config")
    assert direct.returncode != 0
    assert UNIMPLEMENTED[version] in direct.stderr
    through = crictl(node.cri, "runtime-config")
    assert through.returncode == 0, through.stderr
    assert squeezed(through.stdout) == EXPECTED
    assert ANSWERED in proxy_log(node)


def test_crictl_runtime_config_on_2x_is_containerds_own(node_2x: Node) -> None:
    direct = crictl(node_2x.containerd, "runtime-config")
    through = crictl(node_2x.cri, "runtime-config")
    assert direct.returncode == 0, direct.stderr
    assert (through.returncode, through.stdout) == (0, direct.stdout)
    assert squeezed(through.stdout) == EXPECTED
    assert "RuntimeConfig answered" not in proxy_log(node_2x)  # relayed, not ours


def test_garbage_runtime_config_request_is_refused(node: Node) -> None:
    with grpc.insecure_channel(node.cri) as channel:
        raw = channel.unary_unary("/runtime.v1.RuntimeService/RuntimeConfig")
        with pytest.raises(grpc.RpcError) as raised:
            raw(b"\xff\xff\xff\xff", timeout=10)
    error: grpc.Call = raised.value  # type: ignore[assignment]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("grpc: error unmarshalling request: ")
    # the proxy still answers the well-formed call afterwards
    assert squeezed(crictl(node.cri, "runtime-config").stdout) == EXPECTED
