"""A registry every node of a fabric reaches: `docker-registry` in the router's namespace (blocking).

For `criu-shim migrate --mode registry` between fabric hosts: the source pushes the checkpoint
image, the target's containerd pulls it. The registry listens on REGISTRY_IP (an address of the
router's own loopback, reached from each host through its default route) over HTTPS with a
certificate the fabric's CA issues; each fabric node's containerd trusts that CA through its
hosts.toml (`fabric.write_registry_hosts`, written by `node up`), and its proxy admits images of
that registry (`restore.allowed_registries`). A client outside containerd (criu-shim migrate's
push, through requests) is told the CA with REQUESTS_CA_BUNDLE (`client_env`).

    with fabric_registry.running(fabric.Fabric("mtest"), tmp / "registry") as host:
        ...  # push HOST/REPO:TAG from any host of the fabric

`stop` is idempotent and also runs on every failure of `start`: the process, its address on the
router and its pid file go; the router namespace itself goes with the fabric's last node.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

from shim.errors import FailedPrecondition, Unavailable
from shim.node import fabric, pki, procs
from shim.node import registry as dev_registry

START_TIMEOUT = 30.0


def client_env(fab: fabric.Fabric) -> dict[str, str]:
    """What a process that pushes with requests (criu-shim push, migrate) needs to trust the registry."""
    return {"REQUESTS_CA_BUNDLE": str(fab.ca.cert)}


def start(fab: fabric.Fabric, directory: Path) -> str:
    """Start the fabric's registry (its storage and log in `directory`); returns its HOST:PORT."""
    if not (Path("/run/netns") / fab.router).exists():
        raise FailedPrecondition(f"fabric {fab.name} has no router: bring a node up on it first")
    directory = directory.resolve()
    try:
        return _start(fab, directory)
    except BaseException:
        stop(fab, directory)
        raise


def _start(fab: fabric.Fabric, directory: Path) -> str:
    (directory / dev_registry.STORAGE_NAME).mkdir(parents=True, exist_ok=True)
    cert = pki.issue(fab.ca, pki.CertPair(directory / "registry.crt", directory / "registry.key"),
                     f"fabric {fab.name} registry", server=True, ips=(fabric.REGISTRY_IP,))
    _router_ip("addr", "replace", f"{fabric.REGISTRY_IP}/32", "dev", "lo", fab=fab)
    config = directory / dev_registry.CONFIG_NAME
    config.write_text(dev_registry.render_config(directory / dev_registry.STORAGE_NAME, fabric.REGISTRY_PORT,
                                                 secrets.token_hex(16), fabric.REGISTRY_IP, (cert.cert, cert.key)))
    log = directory / dev_registry.LOG_NAME
    pid = procs.spawn(["nsenter", f"--net=/run/netns/{fab.router}", "--", str(dev_registry.registry_bin()),
                       "serve", str(config)], log, directory / dev_registry.PID_NAME)
    if not procs.wait_until(lambda: _listening(fab) or not procs.alive(pid), START_TIMEOUT) or not procs.alive(pid):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
        raise Unavailable(f"the registry of fabric {fab.name} did not listen on {fabric.REGISTRY_HOST}; last lines "
                          f"of {log}:\n{tail}")
    return fabric.REGISTRY_HOST


def stop(fab: fabric.Fabric, directory: Path) -> None:
    """Stop the registry of `directory` and drop its address from the router (idempotent)."""
    dev_registry.stop_registry(directory.resolve())
    if (Path("/run/netns") / fab.router).exists():
        _router_ip("addr", "del", f"{fabric.REGISTRY_IP}/32", "dev", "lo", fab=fab, check=False)


@contextlib.contextmanager
def running(fab: fabric.Fabric, directory: Path) -> Iterator[str]:
    host = start(fab, directory)
    try:
        yield host
    finally:
        stop(fab, directory)


def _listening(fab: fabric.Fabric) -> bool:
    out = subprocess.run(["ip", "netns", "exec", fab.router, "ss", "-Hltn", f"src {fabric.REGISTRY_IP}"],
                         capture_output=True, text=True).stdout
    return f":{fabric.REGISTRY_PORT}" in out


def _router_ip(*args: str, fab: fabric.Fabric, check: bool = True) -> None:
    proc = subprocess.run(["ip", "-n", fab.router, *args], capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"})
    if check and proc.returncode != 0:
        raise FailedPrecondition(f"`ip -n {fab.router} {' '.join(args)}` failed: {proc.stderr.strip()}")
