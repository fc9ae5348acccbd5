#!/usr/bin/env python3
"""Build the test and demo container images without any registry.

Compiles the static C programs in images/src/, takes a static busybox from
Debian's busybox-static package, and writes one OCI image layout tar archive
per image, importable with `ctr -n k8s.io images import <tar>`:

    pause.tar      localhost/criu-shim/pause:1      /pause
    busybox.tar    localhost/criu-shim/busybox:1    /bin/busybox + applet links
    testprogs.tar  localhost/criu-shim/testprogs:1  busybox layer + counter,
                                                    tcpserver, tcpclient, shmcounter

Output (default build/images/): bin/ (compiled programs and busybox), the tar
archives and images.json (a list of {name, ref, tar, file, digest}).
Builds are reproducible (fixed mtimes, uid/gid 0, sorted entries) and
incremental: nothing is rebuilt when the outputs are newer than the inputs.

Usage: python3 scripts/build-images.py [--out DIR] [--busybox PATH] [--force]
Exit codes: 0 ok, 1 build error, 3 no static busybox could be had.
Standard library only; Python >= 3.11.
"""

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # shim.arch: stdlib only, runs on python3
import app_images  # noqa: E402  (scripts/ is not a package)

from shim import oci  # noqa: E402
from shim.arch import go_name  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SRC_DIR = REPO / "images" / "src"
SCRIPT = Path(__file__).resolve()

REPOSITORY = "localhost/criu-shim"
TAG = "1"
PROGRAMS = ("pause", "counter", "tcpserver", "tcpclient", "shmcounter")
TESTPROGS = PROGRAMS[1:]  # in the testprogs image, under /usr/local/bin
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-s")
MTIME = 0  # every file and directory in every archive gets this mtime
CREATED = "1970-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MT_INDEX = oci.OCI_INDEX
MT_MANIFEST = oci.OCI_MANIFEST
MT_CONFIG = oci.OCI_CONFIG
MT_LAYER_GZIP = oci.OCI_LAYER_GZIP

# Applets linked when `busybox --list` cannot be run (e.g. foreign arch).
FALLBACK_APPLETS = [
    "[", "ash", "awk", "basename", "cat", "chmod", "chown", "cp", "cut", "date", "dd",
    "df", "dirname", "du", "echo", "env", "expr", "false", "find", "free", "grep",
    "gunzip", "gzip", "head", "hostname", "id", "ip", "kill", "ln", "ls", "mkdir",
    "mktemp", "mount", "mv", "nc", "netstat", "nproc", "ping", "printf", "ps", "pwd",
    "readlink", "rm", "rmdir", "sed", "seq", "sh", "sleep", "sort", "stat", "tail", "tar",
    "tee", "test", "timeout", "top", "touch", "tr", "true", "umount", "uname", "uniq",
    "usleep", "vi", "wc", "wget", "which", "whoami", "xargs", "yes",
]

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n"


class BuildError(Exception):
    pass


class BusyboxUnavailable(BuildError):
    """No static busybox could be found or downloaded (exit code 3)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def go_arch() -> str:
    """The machine's architecture in OCI/Go spelling (shim.arch owns the table)."""
    return go_name(platform.machine().lower())


def elf_is_static(data: bytes) -> bool:
    """True for an ELF executable with no PT_INTERP program header."""
    if data[:4] != b"\x7fELF":
        return False
    is64, end = data[4] == 2, "<" if data[5] == 1 else ">"
    if is64:
        phoff, = struct.unpack_from(end + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 0x36)
    else:
        phoff, = struct.unpack_from(end + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 0x2A)
    for i in range(phnum):
        p_type, = struct.unpack_from(end + "I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def newer(target: Path, *sources: Path) -> bool:
    """True if target exists and is at least as new as every source."""
    if not target.exists():
        return False
    t = target.stat().st_mtime_ns
    return all(t >= s.stat().st_mtime_ns for s in sources)


# --------------------------------------------------------------- inputs

def compile_programs(bin_dir: Path, force: bool) -> dict[str, Path]:
    gcc = shutil.which("gcc")
    out: dict[str, Path] = {}
    for name in PROGRAMS:
        src, dst = SRC_DIR / f"{name}.c", bin_dir / name
        out[name] = dst
        if not force and newer(dst, src, SCRIPT):
            continue
        if gcc is None:
            raise BuildError("gcc not found (needed to compile images/src/*.c)")
        log(f"compiling {src.relative_to(REPO)}")
        tmp = dst.with_suffix(".tmp")
        res = subprocess.run([gcc, *CFLAGS, "-o", str(tmp), str(src)],
                             check=False, capture_output=True, text=True)
        if res.returncode != 0:
            raise BuildError(f"gcc failed for {src.name}:\n{res.stderr}")
        os.replace(tmp, dst)
    return out


def installed_busybox_static() -> Path | None:
    """/bin/busybox if it comes from an installed busybox-static package."""
    try:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "busybox-static"],
                             check=False, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    if res.returncode == 0 and res.stdout.strip().endswith(" installed"):
        for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
            if p.is_file():
                return p
    return None


def download_busybox_static(dst: Path) -> None:
    """apt-get download busybox-static into a temp dir and extract busybox."""
    with tempfile.TemporaryDirectory(prefix="busybox-static.") as tmp:
        cmd = ["apt-get", "download", "-q", "busybox-static"]
        if os.geteuid() == 0:  # avoid apt's "_apt cannot access" sandbox warning
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        log("downloading Debian package busybox-static")
        try:
            res = subprocess.run(cmd, cwd=tmp, check=False, capture_output=True, text=True)
        except FileNotFoundError:
            raise BusyboxUnavailable("apt-get not found: pass --busybox PATH to a static busybox") from None
        debs = list(Path(tmp).glob("busybox-static_*.deb"))
        if res.returncode != 0 or not debs:
            raise BusyboxUnavailable("apt-get download busybox-static failed (run 'apt-get update'"
                             f" first?):\n{res.stderr.strip()}")
        root = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        for cand in (root / "bin/busybox", root / "usr/bin/busybox"):
            if cand.is_file():
                shutil.copyfile(cand, dst.with_suffix(".tmp"))
                os.replace(dst.with_suffix(".tmp"), dst)
                return
        raise BusyboxUnavailable(f"no busybox binary in {debs[0].name}")


def get_busybox(bin_dir: Path, explicit: Path | None) -> Path:
    """Place a static busybox at bin_dir/busybox (copied only when it changed)."""
    dst = bin_dir / "busybox"
    src = explicit or installed_busybox_static()
    if src is not None:
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
    elif not dst.exists():
        download_busybox_static(dst)
    dst.chmod(0o755)
    if not elf_is_static(dst.read_bytes()):
        raise BuildError(f"{src or dst} is not a static ELF executable")
    return dst


def busybox_applets(busybox: Path) -> list[str]:
    try:
        res = subprocess.run([str(busybox), "--list"], check=False, capture_output=True,
                             text=True, timeout=30)
        names = res.stdout.split() if res.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        names = []
    names = [n for n in names if n != "busybox" and "/" not in n]
    return sorted(set(names or FALLBACK_APPLETS))


# --------------------------------------------------------------- layers

@dataclasses.dataclass(frozen=True)
class Entry:
    path: str              # relative, no leading "/", e.g. "bin/busybox"
    kind: str              # "dir", "file" or "symlink"
    mode: int = 0o755
    data: bytes = b""      # file contents
    target: str = ""       # symlink target


def dirs(*paths: str, mode: int = 0o755) -> list[Entry]:
    return [Entry(p, "dir", mode) for p in paths]


def make_tar(entries: list[Entry]) -> bytes:
    """A reproducible tar: sorted (parents first), mtime MTIME, root-owned."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for e in sorted(entries, key=lambda e: e.path.split("/")):
            ti = tarfile.TarInfo(e.path)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = MTIME, 0, 0, "root", "root"
            ti.mode = e.mode
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif e.kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e.target, 0o777
                tf.addfile(ti)
            else:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
    return buf.getvalue()


@dataclasses.dataclass
class Layer:
    tar: bytes
    blob: bytes  # gzip of tar

    @classmethod
    def of(cls, entries: list[Entry], compresslevel: int = 9) -> "Layer":
        tar = make_tar(entries)
        return cls(tar, gzip.compress(tar, compresslevel=compresslevel, mtime=0))

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.tar).hexdigest()


def pause_layer(bins: dict[str, Path]) -> Layer:
    return Layer.of([Entry("pause", "file", 0o755, bins["pause"].read_bytes())])


def busybox_layer(busybox: Path) -> Layer:
    entries = dirs("bin", "dev", "etc", "proc", "sys", "usr", "usr/bin", "var")
    entries += [Entry("root", "dir", 0o700), Entry("tmp", "dir", 0o1777),
                Entry("bin/busybox", "file", 0o755, busybox.read_bytes()),
                Entry("etc/passwd", "file", 0o644, PASSWD.encode()),
                Entry("etc/group", "file", 0o644, GROUP.encode()),
                Entry("usr/bin/env", "symlink", target="../../bin/busybox")]
    entries += [Entry(f"bin/{a}", "symlink", target="busybox") for a in busybox_applets(busybox)]
    return Layer.of(entries)


def testprogs_layer(bins: dict[str, Path]) -> Layer:
    entries = dirs("usr", "usr/local", "usr/local/bin")
    entries += [Entry(f"usr/local/bin/{p}", "file", 0o755, bins[p].read_bytes())
                for p in TESTPROGS]
    return Layer.of(entries)


# --------------------------------------------------------------- images

def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def descriptor(media_type: str, blob: bytes) -> dict:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
            "size": len(blob)}


def write_image(out: Path, ref: str, layers: list[tuple[str, Layer]],
                entrypoint: list[str] | None, cmd: list[str] | None) -> str:
    """Write an OCI layout tar for one image; return the manifest digest."""
    arch = go_arch()
    container_config: dict = {"Env": [PATH_ENV], "WorkingDir": "/"}
    if entrypoint:
        container_config["Entrypoint"] = entrypoint
    if cmd:
        container_config["Cmd"] = cmd
    config = canonical_json({
        "architecture": arch, "os": "linux", "created": CREATED,
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for _, layer in layers]},
        "history": [{"created": CREATED, "created_by": f"scripts/build-images.py: {what}"}
                    for what, _ in layers],
    })
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": descriptor(MT_CONFIG, config),
        "layers": [descriptor(MT_LAYER_GZIP, layer.blob) for _, layer in layers],
    })
    mdesc = descriptor(MT_MANIFEST, manifest)
    mdesc["platform"] = {"architecture": arch, "os": "linux"}
    mdesc["annotations"] = {oci.CONTAINERD_IMAGE_NAME: ref, oci.REF_NAME: ref.rsplit(":", 1)[1]}
    index = canonical_json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [mdesc]})

    blobs = {descriptor("", b)["digest"].split(":")[1]: b
             for b in [config, manifest] + [layer.blob for _, layer in layers]}
    # Docker-style manifest.json too, so `docker load`/`podman load` accept the
    # archive; containerd prefers the OCI layout when oci-layout is present.
    docker_manifest = canonical_json([{
        "Config": "blobs/sha256/" + hashlib.sha256(config).hexdigest(),
        "RepoTags": [ref],
        "Layers": ["blobs/sha256/" + hashlib.sha256(layer.blob).hexdigest() for _, layer in layers],
    }])
    entries = dirs("blobs", "blobs/sha256")
    entries += [Entry(f"blobs/sha256/{h}", "file", 0o644, b) for h, b in blobs.items()]
    entries += [Entry("oci-layout", "file", 0o644, canonical_json({"imageLayoutVersion": "1.0.0"})),
                Entry("index.json", "file", 0o644, index),
                Entry("manifest.json", "file", 0o644, docker_manifest)]
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(make_tar(entries))
    os.replace(tmp, out)
    return mdesc["digest"]


def read_digest(tar_path: Path) -> str | None:
    """Manifest digest of an existing archive, or None if unreadable."""
    try:
        with tarfile.open(tar_path) as tf:
            f = tf.extractfile("index.json")
            return json.load(f)["manifests"][0]["digest"] if f else None
    except (OSError, tarfile.TarError, KeyError, IndexError, ValueError):
        return None


def app_layer(files: list[app_images.File]) -> Layer:
    # Level 1: these layers are tens of MiB of libraries; level 9 would triple the build time.
    return Layer.of([Entry(f.path, f.kind, f.mode, f.data, f.target) for f in files], compresslevel=1)


def app_specs(out_dir: Path, busybox: Path, busybox_layer_of) -> list:
    """PostgreSQL, nginx and Redis from Debian's packages (scripts/app_images.py), on busybox."""
    staged: dict[str, app_images.AppImage] = {}

    def app(name: str) -> app_images.AppImage:
        if not staged:  # download and unpack only when an app image is (re)built
            staged.update((a.name, a) for a in app_images.build(out_dir / "apps"))
        return staged[name]

    def layers(name: str):
        return lambda: [("busybox", busybox_layer_of()), (f"{name} from Debian packages", app_layer(app(name).files))]

    return [(name, [busybox, *app_images.inputs()], layers(name), None, app_images.CMDS[name])
            for name in app_images.NAMES]


def build(out_dir: Path, busybox_path: Path | None = None, force: bool = False) -> list[dict]:
    bin_dir = out_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    bins = compile_programs(bin_dir, force)
    for path in bins.values():
        if not elf_is_static(path.read_bytes()):
            raise BuildError(f"{path} is not statically linked")
    busybox = get_busybox(bin_dir, busybox_path)

    cache: dict[str, Layer] = {}

    def layer(key: str, make) -> Layer:
        if key not in cache:
            cache[key] = make()
        return cache[key]

    specs = [  # name, inputs, layers factory, entrypoint, cmd
        ("pause", [bins["pause"]],
         lambda: [("pause", layer("pause", lambda: pause_layer(bins)))], ["/pause"], None),
        ("busybox", [busybox],
         lambda: [("busybox", layer("busybox", lambda: busybox_layer(busybox)))], None, ["/bin/sh"]),
        ("testprogs", [busybox, *(bins[p] for p in TESTPROGS)],
         lambda: [("busybox", layer("busybox", lambda: busybox_layer(busybox))),
                  ("testprogs", layer("testprogs", lambda: testprogs_layer(bins)))],
         None, ["/usr/local/bin/counter"]),
    ]
    specs += app_specs(out_dir, busybox, lambda: layer("busybox", lambda: busybox_layer(busybox)))
    results = []
    for name, inputs, layers, entrypoint, cmd in specs:
        ref = f"{REPOSITORY}/{name}:{TAG}"
        tar_path = out_dir / f"{name}.tar"
        digest = None
        if not force and newer(tar_path, *inputs, SCRIPT):
            digest = read_digest(tar_path)
        if digest is None:
            digest = write_image(tar_path, ref, layers(), entrypoint, cmd)
        results.append({"name": name, "ref": ref, "tar": str(tar_path.resolve()),
                         "file": tar_path.name, "digest": digest})
        if name in app_images.NAMES:
            # 45 MiB that most node tests never use: `node up` skips them, their tests import them.
            results[-1]["on_demand"] = True

    manifest = out_dir / "images.json"
    text = json.dumps(results, indent=2) + "\n"
    if not manifest.exists() or manifest.read_text() != text:
        manifest.write_text(text)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "build" / "images",
                    help="output directory (default: build/images)")
    ap.add_argument("--busybox", type=Path, default=None,
                    help="use this static busybox binary instead of busybox-static")
    ap.add_argument("--force", action="store_true", help="rebuild everything")
    args = ap.parse_args(argv)
    try:
        results = build(args.out, args.busybox, args.force)
    except BuildError as e:
        log(f"build-images: error: {e}")
        return 3 if isinstance(e, BusyboxUnavailable) else 1
    for r in results:
        print(f"{r['name']:10} {r['ref']:34} {r['digest']}  {r['tar']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
