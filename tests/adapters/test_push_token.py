"""`criu-shim push`/`pull` against a registry with token auth (distribution's `auth: token`, as Docker Hub,
GHCR and Harbor do it): a token service on loopback that checks the docker config's user and password
and grants exactly the scope asked for, signed ES256 with a certificate the registry trusts. A token for
`pull` (the first blob HEAD) must be upgraded for `push`, which oras-py alone does not do."""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from shim import export
from shim.errors import PermissionDenied
from shim.restore.build_image import checkpoint_image
from tests.adapters.test_push import REGISTRY_BIN, _archive, _docker_config
from tests.support import registries

pytestmark = pytest.mark.skipif(not os.access(REGISTRY_BIN, os.X_OK), reason=f"{REGISTRY_BIN} missing")

ISSUER, SERVICE = "criu-shim-test-issuer", "criu-shim-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService(BaseHTTPRequestHandler):
    key: ClassVar[ec.EllipticCurvePrivateKey]
    cert_der: ClassVar[bytes]
    users: ClassVar[dict[str, str]] = {"ckpt": "s3cret"}
    granted: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        user, _, password = base64.b64decode(self.headers.get("Authorization", "Basic ")[6:]).decode().partition(":")
        if self.users.get(user) != password:
            self.send_response(401)
            self.end_headers()
            return
        query = parse_qs(urlsplit(self.path).query)
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
            self.granted.append(scope)
        body = json.dumps({"token": self._token(user, access)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _token(self, user: str, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("token-registry")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    (directory / "root.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    TokenService.key, TokenService.cert_der = key, cert.public_bytes(serialization.Encoding.DER)
    TokenService.granted = []
    tokens = ThreadingHTTPServer(("127.0.0.1", 0), TokenService)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    auth = (f"  token:\n    realm: \"http://127.0.0.1:{tokens.server_port}/token\"\n"
            f"    service: {SERVICE}\n    issuer: {ISSUER}\n"
            f"    rootcertbundle: {registries.yaml_string(str(directory / 'root.pem'))}")
    try:
        with registries.with_auth(directory, auth, "Bearer") as host:
            yield host
    finally:
        tokens.shutdown()
        tokens.server_close()


def test_push_and_pull_with_token_auth(token_registry: str, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "ckpt.tar", pages=10)
    config = _docker_config(tmp_path / "docker", token_registry, "ckpt", "s3cret") / "config.json"
    pushed = export.push_checkpoint(archive, f"{token_registry}/secure/ckpt:1", config)
    assert pushed.digest == checkpoint_image(archive).digest
    # The first token (for the blob HEAD) was for pull only; the push needed a second one.
    # (distribution names the actions in either order: it builds the scope from a map)
    scopes = [(scope.rsplit(":", 1)[0], set(scope.rsplit(":", 1)[1].split(","))) for scope in TokenService.granted]
    assert ("repository:secure/ckpt", {"pull"}) in scopes
    assert ("repository:secure/ckpt", {"pull", "push"}) in scopes, TokenService.granted
    out = tmp_path / "back.tar"
    assert export.pull_checkpoint(f"{token_registry}/secure/ckpt:1", out, config) == pushed.digest
    assert out.read_bytes() == archive.read_bytes()


def test_wrong_password_for_the_token_service_is_refused(token_registry: str, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "ckpt.tar", pages=1)
    config = _docker_config(tmp_path / "docker", token_registry, "ckpt", "wrong") / "config.json"
    with pytest.raises(PermissionDenied) as refused:
        export.push_checkpoint(archive, f"{token_registry}/secure/ckpt:2", config)
    assert f"refused the credentials of {config}" in refused.value.message
