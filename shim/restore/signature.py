"""A restore's signature check (shim.signing), done before anything is created.

An archive is judged by ARCHIVE.sig beside it, over its bytes. A checkpoint image by the
signature on its manifest (`oci.ARCHIVE_SIGNATURE`), over its layer's digest: the layer *is* the
archive (`criu-shim checkpoint-image` never repacks it), and containerd checked the layer's bytes
against that digest when it pulled them, so no second read is needed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shim import oci, signing
from shim.config import SigningSettings
from shim.restore.image import CheckpointImage

log = logging.getLogger(__name__)
UNCHECKED = signing.Verdict(checked=False)


def verify_signature(settings: SigningSettings, source: Path | CheckpointImage, name: str) -> signing.Verdict:
    """The verdict on `source`; raises SignatureRefused (PERMISSION_DENIED) or FailedPrecondition (keys)."""
    if not settings.trusted_keys and not settings.require_signature:
        return signing.Verdict(checked=False)
    trusted = signing.load_trusted_keys(settings.trusted_keys)
    subject = f"restore from checkpoint {name}"
    if isinstance(source, Path):
        verdict = signing.check_archive(source, trusted, settings.require_signature, subject)
    else:
        verdict = _check_image(source, trusted, settings.require_signature, subject)
    log.info("%s: signature %s", subject, verdict.describe())
    return verdict


def check_unchanged(verdict: signing.Verdict, archive: Path, name: str) -> None:
    """After the unpack: the archive file is still the one whose bytes were verified (same device,
    inode, size and modification time), so what was unpacked is what was signed."""
    if verdict.identity is None:
        return
    if signing.identity(os.stat(archive)) != verdict.identity:
        raise signing.SignatureRefused(f"restore from checkpoint {name} refused: {archive} was replaced or "
                                       "changed after its signature was verified")


def _check_image(image: CheckpointImage, trusted: tuple[signing.TrustedKey, ...], required: bool,
                 subject: str) -> signing.Verdict:
    where = f"annotation {oci.ARCHIVE_SIGNATURE} of image {image.name}"
    text = image.annotations.get(oci.ARCHIVE_SIGNATURE)
    try:
        der = None if text is None else signing.decode_signature(text.encode(), where)
    except signing.BadSignature as exc:
        raise signing.SignatureRefused(f"{subject} refused: its signature is unreadable: {exc.message}") from None
    algorithm, _, hexdigest = image.layer.digest.partition(":")
    if der is not None and (algorithm != "sha256" or len(hexdigest) != 64):
        raise signing.SignatureRefused(f"{subject} refused: its layer digest {image.layer.digest} is not a "
                                       "sha256 digest, which the signature covers")
    digest = bytes.fromhex(hexdigest) if der is not None else b""
    return signing.judge(digest, der, where, trusted, required, subject)
