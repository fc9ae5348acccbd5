"""An OCI registry, through oras-py: push and pull blobs and manifests (blocking; call it from a thread).

    ref = Reference.parse("registry.example:5000/ckpt/app:1")  # shim.image_reference
    with RegistryClient(ref.registry) as client:
        client.push_blob(ref, path, digest, size)
        digest = client.push_manifest(ref, manifest_bytes, OCI_MANIFEST)
        body, media_type, digest = client.manifest(ref)

What we add to oras-py, and why:
- Manifests go up and come down as exact bytes: a manifest's digest is the hash of its bytes, and
  signatures and `ref@digest` pulls name that digest (oras' own `upload_manifest` re-serialises).
- No silent retries: oras' `do_request` retries every failure five times with sleeps of 3 to 83 s
  (two minutes before "connection refused" is reported); we call the undecorated request once.
- Credentials from the usual docker config: `$DOCKER_CONFIG/config.json`, else
  `~/.docker/config.json` (oras reads only the latter), `auths`, `credHelpers` and `credsStore`. The
  scheme follows the registry's challenge to `GET /v2/` (the ping docker and containerd do): Basic
  (distribution's htpasswd) or a Bearer token service.
- Plain HTTP only for loopback registries (127.0.0.0/8, localhost, [::1]), as containerd's resolver
  does; every other registry is HTTPS with certificate checks.
- Large blobs are streamed in chunks (the archive of a 4 GiB container never sits in memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import oras.auth
import oras.container
import oras.provider
import oras.utils
import requests

from shim.errors import InvalidArgument, NotFound, PermissionDenied, ShimError, Unavailable, Unknown
from shim.image_reference import Reference, is_loopback, is_registry_host
from shim.oci import INDEX_TYPES, MANIFEST_TYPES

ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
CHUNK = 64 << 20  # one PATCH of a chunked upload
MAX_MANIFEST = 4 << 20  # distribution's own limit on a manifest's size
TIMEOUT = 60.0  # seconds without a byte from the registry

class RegistryError(Unknown):
    """The registry refused or failed a request; its own error text is in the message."""


def docker_config_path() -> Path:
    """Where docker, containerd's ctr and crane look for credentials."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def load_docker_config(path: Path) -> dict[str, Any]:
    """The credential parts of a docker config; a missing file is no credentials, an unreadable one an error."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"auths": {}, "credsStore": None, "credHelpers": {}}
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"docker config {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"docker config {path} is not a JSON object")
    return {"auths": dict(data.get("auths") or {}), "credsStore": data.get("credsStore"),
            "credHelpers": dict(data.get("credHelpers") or {})}


class _Oras(oras.provider.Registry):  # type: ignore[misc]
    config_path: Path = Path()  # the docker config credentials came from, for errors

    def do_request(self, url: str, method: str = "GET", data: Any = None, headers: dict[str, str] | None = None,
                   json: Any = None, stream: bool = False) -> requests.Response:
        response = self._once(url, method, data, headers, json, stream)
        if response.status_code == 401 and isinstance(self.auth, oras.auth.TokenAuth) and self.auth.token:
            # oras keeps the first token it got; its scope (pull, for the first blob HEAD) does not cover a
            # push. Forget it: the retry's challenge names the scope needed and a new token is asked for it.
            self.auth.token = None
            response = self._once(url, method, data, headers, json, stream)
        return response

    def _once(self, url: str, method: str, data: Any, headers: dict[str, str] | None, json: Any,
              stream: bool) -> requests.Response:
        # Once, without oras' retry loop (module docstring); a transport failure is ours to word.
        undecorated = oras.provider.Registry.do_request.__wrapped__
        try:
            response: requests.Response = undecorated(self, url, method, data, headers, json, stream)
        except requests.RequestException as exc:
            raise Unavailable(f"registry {self.hostname}: {method} {url}: {exc}") from None
        except ValueError as exc:  # oras: "Cannot respond to request for authentication."
            raise PermissionDenied(f"registry {self.hostname} refused the credentials of {self.config_path} "
                                   f"(none there for it, or wrong): {exc}") from None
        return response


class RegistryClient:
    """One registry host; credentials resolved once, at the first request."""

    def __init__(self, registry: str, docker_config: Path | None = None) -> None:
        if not is_registry_host(registry):
            raise InvalidArgument(f"invalid registry host {registry!r} (HOST[:PORT], with a dot or a port, "
                                  "or localhost)")
        self.registry = registry
        self.scheme = "http" if is_loopback(registry) else "https"
        self._config_path = docker_config or docker_config_path()
        self._client: _Oras | None = None

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.session.close()

    # ------------------------------------------------------------ connection and credentials

    def _oras(self) -> _Oras:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> _Oras:
        challenge = self._ping()
        backend = "basic" if challenge.lower().startswith("basic") else "token"
        client = _Oras(hostname=self.registry, insecure=self.scheme == "http", auth_backend=backend)
        client.config_path = self._config_path
        # oras reads ~/.docker/config.json only; DOCKER_CONFIG is honoured by handing it ours.
        client.auth._auth_config = load_docker_config(self._config_path)
        for host in oras.utils.iter_localhosts(self.registry):
            if client.auth._load_auth(host):
                break
        if backend == "basic":
            basic = getattr(client.auth, "_basic_auth", None)
            if not basic:
                raise PermissionDenied(f"registry {self.registry} asks for a user name and password "
                                       f"(Basic) and {self._config_path} has none for it")
            client.set_header("Authorization", f"Basic {basic}")  # up front: chunks are not sent twice
        return client

    def _ping(self) -> str:
        """`GET /v2/`: the registry's auth challenge ('' when it asks none)."""
        url = f"{self.scheme}://{self.registry}/v2/"
        try:
            with requests.Session() as session:
                session.trust_env = False if self.scheme == "http" else session.trust_env
                response = session.get(url, timeout=TIMEOUT)
        except requests.RequestException as exc:
            raise Unavailable(f"registry {self.registry} is not reachable: {exc}") from None
        if response.status_code == 401:
            return str(response.headers.get("WWW-Authenticate", ""))
        if response.status_code != 200:
            raise RegistryError(f"registry {self.registry}: GET /v2/ answered HTTP {response.status_code}: "
                                f"{_error_text(response)}")
        return ""

    def _container(self, ref: Reference) -> oras.container.Container:
        if ref.registry != self.registry:
            raise InvalidArgument(f"{ref} is not on registry {self.registry}")
        name = ref.repository + (f"@{ref.digest}" if ref.digest else f":{ref.tag or 'latest'}")
        return oras.container.Container(name, registry=self.registry)

    def _url(self, path: str) -> str:
        return f"{self.scheme}://{path}"

    # ------------------------------------------------------------ blobs

    def blob_exists(self, ref: Reference, digest: str) -> bool:
        container = self._container(ref)
        response = self._oras().do_request(self._url(container.get_blob_url(digest)), "HEAD")
        _expect(response, (200, 404), f"HEAD blob {digest} of {ref.repository}")
        return response.status_code == 200

    def push_blob(self, ref: Reference, path: Path, digest: str, size: int) -> bool:
        """Upload the file `path` as blob `digest`; False when the registry had it already."""
        if self.blob_exists(ref, digest):
            return False
        container = self._container(ref)
        layer = {"digest": digest, "size": size}
        try:
            if size <= CHUNK:
                response = self._oras().put_upload(str(path), container, layer)
            else:
                response = self._oras().chunked_upload(str(path), container, layer, chunk_size=CHUNK)
        except ValueError as exc:  # oras: an upload the registry did not open or continue ("session url")
            raise RegistryError(f"registry: upload of blob {digest} to {ref.repository} refused: {exc}") from None
        _expect(response, (201,), f"upload of blob {digest} to {ref.repository}")
        return True

    def check_push(self, ref: Reference) -> None:
        """That a push to `ref`'s repository would be accepted, sending nothing: an upload is opened
        (what needs the push scope, or Basic credentials with write access) and cancelled at once.
        For a caller that must learn of a registry that is down or refuses it before it does
        something it cannot take back (a migration stops its source)."""
        container = self._container(ref)
        response = self._oras().do_request(self._url(container.upload_blob_url()), "POST")
        _expect(response, (202,), f"start of an upload to {ref.repository}")
        location = response.headers.get("Location", "")
        if location:  # an upload left open expires on its own (distribution: after a week): cancel it
            url = location if "://" in location else f"{self.scheme}://{self.registry}{location}"
            self._oras().do_request(url, "DELETE")

    def push_blob_bytes(self, ref: Reference, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with tempfile.NamedTemporaryFile(prefix="criu-shim-blob-") as f:
            f.write(data)
            f.flush()
            self.push_blob(ref, Path(f.name), digest, len(data))
        return digest

    def pull_blob(self, ref: Reference, digest: str, dest: Path) -> None:
        """Stream blob `digest` into `dest` (created 0600, must not exist) and check its digest."""
        container = self._container(ref)
        sha = hashlib.sha256()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out, \
                    self._oras().do_request(self._url(container.get_blob_url(digest)), "GET", stream=True) as response:
                _expect(response, (200,), f"GET blob {digest} of {ref.repository}")
                for chunk in response.iter_content(chunk_size=1 << 20):
                    sha.update(chunk)
                    out.write(chunk)
            if "sha256:" + sha.hexdigest() != digest:
                raise RegistryError(f"blob {digest} of {ref.repository} does not match its digest")
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------ manifests

    def push_manifest(self, ref: Reference, body: bytes, media_type: str) -> str:
        """PUT a manifest with these exact bytes under the ref's tag (or digest); returns its digest."""
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        container = self._container(ref)
        url = self._url(container.manifest_url(ref.reference))
        headers = {"Content-Type": media_type, **self._oras().headers}
        response = self._oras().do_request(url, "PUT", data=body, headers=headers)
        _expect(response, (201,), f"PUT manifest {ref}")
        served = response.headers.get("Docker-Content-Digest", digest)
        if served != digest:
            raise RegistryError(f"registry stored manifest {ref} as {served}, not {digest}")
        return digest

    def manifest(self, ref: Reference) -> tuple[bytes, str, str]:
        """GET a manifest or index: (its bytes, media type, digest of the bytes)."""
        container = self._container(ref)
        with self._oras().do_request(self._url(container.manifest_url(ref.reference)), "GET",
                                     headers={"Accept": ACCEPT}, stream=True) as response:
            _expect(response, (200,), f"GET manifest {ref}")
            body = response.raw.read(MAX_MANIFEST + 1, decode_content=True)  # a registry is no trusted peer
            media_type = str(response.headers.get("Content-Type", "")).split(";")[0].strip()
        if len(body) > MAX_MANIFEST:
            raise RegistryError(f"manifest {ref} is over {MAX_MANIFEST} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.digest and digest != ref.digest:
            raise RegistryError(f"manifest {ref} does not match its digest (got {digest})")
        return body, media_type, digest


def _error_text(response: requests.Response) -> str:
    """The registry's own error messages (OCI distribution error body), else the start of the body."""
    try:
        errors = response.json().get("errors") or []
        texts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)]
        if texts:
            return "; ".join(texts)
    except (ValueError, AttributeError):
        pass
    return response.text[:300].strip() or response.reason or ""


def _expect(response: requests.Response, ok: tuple[int, ...], what: str) -> None:
    status = response.status_code
    if status in ok:
        return
    text = _error_text(response)
    error: type[ShimError] = RegistryError
    if status in (401, 403):
        error = PermissionDenied
    elif status == 404:
        error = NotFound
    raise error(f"registry: {what}: HTTP {status}: {text}")
