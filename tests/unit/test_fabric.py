"""The development fabric's pure parts: names, addresses, the address hook script, the migrate CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.cli import build_parser
from shim.errors import InvalidArgument
from shim.node import fabric
from shim.node.layout import NodeLayout


def _host(directory: str = "/tmp/some-node") -> fabric.NodeHost:
    return fabric.NodeHost(NodeLayout(Path(directory)), fabric.check_name("f1"))


def test_a_node_host_derives_its_names_and_addresses_from_its_layout() -> None:
    host = _host()
    tag = host.layout.tag
    octet = host.layout.subnet.split(".")[2]
    assert host.netns == f"csh-{tag}" and host.router_link == f"cf{tag}" and len(host.router_link) <= 15
    assert (host.router_ip, host.host_ip) == (f"10.235.{octet}.1", f"10.235.{octet}.2")
    assert host.receiver_address == f"10.235.{octet}.2:{fabric.RECEIVER_PORT}"
    assert host.fabric.router == "csr-f1" and host.enter()[:2] == ["nsenter", "--net=/run/netns/" + host.netns]


@pytest.mark.parametrize("name", ["", "UPPER", "a b", "x;rm", "-lead", "much-too-long-name"])
def test_fabric_names_are_refused_unless_short_and_plain(name: str) -> None:
    with pytest.raises(InvalidArgument, match="fabric name"):
        fabric.check_name(name)


def test_the_hook_routes_a_claimed_address_on_the_host_and_the_router() -> None:
    host = _host()
    script = fabric.hook_script(host)
    assert script.startswith("#!/bin/sh\n") and "set -eu" in script
    assert f'ip route replace "$2/32" via "$3" dev {host.layout.bridge}' in script
    assert f'ip -n csr-f1 route replace "$2/32" via {host.host_ip}' in script
    assert 'release) ip route del "$2/32"' in script


def test_migrate_help_has_examples_and_required_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["migrate", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "--to-pod" in text and "stop-after" in text and "--checkpoint ARCHIVE" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["migrate", "ctr", "--to", "10.0.0.1:7543"])  # --to-pod missing
    assert "--to-pod" in capsys.readouterr().err
    args = parser.parse_args(["node", "up", "--dir", "/tmp/n", "--fabric", "f1"])
    assert args.fabric == "f1"


def test_a_target_with_an_older_or_no_criu_is_refused() -> None:
    from shim.errors import FailedPrecondition
    from shim.migrate import compat

    compat.check((4, 2, 1), (4, 2))  # same release line
    compat.check((4, 1), (4, 2, 1))  # an older source
    compat.check(None, (4, 2))  # a source that did not say
    with pytest.raises(FailedPrecondition, match="CRIU 4.1 is older than the source's 4.2.1"):
        compat.check((4, 2, 1), (4, 1))
    with pytest.raises(FailedPrecondition, match="no usable CRIU"):
        compat.check((4, 2), None)
    assert compat.parse("4.2.1") == (4, 2, 1)
    for garbage in (None, 42, "", "4.x", "1" * 40, "-1.2"):
        assert compat.parse(garbage) is None


@pytest.mark.parametrize(("value", "error"), [("http", "not a port number: 'http'"), ("70000", "port 70000 out of range"),
                                               ("-1", "port -1 out of range")])
def test_a_page_port_that_is_not_one_is_refused(value: str, error: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["migrate", "ctr", "--to", "10.0.0.1:7543", "--to-pod", "p", "--page-port", value])
    assert exited.value.code == 2 and error in capsys.readouterr().err


def test_the_page_port_reaches_the_request() -> None:
    args = build_parser().parse_args(["migrate", "ctr", "--to", "10.0.0.1:7543", "--to-pod", "p", "--mode", "lazy",
                                      "--page-port", "7544"])
    assert args.page_port == 7544
    assert build_parser().parse_args(["migrate", "ctr", "--to", "10.0.0.1:7543", "--to-pod", "p"]).page_port == 0
