"""`criu-shim checkpoint-image`: a checkpoint archive as an OCI image (like `checkpointctl build`).

The image has one layer holding the archive's entries at its root (the archive
tar *is* that layer, uncompressed, so nothing is repacked) and the annotations
of both families that engines look for: `org.criu.checkpoint.*` (containerd,
checkpointctl) and `io.kubernetes.cri-o.annotations.checkpoint.*` (CRI-O). The
output is an OCI layout tar that `ctr images import` or any registry client
takes; the original image is not embedded (restore pulls it by reference). A
zstd archive (`[checkpoint] compression`) is likewise its own layer, of type
`tar+zstd`, its diff_id the digest of the tar inside (one decompressing pass).

A sealed (encrypted) archive goes in as it is, still sealed: the registry and
anyone pulling it see only ciphertext, and a restore decrypts it with its node's
keys. Its blob has our media type (`oci.SEALED_CHECKPOINT`), which containerd
never unpacks, beside one empty tar layer (1024 zero bytes, config diff_ids
naming it): containerd 1.6's pull, when its unpacker found no layer, unpacks
the image again with a rule that counts every manifest layer against the
diff_ids ("mismatched image rootfs and manifest layers"); one real layer keeps
every version on the unpacker's path, which skips non-layer blobs. Building the
image reads the archive's names for the annotations, so it takes the keyring
(`--config`: the node's `[encryption]` keys).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from shim import oci, signing
from shim.arch import go_arch
from shim.archive_layout import CONFIG_DUMP, REQUIRED, SPEC_DUMP
from shim.checkpoint.compression import ZSTD_MAGIC
from shim.errors import InvalidArgument
from shim.sealed import Keyring, is_encrypted, open_decrypted, read_header

_MAX_JSON = 64 << 20  # spec.dump and config.dump are small; a bigger one is no checkpoint of ours
# An empty tar stream (two zero blocks), uncompressed: its digest is its diff_id (module docstring).
EMPTY_LAYER = bytes(1024)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return "sha256:" + sha.hexdigest(), size


def _read_member(archive: Path, name: str) -> dict[str, Any]:
    try:
        return _read_json_member(archive, name)
    except (tarfile.TarError, ValueError, EOFError) as exc:
        raise InvalidArgument(f"{archive} is not a readable checkpoint archive: {exc}") from None


def _is_zstd(archive: Path) -> bool:
    with open(archive, "rb") as f:
        return f.read(len(ZSTD_MAGIC)) == ZSTD_MAGIC


@contextlib.contextmanager
def _zstd_stream(archive: Path) -> Iterator[Any]:
    """The decompressed tar of a zstd archive (its window capped as the restore's reader caps it)."""
    with open(archive, "rb") as f, zstandard.ZstdDecompressor(max_window_size=128 << 20).stream_reader(
            f, read_across_frames=True) as stream:
        yield stream


def _zstd_json_members(archive: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        with _zstd_stream(archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            return _json_members(tar, archive)
    except (tarfile.TarError, ValueError, EOFError, zstandard.ZstdError) as exc:
        raise InvalidArgument(f"{archive} is not a readable checkpoint archive: {exc}") from None


def _decompressed_digest(archive: Path) -> str:
    """The diff_id of a zstd layer: the digest of the tar inside."""
    sha = hashlib.sha256()
    try:
        with _zstd_stream(archive) as stream:
            while chunk := stream.read(1 << 20):
                sha.update(chunk)
    except zstandard.ZstdError as exc:
        raise InvalidArgument(f"{archive} is not a readable checkpoint archive: {exc}") from None
    return "sha256:" + sha.hexdigest()


def _read_json_member(archive: Path, name: str) -> dict[str, Any]:
    with tarfile.open(archive, "r:") as tar:
        names = set(tar.getnames())
        missing = [r for r in REQUIRED if r not in names]
        if missing:
            raise InvalidArgument(f"{archive} has no {', '.join(missing)}: not a checkpoint archive")
        member = tar.extractfile(name)
        assert member is not None
        data: dict[str, Any] = json.loads(member.read())
        return data


def _read_sealed_members(archive: Path, keyring: Keyring | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """config.dump and spec.dump of a sealed archive, in one pass through the decrypting stream (the
    whole archive is authenticated on the way)."""
    try:
        return _sealed_json_members(archive, keyring)
    except (tarfile.TarError, ValueError, EOFError) as exc:
        raise InvalidArgument(f"{archive} is not a readable checkpoint archive: {exc}") from None


def _sealed_json_members(archive: Path, keyring: Keyring | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if keyring is None:
        raise InvalidArgument(f"{archive} is encrypted (key id {read_header(archive).key_id!r}): building its "
                              "image needs the key (--config with the node's [encryption] keys)")
    with open_decrypted(archive, keyring) as reader, \
            tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
        members = _json_members(tar, archive)
        reader.verify_to_end()
    return members


def _json_members(tar: tarfile.TarFile, archive: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """config.dump and spec.dump from a tar read as a stream."""
    found: dict[str, Any] = {}
    names: set[str] = set()
    for member in tar:
        names.add(member.name)
        if member.name in (CONFIG_DUMP, SPEC_DUMP) and member.isfile() and member.size <= _MAX_JSON:
            data = tar.extractfile(member)
            assert data is not None
            found[member.name] = json.loads(data.read())
    missing = [r for r in REQUIRED if r not in names]
    config, spec = found.get(CONFIG_DUMP), found.get(SPEC_DUMP)
    if missing or not isinstance(config, dict) or not isinstance(spec, dict):
        raise InvalidArgument(f"{archive} has no {', '.join(missing) or 'readable spec/config'}: "
                              "not a checkpoint archive")
    return config, spec


def _require_archive_file(archive: Path) -> None:
    """A missing path or a directory says so in words, not as an errno."""
    try:
        mode = archive.stat().st_mode
    except FileNotFoundError:
        raise InvalidArgument(f"{archive}: no such checkpoint archive") from None
    except OSError as exc:
        raise InvalidArgument(f"{archive}: cannot read the checkpoint archive: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InvalidArgument(f"{archive} is not a checkpoint archive: not a regular file")


def checkpoint_annotations(archive: Path, keyring: Keyring | None = None) -> dict[str, str]:
    _require_archive_file(archive)
    if is_encrypted(archive):
        config, spec = _read_sealed_members(archive, keyring)
    elif _is_zstd(archive):
        config, spec = _zstd_json_members(archive)
    else:
        config, spec = _read_member(archive, CONFIG_DUMP), _read_member(archive, SPEC_DUMP)
    spec_notes = spec.get("annotations", {})
    name = str(config.get("name") or spec_notes.get(oci.CRI_CONTAINER_NAME, "container"))
    image = str(config.get("rootfsImageName") or config.get("rootfsImage") or "")
    return {
        oci.CRIU_PREFIX + "container.name": name,
        oci.CRIU_PREFIX + "engine.name": "criu-shim",
        oci.CRIU_PREFIX + "rootfsImageName": image,
        oci.CRIU_PREFIX + "rootfsImageRef": str(config.get("rootfsImageRef", "")),
        oci.CRIU_PREFIX + "pod.name": str(spec_notes.get(oci.CRI_SANDBOX_NAME, "")),
        oci.CRIU_PREFIX + "pod.namespace": str(spec_notes.get(oci.CRI_SANDBOX_NAMESPACE, "")),
        oci.CRIO_PREFIX + "name": name,
        oci.CRIO_PREFIX + "rootfsImageName": image,
    }


@dataclass(frozen=True)
class CheckpointImage:
    """The documents of a checkpoint image whose one layer is the archive itself."""

    archive: Path
    config: bytes
    manifest: bytes
    layer_digest: str  # the archive's blob (a tar layer, or the sealed blob)
    layer_size: int
    annotations: dict[str, str]
    small_blobs: tuple[bytes, ...] = ()  # besides config and archive: a sealed image's empty layer

    @property
    def digest(self) -> str:
        """The manifest digest: what `ref@digest` and signatures name."""
        return _digest(self.manifest)


def checkpoint_image(archive: Path, keyring: Keyring | None = None) -> CheckpointImage:
    """Config and manifest (exact bytes) of the checkpoint image of `archive` (`keyring`: to read a sealed one)."""
    notes = checkpoint_annotations(archive, keyring)
    layer_digest, layer_size = _file_digest(archive)  # an uncompressed tar: already a valid layer
    signature = _archive_signature(archive)
    if signature is not None:  # ARCHIVE.sig signs the archive's SHA-256, which is the layer's digest
        notes[oci.ARCHIVE_SIGNATURE] = signature
    blob: dict[str, Any] = {"mediaType": oci.OCI_LAYER_TAR, "digest": layer_digest, "size": layer_size}
    layers: list[dict[str, Any]] = [blob]
    small: tuple[bytes, ...] = ()
    if is_encrypted(archive):  # ciphertext is no layer: our type, beside the empty layer (module docstring)
        layers = [{"mediaType": oci.OCI_LAYER_TAR, "digest": _digest(EMPTY_LAYER), "size": len(EMPTY_LAYER)},
                  {**blob, "mediaType": oci.SEALED_CHECKPOINT}]
        small = (EMPTY_LAYER,)
    diff_ids = [str(layer["digest"]) for layer in layers if layer["mediaType"] != oci.SEALED_CHECKPOINT]
    if not is_encrypted(archive) and _is_zstd(archive):  # a zstd archive is a zstd layer as it is
        blob["mediaType"] = oci.OCI_LAYER_ZSTD
        diff_ids = [_decompressed_digest(archive)]
    config = json.dumps({"architecture": go_arch(), "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": _digest(config),
                   "size": len(config)},
        "layers": layers,
        "annotations": notes,
    }, sort_keys=True).encode()
    return CheckpointImage(archive, config, manifest, layer_digest, layer_size, notes, small)


def archive_blob(layers: list[Any], image: str) -> dict[str, Any]:
    """The descriptor, among a checkpoint image manifest's `layers`, of the blob holding the archive.

    The one sealed blob (`oci.SEALED_CHECKPOINT`), with at most one tar layer beside it (the empty
    one `checkpoint_image` adds; never read); else the one tar layer (plain, gzip or zstd: an
    unencrypted archive, any engine's, or a sealed one from before the sealed type, which the
    archive reader tells by its magic bytes). Anything else is InvalidArgument.
    """
    if not all(isinstance(layer, dict) for layer in layers):
        raise InvalidArgument(f"checkpoint image {image}: a layer descriptor is not an object")
    sealed = [layer for layer in layers if layer.get("mediaType") == oci.SEALED_CHECKPOINT]
    others = [layer for layer in layers if layer.get("mediaType") != oci.SEALED_CHECKPOINT]
    if len(sealed) > 1:
        raise InvalidArgument(f"checkpoint image {image} has {len(sealed)} sealed archives ({oci.SEALED_CHECKPOINT}); "
                              "a checkpoint image has one")
    if sealed:
        if len(others) > 1 or any(layer.get("mediaType") not in oci.LAYER_TYPES for layer in others):
            kinds = ", ".join(repr(layer.get("mediaType")) for layer in others)
            raise InvalidArgument(f"checkpoint image {image}: beside its sealed archive it may have one empty tar "
                                  f"layer, it has {len(others)} ({kinds})")
        return dict(sealed[0])
    if len(layers) != 1:
        raise InvalidArgument(f"checkpoint image {image} has {len(layers)} layers; a checkpoint image has exactly "
                              "one, holding the checkpoint archive's contents (or one sealed archive)")
    if layers[0].get("mediaType") not in oci.LAYER_TYPES:
        raise InvalidArgument(f"checkpoint image {image}: layer media type {layers[0].get('mediaType')!r} is not a "
                              f"tar layer (plain, gzip or zstd) nor a sealed archive ({oci.SEALED_CHECKPOINT})")
    return dict(layers[0])


def _archive_signature(archive: Path) -> str | None:
    """ARCHIVE.sig's signature (canonical base64), for the manifest; None when the archive is unsigned."""
    try:
        der = signing.read_signature(signing.signature_path(archive))
    except signing.BadSignature as exc:
        raise InvalidArgument(f"{archive} has a signature file that is no signature: {exc.message}") from None
    return base64.b64encode(der).decode("ascii") if der is not None else None


def build(archive: Path, ref: str, out: Path, keyring: Keyring | None = None) -> str:
    """Write the OCI layout tar for `archive` named `ref` to `out`; return the manifest digest."""
    image = checkpoint_image(archive, keyring)
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": oci.OCI_MANIFEST, "digest": image.digest,
        "size": len(image.manifest), "annotations": {**image.annotations, oci.CONTAINERD_IMAGE_NAME: ref,
                                                     oci.REF_NAME: ref.rsplit(":", 1)[-1]}}]})
    _write_layout(out, {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index.encode()},
                  [image.config, image.manifest, *image.small_blobs], archive, image.layer_digest)
    return image.digest


def _write_layout(out: Path, files: dict[str, bytes], blobs: list[bytes], layer: Path, layer_digest: str) -> None:
    """Written beside `out` and renamed: a failure leaves no half image behind."""
    temp = out.with_name(f".{out.name}.criu-shim.tmp")
    try:
        _write_tar(temp, files, blobs, layer, layer_digest)
        temp.rename(out)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _write_tar(out: Path, files: dict[str, bytes], blobs: list[bytes], layer: Path, layer_digest: str) -> None:
    with tarfile.open(out, "w") as tar:
        for name, data in files.items():
            _add(tar, name, data)
        for blob in blobs:
            _add(tar, "blobs/sha256/" + _digest(blob).removeprefix("sha256:"), blob)
        tar.add(layer, arcname="blobs/sha256/" + layer_digest.removeprefix("sha256:"))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))
