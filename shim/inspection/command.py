"""`criu-shim inspect ARCHIVE`: checkpointctl's view of an archive, with its signature and encryption.

Read-only: nothing is written, unpacked or left behind. The signature is judged first, over the
archive's bytes as they are on disk (an encrypted archive's signature covers its ciphertext, so
it is checked without the key); the contents are read next, decrypted with the key given.
The keys: --trusted-key and --key-file/--key-command, or the node config's [signing] trusted_keys
and [encryption] keys (--config). Exit status 0 when the archive was shown and its signature (if
any) verified or was not checked; 1 when it could not be read or its signature does not verify.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from shim import config as config_file
from shim import signing
from shim.inspection import contents, facts, render
from shim.restore import unseal
from shim.sealed.format import Header
from shim.sealed.keys import Keyring


def run(archive: Path, *, config: Path | None = None, trusted_keys: Sequence[Path] = (),
        key_file: Path | None = None, key_command: str | None = None, as_json: bool = False) -> int:
    trusted, configured = list(trusted_keys), None
    if config is not None:
        configured = config_file.load(config)
        trusted += configured.signing.trusted_keys
    header = contents.encryption_header(archive)
    signature, verified = signature_status(archive, signing.load_trusted_keys(trusted))
    keyring = _keyring(header, key_file, key_command)
    if keyring is None and header is not None and configured is not None:
        keyring = unseal.keyring(configured.encryption)  # the node's own keys ([encryption])
    read = contents.read(archive, keyring)
    found = facts.facts(read)
    encryption = encryption_status(header, read.compression)
    if as_json:
        print(render.as_json(found, signature, encryption))
    else:
        print(f"\nDisplaying container checkpoint tree view from {archive}\n")
        print(render.text(render.tree(found, signature, encryption)))
    if not verified:
        print(f"criu-shim: {archive}: the signature does not verify", file=sys.stderr)
        return 1
    return 0


def signature_status(archive: Path, trusted: Sequence[signing.TrustedKey]) -> tuple[str, bool]:
    """What to say about ARCHIVE.sig, and whether that is acceptable (False: it does not verify)."""
    sig = signing.signature_path(archive)
    if not trusted:
        present = sig.is_file() and not sig.is_symlink()
        return ((f"present ({sig}), not checked: give --trusted-key or --config" if present else "unsigned"),
                True)
    try:
        verdict = signing.check_archive(archive, trusted, False, f"checkpoint {archive}")
    except signing.SignatureRefused as exc:
        return f"INVALID: {exc.message}", False
    return verdict.describe(), True


def encryption_status(header: Header | None, compression: str) -> str:
    packed = "" if compression == "none" else f", {compression}-compressed"
    if header is None:
        return f"none{packed}"
    return f"sealed (AES-256-GCM, key id {header.key_id!r}{packed})"


def _keyring(header: Header | None, key_file: Path | None, key_command: str | None) -> Keyring | None:
    if header is None or (key_file is None and not key_command):
        return None
    files = {header.key_id: key_file} if key_file is not None else {}
    return Keyring(files, shlex.split(key_command) if key_command else ())
