"""Archive signatures (shim.signing): cosign's blob format, key hygiene, and every refusal."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from shim import config, oci, signing
from shim.errors import Code, FailedPrecondition, InvalidArgument
from shim.restore.image import CheckpointImage, Layer
from shim.restore.signature import verify_signature


def write_key(path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, mode: int = 0o600) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(mode)
    return path


def write_public(path: Path, key: ec.EllipticCurvePrivateKey, mode: int = 0o644) -> Path:
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    path.chmod(mode)
    return path


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint.tar"
    path.write_bytes(os.urandom(3 << 20) + b"end")  # more than one read chunk
    return path


def trusted(tmp_path: Path, *keys: ec.EllipticCurvePrivateKey) -> tuple[signing.TrustedKey, ...]:
    paths = [write_public(tmp_path / f"trusted-{i}.pub", k) for i, k in enumerate(keys)]
    return signing.load_trusted_keys(paths)


def test_signature_is_cosign_blob_format_over_the_file_bytes(archive: Path, key: ec.EllipticCurvePrivateKey) -> None:
    sig = signing.sign_archive(archive, key)

    assert sig == archive.with_name("checkpoint.tar.sig")
    assert stat.S_IMODE(sig.stat().st_mode) == 0o600
    der = base64.b64decode(sig.read_bytes(), validate=True)
    # What cosign verify-blob does: ECDSA P-256 with SHA-256 over the blob itself (not prehashed by us).
    key.public_key().verify(der, archive.read_bytes(), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.public_key().verify(der, archive.read_bytes() + b"x", ec.ECDSA(hashes.SHA256()))
    assert [p.name for p in archive.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_verified_with_the_trusted_key_that_signed(tmp_path: Path, archive: Path,
                                                   key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    keys = trusted(tmp_path, other, key)
    signing.sign_archive(archive, key)

    verdict = signing.check_archive(archive, keys, True, "restore of x")

    assert verdict.key == keys[1].path
    assert verdict.describe() == f"verified with {keys[1].path}"


def test_tampered_archive_refused(tmp_path: Path, archive: Path, key: ec.EllipticCurvePrivateKey) -> None:
    signing.sign_archive(archive, key)
    with archive.open("r+b") as f:  # one bit, in the middle
        f.seek(1 << 20)
        byte = f.read(1)[0]
        f.seek(1 << 20)
        f.write(bytes([byte ^ 1]))

    with pytest.raises(signing.SignatureRefused) as refused:
        signing.check_archive(archive, trusted(tmp_path, key), False, "restore of x")

    assert refused.value.code == Code.PERMISSION_DENIED
    assert "does not verify with any key of signing.trusted_keys" in refused.value.message
    assert "changed after it was signed" in refused.value.message


def test_untrusted_key_refused_even_when_signatures_are_optional(tmp_path: Path, archive: Path,
                                                                 key: ec.EllipticCurvePrivateKey) -> None:
    signing.sign_archive(archive, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(signing.SignatureRefused, match="does not verify"):
        signing.check_archive(archive, trusted(tmp_path, key), False, "restore of x")


def test_unsigned_refused_only_when_required(tmp_path: Path, archive: Path, key: ec.EllipticCurvePrivateKey) -> None:
    keys = trusted(tmp_path, key)
    assert signing.check_archive(archive, keys, False, "x").describe() == "unsigned"
    with pytest.raises(signing.SignatureRefused) as refused:
        signing.check_archive(archive, keys, True, "restore from checkpoint /a.tar")
    assert refused.value.message == (
        f"restore from checkpoint /a.tar refused by rule signing.require_signature: it is not signed "
        f"({archive}.sig does not exist)")


def test_nothing_checked_without_trusted_keys(archive: Path) -> None:
    (archive.parent / "checkpoint.tar.sig").write_bytes(b"garbage")
    assert signing.check_archive(archive, (), False, "x").describe() == "not checked (no signing.trusted_keys)"


@pytest.mark.parametrize("content", [b"garbage!", b"", b"QUFB" * 2000, base64.b64encode(b"not DER at all")])
def test_garbage_signature_file_refused(tmp_path: Path, archive: Path, key: ec.EllipticCurvePrivateKey,
                                        content: bytes) -> None:
    (archive.parent / "checkpoint.tar.sig").write_bytes(content)
    with pytest.raises(signing.SignatureRefused) as refused:
        signing.check_archive(archive, trusted(tmp_path, key), False, "restore of x")
    assert refused.value.code == Code.PERMISSION_DENIED
    assert "checkpoint.tar.sig" in refused.value.message


def test_signature_file_that_is_a_symlink_or_directory_refused(tmp_path: Path, archive: Path,
                                                               key: ec.EllipticCurvePrivateKey) -> None:
    real = tmp_path / "elsewhere.sig"
    real.write_bytes(signing.sign_digest(key, signing.archive_sha256(archive)))
    (archive.parent / "checkpoint.tar.sig").symlink_to(real)
    with pytest.raises(signing.SignatureRefused, match="cannot open"):
        signing.check_archive(archive, trusted(tmp_path, key), False, "x")
    (archive.parent / "checkpoint.tar.sig").unlink()
    (archive.parent / "checkpoint.tar.sig").mkdir()
    with pytest.raises(signing.SignatureRefused, match="not a regular file"):
        signing.check_archive(archive, trusted(tmp_path, key), False, "x")


def test_signing_key_readable_by_others_refused(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path = write_key(tmp_path / "signing.key", key, 0o640)
    with pytest.raises(FailedPrecondition) as refused:
        signing.load_signing_key(path)
    assert refused.value.message == (f"signing.key_file {path}: mode 0640 lets others read the private key; "
                                     "chmod 600")
    path.chmod(0o600)
    assert signing.load_signing_key(path).public_key() == key.public_key()


def test_trusted_key_writable_by_others_refused(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path = write_public(tmp_path / "a.pub", key, 0o666)
    with pytest.raises(FailedPrecondition, match="mode 0666 lets others replace a trusted key"):
        signing.load_trusted_keys([path])


@pytest.mark.parametrize("content", [b"", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                                     b"\x00" * 100])
def test_garbage_key_file_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "signing.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(FailedPrecondition, match=f"signing.key_file {path}: not an unencrypted PEM private key"):
        signing.load_signing_key(path)
    with pytest.raises(FailedPrecondition, match="not a PEM public key"):
        signing.load_public_key(path)


def test_other_key_types_refused(tmp_path: Path) -> None:
    path = write_key(tmp_path / "ed.key", ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(FailedPrecondition, match="must be an ECDSA P-256 key"):
        signing.load_signing_key(path)
    p384 = write_key(tmp_path / "p384.key", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(FailedPrecondition, match="must be an ECDSA P-256 key"):
        signing.load_signing_key(p384)


def test_missing_key_and_key_symlink_refused(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(FailedPrecondition, match="cannot open: No such file"):
        signing.load_signing_key(tmp_path / "none.key")
    (tmp_path / "link.key").symlink_to(write_key(tmp_path / "real.key", key))
    with pytest.raises(FailedPrecondition, match="cannot open"):
        signing.load_signing_key(tmp_path / "link.key")


def test_config_signing_section() -> None:
    parsed = config.parse({"signing": {"key_file": "/k", "trusted_keys": ["/a.pub"], "require_signature": True}})
    assert parsed.signing == config.SigningSettings(Path("/k"), (Path("/a.pub"),), True)
    assert config.parse({}).signing == config.SigningSettings()
    with pytest.raises(InvalidArgument, match="require_signature = true needs signing.trusted_keys"):
        config.parse({"signing": {"require_signature": True}})
    with pytest.raises(InvalidArgument, match="unknown keys in \\[signing\\]: key"):
        config.parse({"signing": {"key": "/k"}})
    with pytest.raises(InvalidArgument, match="signing.trusted_keys must be a list of absolute paths"):
        config.parse({"signing": {"trusted_keys": "a.pub"}})


def _image(annotations: dict[str, str], digest: str) -> CheckpointImage:
    return CheckpointImage("reg/ckpt:1", "org.criu", annotations, Layer(digest, oci.OCI_LAYER_TAR, 10), "sha256:m")


def test_checkpoint_image_verified_by_its_annotation_over_the_layer_digest(
        tmp_path: Path, archive: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pub = write_public(tmp_path / "a.pub", key)
    settings = config.SigningSettings(None, (pub,), True)
    digest = signing.archive_sha256(archive)
    text = signing.sign_digest(key, digest).decode()
    layer = "sha256:" + digest.hex()

    assert verify_signature(settings, _image({oci.ARCHIVE_SIGNATURE: text}, layer), "reg/ckpt:1").key == pub
    with pytest.raises(signing.SignatureRefused, match="does not verify"):  # another layer
        verify_signature(settings, _image({oci.ARCHIVE_SIGNATURE: text}, "sha256:" + "0" * 64), "reg/ckpt:1")
    with pytest.raises(signing.SignatureRefused, match="refused by rule signing.require_signature"):
        verify_signature(settings, _image({}, layer), "reg/ckpt:1")
    with pytest.raises(signing.SignatureRefused, match="unreadable"):
        verify_signature(settings, _image({oci.ARCHIVE_SIGNATURE: "%%%"}, layer), "reg/ckpt:1")


def test_restore_check_names_the_checkpoint_and_refuses_loose_trusted_keys(
        tmp_path: Path, archive: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pub = write_public(tmp_path / "a.pub", key)
    with pytest.raises(signing.SignatureRefused, match=f"^restore from checkpoint {archive} refused by rule"):
        verify_signature(config.SigningSettings(None, (pub,), True), archive, str(archive))
    pub.chmod(0o646)
    with pytest.raises(FailedPrecondition, match="lets others replace a trusted key"):
        verify_signature(config.SigningSettings(None, (pub,), False), archive, str(archive))
    assert not verify_signature(config.SigningSettings(), archive, str(archive)).checked


# Made with the real cosign v2.6.5 (`cosign import-key-pair` of a PEM P-256 key, then
# `cosign sign-blob --key imported.key --tlog-upload=false`): what cosign signs, we verify.
COSIGN_PUBLIC_KEY = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEl8qejbsQaMUUqijYTMHufIsZqSoO
M1SpmiHKvjaV2IUALwwCy1b0NC9lv2IpIxCD2sKLwd+lwYznRKh1hw0X7A==
-----END PUBLIC KEY-----
"""
COSIGN_BLOB = b"criu-shim: a blob signed by cosign v2.6.5 sign-blob\n"
COSIGN_SIGNATURE = b"MEUCIQCcMbkN7rhdzyms0dB63pCy4Hxj+I7s1mQTroevFGCIxgIgLjl+At0Cir7Yh9AyACKHvLc9fOv0rIguflfyB3ymD6c=\n"


def test_cosign_sign_blob_vector_verifies(tmp_path: Path) -> None:
    pub = tmp_path / "cosign.pub"
    pub.write_bytes(COSIGN_PUBLIC_KEY)
    blob = tmp_path / "blob"
    blob.write_bytes(COSIGN_BLOB)
    (tmp_path / "blob.sig").write_bytes(COSIGN_SIGNATURE)
    keys = signing.load_trusted_keys([pub])

    assert signing.check_archive(blob, keys, True, "x").key == pub
    blob.write_bytes(COSIGN_BLOB.upper())
    with pytest.raises(signing.SignatureRefused):
        signing.check_archive(blob, keys, True, "x")


def test_checkpoint_image_of_a_signed_archive_carries_a_signature_that_verifies(
        tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    from shim.restore.build_image import checkpoint_image
    from tests.support.archives import write_checkpoint

    archive = write_checkpoint(tmp_path / "ckpt.tar")
    assert oci.ARCHIVE_SIGNATURE not in checkpoint_image(archive).annotations  # unsigned: no annotation
    signing.sign_archive(archive, key)
    built = checkpoint_image(archive)
    manifest = json.loads(built.manifest)
    layer = manifest["layers"][0]["digest"]
    settings = config.SigningSettings(None, (write_public(tmp_path / "a.pub", key),), True)

    image = _image(manifest["annotations"], layer)
    assert verify_signature(settings, image, "reg/ckpt:1").checked
    signing.signature_path(archive).write_bytes(b"garbage")
    with pytest.raises(InvalidArgument, match="has a signature file that is no signature"):
        checkpoint_image(archive)


def test_the_proxy_says_at_start_up_which_key_will_refuse(tmp_path: Path, key: ec.EllipticCurvePrivateKey,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from shim.app import _warn_about_keys

    path = write_key(tmp_path / "signing.key", key, 0o644)
    _warn_about_keys(config.parse({"signing": {"key_file": str(path)}}))
    assert f"signing.key_file {path}: mode 0644 lets others read the private key" in caplog.text
    assert "checkpoints or restores will be refused until it is fixed" in caplog.text
    caplog.clear()
    path.chmod(0o600)
    _warn_about_keys(config.parse({"signing": {"key_file": str(path)}}))
    assert caplog.text == ""


def test_an_archive_replaced_or_changed_after_verification_is_refused(
        tmp_path: Path, archive: Path, key: ec.EllipticCurvePrivateKey) -> None:
    from shim.restore.signature import check_unchanged

    signing.sign_archive(archive, key)
    settings = config.SigningSettings(None, (write_public(tmp_path / "a.pub", key),), True)
    verdict = verify_signature(settings, archive, str(archive))
    assert verdict.identity == signing.identity(archive.stat())
    check_unchanged(verdict, archive, str(archive))  # untouched: fine

    replacement = tmp_path / "replacement"
    replacement.write_bytes(archive.read_bytes())  # the same bytes, another file
    replacement.rename(archive)
    with pytest.raises(signing.SignatureRefused, match="was replaced or changed after its signature was verified"):
        check_unchanged(verdict, archive, str(archive))
    check_unchanged(verify_signature(config.SigningSettings(), archive, str(archive)), archive, str(archive))
