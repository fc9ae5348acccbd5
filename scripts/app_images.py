"""Real-application images (PostgreSQL 15, nginx 1.22, Redis 7.0) from Debian's own packages.

Used by scripts/build-images.py. Every package of scripts/app-packages.lock is downloaded
(`apt-get download pkg=version`, cached in CRIU_SHIM_DEB_CACHE like scripts/setup-host.sh does)
and unpacked with `dpkg-deb -x` into one staging tree; no package is installed on the host and
no maintainer script runs. Each image then takes its programs, their data files and the
shared libraries they load: the staged dynamic loader lists each program's libraries
(`ld.so --library-path STAGE --list`), so the image holds exactly what runs, and a library
that is not in the lock fails the build and names itself.

The images sit on the busybox layer (a shell for the start script and for exec in tests).
Users: postgres (999), redis (998), www-data (33), as Debian's packages would create them.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "scripts" / "app-packages.lock"
CONFIG_DIR = REPO / "images" / "apps"
PATHS_ENV = REPO / "scripts" / "paths.env"
SCRIPT = Path(__file__).resolve()

LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
LOADER = "lib64/ld-linux-x86-64.so.2"
PG = "usr/lib/postgresql/15"
# PostgreSQL modules left out: JIT needs LLVM (about 100 MB), the others libraries the
# tests never load (libxslt, libselinux, libuuid).
PG_MODULES_LEFT_OUT = ("llvmjit.so", "llvmjit_types.bc", "pgxml.so", "sepgsql.so", "uuid-ossp.so")

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "www-data:x:33:33:www-data:/var/www:/bin/false\n"
    "redis:x:998:998:Redis:/var/lib/redis:/bin/false\n"
    "postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = ("root:x:0:\ndaemon:x:1:\nwww-data:x:33:\nredis:x:998:\npostgres:x:999:\nnogroup:x:65534:\n")
BLOB_SIZE = 2 << 20  # the file nginx serves in the tests

NAMES = ("postgres", "nginx", "redis")
CMDS = {
    "postgres": ["/usr/local/bin/postgres-start"],
    # -e: nginx opens its compiled-in error log before reading the configuration.
    "nginx": ["/usr/sbin/nginx", "-e", "stderr", "-g", "daemon off;"],
    "redis": ["/usr/bin/redis-server", "/etc/redis/redis.conf"],
}


class AppBuildError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class File:
    """One layer entry, as build-images.py's Entry: kind is "dir", "file" or "symlink"."""
    path: str
    kind: str
    mode: int = 0o755
    data: bytes = b""
    target: str = ""


@dataclasses.dataclass(frozen=True)
class AppImage:
    name: str
    files: list[File]


def inputs() -> list[Path]:
    """What the app images are made from: rebuilt when any is newer than the image."""
    return [LOCK, SCRIPT, *sorted(CONFIG_DIR.iterdir())]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------- packages

def locked_packages() -> list[tuple[str, str, str]]:
    rows = []
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            package, suite, version = line.split()
            rows.append((package, suite, version))
    return rows


def deb_cache() -> Path:
    for line in PATHS_ENV.read_text().splitlines():
        if line.startswith("CRIU_SHIM_DEB_CACHE="):
            return Path(line.split("=", 1)[1].strip())
    raise AppBuildError(f"CRIU_SHIM_DEB_CACHE missing from {PATHS_ENV}")


def cached_deb(cache: Path, package: str, version: str) -> Path | None:
    found = sorted(cache.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
    return found[0] if found else None


def apt_download(cache: Path, specs: list[str]) -> bool:
    cmd = ["apt-get", "download", "-qq", *specs]
    if os.geteuid() == 0:  # apt's _apt sandbox user cannot write root's cache
        cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
    return subprocess.run(cmd, cwd=cache, capture_output=True, text=True).returncode == 0


def suite_version(package: str, suite: str) -> str | None:
    out = subprocess.run(["apt-cache", "madison", package], capture_output=True, text=True).stdout
    for row in out.splitlines():  # " pkg | version | http://... bookworm-security/main amd64 Packages"
        cols = [c.strip() for c in row.split("|")]
        where = cols[2].split() if len(cols) >= 3 else []
        if len(where) >= 2 and where[1].split("/")[0] in (suite, f"{suite}-security", f"{suite}-updates"):
            return cols[1]
    return None


def fetch_debs(cache: Path) -> list[Path]:
    """The locked .debs, downloading what the cache lacks (one apt run for all of them)."""
    cache.mkdir(parents=True, exist_ok=True)
    rows = locked_packages()
    missing = [f"{p}={v}" for p, _, v in rows if cached_deb(cache, p, v) is None]
    if missing:
        log(f"downloading {len(missing)} Debian packages for the app images into {cache}")
        apt_download(cache, missing)
    debs = []
    for package, suite, version in rows:
        deb = cached_deb(cache, package, version)
        if deb is None and not apt_download(cache, [f"{package}={version}"]):
            # A point release replaced the pin: take the suite's current one, loudly.
            current = suite_version(package, suite)
            if current is None or not apt_download(cache, [f"{package}={current}"]):
                raise AppBuildError(f"cannot download {package}={version} ({suite}); run `apt-get update`?")
            log(f"WARNING: {package}={version} ({suite}) left the mirror; using {current}. "
                f"Update {LOCK.relative_to(REPO)}.")
            version = current
        deb = cached_deb(cache, package, version)
        if deb is None:
            raise AppBuildError(f"no .deb for {package}={version} in {cache}")
        debs.append(deb)
    return debs


def stage(debs: list[Path], stage_dir: Path) -> Path:
    """Unpack every .deb into stage_dir/root (reused while the set of .debs is the same)."""
    stamp = hashlib.sha256("\n".join(d.name for d in debs).encode()).hexdigest()
    root, stamp_file = stage_dir / "root", stage_dir / "root.stamp"
    if root.is_dir() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return root
    shutil.rmtree(root, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix="root.", dir=stage_dir))
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    os.replace(tmp, root)
    stamp_file.write_text(stamp)
    return root


# --------------------------------------------------------------- closure

def libraries(root: Path, program: str) -> set[str]:
    """Paths (relative to root) of the shared libraries `program` loads, via the staged loader."""
    search = ":".join(str(root / d) for d in LIBRARY_DIRS)
    res = subprocess.run([str(root / LOADER), "--library-path", search, "--list", str(root / program)],
                         capture_output=True, text=True)
    found: set[str] = set()
    for line in res.stdout.splitlines():
        if "=>" not in line:
            continue
        name, _, where = line.strip().partition(" => ")
        path = where.rsplit(" (", 1)[0].strip()
        if path == "not found" or not path.startswith(f"{root}/"):
            raise AppBuildError(f"{program} needs {name}, which no package of "
                                f"{LOCK.relative_to(REPO)} provides (resolved: {path})")
        found.add(os.path.relpath(path, root))
    if res.returncode != 0 and not found:
        raise AppBuildError(f"the staged loader cannot list {program}: {res.stderr.strip()}")
    return found


class Tree:
    """The files of one image, taken from the staging root with their parents and link targets."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, File] = {}

    def add(self, rel: str) -> None:
        rel = rel.strip("/")
        if rel in self.files:
            return
        self._parents(rel)
        src = self.root / rel
        if src.is_symlink():
            target = os.readlink(src)
            self.files[rel] = File(rel, "symlink", target=target)
            resolved = target.lstrip("/") if target.startswith("/") else os.path.normpath(
                os.path.join(os.path.dirname(rel), target))
            if os.path.lexists(self.root / resolved):  # zoneinfo/localtime points at the host's file
                self.add(resolved)
        elif src.is_dir():
            self.files[rel] = File(rel, "dir", 0o755)
            for child in sorted(src.iterdir()):
                self.add(f"{rel}/{child.name}")
        else:
            self.files[rel] = File(rel, "file", src.stat().st_mode & 0o755, src.read_bytes())

    def add_program(self, rel: str) -> None:
        self.add(rel)
        for lib in sorted(libraries(self.root, rel)):
            self.add(lib)

    def put(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(rel)
        self.files[rel] = File(rel, "file", mode, data)

    def _parents(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self.files:
                mode = 0o1777 if parent == "tmp" else 0o755
                self.files[parent] = File(parent, "dir", mode)

    def entries(self) -> list[File]:
        return list(self.files.values())


def base(root: Path) -> Tree:
    tree = Tree(root)
    tree.add(LOADER)
    tree.put("etc/passwd", PASSWD.encode())
    tree.put("etc/group", GROUP.encode())
    return tree


def blob() -> bytes:
    """BLOB_SIZE bytes that do not compress (so sendfile and the page cache carry real data)."""
    out = bytearray()
    for counter in range(BLOB_SIZE // 64):
        out += hashlib.blake2b(counter.to_bytes(8, "little"), digest_size=64).digest()
    return bytes(out)


def redis(root: Path) -> AppImage:
    tree = base(root)
    tree.add("usr/bin/redis-server")
    tree.add_program("usr/bin/redis-check-rdb")  # redis-server links to it
    tree.put("etc/redis/redis.conf", (CONFIG_DIR / "redis.conf").read_bytes())
    return AppImage("redis", tree.entries())


def nginx(root: Path) -> AppImage:
    tree = base(root)
    tree.add_program("usr/sbin/nginx")
    tree.add("etc/nginx/mime.types")
    tree.put("etc/nginx/nginx.conf", (CONFIG_DIR / "nginx.conf").read_bytes())
    tree.put("srv/www/blob.bin", blob())
    return AppImage("nginx", tree.entries())


def postgres(root: Path) -> AppImage:
    tree = base(root)
    for program in ("postgres", "initdb"):
        tree.add_program(f"{PG}/bin/{program}")
    for module in sorted((root / PG / "lib").iterdir()):
        if module.name.endswith(".so") and module.name not in PG_MODULES_LEFT_OUT:
            tree.add_program(f"{PG}/lib/{module.name}")
    share = root / "usr/share/postgresql/15"
    for item in sorted(share.iterdir()):
        if item.name != "man":
            tree.add(f"usr/share/postgresql/15/{item.name}")
    tree.add("usr/share/zoneinfo")  # Debian builds with --with-system-tzdata
    tree.put("usr/local/bin/postgres-start", (CONFIG_DIR / "postgres-start.sh").read_bytes(), 0o755)
    return AppImage("postgres", tree.entries())


def build(stage_dir: Path) -> list[AppImage]:
    """Stage the locked packages and make the three images' file lists."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    root = stage(fetch_debs(deb_cache()), stage_dir)
    return [postgres(root), nginx(root), redis(root)]
