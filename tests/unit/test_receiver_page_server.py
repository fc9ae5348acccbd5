"""What the migration receiver tells the restore about a lazy migration's memory (the page-server file
beside the archive, read by shim.restore.lazy): the tunnel's loopback port, or the source's page end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shim.errors import InvalidArgument
from shim.migrate import channel, receiver

CREDS = channel.Credentials(Path("/etc/criu-shim/node.crt"), Path("/etc/criu-shim/node.key"), Path("/etc/ca.crt"))
SETTINGS = receiver.ReceiverSettings("10.0.0.2:7543", Path("/run/criu-shim.sock"), Path("/ckpt"), CREDS, None,
                                     idle_timeout=12.0)


def _end(tunnel_port: int | None = None) -> receiver._PageEnd:
    async def made() -> receiver._PageEnd:
        pumped: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        loopback = None
        if tunnel_port is not None:
            loopback = receiver.tunnel.LoopbackEnd()
            loopback.port = tunnel_port
        return receiver._PageEnd("cd" * 16, loopback, pumped, "ab" * 32)

    return asyncio.run(made())


def test_the_source_page_end_is_named_with_this_node_s_credentials_and_the_source_s_pin() -> None:
    named = receiver._page_server_named(SETTINGS, _end(), {"op": "restore", "pages_port": 40001}, "10.0.0.1")
    assert named == {"address": "10.0.0.1", "port": 40001,
                     "tls": {"cert": "/etc/criu-shim/node.crt", "key": "/etc/criu-shim/node.key", "ca": "/etc/ca.crt",
                             "certificate": "ab" * 32, "token": "cd" * 16, "idle": 12.0}}


def test_the_tunnel_is_named_by_its_loopback_port_whatever_the_source_says() -> None:
    named = receiver._page_server_named(SETTINGS, _end(tunnel_port=41000), {"pages_port": 1}, "10.0.0.1")
    assert named == {"port": 41000}


def test_an_eager_migration_names_no_page_server() -> None:
    assert receiver._page_server_named(SETTINGS, None, {"pages_port": 1}, "10.0.0.1") is None


@pytest.mark.parametrize(("message", "error"), [
    ({}, "field 'pages_port': expected int, got None"),
    ({"pages_port": "40001"}, "expected int"),
    ({"pages_port": True}, "expected int"),
    ({"pages_port": 0}, "pages_port 0 out of range"),
    ({"pages_port": 65536}, "pages_port 65536 out of range"),
])
def test_a_hostile_pages_port_is_refused(message: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        receiver._page_server_named(SETTINGS, _end(), message, "10.0.0.1")
