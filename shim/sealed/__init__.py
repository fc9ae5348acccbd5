"""Sealed (encrypted) checkpoint archives: format, keys, reader and writer.

Public API (the inspect command, restore and migration build on these):

    is_encrypted(path) -> bool
    read_header(path) -> Header                     # .key_id, .chunk_size, .content; no key needed
    open_decrypted(path, keyring) -> DecryptingReader  # a readable stream of the plaintext tar
    decrypt_to(path, keyring, out_fd) -> int        # the whole plaintext, every chunk authenticated
    Keyring(files={key_id: path}, command=[...])    # .key(key_id) -> 32 bytes
    new_header(key_id, key) -> (Header, data_key); SealedFile(fd, header, data_key) to write
    Sealer / Opener                                 # the chunk AEAD over any byte stream

Errors: CorruptSealedArchive (INVALID_ARGUMENT: not sealed, bad header,
truncated, tampered), KeyUnavailable and WrongKey (FAILED_PRECONDITION).
The format is specified in `shim.sealed.format`.
"""

from shim.sealed.format import (
    CONTENT_TAR,
    CONTENT_TAR_ZSTD,
    MAGIC,
    CorruptSealedArchive,
    Header,
    KeyUnavailable,
    Opener,
    Sealer,
    WrongKey,
    new_header,
)
from shim.sealed.keys import Keyring, decode_key, read_key_file, run_key_command
from shim.sealed.reader import DecryptingReader, decrypt_to, is_encrypted, open_decrypted, read_header
from shim.sealed.writer import SealedFile, Slot

__all__ = [
    "CONTENT_TAR", "CONTENT_TAR_ZSTD", "MAGIC", "CorruptSealedArchive", "DecryptingReader", "Header", "KeyUnavailable",
    "Keyring", "Opener", "SealedFile", "Sealer", "Slot", "WrongKey", "decode_key", "decrypt_to", "is_encrypted",
    "new_header", "open_decrypted", "read_header", "read_key_file", "run_key_command",
]
