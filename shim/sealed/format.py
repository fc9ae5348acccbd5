"""The sealed (encrypted) archive format, version 2: header and chunk framing (pure, no I/O).

    file   = MAGIC | u32 header length | header JSON | chunk* (the last one flagged final)
    chunk  = u32 word (bit 31: final, bits 0-30: plaintext length n <= chunk_size)
             | AES-256-GCM(data key, nonce, plaintext, aad) (n bytes) | tag (16 bytes)
    nonce  = 4-byte random per-archive prefix | u64 chunk counter (0, 1, 2, ... in file order)
    aad    = SHA-256(MAGIC | u32 | header JSON) | u32 word | u64 plaintext offset of the chunk
             (version 1, still read: without the plaintext offset)

Version 2 binds each chunk's plaintext offset into its AAD, which is what makes random access
safe (shim.sealed.chunks): a reader that locates chunk k by walking the words, without having
opened chunks 0..k-1, computes where k's plaintext lies from their *unauthenticated* lengths; with
version 1 a shortened earlier chunk (word and body cut alike) would shift every later chunk's
plaintext unnoticed until that earlier chunk is opened. In version 2 the shifted chunk fails its
own tag. A sequential reader checks the same (it counts the offset as it goes).

The header (readable without a key) names format, version, cipher, chunk size,
key id, the nonce prefix and the per-archive data key wrapped with the key
the key id names (AES key wrap, RFC 3394). Binding the header's digest into
every chunk's AAD means a changed header (another key id, another prefix)
fails authentication; the counter in the nonce catches reordered, dropped or
repeated chunks; the final flag (authenticated, in the word) catches a stream
cut at a chunk boundary; a length that disagrees with the data fails the tag.
A fresh random data key per archive keeps (key, nonce) pairs unique without
any state on the node. Nothing here is a hand-made primitive: AES-GCM and AES
key wrap come from `cryptography`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from shim.errors import FailedPrecondition, InvalidArgument

MAGIC = b"CRIU-SHIM-SEALED\n"
FORMAT = "criu-shim-sealed"
VERSION = 2
VERSIONS = (1, 2)  # read; new archives are written as VERSION
OFFSET = struct.Struct(">Q")
CIPHER = "AES-256-GCM"
KEY_WRAP = "AES-256-KW"  # RFC 3394
CONTENT_TAR = "application/x-tar"
CONTENT_TAR_ZSTD = "application/x-tar+zstd"
CONTENTS = (CONTENT_TAR, CONTENT_TAR_ZSTD)
KEY_SIZE = 32
TAG_SIZE = 16
PREFIX_SIZE = 4
WORD = struct.Struct(">I")
WORD_SIZE = WORD.size
FINAL = 1 << 31
DEFAULT_CHUNK = 1 << 20
MAX_CHUNK = 16 << 20  # a header asking for more is refused (a reader buffers one chunk)


def _in_place_allowed() -> bool:
    """Whether this cryptography encrypts and decrypts into the buffer it reads: 45-50 do, 51 refuses
    ("data and buf must not overlap"). Without it a chunk is sealed or opened through a copy."""
    buffer = memoryview(bytearray(16 + TAG_SIZE))
    try:
        AESGCM(bytes(KEY_SIZE)).encrypt_into(bytes(12), buffer[:16], None, buffer)
    except ValueError:
        return False
    return True


IN_PLACE = _in_place_allowed()
MAX_HEADER = 64 << 10
MAX_KEY_ID = 256
_FIELDS = {"format", "version", "cipher", "chunk_size", "key_id", "key_wrap", "wrapped_key", "nonce_prefix",
           "content"}


class CorruptSealedArchive(InvalidArgument):
    """The file is not a well-formed sealed archive, or fails authentication: truncated, tampered."""


class KeyUnavailable(FailedPrecondition):
    """The key the archive names is not configured, or its source (file, command) failed."""


class WrongKey(FailedPrecondition):
    """A key was found under the archive's key id, but it does not unwrap the archive's data key."""


@dataclass(frozen=True)
class Header:
    key_id: str
    wrapped_key: bytes
    nonce_prefix: bytes
    chunk_size: int = DEFAULT_CHUNK
    content: str = CONTENT_TAR
    version: int = VERSION

    @property
    def random_access(self) -> bool:
        """Whether a chunk may be opened without its predecessors (its plaintext offset is authenticated)."""
        return self.version >= 2

    def encode(self) -> bytes:
        body = json.dumps({
            "format": FORMAT, "version": self.version, "cipher": CIPHER, "chunk_size": self.chunk_size,
            "key_id": self.key_id, "key_wrap": KEY_WRAP, "wrapped_key": self.wrapped_key.hex(),
            "nonce_prefix": self.nonce_prefix.hex(), "content": self.content,
        }, sort_keys=True, separators=(",", ":")).encode()
        return MAGIC + WORD.pack(len(body)) + body


def new_header(key_id: str, key: bytes, content: str = CONTENT_TAR,
               chunk_size: int = DEFAULT_CHUNK) -> tuple[Header, bytes]:
    """A header for a new archive and its fresh random data key (wrapped in the header with `key`)."""
    check_key_id(key_id)
    check_key(key, key_id)
    data_key = AESGCM.generate_key(bit_length=256)
    header = Header(key_id, aes_key_wrap(key, data_key), os.urandom(PREFIX_SIZE), chunk_size, content)
    return header, data_key


def check_key_id(key_id: str) -> None:
    if not key_id or len(key_id) > MAX_KEY_ID or not key_id.isprintable() or key_id != key_id.strip():
        raise InvalidArgument(f"encryption key id {key_id!r} must be 1-{MAX_KEY_ID} printable characters "
                              "without surrounding blanks")


def check_key(key: bytes, key_id: str) -> None:
    if len(key) != KEY_SIZE:
        raise KeyUnavailable(f"the key for key id {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_SIZE}")


def unwrap(header: Header, key: bytes, label: str) -> bytes:
    """The archive's data key; WrongKey when `key` is not the one it was sealed with."""
    check_key(key, header.key_id)
    try:
        return aes_key_unwrap(key, header.wrapped_key)
    except InvalidUnwrap:
        raise WrongKey(f"{label}: wrong key: the key configured for key id {header.key_id!r} does not open "
                       "this archive (sealed with another key under that id, or its header was modified)") from None


def parse_header(prefix: bytes, label: str) -> tuple[Header, int]:
    """The header from the file's first bytes (at least its whole header); and the header's length."""
    if not prefix.startswith(MAGIC):
        raise CorruptSealedArchive(f"{label} is not an encrypted checkpoint archive (no {FORMAT} header)")
    start = len(MAGIC) + WORD_SIZE
    if len(prefix) < start:
        raise CorruptSealedArchive(f"{label} is truncated inside its header")
    (length,) = WORD.unpack_from(prefix, len(MAGIC))
    if length > MAX_HEADER:
        raise CorruptSealedArchive(f"{label}: encrypted archive header of {length} bytes (at most {MAX_HEADER})")
    if len(prefix) < start + length:
        raise CorruptSealedArchive(f"{label} is truncated inside its header")
    try:
        fields = json.loads(prefix[start:start + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptSealedArchive(f"{label}: encrypted archive header is not valid JSON: {exc}") from None
    return _header_from(fields, label), start + length


def _header_from(fields: object, label: str) -> Header:
    def bad(what: str) -> CorruptSealedArchive:
        return CorruptSealedArchive(f"{label}: encrypted archive header: {what}")

    if not isinstance(fields, dict) or set(fields) != _FIELDS:
        raise bad(f"expected exactly the fields {sorted(_FIELDS)}")
    version = fields["version"]
    if fields["format"] != FORMAT or isinstance(version, bool) or version not in VERSIONS:
        raise bad(f"format {fields['format']!r} version {version!r} is not {FORMAT} "
                  f"{' or '.join(map(str, VERSIONS))} (written by a newer criu-shim?)")
    if fields["cipher"] != CIPHER or fields["key_wrap"] != KEY_WRAP:
        raise bad(f"cipher {fields['cipher']!r} / key wrap {fields['key_wrap']!r} not supported")
    chunk = fields["chunk_size"]
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not 0 < chunk <= MAX_CHUNK:
        raise bad(f"chunk size {chunk!r} out of range (1..{MAX_CHUNK})")
    if fields["content"] not in CONTENTS:
        raise bad(f"content {fields['content']!r} not one of {list(CONTENTS)}")
    key_id = fields["key_id"]
    if not isinstance(key_id, str):
        raise bad("key_id is not a string")
    try:
        check_key_id(key_id)
        wrapped = bytes.fromhex(str(fields["wrapped_key"]))
        prefix = bytes.fromhex(str(fields["nonce_prefix"]))
    except (InvalidArgument, ValueError) as exc:
        raise bad(str(exc)) from None
    if len(wrapped) != KEY_SIZE + 8 or len(prefix) != PREFIX_SIZE:
        raise bad("wrapped key or nonce prefix of the wrong length")
    return Header(key_id, wrapped, prefix, chunk, str(fields["content"]), int(version))


def aad(digest: bytes, word: bytes, plain_offset: int, version: int) -> bytes:
    """A chunk's associated data: the header's digest, its word and (version 2) its plaintext offset."""
    return digest + word + OFFSET.pack(plain_offset) if version >= 2 else digest + word


class Sealer:
    """Seals a byte stream chunk by chunk, in order: usable on any stream (file, pipe, socket).

    `plaintext` counts the bytes sealed so far: a chunk's plaintext offset (in its AAD) is that
    count unless given (a reserved slot, sealed out of order, passes its own).
    """

    def __init__(self, header_bytes: bytes, nonce_prefix: bytes, data_key: bytes, version: int = VERSION) -> None:
        self._aead = AESGCM(data_key)
        self._digest = hashlib.sha256(header_bytes).digest()
        self._prefix = nonce_prefix
        self._version = version
        self.counter = 0
        self.plaintext = 0

    def seal(self, plaintext: bytes | bytearray | memoryview, final: bool = False,
             counter: int | None = None, plain_offset: int | None = None) -> bytes:
        """One chunk as it goes on the wire: word, ciphertext, tag. `counter` for a reserved slot."""
        word = WORD.pack(len(plaintext) | (FINAL if final else 0))
        counter, where = self._place(counter, plain_offset, len(plaintext))
        return word + self._aead.encrypt(self._nonce(counter), bytes(plaintext), self._aad(word, where))

    def seal_into(self, plaintext: memoryview, out: bytearray, final: bool = False,
                  counter: int | None = None, plain_offset: int | None = None) -> memoryview:
        """Like seal, into `out` (at least WORD_SIZE + len + TAG_SIZE bytes): no allocation per chunk."""
        word = WORD.pack(len(plaintext) | (FINAL if final else 0))
        counter, where = self._place(counter, plain_offset, len(plaintext))
        size = WORD_SIZE + len(plaintext) + TAG_SIZE
        view = memoryview(out)[:size]
        view[:WORD_SIZE] = word
        self._aead.encrypt_into(self._nonce(counter), plaintext, self._aad(word, where), view[WORD_SIZE:])
        return view

    def seal_in_place(self, frame: bytearray, length: int, final: bool = False,
                      counter: int | None = None, plain_offset: int | None = None) -> memoryview:
        """Seal the plaintext at frame[WORD_SIZE:WORD_SIZE + length] where it lies; return the chunk.

        `frame` has room for the word before and the tag after. AES-GCM is a stream cipher with the
        tag at the end, so OpenSSL encrypts in place: no second buffer, no copy (the chunk stays in
        the CPU cache between the read from CRIU's pipe, the encryption and the write).
        """
        word = WORD.pack(length | (FINAL if final else 0))
        counter, where = self._place(counter, plain_offset, length)
        view = memoryview(frame)[:WORD_SIZE + length + TAG_SIZE]
        view[:WORD_SIZE] = word
        nonce, plaintext = self._nonce(counter), view[WORD_SIZE:WORD_SIZE + length]
        if IN_PLACE:
            self._aead.encrypt_into(nonce, plaintext, self._aad(word, where), view[WORD_SIZE:])
        else:
            view[WORD_SIZE:] = self._aead.encrypt(nonce, plaintext, self._aad(word, where))
        return view

    def _place(self, counter: int | None, plain_offset: int | None, length: int) -> tuple[int, int]:
        """The chunk's counter and plaintext offset: the next in order unless given."""
        if counter is None:
            counter, self.counter = self.counter, self.counter + 1
        if plain_offset is None:
            plain_offset, self.plaintext = self.plaintext, self.plaintext + length
        return counter, plain_offset

    def _aad(self, word: bytes, plain_offset: int) -> bytes:
        return aad(self._digest, word, plain_offset, self._version)

    def _nonce(self, counter: int) -> bytes:
        return self._prefix + counter.to_bytes(8, "big")


class Opener:
    """Opens the chunks a Sealer made, in order; every failure names the chunk and its offset."""

    def __init__(self, header_bytes: bytes, header: Header, data_key: bytes, label: str) -> None:
        self._aead = AESGCM(data_key)
        self._digest = hashlib.sha256(header_bytes).digest()
        self._prefix = header.nonce_prefix
        self._chunk_size = header.chunk_size
        self._version = header.version
        self._label = label
        self.counter = 0
        self.plaintext = 0  # the plaintext offset of the next chunk
        self.ended = False

    def length(self, word_bytes: bytes, offset: int) -> tuple[int, bool]:
        """Plaintext length and final flag of the chunk whose word is `word_bytes` (at file `offset`)."""
        if self.ended:
            raise CorruptSealedArchive(f"{self._label}: data after the final chunk at byte {offset} "
                                       "(appended or tampered)")
        (word,) = WORD.unpack(word_bytes)
        length = word & ~FINAL
        if length > self._chunk_size:
            raise CorruptSealedArchive(f"{self._label}: chunk {self.counter} at byte {offset} claims {length} "
                                       f"bytes, more than the chunk size {self._chunk_size} (tampered or corrupt)")
        return length, bool(word & FINAL)

    def open(self, word_bytes: bytes, sealed: bytes | memoryview, offset: int) -> bytes:
        """The plaintext of the chunk (`sealed` = ciphertext and tag); counts it."""
        _, final = self.length(word_bytes, offset)
        nonce = self._prefix + self.counter.to_bytes(8, "big")
        try:
            plaintext = self._aead.decrypt(nonce, sealed, aad(self._digest, word_bytes, self.plaintext, self._version))
        except InvalidTag:
            raise CorruptSealedArchive(f"{self._label}: chunk {self.counter} at byte {offset} fails authentication: "
                                       "the archive was modified or is corrupt") from None
        self.counter += 1
        self.plaintext += len(plaintext)
        self.ended = final
        return plaintext

    def truncated(self, offset: int, inside: bool) -> CorruptSealedArchive:
        if inside:
            where = f"inside chunk {self.counter}"
        elif self.counter:
            where = f"after chunk {self.counter - 1}, before the final chunk"
        else:
            where = "before the first chunk"
        return CorruptSealedArchive(f"{self._label} is truncated at byte {offset} ({where})")
