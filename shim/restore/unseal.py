"""Restore from a sealed (encrypted) archive: authenticate and decrypt it whole, then unpack as usual.

A sealed archive (shim.sealed) is decrypted in one pass into a private
plaintext copy beside the restore's work dir (`<work>.plain`, 0600 in the
0700 restore directory), and that copy is what the unpacker reads: the same
hostile-archive checks, the same lazy restore (its loop device then serves
pages from the plaintext copy, which stays alive, unlinked, until the page
daemon is done). Every chunk, the final one included, is authenticated before
anything else is read, so a wrong or missing key, a truncated or tampered
archive fails CreateContainer before anything is unpacked or created. The
cost is one sequential read, decrypt and write of the archive at
CreateContainer (measured in the README), and the archive's size in disk space
while the restore runs. CRIU needs plaintext images: the memory image is in
the clear in the private work dir during a restore, as for any archive.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from shim.config import EncryptionSettings
from shim.errors import ResourceExhausted
from shim.sealed import Keyring, decrypt_to, is_encrypted

PLAIN_SUFFIX = ".plain"


def plaintext_path(work: Path) -> Path:
    """Where the decrypted copy of a restore's archive lives (recovery deletes it after a crash)."""
    return work.parent / f"{work.name}{PLAIN_SUFFIX}"


def keyring(settings: EncryptionSettings) -> Keyring:
    return Keyring(settings.key_files, settings.key_command)


def unseal(archive: Path, work: Path, settings: EncryptionSettings) -> Path:
    """The archive to unpack: `archive` itself, or its decrypted copy if it is sealed. Blocking.

    Errors are the sealed format's (INVALID_ARGUMENT for a corrupt or tampered archive,
    FAILED_PRECONDITION for a missing or wrong key), RESOURCE_EXHAUSTED for a full disk;
    no copy is left behind on any of them.
    """
    if not is_encrypted(archive):
        return archive
    out = plaintext_path(work)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            decrypt_to(archive, keyring(settings), fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            out.unlink()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"no space left on the filesystem of {out} decrypting {archive}: "
                                    f"{exc.strerror}") from None
        raise
    return out
