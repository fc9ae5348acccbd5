"""shim.node.registry without docker-registry: config rendering, reference and URL helpers,
manifest selection, pid-file safety, and the OCI push client against an in-memory fake
registry on loopback (relative upload Locations with a query of their own, like distribution's)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest

from shim.errors import InvalidArgument
from shim.node import registry as reg

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"


# ---------------------------------------------------------------- pure parts

def test_config_has_storage_loopback_addr_and_no_auth(tmp_path: Path) -> None:
    text = reg.render_config(tmp_path / "st ore", 41234, "s3cret")
    lines = text.splitlines()
    assert lines[0] == "version: 0.1"
    assert f"    rootdirectory: {json.dumps(str(tmp_path / 'st ore'))}" in lines
    assert '  addr: "127.0.0.1:41234"' in lines
    assert '  secret: "s3cret"' in lines
    assert "auth" not in text and "tls" not in text
    assert reg.config_port(text) == 41234


def test_config_quotes_awkward_paths() -> None:
    text = reg.render_config(Path('/tmp/a "b": #c'), 5, "x")
    line = next(ln for ln in text.splitlines() if "rootdirectory" in ln)
    assert json.loads(line.split(": ", 1)[1]) == '/tmp/a "b": #c'


def test_config_port_absent() -> None:
    assert reg.config_port("version: 0.1\n") is None


@pytest.mark.parametrize(("local", "expected"), [
    ("localhost/criu-shim/busybox:1", ("criu-shim/busybox", "1")),
    ("127.0.0.1:5000/criu-shim/pause:1", ("criu-shim/pause", "1")),
    ("registry.example/a/b:v2.0", ("a/b", "v2.0")),
    ("criu-shim/busybox", ("criu-shim/busybox", "latest")),
    ("localhost:5000/x", ("x", "latest")),
    ("busybox:1", ("busybox", "1")),
])
def test_repo_and_tag(local: str, expected: tuple[str, str]) -> None:
    assert reg.repo_and_tag(local) == expected


@pytest.mark.parametrize("local", ["localhost/Upper/x:1", "a/b@sha256:" + "0" * 64, "a:b c", "a/../b:1"])
def test_repo_and_tag_refuses(local: str) -> None:
    with pytest.raises(InvalidArgument):
        reg.repo_and_tag(local)


@pytest.mark.parametrize(("location", "expected"), [
    ("/v2/r/blobs/uploads/u1?_state=abc%3D",
     "http://127.0.0.1:9/v2/r/blobs/uploads/u1?_state=abc%3D&digest=sha256%3Aff"),
    ("http://127.0.0.1:9/v2/r/blobs/uploads/u2", "http://127.0.0.1:9/v2/r/blobs/uploads/u2?digest=sha256%3Aff"),
])
def test_upload_url(location: str, expected: str) -> None:
    assert reg.upload_url("http://127.0.0.1:9/", location, "sha256:ff") == expected


def _desc(n: int, name: str | None = None) -> dict[str, object]:
    d: dict[str, object] = {"mediaType": MT_MANIFEST, "digest": "sha256:" + f"{n:064x}", "size": 1}
    if name is not None:
        d["annotations"] = {"org.opencontainers.image.ref.name": name}
    return d


def test_select_manifest() -> None:
    assert reg.select_manifest({"manifests": [_desc(1)]}, "anything") == _desc(1)
    assert reg.select_manifest({"manifests": [_desc(1, "a"), _desc(2, "b")]}, "b") == _desc(2, "b")
    bad: list[dict[str, object]] = [{"manifests": [_desc(1, "a"), _desc(2, "b")]}, {"manifests": []}, {},
                                    {"manifests": [{"mediaType": MT_MANIFEST, "digest": "md5:00"}]}]
    for index in bad:
        with pytest.raises(InvalidArgument):
            reg.select_manifest(index, "c")


def test_stop_and_running_ignore_a_pid_that_is_not_a_registry_of_this_dir(tmp_path: Path) -> None:
    (tmp_path / reg.PID_NAME).write_text(f"{os.getpid()}\n")  # us: must never be signalled
    (tmp_path / reg.CONFIG_NAME).write_text(reg.render_config(tmp_path, 1, "x"))
    assert reg.running_registry(tmp_path) is None
    assert reg.stop_registry(tmp_path) is False
    assert not (tmp_path / reg.PID_NAME).exists()
    assert reg.stop_registry(tmp_path) is False  # idempotent, nothing there


# ---------------------------------------------------------------- push client vs a fake registry

class FakeRegistry(BaseHTTPRequestHandler):
    blobs: ClassVar[dict[str, bytes]] = {}
    manifests: ClassVar[dict[tuple[str, str], tuple[str, bytes]]] = {}
    uploads: ClassVar[set[str]] = set()
    log: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_HEAD(self) -> None:
        self.log.append(f"HEAD {self.path}")
        digest = self.path.rsplit("/", 1)[1]
        self._send(200 if digest in self.blobs else 404)

    def do_POST(self) -> None:
        self.log.append(f"POST {self.path}")
        self._body()
        upload = str(uuid.uuid4())
        self.uploads.add(upload)
        repo = self.path.removeprefix("/v2/").removesuffix("/blobs/uploads/")
        self._send(202, {"Location": f"/v2/{repo}/blobs/uploads/{upload}?_state=x%3Dy"})

    def do_PUT(self) -> None:
        parts = urlsplit(self.path)
        body = self._body()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if "/blobs/uploads/" in parts.path:
            query = parse_qs(parts.query)
            assert query["_state"] == ["x=y"], query
            assert parts.path.rsplit("/", 1)[1] in self.uploads
            self.log.append("PUT blob")
            if query["digest"] != [digest]:
                return self._send(400, body=b'{"errors":[{"code":"DIGEST_INVALID"}]}')
            self.blobs[digest] = body
            return self._send(201, {"Docker-Content-Digest": digest})
        repo, _, ref = parts.path.removeprefix("/v2/").rpartition("/manifests/")
        self.log.append(f"PUT manifest {ref}")
        doc = json.loads(body)
        for child in [doc.get("config"), *doc.get("layers", [])] if "layers" in doc else []:
            if child["digest"] not in self.blobs:
                return self._send(400, body=b'{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN"}]}')
        for child in doc.get("manifests", []):
            if (repo, child["digest"]) not in self.manifests:
                return self._send(400, body=b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
        for key in (ref, digest):
            self.manifests[(repo, key)] = (self.headers["Content-Type"], body)
        self._send(201, {"Docker-Content-Digest": digest})

    def do_GET(self) -> None:
        repo, _, ref = self.path.removeprefix("/v2/").rpartition("/manifests/")
        if (repo, ref) not in self.manifests:
            return self._send(404)
        media_type, body = self.manifests[(repo, ref)]
        self._send(200, {"Content-Type": media_type,
                         "Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()}, body)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[reg.Registry]:
    FakeRegistry.blobs, FakeRegistry.manifests, FakeRegistry.uploads, FakeRegistry.log = {}, {}, set(), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield reg.Registry(tmp_path, server.server_address[1], pid=0)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _blob(files: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    files["blobs/sha256/" + digest.split(":")[1]] = data
    return digest


def _manifest(files: dict[str, bytes], layer: bytes) -> tuple[str, int]:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    doc = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": _blob(files, config), "size": len(config)},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       "digest": _blob(files, layer), "size": len(layer)}]}
    body = json.dumps(doc).encode()
    return _blob(files, body), len(body)


def _layout(path: Path, files: dict[str, bytes], top: dict[str, object], prefix: str = "") -> Path:
    files = {**files, "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
             "index.json": json.dumps({"schemaVersion": 2, "manifests": [top]}).encode()}
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("prefix", ["", "./"])
def test_push_manifest_then_get_by_tag_and_digest(fake: reg.Registry, tmp_path: Path, prefix: str) -> None:
    files: dict[str, bytes] = {}
    digest, size = _manifest(files, b"layer-bytes")
    tar = _layout(tmp_path / "img.tar", files, {"mediaType": MT_MANIFEST, "digest": digest, "size": size}, prefix)
    assert reg.push_layout(fake, tar, "criu-shim/x", "1") == digest
    assert FakeRegistry.log.count("PUT blob") == 2
    assert FakeRegistry.log[-1] == "PUT manifest 1"
    for ref in ("1", digest):
        body, media_type, served = reg.get_manifest(fake, "criu-shim/x", ref)
        assert (media_type, served) == (MT_MANIFEST, digest)
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    # a second push uploads no blob again
    FakeRegistry.log.clear()
    assert reg.push_layout(fake, tar, "criu-shim/x", "1") == digest
    assert "PUT blob" not in FakeRegistry.log


def test_push_index_pushes_children_by_digest_first(fake: reg.Registry, tmp_path: Path) -> None:
    files: dict[str, bytes] = {}
    children = [_manifest(files, b"amd64-layer"), _manifest(files, b"arm64-layer")]
    index = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        {"mediaType": MT_MANIFEST, "digest": d, "size": s} for d, s in children]}).encode()
    index_digest = _blob(files, index)
    tar = _layout(tmp_path / "idx.tar", files, {"mediaType": MT_INDEX, "digest": index_digest, "size": len(index)})
    assert reg.push_layout(fake, tar, "multi", "v1") == index_digest
    assert [e for e in FakeRegistry.log if e.startswith("PUT manifest")] == [
        f"PUT manifest {children[0][0]}", f"PUT manifest {children[1][0]}", "PUT manifest v1"]
    assert reg.get_manifest(fake, "multi", "v1")[1:] == (MT_INDEX, index_digest)


def test_push_refuses_a_corrupt_or_incomplete_layout(fake: reg.Registry, tmp_path: Path) -> None:
    files: dict[str, bytes] = {}
    digest, size = _manifest(files, b"layer")
    top = {"mediaType": MT_MANIFEST, "digest": digest, "size": size}
    layer = next(n for n, d in files.items() if d == b"layer")
    missing = _layout(tmp_path / "missing.tar", {n: d for n, d in files.items() if n != layer}, top)
    with pytest.raises(InvalidArgument, match="is missing"):
        reg.push_layout(fake, missing, "r", "1")
    manifest_name = "blobs/sha256/" + digest.split(":")[1]
    corrupt = _layout(tmp_path / "corrupt.tar", {**files, manifest_name: files[manifest_name] + b" "}, top)
    with pytest.raises(InvalidArgument, match="does not match"):
        reg.push_layout(fake, corrupt, "r", "1")
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(InvalidArgument, match="no index.json"):
        reg.push_layout(fake, tmp_path / "empty.tar", "r", "1")
    with pytest.raises(InvalidArgument):
        reg.push_layout(fake, missing, "Bad Repo", "1")
    assert not any(e.startswith("PUT manifest") for e in FakeRegistry.log)


def test_registry_errors_carry_status_and_body(fake: reg.Registry) -> None:
    with pytest.raises(reg.RegistryError, match="HTTP 404"):
        reg.get_manifest(fake, "nothing", "1")
    with pytest.raises(reg.RegistryError, match="MANIFEST_BLOB_UNKNOWN"):
        reg.put_manifest(fake, "r", "1", MT_MANIFEST, json.dumps(
            {"layers": [], "config": {"digest": "sha256:" + "1" * 64}}).encode())


def test_unreachable_registry_is_unavailable(tmp_path: Path) -> None:
    from shim.errors import Unavailable

    closed = reg.Registry(tmp_path, reg.free_port(), pid=0)
    with pytest.raises(Unavailable):
        reg.get_manifest(closed, "r", "1")
