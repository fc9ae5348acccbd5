"""Signatures of checkpoint archives: ECDSA P-256 over the archive's SHA-256, in cosign's blob format.

A signature is exactly what `cosign sign-blob --key` writes for the archive file: the base64 of
an ASN.1 DER ECDSA P-256 / SHA-256 signature of its bytes. So anyone can check one with the
ecosystem's tools, without criu-shim: `cosign verify-blob --key KEY.pub --signature ARCHIVE.sig
--insecure-ignore-tlog ARCHIVE`, or `openssl dgst -sha256 -verify KEY.pub` over the decoded
signature. It is kept beside the archive as `ARCHIVE.sig` (0600, appearing atomically). The same
signature also signs the archive as a checkpoint image's layer: the uncompressed layer *is* the
archive, so its digest is the archive's SHA-256 (see `criu-shim checkpoint-image`).

Signing keys are PEM PKCS#8 EC P-256 private keys (`openssl genpkey -algorithm EC -pkeyopt
ec_paramgen_curve:P-256`; `cosign import-key-pair` takes the same file), trusted keys PEM public
keys (cosign.pub is one). A private key readable by others, or a trusted key others may replace,
is refused: whoever can write a trusted key decides what is restored.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from shim.errors import FailedPrecondition, PermissionDenied, ShimError

SIGNATURE_SUFFIX = ".sig"  # ARCHIVE.sig, as cosign sign-blob users name it
# A DER P-256 signature is at most 72 bytes (96 in base64): anything much larger is not one.
MAX_SIGNATURE_FILE = 4096
MAX_KEY_FILE = 64 * 1024
_READ_CHUNK = 1 << 20
_ALGORITHM = ec.ECDSA(Prehashed(hashes.SHA256()))


SigningKey = ec.EllipticCurvePrivateKey


class BadSignature(ShimError):
    """A signature that is unreadable or does not verify (the caller says which rule refuses it)."""


@dataclass(frozen=True)
class TrustedKey:
    path: Path
    key: ec.EllipticCurvePublicKey


def signature_path(archive: Path) -> Path:
    return archive.with_name(archive.name + SIGNATURE_SUFFIX)


# --- keys -------------------------------------------------------------------------------------


def load_signing_key(path: Path, what: str = "signing.key_file") -> ec.EllipticCurvePrivateKey:
    """The private key, if only its owner (root, or us) can read it and it is EC P-256."""
    data = _read_key_file(path, what, forbidden=0o077, why="lets others read the private key; chmod 600")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise FailedPrecondition(f"{what} {path}: not an unencrypted PEM private key ({_first_line(exc)})") \
            from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise FailedPrecondition(f"{what} {path}: must be an ECDSA P-256 key (cosign's kind), "
                                 f"got {type(key).__name__}")
    return key


def load_trusted_keys(paths: Sequence[Path], what: str = "signing.trusted_keys") -> tuple[TrustedKey, ...]:
    return tuple(TrustedKey(path, load_public_key(path, what)) for path in paths)


def load_public_key(path: Path, what: str = "signing.trusted_keys") -> ec.EllipticCurvePublicKey:
    data = _read_key_file(path, what, forbidden=0o022,
                          why="lets others replace a trusted key; chmod go-w")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise FailedPrecondition(f"{what} {path}: not a PEM public key ({_first_line(exc)})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise FailedPrecondition(f"{what} {path}: must be an ECDSA P-256 public key, got {type(key).__name__}")
    return key


def _read_key_file(path: Path, what: str, *, forbidden: int, why: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise FailedPrecondition(f"{what} {path}: cannot open: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # before fdopen, which refuses a directory with its own error
        os.close(fd)
        raise FailedPrecondition(f"{what} {path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_uid not in (0, os.geteuid()):
            raise FailedPrecondition(f"{what} {path}: owned by uid {info.st_uid}, must be root's")
        if info.st_mode & forbidden:
            raise FailedPrecondition(f"{what} {path}: mode {stat.S_IMODE(info.st_mode):04o} {why}")
        data = f.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise FailedPrecondition(f"{what} {path}: over {MAX_KEY_FILE} bytes, not a key")
    return data


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# --- digests and signatures -------------------------------------------------------------------


def file_sha256(fd: int) -> bytes:
    """SHA-256 of the whole file behind `fd` (read with pread: the caller's position stays)."""
    sha, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, _READ_CHUNK, offset):
        sha.update(chunk)
        offset += len(chunk)
    return sha.digest()


def sign_digest(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """The base64 text cosign sign-blob writes for a blob whose SHA-256 is `digest`."""
    return base64.b64encode(key.sign(digest, _ALGORITHM))


def decode_signature(text: bytes, where: str) -> bytes:
    """The DER signature in a base64 signature file's text (cosign's format), or BadSignature."""
    try:
        der = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadSignature(f"{where} is not a base64 signature (cosign sign-blob's format)") from None
    if not der:
        raise BadSignature(f"{where} is empty")
    return der


def verifying_key(digest: bytes, der: bytes, trusted: Sequence[TrustedKey]) -> TrustedKey | None:
    """The first trusted key under which `der` signs `digest`; None when none does."""
    for candidate in trusted:
        try:
            candidate.key.verify(der, digest, _ALGORITHM)
        except InvalidSignature:
            continue
        return candidate
    return None


# --- detached signature files -----------------------------------------------------------------


def sign_archive(archive: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    """Write ARCHIVE.sig for the archive as it is now (0600, atomic); return its path."""
    return write_signature(signature_path(archive), sign_digest(key, archive_sha256(archive)))


def write_signature(path: Path, text: bytes) -> Path:
    temp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(text)
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return path


def read_signature(path: Path) -> bytes | None:
    """The DER signature in `path`; None when there is no such file; BadSignature when garbage."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadSignature(f"{path}: cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadSignature(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        text = f.read(MAX_SIGNATURE_FILE + 1)
    if len(text) > MAX_SIGNATURE_FILE:
        raise BadSignature(f"{path} is over {MAX_SIGNATURE_FILE} bytes: not a signature")
    return decode_signature(text, str(path))


# --- verification at restore ------------------------------------------------------------------


class SignatureRefused(PermissionDenied):
    """A checkpoint refused for its signature: missing where required, unreadable, or not verifying."""


# (device, inode, size, mtime in ns) of a file: what "the same bytes as verified" can be checked by.
Identity = tuple[int, int, int, int]


@dataclass(frozen=True)
class Verdict:
    checked: bool  # trusted keys are configured, so a signature was looked for
    key: Path | None = None  # the trusted key that verified it; None: unsigned (and allowed)
    identity: Identity | None = None  # of the archive file whose bytes were verified

    def describe(self) -> str:
        if not self.checked:
            return "not checked (no signing.trusted_keys)"
        return f"verified with {self.key}" if self.key else "unsigned"


def check_file(signature: Path, digest_of_checkpoint: Callable[[], bytes], trusted: Sequence[TrustedKey],
               required: bool, subject: str) -> Verdict:
    """Judge a checkpoint by the signature file `signature` (the digest is computed only when needed).

    A signature that is there is always checked (a garbage or non-verifying one is refused even
    when signatures are optional: it means tampering); a missing one is refused only when
    `required`. `subject` names the checkpoint in the refusal.
    """
    if not trusted and not required:
        return Verdict(checked=False)
    try:
        der = read_signature(signature)
    except BadSignature as exc:
        raise SignatureRefused(f"{subject} refused: its signature is unreadable: {exc.message}") from None
    return judge(digest_of_checkpoint() if der is not None else b"", der, str(signature), trusted, required,
                 subject)


def identity(info: os.stat_result) -> Identity:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def judge(digest: bytes, der: bytes | None, where: str, trusted: Sequence[TrustedKey], required: bool,
          subject: str) -> Verdict:
    if der is None:
        if required:
            raise SignatureRefused(f"{subject} refused by rule signing.require_signature: it is not signed "
                                   f"({where} does not exist)")
        return Verdict(checked=True)
    key = verifying_key(digest, der, trusted)
    if key is None:
        names = ", ".join(str(k.path) for k in trusted) or "none configured"
        raise SignatureRefused(f"{subject} refused: its signature {where} does not verify with any key of "
                               f"signing.trusted_keys ({names}): the checkpoint was changed after it was "
                               "signed, or signed by a key that is not trusted")
    return Verdict(checked=True, key=key.path)


def check_archive(archive: Path, trusted: Sequence[TrustedKey], required: bool, subject: str) -> Verdict:
    """check_file with ARCHIVE.sig over the archive's bytes (read once, only when it is signed).

    The verdict names the file it judged (`identity`), so that a reader that opens it again later
    can tell that it still holds the bytes verified."""
    seen: list[Identity] = []

    def digest() -> bytes:
        fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            before = identity(os.fstat(fd))
            digest = file_sha256(fd)
            if identity(os.fstat(fd)) != before:
                raise SignatureRefused(f"{subject} refused: {archive} changed while its signature was checked")
        finally:
            os.close(fd)
        seen.append(before)
        return digest

    verdict = check_file(signature_path(archive), digest, trusted, required, subject)
    return dataclasses.replace(verdict, identity=seen[0]) if seen else verdict


def archive_sha256(archive: Path) -> bytes:
    fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return file_sha256(fd)
    finally:
        os.close(fd)
