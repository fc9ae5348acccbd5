"""A private OCI registry on loopback for a local node (blocking; CLI- and test-side code).

Images imported with `ctr images import` have no repo digest, so CRI reports their image
ID as `image_ref` and nothing can pull them again. Real nodes pull from registries; so
does a local node that serves its images from Debian's `docker-registry` (distribution
2.8) on 127.0.0.1:<free port>. containerd's CRI pulls from `127.0.0.1:PORT/...` over
plain HTTP with no extra configuration.

    registry = start_registry(directory)          # config.yml, registry.log, registry.pid, storage/
    digest = push_layout(registry, tar, "criu-shim/busybox", "1")
    ...
    stop_registry(directory)                      # idempotent

`push_layout` is a small OCI distribution client (standard library only): it pushes
an OCI image layout archive (what scripts/build-images.py writes) blob by blob, then
its manifest with the manifest's own bytes, so the digest a registry serves is the
digest in the archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shim import image_reference
from shim.errors import FailedPrecondition, InvalidArgument, Unavailable, Unknown
from shim.node import procs
from shim.node.tools import REPO_ROOT
from shim.oci import INDEX_TYPES, MANIFEST_TYPES, REF_NAME
from shim.paths_env import load_paths

CONFIG_NAME = "config.yml"
LOG_NAME = "registry.log"
PID_NAME = "registry.pid"
STORAGE_NAME = "storage"
START_TIMEOUT = 30.0
HTTP_TIMEOUT = 30.0
IMAGES_INDEX = REPO_ROOT / "build" / "images" / "images.json"

ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)

# Never send loopback traffic through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RegistryError(Unknown):
    """The registry answered a request with an error."""


@dataclass(frozen=True)
class Registry:
    directory: Path
    port: int
    pid: int

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the registry part of image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo: str, tag: str) -> str:
        return f"{self.host}/{repo}:{tag}"


@dataclass(frozen=True)
class PushedImage:
    name: str  # images.json name
    local_ref: str  # what `ctr images import` calls it (localhost/criu-shim/X:1)
    ref: str  # 127.0.0.1:PORT/criu-shim/X:1
    digest: str  # manifest digest: ref@digest is the repo digest

    @property
    def repo_digest(self) -> str:
        return f"{self.ref.rsplit(':', 1)[0]}@{self.digest}"


# ---------------------------------------------------------------- pure parts

def render_config(storage_dir: Path, port: int, secret: str, host: str = "127.0.0.1",
                  tls: tuple[Path, Path] | None = None) -> str:
    """config.yml for `docker-registry serve`: filesystem storage, loopback HTTP, no auth.
    With `host` and `tls` (certificate, key): HTTPS on that address (the fabric's registry).

    Strings are JSON-quoted (valid YAML double-quoted scalars). Logs go to stderr, which
    `start_registry` sends to registry.log.
    """
    q = json.dumps
    https = ["  tls:", f"    certificate: {q(str(tls[0]))}", f"    key: {q(str(tls[1]))}"] if tls else []
    return "\n".join([
        "version: 0.1",
        "log:",
        "  level: info",
        "  formatter: text",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {q(str(storage_dir))}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: {q(f'{host}:{port}')}",
        f"  secret: {q(secret)}",
        *https,
        "  headers:",
        "    X-Content-Type-Options: [nosniff]",
        "health:",
        "  storagedriver:",
        "    enabled: false",
        "",
    ])


def config_port(config_text: str) -> int | None:
    """The port of `http.addr` in a config written by `render_config`."""
    m = re.search(r'^\s+addr:\s*"?[^":\s]*:(\d+)"?\s*$', config_text, re.MULTILINE)
    return int(m.group(1)) if m else None


def repo_and_tag(local_ref: str) -> tuple[str, str]:
    """`localhost/criu-shim/busybox:1` -> (`criu-shim/busybox`, `1`), to push to a registry.

    The first path component is dropped when it names a registry (has a `.` or `:`, or
    is `localhost`), as the image reference grammar does.
    """
    name, sep, tag = local_ref.rpartition(":")
    if not sep or "/" in tag or not name:
        name, tag = local_ref, "latest"
    if "@" in name:
        raise InvalidArgument(f"{local_ref!r}: a digest reference cannot be re-tagged")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        name = rest
    check_repo_tag(name, tag)
    return name, tag


def check_repo_tag(repo: str, tag: str) -> None:
    if not image_reference.is_repository(repo):
        raise InvalidArgument(f"invalid repository name {repo!r}")
    if not image_reference.is_tag(tag):
        raise InvalidArgument(f"invalid tag {tag!r}")


def upload_url(base: str, location: str, digest: str) -> str:
    """The URL completing a monolithic upload: the upload `Location` (absolute or
    relative to `base`, may carry a query of its own) plus `digest=`."""
    url = urllib.parse.urljoin(base, location)
    parts = urllib.parse.urlsplit(url)
    query = parts.query + ("&" if parts.query else "") + urllib.parse.urlencode({"digest": digest})
    return urllib.parse.urlunsplit(parts._replace(query=query))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def select_manifest(index: Mapping[str, object], tag: str) -> dict[str, object]:
    """The descriptor of an OCI layout's index.json to push as `tag`: the only one, or the
    one whose `org.opencontainers.image.ref.name` is `tag`."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise InvalidArgument("index.json lists no manifests")
    if len(manifests) == 1:
        return _descriptor(manifests[0])
    named = [m for m in manifests if isinstance(m, dict)
             and (m.get("annotations") or {}).get(REF_NAME) == tag]
    if len(named) != 1:
        raise InvalidArgument(f"index.json lists {len(manifests)} manifests and {len(named)} are named {tag!r}")
    return _descriptor(named[0])


def _descriptor(value: object) -> dict[str, object]:
    if not isinstance(value, dict) or not isinstance(value.get("digest"), str) \
            or not image_reference.is_digest(value["digest"]) or not isinstance(value.get("mediaType"), str):
        raise InvalidArgument(f"bad descriptor: {value!r}")
    return value


# ---------------------------------------------------------------- process

def registry_bin() -> Path:
    value = load_paths().get("REGISTRY_BIN")
    if not value:
        raise FailedPrecondition("scripts/paths.env has no REGISTRY_BIN")
    path = Path(value)
    if not os.access(path, os.X_OK):
        raise FailedPrecondition(f"{path} is missing: run `make setup` (host package docker-registry)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running_registry(directory: Path) -> Registry | None:
    """The registry started in `directory`, if it still runs."""
    directory = directory.resolve()
    pid = procs.read_pid(directory / PID_NAME)
    if pid is None or not _is_ours(pid, directory) or not procs.alive(pid):
        return None
    try:
        port = config_port((directory / CONFIG_NAME).read_text())
    except OSError:
        return None
    return Registry(directory, port, pid) if port else None


def start_registry(directory: Path, timeout: float = START_TIMEOUT) -> Registry:
    """Start `docker-registry serve` for `directory` on a free loopback port and wait until
    `GET /v2/` answers 200. Returns the one already running there, if any."""
    directory = directory.resolve()
    if (existing := running_registry(directory)) is not None:
        return existing
    binary = registry_bin()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STORAGE_NAME).mkdir(exist_ok=True)
    config, log_file = directory / CONFIG_NAME, directory / LOG_NAME
    last = ""
    for _ in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        config.write_text(render_config(directory / STORAGE_NAME, port, secrets.token_hex(16)))
        offset = log_file.stat().st_size if log_file.exists() else 0
        pid = procs.spawn([str(binary), "serve", str(config)], log_file, directory / PID_NAME)
        registry = Registry(directory, port, pid)
        if _wait_answering(registry, timeout):
            return registry
        _stop(pid, 5.0)
        (directory / PID_NAME).unlink(missing_ok=True)
        with open(log_file, "rb") as f:
            f.seek(offset)
            last = f.read().decode(errors="replace")
        if "address already in use" not in last:
            break
    tail = "\n".join(last.splitlines()[-15:])
    raise Unavailable(f"docker-registry in {directory} did not answer within {timeout:.0f}s; "
                      f"last lines of {log_file}:\n{tail}")


def stop_registry(directory: Path, timeout: float = 10.0) -> bool:
    """Stop the registry started in `directory` (SIGTERM, then SIGKILL); idempotent.
    Returns whether a process was stopped."""
    directory = directory.resolve()
    pid_file = directory / PID_NAME
    pid = procs.read_pid(pid_file)
    stopped = False
    if pid is not None and _is_ours(pid, directory) and procs.alive(pid):
        _stop(pid, timeout)
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


def _stop(pid: int, timeout: float) -> None:
    """procs.stop, then reap the exit status if the registry is our own child: a process
    that turned zombie while `procs.alive` looked at it would otherwise stay in /proc."""
    procs.stop(pid, timeout=timeout)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _is_ours(pid: int, directory: Path) -> bool:
    """`pid` is a registry serving `directory`'s config (not a recycled pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(directory / CONFIG_NAME).encode() in argv


def _wait_answering(registry: Registry, timeout: float) -> bool:
    """Wait until `GET /v2/` answers 200; False if the process died or time ran out."""
    ok = procs.wait_until(lambda: _answers(registry) or not procs.alive(registry.pid), timeout, 0.05)
    return ok and procs.alive(registry.pid)


def _answers(registry: Registry) -> bool:
    try:
        with _OPENER.open(f"{registry.url}/v2/", timeout=1.0) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


# ---------------------------------------------------------------- HTTP client

def _request(method: str, url: str, body: bytes | IO[bytes] | None = None,
             headers: Mapping[str, str] | None = None, ok: tuple[int, ...] = (200,)) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=HTTP_TIMEOUT) as resp:
            status, hdrs, data = int(resp.status), {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, data = exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
    except (OSError, urllib.error.URLError) as exc:
        raise Unavailable(f"{method} {url}: {exc}") from exc
    if status not in ok:
        raise RegistryError(f"{method} {url}: HTTP {status}: {data[:500].decode(errors='replace')}")
    return status, hdrs, data


def blob_exists(registry: Registry, repo: str, digest: str) -> bool:
    status, _, _ = _request("HEAD", f"{registry.url}/v2/{repo}/blobs/{digest}", ok=(200, 404))
    return status == 200


def push_blob(registry: Registry, repo: str, digest: str, size: int, data: IO[bytes] | bytes) -> bool:
    """Upload one blob (monolithic: POST, then PUT ?digest=); False if it was there already."""
    if blob_exists(registry, repo, digest):
        return False
    _, hdrs, _ = _request("POST", f"{registry.url}/v2/{repo}/blobs/uploads/", b"",
                          {"Content-Length": "0"}, ok=(202,))
    location = hdrs.get("location")
    if not location:
        raise RegistryError(f"upload to {registry.host}/{repo} started without a Location")
    _, hdrs, _ = _request("PUT", upload_url(registry.url + "/", location, digest), data,
                          {"Content-Type": "application/octet-stream", "Content-Length": str(size)}, ok=(201,))
    if hdrs.get("docker-content-digest", digest) != digest:
        raise RegistryError(f"blob {digest} stored as {hdrs['docker-content-digest']}")
    return True


def put_manifest(registry: Registry, repo: str, reference: str, media_type: str, body: bytes) -> str:
    """PUT a manifest or index with its exact bytes; returns its digest."""
    digest = sha256_digest(body)
    _, hdrs, _ = _request("PUT", f"{registry.url}/v2/{repo}/manifests/{reference}", body,
                          {"Content-Type": media_type, "Content-Length": str(len(body))}, ok=(201,))
    served = hdrs.get("docker-content-digest", digest)
    if served != digest:
        raise RegistryError(f"manifest {digest} stored as {served}")
    return digest


def get_manifest(registry: Registry, repo: str, reference: str) -> tuple[bytes, str, str]:
    """GET a manifest by tag or digest: (bytes, media type, digest the registry reports)."""
    _, hdrs, body = _request("GET", f"{registry.url}/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT})
    return body, hdrs.get("content-type", ""), hdrs.get("docker-content-digest", sha256_digest(body))


# ---------------------------------------------------------------- OCI layout push

def push_layout(registry: Registry, tar_path: Path, repo: str, tag: str) -> str:
    """Push the OCI image layout archive `tar_path` as `repo:tag`; returns the manifest digest."""
    check_repo_tag(repo, tag)
    with tarfile.open(tar_path) as tar:
        members = {_member_name(m.name): m for m in tar.getmembers() if m.isfile()}

        def blob_member(digest: str) -> tarfile.TarInfo:
            algo, _, hexd = digest.partition(":")
            member = members.get(f"blobs/{algo}/{hexd}")
            if member is None:
                raise InvalidArgument(f"{tar_path}: blob {digest} is missing")
            return member

        def read_blob(desc: Mapping[str, object]) -> bytes:
            digest = str(desc["digest"])
            f = tar.extractfile(blob_member(digest))
            assert f is not None
            data = f.read()
            if sha256_digest(data) != digest:
                raise InvalidArgument(f"{tar_path}: blob {digest} does not match its digest")
            return data

        def push(desc: dict[str, object], reference: str) -> str:
            media_type = str(desc["mediaType"])
            body = read_blob(desc)
            doc = json.loads(body)
            if media_type in INDEX_TYPES:
                for child in doc.get("manifests", []):
                    child = _descriptor(child)
                    push(child, str(child["digest"]))
            elif media_type in MANIFEST_TYPES:
                for child in [doc.get("config"), *doc.get("layers", [])]:
                    child = _descriptor(child)
                    member = blob_member(str(child["digest"]))
                    f = tar.extractfile(member)
                    assert f is not None
                    push_blob(registry, repo, str(child["digest"]), member.size, f)
            else:
                raise InvalidArgument(f"{tar_path}: cannot push media type {media_type!r}")
            return put_manifest(registry, repo, reference, media_type, body)

        index_member = members.get("index.json")
        if index_member is None:
            raise InvalidArgument(f"{tar_path} is not an OCI image layout (no index.json)")
        f = tar.extractfile(index_member)
        assert f is not None
        return push(select_manifest(json.loads(f.read()), tag), tag)


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def push_images(registry: Registry, index: Path = IMAGES_INDEX) -> list[PushedImage]:
    """Push every archive of build/images/images.json (localhost/criu-shim/X:1 becomes
    127.0.0.1:PORT/criu-shim/X:1)."""
    if not index.exists():
        raise FailedPrecondition(f"{index} is missing: run `make images` first")
    pushed = []
    for image in json.loads(index.read_text()):
        tar = Path(image["tar"])
        tar = tar if tar.is_absolute() else REPO_ROOT / tar
        repo, tag = repo_and_tag(image["ref"])
        digest = push_layout(registry, tar, repo, tag)
        pushed.append(PushedImage(image["name"], image["ref"], registry.ref(repo, tag), digest))
    return pushed
