"""Where the keys that seal and open archives come from: key files and a key-provider command.

A key is 32 bytes (AES-256), written as 64 hex digits, as base64, or as the raw
bytes. Each key has a key id: the id is written in the archive's header, so a
restore (on this node or another) asks its own keyring for the key of that id.

* A key file must be readable by its owner only (no group/other bits) and
  owned by root or by criu-shim's own user: anything looser is refused, with
  the fix in the message, before it is read.
* The key-provider command is how a KMS plugs in: criu-shim runs
  `COMMAND... KEY_ID` (no shell, stdin closed, 10 s), and the command prints
  the key on stdout (hex or base64, one line) and exits 0; any other exit is
  "key unavailable", quoting the last line of its stderr. Its stdout is never
  logged nor quoted in an error.

Keys never reach a log line, an error message, or disk (they live in memory
only while an archive is sealed or opened).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from shim.config import EncryptionSettings
from shim.sealed.format import KEY_SIZE, KeyUnavailable, check_key_id

COMMAND_TIMEOUT = 10.0
_MAX_KEY_TEXT = 4096


class Keyring:
    """Key files by key id, then the key-provider command for any id."""

    def __init__(self, files: Mapping[str, Path] | None = None, command: Sequence[str] = ()) -> None:
        self._files = dict(files or {})
        self._command = tuple(command)

    @classmethod
    def of(cls, settings: EncryptionSettings) -> Keyring:
        """Every key a node's `[encryption]` names: key files by id (key_file for key_id, keys), then
        the key command for any id. The one place config becomes a keyring."""
        return cls(settings.key_files, settings.key_command)

    @property
    def empty(self) -> bool:
        return not self._files and not self._command

    def key(self, key_id: str) -> bytes:
        """The 32-byte key named `key_id`; KeyUnavailable (naming the id, never the key) otherwise."""
        check_key_id(key_id)
        path = self._files.get(key_id)
        if path is not None:
            return read_key_file(path, key_id)
        if self._command:
            return run_key_command(self._command, key_id)
        known = ", ".join(repr(k) for k in sorted(self._files)) or "none"
        raise KeyUnavailable(f"no key for key id {key_id!r} is configured (key files for: {known}; no key "
                             "command): set [encryption] key_file/keys or key_command")


def read_key_file(path: Path, key_id: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise KeyUnavailable(f"key file {path} for key id {key_id!r} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyUnavailable(f"key file {path} for key id {key_id!r} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyUnavailable(f"key file {path} for key id {key_id!r} is accessible by group or others "
                                 f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it: chmod 600 {path}")
        if st.st_uid not in (0, os.geteuid()):
            raise KeyUnavailable(f"key file {path} for key id {key_id!r} is owned by uid {st.st_uid}, "
                                 "not root: refusing to use it")
        text = os.read(fd, _MAX_KEY_TEXT + 1)
    finally:
        os.close(fd)
    return decode_key(text, f"key file {path} for key id {key_id!r}")


def run_key_command(command: Sequence[str], key_id: str) -> bytes:
    what = f"key command {command[0]} for key id {key_id!r}"
    try:
        done = subprocess.run([*command, key_id], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise KeyUnavailable(f"{what} did not answer within {COMMAND_TIMEOUT:.0f}s") from None
    except OSError as exc:
        raise KeyUnavailable(f"{what} cannot be run: {exc.strerror}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        said = f": {lines[-1][:300]}" if lines else ""
        raise KeyUnavailable(f"{what} failed (exit status {done.returncode}){said}")
    return decode_key(done.stdout, what)


def decode_key(text: bytes, what: str) -> bytes:
    """32 bytes from 64 hex digits, base64, or the raw bytes; the error never quotes the key."""
    if len(text) > _MAX_KEY_TEXT:
        raise KeyUnavailable(f"{what}: not a key (over {_MAX_KEY_TEXT} bytes)")
    if len(text) == KEY_SIZE:
        return text
    stripped = text.strip()
    if len(stripped) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(stripped.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        key = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) == KEY_SIZE:
        return key
    raise KeyUnavailable(f"{what}: not a 256-bit key (expected 64 hex digits, base64 of 32 bytes, "
                         "or 32 raw bytes)")


def generate_key_file(path: Path) -> None:
    """A new random key, hex, mode 0600 (never over an existing file): for `criu-shim keygen`-like use."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, os.urandom(KEY_SIZE).hex().encode() + b"\n")
    finally:
        os.close(fd)
