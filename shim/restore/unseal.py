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

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

from shim.config import EncryptionSettings
from shim.errors import ResourceExhausted, ShimError
from shim.sealed import Keyring, decrypt_to
from shim.sealed.format import MAGIC, MAX_HEADER, WORD_SIZE, parse_header, unwrap

# A sealed archive's header is at most this long: what check_key_opens needs of it.
HEADER_BYTES = len(MAGIC) + WORD_SIZE + MAX_HEADER

PLAIN_SUFFIX = ".plain"


def plaintext_path(work: Path) -> Path:
    """Where the decrypted copy of a restore's archive lives (recovery deletes it after a crash)."""
    return work.parent / f"{work.name}{PLAIN_SUFFIX}"


def keyring(settings: EncryptionSettings) -> Keyring:
    """The node's keyring (shim.sealed.Keyring.of)."""
    return Keyring.of(settings)


def check_key_opens(head: bytes, label: str, settings: EncryptionSettings) -> None:
    """The node has the key that opens the sealed archive whose first bytes are `head` (its header
    whole, or all of a shorter file): KeyUnavailable, WrongKey or CorruptSealedArchive otherwise.

    For a sealed checkpoint image, before its blob is copied out of containerd's store (a missing key
    then costs a header's read, not a copy of gigabytes); the decryption checks everything again.
    """
    header, _ = parse_header(head, label)
    unwrap(header, keyring(settings).key(header.key_id), label)  # the data key is dropped at once


@contextlib.asynccontextmanager
async def decrypted(archive: Path, work: Path, settings: EncryptionSettings) -> AsyncIterator[Path]:
    """The decrypted copy of the sealed `archive`, for the unpacker; removed when the block ends.

    A lazy restore's loop devices keep the data they serve (the file is unlinked, not gone, until
    they are released). The file is created here, on the loop, and the worker thread writes a
    duplicate descriptor: a cancelled call can never leave it behind, even while the thread runs
    on. Errors from the block that name the copy name the archive instead.
    """
    plain = plaintext_path(work)
    fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(_decrypt_into, archive, os.dup(fd), settings, plain)
        try:
            yield plain
        except ShimError as exc:
            if str(plain) not in exc.message:
                raise
            raise type(exc)(exc.message.replace(str(plain), f"{archive} (decrypted)")) from None
    finally:
        os.close(fd)
        plain.unlink(missing_ok=True)


def _decrypt_into(archive: Path, fd: int, settings: EncryptionSettings, plain: Path) -> None:
    try:
        decrypt_to(archive, keyring(settings), fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"no space left on the filesystem of {plain} decrypting {archive}: "
                                    f"{exc.strerror}") from None
        raise
    finally:
        os.close(fd)
