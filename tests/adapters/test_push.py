"""`criu-shim push`/`pull` and shim.registry (oras-py) against a real docker-registry (distribution 2.8) on
loopback: the checkpoint image's exact manifest bytes and digest, the archive back byte for byte,
credentials from DOCKER_CONFIG for a registry with htpasswd (Basic) auth, and clear errors for bad
references, wrong credentials, a registry that is down and images that are not checkpoint images."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import export
from shim.arch import go_arch
from shim.checkpoint.archive import Member, write_archive
from shim.errors import InvalidArgument, NotFound, Unavailable
from shim.image_reference import Reference, is_loopback
from shim.node import registry as dev_registry
from shim.oci import CRIO_PREFIX, CRIU_PREFIX, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST
from shim.registry import RegistryClient
from shim.restore.build_image import checkpoint_image
from tests.support import registries

with warnings.catch_warnings():  # crypt (deprecated, in 3.11 still): bcrypt for distribution's htpasswd
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

REGISTRY_BIN = registries.REGISTRY_BIN
pytestmark = pytest.mark.skipif(not os.access(REGISTRY_BIN, os.X_OK), reason=f"{REGISTRY_BIN} missing")


def _archive(path: Path, pages: int = 3000) -> Path:
    write_archive(path, [Member("spec.dump", data=json.dumps({"annotations": {
                             "io.kubernetes.cri.sandbox-name": "counter",
                             "io.kubernetes.cri.sandbox-namespace": "default"}}).encode()),
                         Member("config.dump", data=json.dumps({"name": "counter",
                                                                "rootfsImageName": "x/y:1"}).encode()),
                         Member("checkpoint", is_dir=True), Member("checkpoint/inventory.img", data=b"i"),
                         Member("checkpoint/pages-1.img", data=os.urandom(4096) * pages)])
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with registries.plain(tmp_path_factory.mktemp("registry")) as host:
        yield host


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry with htpasswd auth (user `ckpt`, password `s3cret`): distribution answers Basic challenges."""
    directory = tmp_path_factory.mktemp("auth-registry")
    (directory / "htpasswd").write_text(f"ckpt:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    auth = f"  htpasswd:\n    realm: test\n    path: {registries.yaml_string(str(directory / 'htpasswd'))}"
    with registries.with_auth(directory, auth, "Basic") as host:
        yield host


def _docker_config(directory: Path, host: str, user: str, password: str) -> Path:
    directory.mkdir(exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return directory


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_push_serves_the_built_manifest_and_pull_returns_the_archive(registry: str, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "ckpt.tar", pages=20000)  # 80 MiB: a chunked upload (64 MiB chunks)
    built = checkpoint_image(archive)
    done = _cli("push", str(archive), f"{registry}/ckpt/counter:1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{registry}/ckpt/counter:1@{built.digest}"

    ref = Reference.parse(f"{registry}/ckpt/counter:1")
    with RegistryClient(registry) as client:
        body, media_type, digest = client.manifest(ref)
        by_digest = client.manifest(ref.with_digest(built.digest))
    assert body == built.manifest and digest == built.digest and media_type == OCI_MANIFEST
    assert by_digest[0] == built.manifest
    manifest = json.loads(body)
    assert manifest["annotations"][CRIO_PREFIX + "name"] == "counter"
    assert manifest["annotations"][CRIU_PREFIX + "pod.name"] == "counter"
    assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_LAYER_TAR]

    out = tmp_path / "back.tar"
    pulled = _cli("pull", f"{registry}/ckpt/counter:1", str(out))
    assert pulled.returncode == 0, pulled.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(archive.read_bytes()).digest()
    assert out.stat().st_mode & 0o777 == 0o600

    again = export.push_checkpoint(archive, f"{registry}/ckpt/counter:2")  # blobs there already: only a tag
    assert again.digest == built.digest


def test_credentials_come_from_docker_config(auth_registry: str, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "ckpt.tar", pages=10)
    ref = f"{auth_registry}/secure/ckpt:1"
    good = _docker_config(tmp_path / "good", auth_registry, "ckpt", "s3cret")
    done = _cli("push", str(archive), ref, env={"DOCKER_CONFIG": str(good)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(checkpoint_image(archive).digest)

    bad = _docker_config(tmp_path / "bad", auth_registry, "ckpt", "wrong")
    refused = _cli("push", str(archive), f"{auth_registry}/secure/ckpt:2", env={"DOCKER_CONFIG": str(bad)})
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr and "Traceback" not in refused.stderr
    for secret in ("wrong", base64.b64encode(b"ckpt:wrong").decode()):  # credentials are never shown
        assert secret not in refused.stderr + refused.stdout
    none = _cli("push", str(archive), ref, env={"DOCKER_CONFIG": str(tmp_path / "empty")})
    assert none.returncode == 1 and "asks for a user name and password" in none.stderr
    assert str(tmp_path / "empty" / "config.json") in none.stderr
    with RegistryClient(auth_registry, good / "config.json") as client, pytest.raises(NotFound):
        client.manifest(Reference.parse(f"{auth_registry}/secure/ckpt:2"))  # the refused push left no tag


def test_pull_picks_this_platform_from_an_index(registry: str, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "ckpt.tar", pages=2)
    pushed = export.push_checkpoint(archive, f"{registry}/multi/ckpt:manifest")
    size = len(checkpoint_image(archive).manifest)
    foreign = _archive(tmp_path / "other.tar", pages=1)
    other = {"mediaType": OCI_MANIFEST, "digest": export.push_checkpoint(foreign, f"{registry}/multi/ckpt:o").digest,
             "size": len(checkpoint_image(foreign).manifest), "platform": {"os": "linux", "architecture": "s390x"}}
    mine = {"mediaType": OCI_MANIFEST, "digest": pushed.digest, "size": size,
            "platform": {"os": "linux", "architecture": go_arch()}}
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [other, mine]}).encode()
    ref = Reference.parse(f"{registry}/multi/ckpt:1")
    with RegistryClient(registry) as client:
        client.push_manifest(ref, index, OCI_INDEX)
    assert export.pull_checkpoint(ref, tmp_path / "back.tar") == pushed.digest
    assert (tmp_path / "back.tar").read_bytes() == archive.read_bytes()
    with pytest.raises(InvalidArgument, match="no image manifest for linux/"):
        export.platform_manifest(json.dumps({"manifests": [other]}).encode(), "x")


def test_not_a_checkpoint_image_and_missing_tag_are_refused(registry: str, tmp_path: Path) -> None:
    with RegistryClient(registry) as client:
        ref = Reference.parse(f"{registry}/plain/image:1")
        config = client.push_blob_bytes(ref, b"{}")
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": []}).encode()
        client.push_manifest(ref, body, OCI_MANIFEST)
    with pytest.raises(InvalidArgument, match="is not a checkpoint image"):
        export.pull_checkpoint(ref, tmp_path / "out.tar")
    with pytest.raises(NotFound, match="HTTP 404"):
        export.pull_checkpoint(f"{registry}/plain/image:nope", tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def test_bad_input_is_refused_before_any_request(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "ckpt.tar", pages=1)
    for ref, text in (("counter:1", "must name its registry"), ("127.0.0.1:1/UPPER:1", "invalid repository"),
                      ("127.0.0.1:1/a:bad tag", "invalid tag"), ("127.0.0.1:1/a@sha256:12", "invalid digest")):
        done = _cli("push", str(archive), ref)
        assert done.returncode == 1 and text in done.stderr and "Traceback" not in done.stderr, (ref, done.stderr)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 10)
    done = _cli("push", str(garbage), "127.0.0.1:1/a:1")
    assert done.returncode == 1 and "is not a readable checkpoint archive" in done.stderr


def _repositories(registry: str) -> list[str]:
    import requests

    listed: list[str] = requests.get(f"http://{registry}/v2/_catalog", timeout=10).json()["repositories"]
    return listed


def test_garbage_leaves_nothing_in_the_registry_or_on_disk(registry: str, tmp_path: Path) -> None:
    """Each refusal names its cause, sends nothing (no blob, no tag: the catalog lists no new repository)
    and writes nothing (no OUT, no temporary file)."""
    archive = _archive(tmp_path / "ckpt.tar", pages=1)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 10)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[:1500])
    before = _repositories(registry)
    for args, text in ((["push", str(garbage), f"{registry}/junk/garbage:1"], "is not a readable checkpoint archive"),
                       (["push", str(truncated), f"{registry}/junk/truncated:1"], "truncated.tar"),
                       (["push", str(tmp_path / "none.tar"), f"{registry}/junk/none:1"], "none.tar: no such checkpoint archive"),
                       (["push", str(tmp_path), f"{registry}/junk/dir:1"], "is not a checkpoint archive: not a regular file"),
                       (["push", str(archive), f"{registry}/junk/d@sha256:" + "a" * 64], "push to a tag, not a digest"),
                       (["push", str(archive), f"{registry}/junk/x:bad:tag"], "invalid repository name"),
                       (["pull", f"{registry}/junk/x:1", str(tmp_path / "no-dir" / "out.tar")], "does not exist"),
                       (["pull", f"{registry}/junk/x:1", str(tmp_path / "out.tar")], "HTTP 404")):
        done = _cli(*args, env={"TMPDIR": str(tmp_path)})
        assert done.returncode == 1 and text in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr
    assert _repositories(registry) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.tar", "garbage.tar", "truncated.tar"]
    # An existing OUT is never touched, and refused before the registry is asked.
    kept = tmp_path / "kept.tar"
    kept.write_bytes(b"mine")
    done = _cli("pull", f"127.0.0.1:{dev_registry.free_port()}/a:1", str(kept))
    assert done.returncode == 1 and f"{kept} exists" in done.stderr and kept.read_bytes() == b"mine"


def test_a_registry_that_is_down_fails_at_once(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "ckpt.tar", pages=1)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="is not reachable"):
        export.push_checkpoint(archive, f"127.0.0.1:{dev_registry.free_port()}/a:1")
    assert time.monotonic() - started < 5  # oras' own retry loop would sleep for minutes


def test_references_and_kubelet_names() -> None:
    ref = Reference.parse("registry.example:5000/a/b:1@sha256:" + "0" * 64)
    assert (ref.registry, ref.repository, ref.tag) == ("registry.example:5000", "a/b", "1")
    assert ref.reference == "sha256:" + "0" * 64 and str(ref) == "registry.example:5000/a/b:1@sha256:" + "0" * 64
    assert Reference.parse("localhost/x").tag == "latest"
    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost") and is_loopback("[::1]:5000")
    assert not is_loopback("registry.example:5000") and not is_loopback("10.0.0.1:5000")
    name = "checkpoint-counter_default-counter-2026-12-05T00:41:02Z.tar"
    assert str(export.kubelet_reference(name, "127.0.0.1:5000")) == \
        "127.0.0.1:5000/criu-shim/checkpoints/counter_default-counter:2026-12-05T00-41-02Z"
    assert export.kubelet_reference("checkpoint-a.b_ns-c-1-2026-01-01T01:02:03+01:00.tar", "r.example").tag == \
        "2026-01-01T01-02-03_01-00"
    with pytest.raises(InvalidArgument, match="not a kubelet checkpoint archive name"):
        export.kubelet_reference("checkpoint-../x.tar", "r.example")


def test_help_shows_examples() -> None:
    for command in ("push", "pull"):
        done = _cli(command, "--help")
        assert done.returncode == 0 and "examples:" in done.stdout and f"criu-shim {command} " in done.stdout
