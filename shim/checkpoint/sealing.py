"""Encryption at rest for checkpoints: whether a checkpoint is sealed, with which key, and the tar
writer that seals as it writes (shim.sealed holds the format).

Whether: `[encryption] enabled` is the node's default; a pod (or one container)
may say otherwise with the annotation `checkpoint.criu-shim.io/encrypt` (or
`<container>.checkpoint.criu-shim.io/encrypt`): "true" seals even where the
node does not (a key must be configured), "false" is honoured only for pods in
a namespace matching `encryption.opt_out_namespaces`, and refused otherwise
(PERMISSION_DENIED, before the container is touched): an operator who turned
encryption on decides who may write memory to disk in the clear.

The key is loaded before the container is frozen, so a missing key, a key file
others can read or a failing key command fails the checkpoint with nothing
touched. It lives in memory only while the archive is written.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import secrets
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shim.annotations import boolean
from shim.checkpoint.archive import FILE_MODE, Member, SourceChangedError, TarWriter, add_members
from shim.checkpoint.compression import ArchiveStream, ByteSink, Compression, FileSink, ZstdFile
from shim.checkpoint.options import annotation
from shim.config import EncryptionSettings
from shim.errors import FailedPrecondition, PermissionDenied
from shim.sealed import CONTENT_TAR, CONTENT_TAR_ZSTD, Header, Keyring, SealedFile, new_header

OPTION = "encrypt"  # checkpoint.criu-shim.io/encrypt: "true" | "false"
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class SealKey:
    key_id: str
    key: bytes = field(repr=False)  # never in a repr, a log line or an error

    def new_header(self, content: str = CONTENT_TAR) -> tuple[Header, bytes]:
        return new_header(self.key_id, self.key, content)


def wanted(settings: EncryptionSettings, annotations: Mapping[str, str], container: str, namespace: str,
           pod: str, container_id: str) -> bool:
    """Whether this checkpoint is sealed: node default, then pod, then container annotation."""
    value, said = settings.enabled, ""
    for scope in (None, container):
        key = annotation(OPTION, scope)
        if key in annotations:
            value, said = boolean(key, annotations[key], lenient=True), key
    if not value and settings.enabled and not any(fnmatch.fnmatchcase(namespace, p)
                                                  for p in settings.opt_out_namespaces):
        raise PermissionDenied(f"checkpoint of container {container_id} in pod {namespace}/{pod} refused by rule "
                               f'encryption.opt_out_namespaces: annotation {said}: "false" asks for an '
                               f"unencrypted archive, and namespace {namespace!r} matches none of "
                               f"{list(settings.opt_out_namespaces)}")
    if value and not settings.key_id:
        raise FailedPrecondition(f'annotation {said}: "true" asks for an encrypted checkpoint, but this node has '
                                 "no encryption key: set [encryption] key_id and key_file or key_command")
    return value


def load_key(settings: EncryptionSettings) -> SealKey:
    """The key new archives are sealed with (KeyUnavailable: FAILED_PRECONDITION, naming the id)."""
    return SealKey(settings.key_id, Keyring.of(settings).key(settings.key_id))


def open_through(fd: int, seal: SealKey | None, compression: Compression | None,
                 start: int = 0) -> ArchiveStream | None:
    """What an archive's tar stream is written through: compressed, then sealed; None for neither.

    The sealed header says whether the plaintext is a tar or a zstd stream of one.
    """
    sealed = None
    if seal is not None:
        content = CONTENT_TAR_ZSTD if compression is not None else CONTENT_TAR
        sealed = SealedFile(fd, *seal.new_header(content), start=start)
        if compression is None:
            return sealed
    if compression is None:
        return None
    sink: ByteSink = sealed if sealed is not None else FileSink(fd, start)
    return ZstdFile(sink, compression)


class SealedTarWriter(TarWriter):
    """A TarWriter whose bytes go through a SealedFile or a ZstdFile (tar offsets, one pass)."""

    def __init__(self, sealed: ByteSink, start: int = 0) -> None:
        super().__init__(-1, start)
        self._sealed = sealed

    def add_file(self, info: tarfile.TarInfo, source_fd: int) -> None:
        self._pending += info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self._flush()
        remaining = info.size
        while remaining:
            data = os.read(source_fd, min(remaining, _COPY_CHUNK))
            if not data:
                raise SourceChangedError(f"{info.name}: file shrank while being copied ({remaining} bytes short)")
            self._sealed.write(data)
            remaining -= len(data)
        self._written += info.size
        self._pending += bytes(-info.size % tarfile.BLOCKSIZE)

    def _flush(self) -> None:
        self._sealed.write(self._pending)
        self._written += len(self._pending)
        self._pending.clear()


def write_sealed_archive(location: Path, members: Iterable[Member], seal: SealKey | None, durable: bool,
                         compression: Compression | None = None) -> int:
    """The whole archive sealed and/or compressed, written beside `location` and renamed onto it; its size.

    For where the page stream cannot run (no FIFOs): the memory images are read
    from CRIU's files, a copy the streamed path avoids.
    """
    temp = location.with_name(f".{location.name}.criu-shim-{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            sealed = open_through(fd, seal, compression)
            assert sealed is not None, "neither sealed nor compressed: write_archive_in_place"
            try:
                writer = SealedTarWriter(sealed)
                add_members(writer, members)
                writer.finish()
                size = sealed.close()
            finally:
                sealed.abort()  # the writer thread, on every path
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, location)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return size
