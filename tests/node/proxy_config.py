"""A node's proxy restarted with one more config table, for the tests of a config section."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from shim.node import local, procs
from shim.node.layout import NodeLayout
from tests.node.conftest import Node


@contextmanager
def proxy_with(node: Node, table: str, body: str, edit: Callable[[str], str] = str) -> Iterator[None]:
    """The node's proxy restarted with `[table]` + `body` added to its config (and the rest passed
    through `edit`, for a key of a table the node's config has already); put back afterwards."""
    layout = NodeLayout(node.dir.resolve())
    original = layout.proxy_config_file.read_text()

    restart_proxy(layout, f"{edit(original)}\n[{table}]\n{body}")
    try:
        yield
    finally:
        restart_proxy(layout, original)


def restart_proxy(layout: NodeLayout, config: str) -> None:
    """The node's proxy stopped and started again with `config` as its whole config file."""
    pid = procs.read_pid(layout.pid_dir / "proxy.pid")
    assert pid is not None
    procs.stop(pid)
    layout.proxy_config_file.write_text(config)
    local._start_proxy(layout, layout.proxy_config_file)  # a plain node's proxy runs on the host
