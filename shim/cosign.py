"""Cosign signatures of checkpoint images in a registry, so `cosign verify --key` checks them.

A cosign signature of image REPO@DIGEST is an image of its own, tagged `sha256-<hex>.sig` in the
same repository: one layer of media type `application/vnd.dev.cosign.simplesigning.v1+json` whose
content is the "simple signing" payload (the repository and the manifest digest, as JSON), and
whose annotation `dev.cosignproject.cosign/signature` is the base64 ECDSA signature of that
payload (shim.signing's primitive: P-256, SHA-256). This is the layout cosign 2.x writes with
`cosign sign --key` and reads with `cosign verify --key KEY.pub --insecure-ignore-tlog REPO@DIGEST`
(no transparency log: keys are the node's, not Fulcio's). Spelled here only.
"""

from __future__ import annotations

import hashlib
import json

from shim import oci, signing
from shim.image_reference import Reference
from shim.registry import RegistryClient
from shim.signing import SigningKey

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"


def signature_tag(manifest_digest: str) -> str:
    """The tag cosign looks for: `sha256:abc...` becomes `sha256-abc....sig`."""
    algorithm, _, hexdigest = manifest_digest.partition(":")
    return f"{algorithm}-{hexdigest}.sig"


def payload(repository: str, manifest_digest: str) -> bytes:
    """The simple signing payload naming the image (cosign's field names and order)."""
    return json.dumps({"critical": {"identity": {"docker-reference": repository},
                                    "image": {"docker-manifest-digest": manifest_digest},
                                    "type": PAYLOAD_TYPE},
                       "optional": None}, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def signature_image(body: bytes, signature: str) -> tuple[bytes, bytes]:
    """(config, manifest) of the signature image holding `body` signed by `signature` (base64)."""
    config = json.dumps({"architecture": "", "config": {}, "created": "0001-01-01T00:00:00Z",
                         "history": [{"created": "0001-01-01T00:00:00Z"}], "os": "",
                         "rootfs": {"type": "layers", "diff_ids": [_digest(body)]}},
                        separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "size": len(config), "digest": _digest(config)},
        "layers": [{"mediaType": SIMPLE_SIGNING, "size": len(body), "digest": _digest(body),
                    "annotations": {SIGNATURE_ANNOTATION: signature}}],
    }, separators=(",", ":")).encode()
    return config, manifest


def sign(repository: str, manifest_digest: str, key: SigningKey) -> tuple[bytes, str]:
    """The payload for REPOSITORY@DIGEST and its base64 signature."""
    body = payload(repository, manifest_digest)
    return body, signing.sign_digest(key, hashlib.sha256(body).digest()).decode("ascii")


def push_signature(ref: Reference, manifest_digest: str, key: SigningKey,
                   client: RegistryClient) -> Reference:
    """Sign REPOSITORY@DIGEST and push the signature image under its `sha256-<hex>.sig` tag."""
    repository = f"{ref.registry}/{ref.repository}"
    body, signature = sign(repository, manifest_digest, key)
    config, manifest = signature_image(body, signature)
    tag = Reference(ref.registry, ref.repository, signature_tag(manifest_digest), None)
    client.push_blob_bytes(tag, config)
    client.push_blob_bytes(tag, body)
    client.push_manifest(tag, manifest, oci.OCI_MANIFEST)
    return tag
