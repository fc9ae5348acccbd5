"""A sealed (encrypted) checkpoint image through a registry and CRI PullImage on real containerd
(1.6, 1.7, 2.x): pushed by `criu-shim push`, pulled by containerd itself (its own CRI socket) and
through the proxy, restored into a new pod from the image ID a pull answers (what the kubelet
sends), the counter carrying on. The sealed blob has criu-shim's media type, which containerd
fetches and never unpacks; the same blob under a tar layer type (the shape before) fails the pull
at unpacking, on every version. Garbage: the image restored without its key (FAILED_PRECONDITION)
and with its blob tampered with (INVALID_ARGUMENT), each before anything is created."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc
from shim.arch import go_arch
from shim.image_reference import Reference
from shim.node import registry as dev_registry
from shim.node.layout import NodeLayout
from shim.node.tools import tools_for
from shim.oci import OCI_LAYER_TAR, OCI_MANIFEST, SEALED_CHECKPOINT
from shim.paths_env import load_paths
from shim.registry import RegistryClient
from shim.restore.build_image import EMPTY_LAYER
from tests.node.conftest import Node, on
from tests.node.pods import Cri, wait_for
from tests.node.proxy_config import proxy_with
from tests.node.test_encryption import KEY_ID, _enabled, _leftovers, _sealed_checkpoint, keys  # noqa: F401
from tests.node.test_restore import _restore, assert_restore_refused

pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dev_registry.Registry]:
    directory = tmp_path_factory.mktemp("sealed-image-registry") / "registry"
    started = dev_registry.start_registry(directory)
    try:
        yield started
    finally:
        dev_registry.stop_registry(directory)


def _allowing(host: str) -> Callable[[str], str]:
    """The node's config with `host` added to restore.allowed_registries."""
    def edit(text: str) -> str:
        edited = text.replace('allowed_registries = ["localhost"', f'allowed_registries = ["localhost", "{host}"', 1)
        assert edited != text, "the node's config has no allowed_registries line to extend"
        return edited
    return edit


class Images:
    """CRI PullImage/RemoveImage on one endpoint; every image pulled is removed at the end."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = api_pb2_grpc.ImageServiceStub(self.channel)
        self.pulled: list[str] = []

    def pull(self, ref: str) -> str:
        self.pulled.append(ref)
        reply = self.stub.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)), timeout=120)
        self.pulled.append(str(reply.image_ref))
        return str(reply.image_ref)

    def close(self, containerd: str) -> None:
        for ref in reversed(self.pulled):
            try:
                self.stub.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)), timeout=60)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        self.channel.close()
        # 1.6 records an image before its second unpack, and a failed pull leaves that record, which CRI
        # does not know: containerd's own image service removes it (a missing name is no error here)
        names = [ref for ref in self.pulled if not ref.startswith("sha256:")]
        if names:
            subprocess.run([str(Path(load_paths()["CONTAINERD_1_7"]) / "ctr"), "--address",
                            containerd.removeprefix("unix://"), "-n", "k8s.io", "images", "rm", *names],
                           capture_output=True, timeout=60)


@pytest.fixture
def images(node: Node) -> Iterator[tuple[Images, Images]]:
    """(containerd's own CRI, the proxy)."""
    direct, proxied = Images(node.containerd), Images(node.cri)
    try:
        yield direct, proxied
    finally:
        proxied.close(node.containerd)
        direct.close(node.containerd)


def _push(archive: Path, ref: str, node: Node) -> str:
    config = NodeLayout(node.dir.resolve()).proxy_config_file  # the node's [encryption] keys read the names
    pushed = subprocess.run([sys.executable, "-m", "shim", "push", str(archive), ref, "--config", str(config)],
                            capture_output=True, text=True, timeout=300)
    assert pushed.returncode == 0, pushed.stderr
    return pushed.stdout.strip()


def _manifest(ref: str) -> dict[str, Any]:
    parsed = Reference.parse(ref)
    with RegistryClient(parsed.registry) as registry_client:
        body, _, _ = registry_client.manifest(parsed)
    manifest: dict[str, Any] = json.loads(body)
    return manifest


def _push_blob(ref: Reference, blob: Path) -> dict[str, object]:
    data = blob.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with RegistryClient(ref.registry) as registry_client:
        registry_client.push_blob(ref, blob, digest, len(data))
    return {"digest": digest, "size": len(data)}


def _push_manifest(ref: Reference, manifest: dict[str, object]) -> None:
    with RegistryClient(ref.registry) as registry_client:
        registry_client.push_manifest(ref, json.dumps(manifest, sort_keys=True).encode(), OCI_MANIFEST)


def _push_tampered(ref: str, manifest: dict[str, Any], blob: Path) -> None:
    """`manifest` (of an image pushed to the same repository) with `blob` as its sealed blob."""
    parsed = Reference.parse(ref)
    layers = [layer for layer in manifest["layers"] if layer["mediaType"] != SEALED_CHECKPOINT]
    sealed = {"mediaType": SEALED_CHECKPOINT, **_push_blob(parsed, blob)}
    _push_manifest(parsed, {**manifest, "layers": [*layers, sealed]})


def _push_sealed_only(ref: str, manifest: dict[str, Any], blob: Path) -> None:
    """The sealed blob alone, with no layer (config diff_ids empty)."""
    parsed = Reference.parse(ref)
    sealed = {"mediaType": SEALED_CHECKPOINT, **_push_blob(parsed, blob)}
    _push_manifest(parsed, {**manifest, "layers": [sealed], "config": _push_config(parsed, manifest, [])})


def _push_config(ref: Reference, manifest: dict[str, Any], diff_ids: list[object]) -> dict[str, Any]:
    config = json.dumps({"architecture": go_arch(), "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}, sort_keys=True).encode()
    with RegistryClient(ref.registry) as registry_client:
        digest = registry_client.push_blob_bytes(ref, config)
    return {**manifest["config"], "digest": digest, "size": len(config)}


def _push_old_shape(ref: str, manifest: dict[str, Any], blob: Path) -> None:
    """The shape of before: the sealed file as the image's one tar layer (diff_ids naming it)."""
    parsed = Reference.parse(ref)
    layer = {"mediaType": OCI_LAYER_TAR, **_push_blob(parsed, blob)}
    _push_manifest(parsed, {**manifest, "layers": [layer], "config": _push_config(parsed, manifest, [layer["digest"]])})


def _ctr_import(node: Node, version: str, archive: Path, ref: str) -> subprocess.CompletedProcess[str]:
    """`criu-shim checkpoint-image` of `archive` imported by the node's own ctr (it unpacks); removed after."""
    config = NodeLayout(node.dir.resolve()).proxy_config_file
    layout = node.dir / "sealed-image.oci.tar"
    subprocess.run([sys.executable, "-m", "shim", "checkpoint-image", str(archive), "--name", ref, "--out",
                    str(layout), "--config", str(config)], check=True, capture_output=True, timeout=300)
    ctr = [str(tools_for(version).ctr), "--address", node.containerd.removeprefix("unix://"), "-n", "k8s.io", "images"]
    try:
        return subprocess.run([*ctr, "import", str(layout)], capture_output=True, text=True, timeout=300)
    finally:
        layout.unlink()
        subprocess.run([*ctr, "rm", ref], capture_output=True, timeout=60)  # import records it before unpacking


@on("1.6", "1.7", "2.1", "2.4")
def test_sealed_checkpoint_image_pulled_through_cri_restores(client: Cri, node: Node, keys: Path,  # noqa: F811
                                                             registry: dev_registry.Registry,
                                                             images: tuple[Images, Images],
                                                             request: pytest.FixtureRequest) -> None:
    direct, proxied = images
    version = str(request.node.callspec.params["node"])
    repo = f"{registry.host}/ckpt/sealed-{node.dir.name}"
    with proxy_with(node, "encryption", _enabled(keys), edit=_allowing(registry.host)):
        archive, counted = _sealed_checkpoint(client, node, f"sealed-image-{node.dir.name}")
        pinned = _push(archive, f"{repo}:1", node)
        assert pinned.startswith(f"{repo}:1@sha256:")
        manifest = _manifest(f"{repo}:1")
        layers = manifest["layers"]
        assert [layer["mediaType"] for layer in layers] == [OCI_LAYER_TAR, SEALED_CHECKPOINT]
        assert layers[0]["size"] == len(EMPTY_LAYER)
        assert layers[1]["digest"] == "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()

        # containerd itself (no proxy in the path) pulls and unpacks it; then through the proxy, by another tag
        direct.pull(f"{repo}:1")
        _push(archive, f"{repo}:2", node)  # blobs there already: a second tag
        image_id = proxied.pull(f"{repo}:2")
        assert image_id.startswith("sha256:")

        # the shape before: the same sealed blob as a tar layer; containerd's unpacker fails the pull
        _push_old_shape(f"{repo}:old", manifest, archive)
        with pytest.raises(grpc.RpcError) as old:
            direct.pull(f"{repo}:old")
        assert "failed to extract layer" in (old.value.details() or "")
        assert "archive/tar: invalid tar header" in (old.value.details() or "")
        # why the empty layer: without it, 1.6's pull unpacks once more and counts every manifest layer
        _push_sealed_only(f"{repo}:bare", manifest, archive)
        imported = _ctr_import(node, version, archive, f"{repo}:imported")  # `ctr images import`, unpacking
        if version == "1.6":
            with pytest.raises(grpc.RpcError) as bare:
                direct.pull(f"{repo}:bare")
            assert "mismatched image rootfs and manifest layers" in (bare.value.details() or "")
            # and 1.6's import unpacks with that rule: our image needs --no-unpack there
            assert imported.returncode != 0 and "mismatched image rootfs and manifest layers" in imported.stderr
        else:
            direct.pull(f"{repo}:bare")
            assert imported.returncode == 0, imported.stderr

        archive.unlink()  # the image alone must be enough
        with client.pod() as pod:  # by image ID, as the kubelet creates containers
            ctr = _restore(client, pod, Path(image_id))
            first = client.count(ctr)
            assert first >= counted >= 20, "the count restarted instead of resuming"
            wait_for(lambda: client.count(ctr) > first)
        assert not _leftovers(node)

    # without its key, or with another key under its id: refused from the blob's header, before the blob
    # is copied out of containerd's store (the message names the image, not a copy) or anything is created
    no_key = 'key_id = "node-key-2"\n' + f'key_file = "{keys / "other"}"\n'
    with proxy_with(node, "encryption", no_key, edit=_allowing(registry.host)):
        assert_restore_refused(client, node, Path(f"{repo}:2"), grpc.StatusCode.FAILED_PRECONDITION,
                               f"no key for key id '{KEY_ID}' is configured")
    with proxy_with(node, "encryption", _enabled(keys, "other"), edit=_allowing(registry.host)):
        assert_restore_refused(client, node, Path(f"{repo}:2"), grpc.StatusCode.FAILED_PRECONDITION,
                               f"checkpoint image {repo}:2: wrong key", f"'{KEY_ID}'")
    assert not _leftovers(node)


@on("1.7")
def test_tampered_sealed_image_is_refused(client: Cri, node: Node, keys: Path,  # noqa: F811
                                          registry: dev_registry.Registry, images: tuple[Images, Images],
                                          tmp_path: Path) -> None:
    _, proxied = images
    repo = f"{registry.host}/ckpt/tampered"
    with proxy_with(node, "encryption", _enabled(keys), edit=_allowing(registry.host)):
        archive, _ = _sealed_checkpoint(client, node, "sealed-image-tampered")
        _push(archive, f"{repo}:good", node)
        data = bytearray(archive.read_bytes())
        data[len(data) // 2] ^= 0x04  # one bit of the memory image; the manifest names the new digest
        tampered = tmp_path / "tampered"
        tampered.write_bytes(data)
        _push_tampered(f"{repo}:bad", _manifest(f"{repo}:good"), tampered)
        proxied.pull(f"{repo}:bad")  # containerd checks digests, never what is inside
        assert_restore_refused(client, node, Path(f"{repo}:bad"), grpc.StatusCode.INVALID_ARGUMENT,
                               "fails authentication", "modified or is corrupt")
        archive.unlink()
    assert not _leftovers(node)
