"""Clients for the real-application tests, run on the host against a pod IP on the node's bridge.

Each keeps one TCP connection for its whole life and never reconnects on its own, so a test
that uses it before a checkpoint and after the restore proves the connection itself came back.
"""

from __future__ import annotations

import http.client
import json
import socket
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import pg8000.native

from shim.api.cri.v1 import api_pb2 as cri
from shim.checkpoint.options import annotation
from shim.node.local import IMAGES_INDEX, import_image
from shim.node.tools import tools_for
from shim.preflight import probe_prlimit_other_user
from shim.restore.restorer import LAZY_ANNOTATION
from tests.node.pods import Cri, Pod

TIMEOUT = 30.0
# CRIU reads every task's rlimits with prlimit(), which needs CAP_SYS_RESOURCE for another
# user's process: without it (these CI VMs) only root's processes can be dumped. Measured the
# way `criu-shim check` measures it: prlimit() on a process of another user.
NON_ROOT_DUMPS = probe_prlimit_other_user() is True
# Live migration: connections dumped and the source stopped right after a good dump.
MIGRATE = {annotation("tcp-established"): "true", annotation("stop-after"): "true"}
EAGER = {LAZY_ANNOTATION: "false"}  # restore with every page in place before the process runs


@dataclass(frozen=True)
class App:
    name: str
    image: str
    command: list[str]
    user: int  # the application's own uid (and gid) in its image
    port: int


REDIS = App("redis", "localhost/criu-shim/redis:1", ["/usr/bin/redis-server", "/etc/redis/redis.conf"], 998, 6379)
NGINX = App("nginx", "localhost/criu-shim/nginx:1", ["/usr/sbin/nginx", "-e", "stderr"], 33, 8080)
POSTGRES = App("postgres", "localhost/criu-shim/postgres:1", ["/usr/local/bin/postgres-start"], 999, 5432)


def import_app_images(containerd_endpoint: str, version: str = "1.7") -> None:
    """`node up` leaves the real-application images out (45 MiB most node tests never use)."""
    for image in json.loads(IMAGES_INDEX.read_text()):
        if image["ref"] in {a.image for a in (REDIS, NGINX, POSTGRES)}:
            import_image(Path(containerd_endpoint.removeprefix("unix://")), tools_for(version), image)


def run_as(app: App) -> int:
    """The application's own user where its processes can be dumped here, root otherwise."""
    return app.user if NON_ROOT_DUMPS else 0


# A pod user namespace as the kubelet asks for one (hostUsers: false): container ids 0-65535 are
# host ids 100000-165535, in a namespace root owns (so root may prlimit() its processes).
_IDS = [cri.IDMapping(host_id=100000, container_id=0, length=65536)]
USERNS = cri.NamespaceOption(userns_options=cri.UserNamespace(mode=cri.NamespaceMode.POD, uids=_IDS, gids=_IDS))


@contextmanager
def userns_pod(client: Cri, annotations: Mapping[str, str]) -> Iterator[Pod]:
    """A pod with its own user namespace (CRI userns_options), removed on exit."""
    name = f"u-{uuid.uuid4().hex[:8]}"
    log_dir = client.log_root / name
    log_dir.mkdir(parents=True, exist_ok=True)
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="tests", uid=name), log_directory=str(log_dir),
        annotations=dict(annotations), linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=USERNS)))
    pod_id = client.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    try:
        yield Pod(pod_id, config)
    finally:
        client.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
        client.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)


def security(uid: int, userns: bool = False) -> cri.LinuxContainerConfig:
    """run_as_user/group `uid`; in a user-namespace pod the container must name the pod's mappings too."""
    return cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
        run_as_user=cri.Int64Value(value=uid), run_as_group=cri.Int64Value(value=uid),
        namespace_options=USERNS if userns else None))


def start(client: Cri, pod: Pod, app: App, args: list[str] | None = None, uid: int | None = None,
          userns: bool = False) -> str:
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=app.name), image=cri.ImageSpec(image=app.image),
                                 command=app.command + (args or []), log_path=f"{app.name}.log",
                                 linux=security(run_as(app) if uid is None else uid, userns))
    ctr = str(client.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=60).container_id)
    client.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=60)
    return ctr


def restore(client: Cri, pod: Pod, archive: str, name: str, uid: int, userns: bool = False) -> str:
    """CreateContainer from a checkpoint archive with the security context a kubelet would send."""
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=archive),
                                 log_path=f"{name}.log", linux=security(uid, userns))
    ctr = str(client.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=120).container_id)
    client.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr), timeout=120)
    return ctr


def pod_ip(client: Cri, pod: Pod) -> str:
    return str(client.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id)).status.network.ip)


class Redis:
    """The RESP protocol over one socket (commands as arrays of bulk strings)."""

    def __init__(self, host: str, port: int = 6379) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.reader = self.sock.makefile("rb")

    def call(self, *args: str | int) -> object:
        parts = [str(a).encode() for a in args]
        frame = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.sock.sendall(frame)
        return self._reply()

    def _reply(self) -> object:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"redis: connection closed mid-reply ({line!r})")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.reader.read(size + 2)[:-2].decode()
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise ConnectionError(f"redis: unexpected reply {line!r}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Http:
    """HTTP/1.1 keep-alive: one connection, asserted never to be replaced."""

    def __init__(self, host: str, port: int = 8080) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        self.conn.connect()
        self.sock = self.conn.sock

    def get(self, path: str) -> tuple[bytes, http.client.HTTPResponse]:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        body = response.read()
        # http.client would silently open a new connection; the test must see the old one.
        assert self.conn.sock is self.sock, "the keep-alive connection was replaced"
        return body, response

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Postgres:
    """A pg8000 connection (pure Python wire protocol) as user postgres, trust authentication."""

    def __init__(self, host: str, port: int = 5432) -> None:
        self.conn = pg8000.native.Connection("postgres", host=host, port=port, database="postgres",
                                             timeout=TIMEOUT)

    def one(self, sql: str, **params: object) -> tuple[object, ...]:
        rows = self.conn.run(sql, **params)
        assert rows is not None and len(rows) == 1, rows
        return tuple(rows[0])

    def run(self, sql: str, **params: object) -> None:
        self.conn.run(sql, **params)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except Exception:
            if exc is None:
                raise


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
