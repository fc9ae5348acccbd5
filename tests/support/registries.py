"""docker-registry (distribution) instances for the adapter tests, on loopback: plain, or with an `auth:`
section (htpasswd for Basic, a token service for Bearer). Stopped and reaped on every path."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from shim.node import procs
from shim.node import registry as dev_registry

REGISTRY_BIN = Path(dev_registry.load_paths().get("REGISTRY_BIN", "/usr/bin/docker-registry"))


@contextmanager
def plain(directory: Path) -> Iterator[str]:
    """No auth: HOST:PORT of a registry the dev node's own code starts."""
    started = dev_registry.start_registry(directory)
    try:
        yield started.host
    finally:
        dev_registry.stop_registry(directory)


@contextmanager
def with_auth(directory: Path, auth: str, scheme: str) -> Iterator[str]:
    """A registry whose config has `auth` (YAML, the body of its `auth:` key); ready once `GET /v2/`
    answers 401 with a `scheme` (Basic, Bearer) challenge."""
    port = dev_registry.free_port()
    config = dev_registry.render_config(directory / "storage", port, "x")
    (directory / "config.yml").write_text(config.replace("http:", f"auth:\n{auth.rstrip()}\nhttp:", 1))
    pid = procs.spawn([str(REGISTRY_BIN), "serve", str(directory / "config.yml")], directory / "registry.log",
                      directory / "registry.pid")
    try:
        assert procs.wait_until(lambda: _challenges(port, scheme), 30.0, 0.05), \
            (directory / "registry.log").read_text()
        yield f"127.0.0.1:{port}"
    finally:
        procs.stop(pid, timeout=10.0)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def yaml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML string


def _challenges(port: int, scheme: str) -> bool:
    try:
        answer = requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
    except requests.RequestException:
        return False
    return answer.status_code == 401 and answer.headers.get("WWW-Authenticate", "").startswith(scheme)
