"""Cosign signatures of pushed checkpoint images, checked by the real cosign against a real registry."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shim import cosign, export
from shim.errors import FailedPrecondition
from shim.image_reference import Reference
from shim.node import registry as dev_registry
from shim.registry import RegistryClient
from tests.support.archives import write_checkpoint

PATHS = dev_registry.load_paths()
REGISTRY_BIN = Path(PATHS.get("REGISTRY_BIN", "/usr/bin/docker-registry"))
COSIGN = Path(PATHS.get("COSIGN_BIN_DIR", "/nonexistent")) / "cosign"
pytestmark = [pytest.mark.skipif(not os.access(REGISTRY_BIN, os.X_OK), reason=f"{REGISTRY_BIN} missing"),
              pytest.mark.skipif(not os.access(COSIGN, os.X_OK),
                                 reason=f"{COSIGN} missing (scripts/build-peers.py cosign)")]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("registry")
    started = dev_registry.start_registry(directory)
    try:
        yield started.host
    finally:
        dev_registry.stop_registry(directory)


def _key_pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _verify(public: Path, image: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=str(tmp_path), DOCKER_CONFIG=str(tmp_path / "docker"))  # no TUF cache of root's
    return subprocess.run([str(COSIGN), "verify", "--key", str(public), "--insecure-ignore-tlog", image],
                          capture_output=True, text=True, timeout=120, check=False, env=env)


def test_cosign_verifies_the_signature_push_made(registry: str, tmp_path: Path) -> None:
    archive = write_checkpoint(tmp_path / "ckpt.tar")
    private, public = _key_pair(tmp_path, "node")
    _, stranger = _key_pair(tmp_path, "stranger")

    pushed = export.push_checkpoint(archive, f"{registry}/ckpt/web:1", signing_key=private)
    image = str(pushed.pinned)

    verified = _verify(public, image, tmp_path)
    assert verified.returncode == 0, verified.stderr
    claims = json.loads(verified.stdout)
    assert claims[0]["critical"]["image"]["docker-manifest-digest"] == pushed.digest
    assert claims[0]["critical"]["identity"]["docker-reference"] == f"{registry}/ckpt/web"
    refused = _verify(stranger, image, tmp_path)
    assert refused.returncode != 0
    assert "no matching signatures" in refused.stderr

    with RegistryClient(registry) as client:  # the signature image sits where cosign looks for it
        body, _, _ = client.manifest(Reference(registry, "ckpt/web", cosign.signature_tag(pushed.digest)))
    layer = json.loads(body)["layers"][0]
    assert layer["mediaType"] == cosign.SIMPLE_SIGNING and cosign.SIGNATURE_ANNOTATION in layer["annotations"]


def test_an_unsigned_image_does_not_verify(registry: str, tmp_path: Path) -> None:
    archive = write_checkpoint(tmp_path / "ckpt.tar")
    _, public = _key_pair(tmp_path, "node")
    pushed = export.push_checkpoint(archive, f"{registry}/ckpt/unsigned:1")
    assert _verify(public, str(pushed.pinned), tmp_path).returncode != 0


def test_a_loose_key_refuses_the_push_before_anything_is_sent(registry: str, tmp_path: Path) -> None:
    archive = write_checkpoint(tmp_path / "ckpt.tar")
    private, _ = _key_pair(tmp_path, "node")
    private.chmod(0o644)
    with pytest.raises(FailedPrecondition, match="lets others read the private key"):
        export.push_checkpoint(archive, f"{registry}/ckpt/loose:1", signing_key=private)
    with RegistryClient(registry) as client, pytest.raises(Exception, match="404|MANIFEST_UNKNOWN|NAME_UNKNOWN"):
        client.manifest(Reference(registry, "ckpt/loose", "1"))
