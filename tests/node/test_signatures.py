"""Signed checkpoints on a real node: the proxy signs each archive (ARCHIVE.sig, cosign's blob format), a restore
verifies it against the trusted keys, and with require_signature an unsigned, tampered, garbage-signed or
stranger-signed checkpoint is PERMISSION_DENIED before anything is created; loose key files are refused.
criu-shim inspect (and checkpointctl 1.6 through its plugin) shows the real archive; cosign verifies it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shim import signing
from shim.paths_env import load_paths
from tests.node.conftest import Node
from tests.node.pods import Cri, wait_for
from tests.node.proxy_config import proxy_with
from tests.node.test_restore import COUNTER, _restore, _work_dirs, assert_restore_refused

pytestmark = pytest.mark.node
CRIU_SHIM = Path(__file__).resolve().parents[2] / ".venv" / "bin"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """signing.key (0600) with its trusted.pub, and a stranger's key with its public key."""
    made = {}
    for name in ("signing", "stranger"):
        key = ec.generate_private_key(ec.SECP256R1())
        private = tmp_path / f"{name}.key"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        private.chmod(0o600)
        public = tmp_path / f"{name}.pub"
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        public.chmod(0o644)
        made[name], made[f"{name}.pub"] = private, public
    return made


@contextmanager
def copies(node: Node) -> Iterator[list[Path]]:
    """Archives the test makes in the node's checkpoints dir (where restores are allowed from), removed after."""
    made: list[Path] = []
    try:
        yield made
    finally:
        for path in made:
            path.unlink(missing_ok=True)
            signing.signature_path(path).unlink(missing_ok=True)


def _copy(archive: Path, name: str, made: list[Path], signature: bytes | None) -> Path:
    copy = archive.with_name(name)
    made.append(copy)
    shutil.copyfile(archive, copy)
    if signature is not None:
        signing.signature_path(copy).write_bytes(signature)
    return copy


def _checkpoint(client: Cri, node: Node, name: str, made: list[Path]) -> tuple[Path, int]:
    archive = node.dir / "checkpoints" / name
    made.append(archive)
    with client.pod() as pod:
        ctr = client.container(pod, COUNTER, {"INTERVAL_MS": "50", "MEM_MB": "8"})
        # 40 ticks (2 s): more than a counter started afresh would reach by its first read after a restore.
        wait_for(lambda: client.count(ctr) >= 40)
        # Read before the checkpoint: the dump comes after it, so a restore of this memory counts on
        # from at least here (read after, it would include the ticks of the archive's writing and signing).
        counted = client.count(ctr)
        client.checkpoint(ctr, str(archive))
    return archive, counted


def _inspect(archive: Path, *args: str | Path, checkpointctl: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{CRIU_SHIM}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    argv = [str(checkpointctl), "criu-shim"] if checkpointctl else [str(CRIU_SHIM / "criu-shim"), "inspect"]
    return subprocess.run([*argv, str(archive), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_signed_checkpoint_restores_and_every_bad_signature_is_refused(
        client: Cri, node: Node, keys: dict[str, Path]) -> None:
    section = (f'key_file = "{keys["signing"]}"\ntrusted_keys = ["{keys["signing.pub"]}"]\n'
               "require_signature = true\n")
    with proxy_with(node, "signing", section), copies(node) as made:
        archive, counted = _checkpoint(client, node, "signed.tar", made)
        sig = signing.signature_path(archive)
        assert stat.S_IMODE(sig.stat().st_mode) == 0o600
        assert not list(archive.parent.glob(".*.tmp"))

        shown = _inspect(archive, "--trusted-key", keys["signing.pub"])
        assert shown.returncode == 0, shown.stderr
        assert f"├── Signature: verified with {keys['signing.pub']}" in shown.stdout
        assert "├── Engine: containerd" in shown.stdout and "]  counter" in shown.stdout
        assert "Memory pages size: 8." in shown.stdout  # the counter's 8 MiB

        denied = grpc.StatusCode.PERMISSION_DENIED
        unsigned = _copy(archive, "unsigned.tar", made, None)
        assert_restore_refused(client, node, unsigned, denied, f"restore from checkpoint {unsigned} refused by rule "
                               f"signing.require_signature: it is not signed ({unsigned}.sig does not exist)")
        tampered = _copy(archive, "tampered.tar", made, sig.read_bytes())
        with tampered.open("r+b") as f:  # one byte inside the 8 MiB memory image
            f.seek(tampered.stat().st_size // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x40]))
        assert_restore_refused(client, node, tampered, denied, f"its signature {tampered}.sig does not verify with "
                               "any key of signing.trusted_keys", "changed after it was signed")
        garbage = _copy(archive, "garbage-sig.tar", made, b"this is no signature\n")
        assert_restore_refused(client, node, garbage, denied, "its signature is unreadable",
                               f"{garbage}.sig is not a base64 signature")
        stranger = signing.sign_digest(signing.load_signing_key(keys["stranger"]), signing.archive_sha256(archive))
        foreign = _copy(archive, "foreign.tar", made, stranger)
        assert_restore_refused(client, node, foreign, denied, "does not verify with any key of signing.trusted_keys")

        # Last: the relay of a restored container removes its work dir only after the pod has gone, which
        # the refusals above would see as a change of the work dirs.
        with client.pod() as pod:
            ctr = _restore(client, pod, archive)
            assert client.count(ctr) >= counted


def test_loose_signing_key_refuses_the_checkpoint_before_freezing(client: Cri, node: Node,
                                                                  keys: dict[str, Path]) -> None:
    keys["signing"].chmod(0o644)
    with proxy_with(node, "signing", f'key_file = "{keys["signing"]}"\n'), copies(node) as made, client.pod() as pod:
        archive = node.dir / "checkpoints" / "loose-key.tar"
        made.append(archive)
        ctr = client.container(pod, COUNTER, {"INTERVAL_MS": "50"})
        wait_for(lambda: client.count(ctr) >= 1)
        with pytest.raises(grpc.RpcError) as caught:
            client.checkpoint(ctr, str(archive))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"signing.key_file {keys['signing']}: mode 0644 lets others read the private key" in \
            (caught.value.details() or "")
        assert not archive.exists() and not signing.signature_path(archive).exists()
        assert not list(archive.parent.glob(".criu-shim-*"))
        assert client.state(ctr) == "CONTAINER_RUNNING"  # never frozen: it keeps counting
        seen = client.count(ctr)
        wait_for(lambda: client.count(ctr) > seen)


def test_loose_trusted_key_refuses_the_restore(client: Cri, node: Node, keys: dict[str, Path]) -> None:
    with copies(node) as made:
        archive, _ = _checkpoint(client, node, "for-loose-trust.tar", made)
        keys["signing.pub"].chmod(0o666)
        with proxy_with(node, "signing", f'trusted_keys = ["{keys["signing.pub"]}"]\n'):
            assert_restore_refused(client, node, archive, grpc.StatusCode.FAILED_PRECONDITION,
                                   f"signing.trusted_keys {keys['signing.pub']}: mode 0666 lets others replace a "
                                   "trusted key")


@contextmanager
def imported(node: Node, archive: Path, ref: str, tmp_path: Path) -> Iterator[None]:
    """`criu-shim checkpoint-image` of `archive` imported into the node's containerd as `ref`; removed after."""
    layout = tmp_path / f"{archive.name}.oci.tar"
    build = subprocess.run([sys.executable, "-m", "shim", "checkpoint-image", str(archive), "--name", ref,
                            "--out", str(layout)], capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    ctr = Path(load_paths()["CONTAINERD_1_7"]) / "ctr"
    socket = node.containerd.removeprefix("unix://")
    subprocess.run([str(ctr), "--address", socket, "-n", "k8s.io", "images", "import", str(layout)],
                   check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([str(ctr), "--address", socket, "-n", "k8s.io", "images", "rm", ref], capture_output=True,
                       check=False)


def test_signed_checkpoint_image_restores_and_an_unsigned_one_is_refused(
        client: Cri, node: Node, keys: dict[str, Path], tmp_path: Path) -> None:
    section = (f'key_file = "{keys["signing"]}"\ntrusted_keys = ["{keys["signing.pub"]}"]\n'
               "require_signature = true\n")
    signed_ref, unsigned_ref = "localhost/criu-shim/signed-ckpt:1", "localhost/criu-shim/unsigned-ckpt:1"
    with proxy_with(node, "signing", section), copies(node) as made:
        archive, counted = _checkpoint(client, node, "for-image.tar", made)
        unsigned = _copy(archive, "for-image-unsigned.tar", made, None)
        with imported(node, unsigned, unsigned_ref, tmp_path):
            before = _work_dirs(node)
            with client.pod() as pod, pytest.raises(grpc.RpcError) as caught:
                _restore(client, pod, Path(unsigned_ref))
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (f"restore from checkpoint {unsigned_ref} refused by rule signing.require_signature: it is not "
                    "signed (annotation io.criu-shim.checkpoint.archive-signature of image") in \
                (caught.value.details() or "")
            assert _work_dirs(node) == before
        with imported(node, archive, signed_ref, tmp_path), client.pod() as pod:
            ctr = _restore(client, pod, Path(signed_ref))
            assert client.count(ctr) >= counted


def test_encrypted_and_signed(client: Cri, node: Node, keys: dict[str, Path], tmp_path: Path) -> None:
    """An encrypted archive is signed over its ciphertext: verified before it is decrypted, then restored."""
    from shim.sealed.keys import generate_key_file

    sealing = tmp_path / "sealing.key"
    generate_key_file(sealing)
    section = (f'key_file = "{keys["signing"]}"\ntrusted_keys = ["{keys["signing.pub"]}"]\n'
               f'require_signature = true\n\n[encryption]\nenabled = true\nkey_id = "node-a"\nkey_file = "{sealing}"\n')
    with proxy_with(node, "signing", section), copies(node) as made:
        archive, counted = _checkpoint(client, node, "sealed-signed.tar", made)
        shown = _inspect(archive, "--trusted-key", keys["signing.pub"], "--key-file", sealing)
        assert shown.returncode == 0, shown.stderr
        assert "Encryption: sealed (AES-256-GCM, key id 'node-a')" in shown.stdout
        assert f"Signature: verified with {keys['signing.pub']}" in shown.stdout
        tampered = _copy(archive, "sealed-tampered.tar", made, signing.signature_path(archive).read_bytes())
        with tampered.open("r+b") as f:
            f.seek(tampered.stat().st_size // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 1]))
        assert_restore_refused(client, node, tampered, grpc.StatusCode.PERMISSION_DENIED,
                               "changed after it was signed")
        with client.pod() as pod:
            ctr = _restore(client, pod, archive)
            assert client.count(ctr) >= counted


def _peer(key: str, binary: str) -> Path:
    path = Path(load_paths().get(key, "/nonexistent")) / binary
    if not path.exists():
        pytest.skip(f"{path} is not built (scripts/build-peers.py {binary})")
    return path


def test_cosign_and_checkpointctl_read_the_real_archive(client: Cri, node: Node, keys: dict[str, Path]) -> None:
    cosign = _peer("COSIGN_BIN_DIR", "cosign")
    checkpointctl = _peer("CHECKPOINTCTL_PLUGINS_BIN_DIR", "checkpointctl")
    with proxy_with(node, "signing", f'key_file = "{keys["signing"]}"\n'), copies(node) as made:
        archive, _ = _checkpoint(client, node, "for-cosign.tar", made)

        def verify_blob(public: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(cosign), "verify-blob", "--key", str(public), "--signature",
                                   f"{archive}.sig", "--insecure-ignore-tlog", str(archive)],
                                  capture_output=True, text=True, timeout=120, check=False)

        verified = verify_blob(keys["signing.pub"])
        assert verified.returncode == 0 and "Verified OK" in verified.stderr, verified.stderr
        assert verify_blob(keys["stranger.pub"]).returncode != 0

        plugin = _inspect(archive, "--trusted-key", keys["signing.pub"], checkpointctl=checkpointctl)
        assert plugin.returncode == 0, plugin.stderr
        ours = _inspect(archive, "--trusted-key", keys["signing.pub"])
        assert plugin.stdout == ours.stdout
        native = subprocess.run([str(checkpointctl), "inspect", str(archive), "--ps-tree", "--mounts"],
                                capture_output=True, text=True, timeout=120, check=False)
        assert native.returncode == 0, native.stderr
        for label in ("Image: ", "ID: ", "Engine: ", "Checkpoint size: ", "Memory pages size: ", "Process tree",
                      "Destination: "):
            theirs = [line.split("── ", 1)[1] for line in native.stdout.splitlines() if f"── {label}" in line]
            mine = [line.split("── ", 1)[1] for line in ours.stdout.splitlines() if f"── {label}" in line]
            assert theirs and theirs == mine, (label, native.stdout, ours.stdout)
