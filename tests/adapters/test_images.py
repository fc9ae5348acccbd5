"""Checks of scripts/build-images.py and the OCI image archives it writes.

Builds into temporary directories (no root, no containerd): archive layout,
digests, diff_ids, static binaries, reproducibility, and a short run of the
test programs (loopback only).
"""
import gzip
import hashlib
import io
import json
import platform
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from shim.arch import go_name

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build-images.py"
ARCH = go_name(platform.machine())
IMAGES = {
    "pause": ("localhost/criu-shim/pause:1", ["/pause"], None),
    "busybox": ("localhost/criu-shim/busybox:1", None, ["/bin/sh"]),
    "testprogs": ("localhost/criu-shim/testprogs:1", None, ["/usr/local/bin/counter"]),
}
# Built from Debian's packages (scripts/app_images.py), imported only by the tests that use them.
APP_IMAGES = ("postgres", "nginx", "redis")

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None,
                                reason="gcc is not installed (needed to compile images/src/*.c)")


def run_build(out: Path) -> list[dict]:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
    cached = REPO / "build" / "images" / "bin" / "busybox"  # avoid a download per test run
    if cached.is_file():
        cmd += ["--busybox", str(cached)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    if res.returncode == 3:
        pytest.skip(f"no static busybox available: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == len(IMAGES) + len(APP_IMAGES), res.stdout
    return json.loads((out / "images.json").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("images")
    return out, run_build(out)


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def blob(files: dict[str, bytes], digest: str) -> bytes:
    algo, hexd = digest.split(":")
    assert algo == "sha256"
    return files[f"blobs/sha256/{hexd}"]


def image_parts(path: Path) -> tuple[dict, dict, dict, list[bytes]]:
    """index, manifest, config and the gzip layer blobs of one archive."""
    files = read_archive(path)
    index = json.loads(files["index.json"])
    manifest = json.loads(blob(files, index["manifests"][0]["digest"]))
    config = json.loads(blob(files, manifest["config"]["digest"]))
    layers = [blob(files, d["digest"]) for d in manifest["layers"]]
    return index, manifest, config, layers


def layer_members(layer: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tf:
        for m in tf.getmembers():
            out[m.name] = (m, tf.extractfile(m).read() if m.isfile() else b"")
    return out


def elf_static(data: bytes) -> bool:
    """ELF64 little-endian executable without a PT_INTERP program header."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 not in types and 1 in types  # no PT_INTERP, has PT_LOAD


def test_images_json(built: tuple[Path, list[dict]]) -> None:
    out, images = built
    assert [i["name"] for i in images] == [*IMAGES, *APP_IMAGES]
    assert [i["name"] for i in images if i.get("on_demand")] == list(APP_IMAGES)
    for img in images:
        assert img["ref"] == (IMAGES[img["name"]][0] if img["name"] in IMAGES
                              else f"localhost/criu-shim/{img['name']}:1")
        assert Path(img["tar"]) == (out / img["file"]).resolve()
        index = json.loads(read_archive(Path(img["tar"]))["index.json"])
        assert index["manifests"][0]["digest"] == img["digest"]


@pytest.mark.parametrize("name", list(IMAGES))
def test_archive_layout(built: tuple[Path, list[dict]], name: str) -> None:
    out, _ = built
    ref, entrypoint, cmd = IMAGES[name]
    files = read_archive(out / f"{name}.tar")
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    # Every blob is named by its content's digest.
    for fname, data in files.items():
        if fname.startswith("blobs/"):
            assert fname == "blobs/sha256/" + hashlib.sha256(data).hexdigest()

    index = json.loads(files["index.json"])
    assert index["schemaVersion"] == 2
    assert len(index["manifests"]) == 1
    mdesc = index["manifests"][0]
    assert mdesc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert mdesc["annotations"] == {"io.containerd.image.name": ref,
                                    "org.opencontainers.image.ref.name": "1"}
    assert mdesc["platform"] == {"architecture": ARCH, "os": "linux"}
    mbytes = blob(files, mdesc["digest"])
    assert len(mbytes) == mdesc["size"]

    manifest = json.loads(mbytes)
    assert manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    cbytes = blob(files, manifest["config"]["digest"])
    assert len(cbytes) == manifest["config"]["size"]
    config = json.loads(cbytes)
    assert config["architecture"] == ARCH and config["os"] == "linux"
    assert config["rootfs"]["type"] == "layers"
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"]) == len(config["history"])
    for ldesc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        assert ldesc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        layer = blob(files, ldesc["digest"])
        assert len(layer) == ldesc["size"]
        assert diff_id == "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    c = config["config"]
    assert any(e.startswith("PATH=") and "/usr/local/bin" in e for e in c["Env"])
    assert c.get("Entrypoint") == entrypoint
    assert c.get("Cmd") == cmd

    docker = json.loads(files["manifest.json"])  # docker/podman load compatibility
    assert docker[0]["RepoTags"] == [ref]
    assert docker[0]["Config"] == "blobs/sha256/" + manifest["config"]["digest"][7:]


@pytest.mark.parametrize("name", list(IMAGES))
def test_layers_reproducible_metadata(built: tuple[Path, list[dict]], name: str) -> None:
    out, _ = built
    *_, layers = image_parts(out / f"{name}.tar")
    for layer in layers:
        members = layer_members(layer)
        names = list(members)
        assert names == sorted(names, key=lambda n: n.split("/"))
        for info, _ in members.values():
            assert (info.uid, info.gid, info.mtime) == (0, 0, 0), info.name
            assert not info.name.startswith(("/", "./"))


def test_pause_image(built: tuple[Path, list[dict]]) -> None:
    out, _ = built
    *_, layers = image_parts(out / "pause.tar")
    assert len(layers) == 1
    members = layer_members(layers[0])
    assert list(members) == ["pause"]
    info, data = members["pause"]
    assert info.isfile() and info.mode == 0o755
    assert elf_static(data)


def test_busybox_image(built: tuple[Path, list[dict]]) -> None:
    out, _ = built
    *_, layers = image_parts(out / "busybox.tar")
    assert len(layers) == 1
    members = layer_members(layers[0])
    info, data = members["bin/busybox"]
    assert info.mode == 0o755 and elf_static(data)
    for applet in ("sh", "ls", "cat", "echo", "sleep", "date", "wc", "head", "tail", "grep",
                   "ps", "ip", "nc", "touch", "rm", "mkdir", "env", "true", "false", "id",
                   "hostname", "kill"):
        info, _ = members[f"bin/{applet}"]
        assert info.issym() and info.linkname == "busybox", applet
    assert members["tmp"][0].isdir() and members["tmp"][0].mode == 0o1777
    assert members["etc/passwd"][1].startswith(b"root:x:0:0:")
    assert b"root:x:0:" in members["etc/group"][1]


def test_testprogs_image(built: tuple[Path, list[dict]]) -> None:
    out, _ = built
    _, bb_manifest, _, _ = image_parts(out / "busybox.tar")
    _, manifest, _, layers = image_parts(out / "testprogs.tar")
    assert len(layers) == 2
    # The busybox layer is shared with busybox.tar.
    assert manifest["layers"][0]["digest"] == bb_manifest["layers"][0]["digest"]
    members = layer_members(layers[1])
    for prog in ("counter", "tcpserver", "tcpclient"):
        info, data = members[f"usr/local/bin/{prog}"]
        assert info.mode == 0o755 and elf_static(data), prog


def test_reproducible_and_incremental(built: tuple[Path, list[dict]], tmp_path: Path) -> None:
    out, images = built
    again = run_build(tmp_path / "again")
    assert [i["digest"] for i in again] == [i["digest"] for i in images]
    for img in images:
        assert (out / img["file"]).read_bytes() == (tmp_path / "again" / img["file"]).read_bytes()
    # A second run over up-to-date outputs rewrites nothing.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*") if p.is_file()}
    run_build(tmp_path / "again")
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*") if p.is_file()}
    assert before == after


def test_counter_runs(built: tuple[Path, list[dict]], tmp_path: Path) -> None:
    out, _ = built
    env = {"MAX_COUNT": "3", "INTERVAL_MS": "1", "EXIT_CODE": "5", "MEM_MB": "2",
           "COUNT_FILE": str(tmp_path / "count")}
    res = subprocess.run([str(out / "bin" / "counter")], env=env, check=False,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 5
    assert res.stdout.splitlines() == ["count=1", "count=2", "count=3"]
    assert (tmp_path / "count").read_text() == "3\n"
    assert "counter: exit code=5 count=3" in res.stderr


def test_tcpserver_and_client_run(built: tuple[Path, list[dict]]) -> None:
    out, _ = built
    server = subprocess.Popen([str(out / "bin" / "tcpserver")],
                              env={"PORT": "0", "BIND_ADDR": "127.0.0.1"},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        first = server.stdout.readline().split()
        assert first[:2] == ["tcpserver:", "listening"], first
        port = int(first[2].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            f = s.makefile("rwb")
            for n in (1, 2):
                f.write(b"hello\n")
                f.flush()
                assert f.readline() == f"conn={n} total={n}\n".encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.sendto(b"x", ("127.0.0.1", port))
            assert u.recv(100) == b"udp total=3\n"
        res = subprocess.run([str(out / "bin" / "tcpclient"), "127.0.0.1", str(port)],
                             env={"COUNT": "2", "INTERVAL_MS": "1"}, check=False,
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stdout + res.stderr
        lines = [ln.split(" ", 1)[1] for ln in res.stdout.splitlines()]
        assert lines[0].startswith(f"connected 127.0.0.1:{port} ")
        assert lines[1].startswith("seq=1 ") and lines[1].endswith("reply=conn=1 total=4")
        assert lines[2].endswith("reply=conn=2 total=5")
        assert lines[3] == "done sent=2"
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0
        assert server.stdout is not None
        server.stdout.close()
