"""criu-shim inspect: checkpointctl's fields, signature and encryption status, and every bad input."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shim import cli, signing
from shim.sealed.format import new_header
from shim.sealed.keys import generate_key_file, read_key_file
from shim.sealed.writer import SealedFile
from tests.support.archives import PAGES, ROOTFS_DIFF, _pstree, write_checkpoint


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "checkpoint.tar")


def inspect(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = cli.main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def public_key(tmp_path: Path, key: ec.EllipticCurvePrivateKey, name: str = "trusted.pub") -> Path:
    path = tmp_path / name
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def test_tree_shows_what_checkpointctl_shows(archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = inspect(capsys, archive)

    assert code == 0
    assert f"Displaying container checkpoint tree view from {archive}" in out
    lines = out.splitlines()
    assert lines[3] == "web"
    for line in ("├── Image: docker.io/library/busybox:latest", "├── ID: c0ffee",
                 "├── Runtime: io.containerd.runc.v2", "├── Engine: containerd",
                 "│   └── Memory pages size: 3.0 MiB", "├── Root FS diff size: 6.0 KiB",
                 "├── Signature: unsigned", "├── Encryption: none",
                 "│   ├── Pod name: pod-1", "│   └── Kubernetes namespace: ns-1",
                 "│   └── [1]  sh", "│       └── [7]  sleep",
                 "    ├── Destination: /proc", "    └── Destination: /data", "        └── Source: /var/lib/data"):
        assert line in lines, (line, out)


def test_json(archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = inspect(capsys, archive, "--json")
    document = json.loads(out)
    assert code == 0
    assert (document["name"], document["engine"], document["pages_size"], document["rootfs_diff_size"]) == \
        ("web", "containerd", PAGES, ROOTFS_DIFF)
    assert document["processes"][0]["children"][0]["command"] == "sleep"
    assert document["signature"] == "unsigned"


def test_signature_verified_untrusted_and_tampered(tmp_path: Path, archive: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signing.sign_archive(archive, key)
    trusted = public_key(tmp_path, key)
    stranger = public_key(tmp_path, ec.generate_private_key(ec.SECP256R1()), "stranger.pub")

    code, out, _ = inspect(capsys, archive, "--trusted-key", trusted)
    assert code == 0 and f"├── Signature: verified with {trusted}" in out
    code, out, _ = inspect(capsys, archive)
    assert code == 0 and f"Signature: present ({archive}.sig), not checked: give --trusted-key or --config" in out
    code, out, err = inspect(capsys, archive, "--trusted-key", stranger)
    assert code == 1 and "Signature: INVALID:" in out and "does not verify" in err

    with archive.open("r+b") as f:  # one byte of the memory image
        f.seek(-20000, os.SEEK_END)
        f.write(b"\1")
    code, out, err = inspect(capsys, archive, "--trusted-key", trusted)
    assert code == 1
    assert "Signature: INVALID:" in out and "changed after it was signed" in out


def test_trusted_keys_from_the_config(tmp_path: Path, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signing.sign_archive(archive, key)
    trusted = public_key(tmp_path, key)
    config = tmp_path / "config.toml"
    config.write_text(f'[signing]\ntrusted_keys = ["{trusted}"]\n')
    code, out, _ = inspect(capsys, archive, "--config", config)
    assert code == 0 and f"Signature: verified with {trusted}" in out


def test_loose_trusted_key_refused(tmp_path: Path, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trusted = public_key(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    trusted.chmod(0o666)
    code, out, err = inspect(capsys, archive, "--trusted-key", trusted)
    assert (code, out) == (1, "")
    assert "lets others replace a trusted key" in err


def _seal(plain: Path, sealed: Path, key_file: Path, key_id: str = "node-a") -> Path:
    header, data_key = new_header(key_id, read_key_file(key_file, key_id))
    fd = os.open(sealed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer = SealedFile(fd, header, data_key)
        writer.write(plain.read_bytes())
        writer.close()
    finally:
        os.close(fd)
    return sealed


def test_encrypted_archive_with_and_without_its_key(tmp_path: Path, archive: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "node-a.key"
    generate_key_file(key_file)
    sealed = _seal(archive, tmp_path / "sealed.tar", key_file)

    code, out, err = inspect(capsys, sealed)
    assert (code, out) == (1, "")
    assert err == (f"criu-shim: {sealed} is encrypted (key id 'node-a'): inspecting its contents needs the key: "
                   "--key-file FILE or --key-command\n")
    code, out, _ = inspect(capsys, sealed, "--key-file", key_file)
    assert code == 0
    assert "├── Encryption: sealed (AES-256-GCM, key id 'node-a')" in out
    assert "│       └── [7]  sleep" in out

    other = tmp_path / "other.key"
    generate_key_file(other)
    code, out, err = inspect(capsys, sealed, "--key-file", other)
    assert (code, out) == (1, "") and "criu-shim:" in err and "node-a" in err


def test_truncated_or_flipped_encrypted_archive(tmp_path: Path, archive: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "node-a.key"
    generate_key_file(key_file)
    sealed = _seal(archive, tmp_path / "sealed.tar", key_file)
    data = sealed.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:-100])
    flipped = tmp_path / "flipped.tar"
    flipped.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
    for bad in (cut, flipped):
        code, out, err = inspect(capsys, bad, "--key-file", key_file)
        assert (code, out) == (1, ""), bad
        assert err.startswith("criu-shim: ") and str(bad) in err


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is not a checkpoint archive: not a tar archive"),
    (b"garbage " * 1000, "is not a checkpoint archive: not a tar archive"),
    (b"\x1f\x8b garbage", "is not a checkpoint archive: not a tar archive"),
])
def test_garbage(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str) -> None:
    path = tmp_path / "garbage.tar"
    path.write_bytes(content)
    code, out, err = inspect(capsys, path)
    assert (code, out) == (1, "")
    assert err.startswith(f"criu-shim: {path} {message}")
    assert os.listdir(tmp_path) == ["garbage.tar"]  # nothing written beside it


def test_truncated(tmp_path: Path, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        last = tar.getmembers()[-1]
        no_end_marker = last.offset_data + last.size + (-last.size % 512)
    for cut_at in (700, len(data) // 2, no_end_marker):  # in a member's data, in the pages, the end marker
        archive.write_bytes(data[:cut_at])
        code, out, err = inspect(capsys, archive)
        assert (code, out) == (1, ""), cut_at
        assert err.startswith(f"criu-shim: {archive} is truncated or corrupt: "), err


def test_a_tar_that_is_no_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plain.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(__file__, "x.py")
    code, _, err = inspect(capsys, path)
    assert code == 1
    assert err == (f"criu-shim: {path} is not a checkpoint archive: it has no spec.dump, config.dump, "
                   "checkpoint/inventory.img\n")


def test_not_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    assert inspect(capsys, fifo)[2] == f"criu-shim: {fifo} is not a regular file\n"  # never blocks on it
    assert inspect(capsys, tmp_path)[2] == f"criu-shim: {tmp_path} is not a regular file\n"
    assert inspect(capsys, tmp_path / "none.tar")[2] == f"criu-shim: {tmp_path / 'none.tar'} does not exist\n"


def test_hostile_process_tree_is_reported_not_trusted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    looped = write_checkpoint(tmp_path / "loop.tar", pstree=_pstree((1, 7), (7, 1)))
    code, out, _ = inspect(capsys, looped)
    assert code == 0
    assert "├── Process tree: checkpoint/pstree.img is unreadable: ValueError: the parents of some tasks form a loop" \
        in out
    garbage = write_checkpoint(tmp_path / "garbage.tar", pstree=b"\xff" * 64)
    code, out, _ = inspect(capsys, garbage)
    assert code == 0 and "Process tree: checkpoint/pstree.img is unreadable" in out


def test_plugin_protocol(archive: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["checkpointctl-criu-shim", "--plugin-description"])
    assert cli.checkpointctl_plugin() == 42  # checkpointctl's sign that the plugin describes itself
    assert capsys.readouterr().out.startswith("Inspect criu-shim checkpoints")
    for argv in ([str(archive)], ["inspect", str(archive)]):
        monkeypatch.setattr("sys.argv", ["checkpointctl-criu-shim", *argv])
        assert cli.checkpointctl_plugin() == 0
        assert "├── Engine: containerd" in capsys.readouterr().out


def test_keys_from_the_node_config(tmp_path: Path, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "node-a.key"
    generate_key_file(key_file)
    sealed = _seal(archive, tmp_path / "sealed.tar", key_file)
    signer = ec.generate_private_key(ec.SECP256R1())
    signing.sign_archive(sealed, signer)  # over the ciphertext: checked without the key
    config = tmp_path / "config.toml"
    config.write_text(f'[signing]\ntrusted_keys = ["{public_key(tmp_path, signer)}"]\n'
                      f'[encryption]\nkey_id = "node-a"\nkey_file = "{key_file}"\n')
    code, out, err = inspect(capsys, sealed, "--config", config)
    assert code == 0, err
    assert "├── Signature: verified with" in out and "key id 'node-a'" in out and "[7]  sleep" in out
