"""A real kubelet with encryption on: its checkpoint is sealed, the proxy publishes it (`[export]`) as a
sealed checkpoint image, and a pod whose image is that reference is pulled by the kubelet (CRI
PullImage through the proxy, containerd unpacking only the empty layer beside the sealed blob) and
restored, counting on. On containerd 1.7 and 1.6 (1.6 is where the empty layer matters)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from shim.errors import NotFound
from shim.export import kubelet_reference
from shim.image_reference import Reference
from shim.oci import OCI_LAYER_TAR, SEALED_CHECKPOINT
from shim.registry import RegistryClient
from shim.sealed import is_encrypted, read_header
from tests.node.conftest import Node
from tests.node.kube import KubeNode, count, wait_for
from tests.node.proxy_config import proxy_with
from tests.node.test_kubelet import _checkpoint, _counter_pod, knode, pods  # noqa: F401 - fixtures, used by name

pytestmark = pytest.mark.node

KEY_ID = "kubelet-node-key"


@pytest.fixture
def sealing(knode: KubeNode) -> Iterator[str]:  # noqa: F811
    """The [encryption] table of the node's proxy: on, with a fresh key."""
    directory = knode.dir / "sealing-keys"
    directory.mkdir(mode=0o700)
    key = directory / "key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    try:
        yield f'enabled = true\nkey_id = "{KEY_ID}"\nkey_file = "{key}"\n'
    finally:
        key.unlink()
        directory.rmdir()


def _published(ref: Reference) -> dict[str, object] | None:
    try:
        with RegistryClient(ref.registry) as client:
            body, _, _ = client.manifest(ref)
    except NotFound:
        return None
    manifest: dict[str, object] = json.loads(body)
    return manifest


def test_kubelet_pulls_and_restores_a_sealed_checkpoint_image(knode: KubeNode, pods: list[str],  # noqa: F811
                                                              sealing: str) -> None:
    with proxy_with(Node(knode.dir, "", knode.cri), "encryption", sealing):
        _counter_pod(knode, pods, "sealed-src")
        archive, counted = _checkpoint(knode, "sealed-src", 10)
        assert is_encrypted(archive) and read_header(archive).key_id == KEY_ID
        ref = kubelet_reference(archive.name, knode.registry)
        wait_for(lambda: _published(ref) is not None, what=f"{ref} published")
        manifest = _published(ref)
        assert manifest is not None
        assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_LAYER_TAR, SEALED_CHECKPOINT]  # type: ignore[attr-defined]

        _counter_pod(knode, pods, "sealed-copy", image=str(ref), pull="Always")
        events = knode.events("sealed-copy")
        assert any(line.startswith("Pulled:") for line in events.splitlines()), events
        first = count(knode, "sealed-copy")
        assert first >= counted, "the count restarted instead of resuming"
        wait_for(lambda: count(knode, "sealed-copy") > first, what="the restored count to go on")
