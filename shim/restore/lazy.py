"""Lazy restore, proxy side: copy out of the archive only the pages CRIU reads itself.

What really has to be copied for a restore? A restore that reads the memory
image into the new process before it runs pays twice per page: once out of
the archive into a file, once from the file into memory. A lazy restore
(CRIU's userfaultfd post-copy) needs neither up front: the restoring CRIU
reads only the few runs without PE_LAZY, and the process runs while
`criu lazy-pages` fills in the rest, on demand first, then in the background.

So at CreateContainer a large `pages-N.img` of an uncompressed archive is not
unpacked. Its file is created sparse, the eager runs (a handful of pages,
`shim.restore.pagemap`) are copied into it at their offsets, and a read-only
loop device over the member's bytes in the archive gives the page daemon the
whole image in place. The relay (`shim.runtime.lazy_daemon`) runs the daemon
and releases the devices; `lazy-pages.json` in the work dir tells it what to do.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from shim.archive_layout import IMAGES_DIR
from shim.config import PAGE_DAEMON_CRIU, PAGE_DAEMON_OURS
from shim.errors import InvalidArgument
from shim.fileio import kernel_copy
from shim.handoff import LAZY_CRIU_OPTION, LAZY_PLAN, REMOTE_PAGES_SUFFIX
from shim.restore import loopdev, pagemap
from shim.restore.image import LAYER_SUFFIX, layer_path
from shim.restore.unseal import PLAIN_SUFFIX, plaintext_path
from shim.restore.unseal_lazy import PartlyDecrypted

PLAN_FILE = LAZY_PLAN
CRIU_OPTION = LAZY_CRIU_OPTION
# Smaller images are copied whole: a loop device costs more than copying a few MiB.
DEFER_MIN_SIZE = 4 << 20
_PAGES = re.compile(re.escape(IMAGES_DIR) + r"/pages-([0-9]{1,9})\.img")
# A task's pagemap, and a shared memory segment's (its pages in their own pages-N.img, all eager).
_PAGEMAP = re.compile(r"pagemap-(?:shmem-)?[0-9]{1,20}\.img")
_MAX_PAGEMAP = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[0-9a-f]{16,128}")
# A lazy migration's tunnel listens on the node's loopback only (shim.migrate.receiver).
PAGE_SERVER_ADDRESS = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Deferred:
    """An archive member left in the archive: its name in the work dir, and where its data is."""

    name: str
    offset: int
    size: int


def deferrable(name: str, size: int) -> bool:
    """Whether a member of an uncompressed archive stays in the archive under a lazy restore."""
    return size >= DEFER_MIN_SIZE and _PAGES.fullmatch(name.removeprefix("./")) is not None


def tag_prefix(work_root: Path) -> str:
    """The loop-device tag prefix of one restore work root (one node)."""
    return hashlib.sha256(str(work_root).encode()).hexdigest()[:8] + "/"


def tag(work: Path) -> str:
    return tag_prefix(work.parent) + work.name


def prepare(archive: Path, work: Path, deferred: tuple[Deferred, ...], criu: Path,
            daemon: str = PAGE_DAEMON_CRIU, sealed: PartlyDecrypted | None = None) -> None:
    """Copy the eager runs of each deferred image, say where the rest is, write the relay's plan.

    Our page daemon (`daemon` "criu-shim", shim.runtime.page_daemon) maps each image where it
    lies in the archive; CRIU's reads it through a read-only loop device attached here.
    `work` is the unpacked checkpoint; on failure every device attached here is released.
    `sealed`: `archive` is the partly decrypted copy of a sealed archive (shim.restore.unseal_lazy),
    whose images our daemon serves by decrypting the sealed archive's chunks (the restorer checked its
    holes against `deferred`).
    """
    maps = _pagemaps(work / IMAGES_DIR)
    pages: list[dict[str, object]] = []
    try:
        for member in deferred:
            _fill_eager(archive, work, member, maps, sealed)
            if sealed is not None:
                pages.append(_in_sealed(sealed, work, member))
                continue
            _read_ahead(archive, member)
            if daemon == PAGE_DAEMON_OURS:
                pages.append(_in_place(archive, work, member))
                continue
            device = loopdev.attach_read_only(archive, member.offset, member.size, tag(work))
            pages.append({"image": Path(member.name).name, "device": device})
        _write_plan(work, {"criu": str(criu), "daemon": daemon, "pages": pages})
    except BaseException:
        release(work)
        raise


def _write_plan(work: Path, plan: dict[str, object]) -> None:
    temp = work / f"{PLAN_FILE}.tmp"  # atomic: a relay may read it at any time
    temp.write_text(json.dumps(plan))
    os.replace(temp, work / PLAN_FILE)


def remote_pages_file(archive: Path) -> Path:
    """Where the migration receiver names the port serving a lazy migration's memory (shim.handoff)."""
    return archive.with_name(archive.name + REMOTE_PAGES_SUFFIX)


def plan_remote(archive: Path, work: Path, criu: Path | None, daemon: str = PAGE_DAEMON_CRIU) -> bool:
    """A lazy migration's restore: plan a page daemon that asks the source's page server (through the
    receiver's tunnel) for the memory no image holds. False when every page is in the images.
    `daemon`: ours (shim.runtime.page_daemon with shim.restore.remote_pages) or `criu lazy-pages --page-server`.

    A dump of CRIU's `--lazy-pages` leaves lazy runs without data (PE_LAZY, not PE_PRESENT): restored
    without their page server they would read as zeros, so such an archive is refused unless the
    receiver named one beside it.
    """
    if not any(r.lazy and not r.present for m in _pagemaps(work / IMAGES_DIR).values() for r in m.runs):
        return False
    server = _remote_server(remote_pages_file(archive))
    if criu is None:
        raise InvalidArgument("a lazy migration's checkpoint needs CRIU's lazy-pages daemon; no CRIU is configured")
    if "tls" in server and daemon != PAGE_DAEMON_OURS:
        raise InvalidArgument("the migration receiver named the source's page end itself, which only criu-shim's "
                              f"page daemon reaches, and this node's restore.page_daemon is {daemon!r}: give the "
                              "receiver and the proxy the same config")
    _write_plan(work, {"criu": str(criu), "daemon": daemon, "pages": [], "page_server": server})
    return True


def remote(work: Path) -> bool:
    """Whether the plan in `work` asks a page server (a lazy migration's restore)."""
    try:
        return "page_server" in json.loads((work / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return False


def _remote_server(path: Path) -> dict[str, object]:
    """The page server a lazy migration's receiver named (shim.handoff REMOTE_PAGES_SUFFIX): the tunnel's
    loopback port, or the source's page end (address, port) with the pinned TLS to reach it."""
    missing = InvalidArgument(
        "the checkpoint's memory is not in it (a lazy migration's dump: its pages are served by the source "
        "node during that migration only); it can be restored only by `criu-shim migrate-receiver`")
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise missing from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise InvalidArgument(f"{path} is not root's private file: refusing the page server it names")
    try:
        named = json.loads(path.read_text())
        port = named.get("port")
        tls = named.get("tls")
    except (OSError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"{path} is malformed: {exc}") from None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise InvalidArgument(f"{path}: port {port!r:.20} out of range")
    if tls is None:
        return {"address": PAGE_SERVER_ADDRESS, "port": port}
    return {"address": _ip(path, named.get("address")), "port": port, "tls": _pinned(path, tls)}


def _ip(path: Path, value: object) -> str:
    try:
        return str(ipaddress.ip_address(value if isinstance(value, str) else ""))
    except ValueError:
        raise InvalidArgument(f"{path}: address {value!r:.40} is not an IP address") from None


def _pinned(path: Path, tls: object) -> dict[str, object]:
    """How the page daemon reaches the source's page end: this node's credentials (absolute paths), the
    source's certificate (SHA-256), the migration's token and the idle timeout (shim.restore.remote_pages)."""
    if not isinstance(tls, dict):
        raise InvalidArgument(f"{path}: tls is not an object")
    for key in ("cert", "key", "ca"):
        value = tls.get(key)
        if not isinstance(value, str) or not value.startswith("/") or "\0" in value or len(value) > 4096:
            raise InvalidArgument(f"{path}: tls.{key} {value!r:.40} is not an absolute path")
    for key, pattern in (("certificate", _SHA256), ("token", _TOKEN)):
        value = tls.get(key)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise InvalidArgument(f"{path}: tls.{key} {value!r:.40} is malformed")
    idle = tls.get("idle")
    if not isinstance(idle, int | float) or isinstance(idle, bool) or not 0 < idle <= 3600:
        raise InvalidArgument(f"{path}: tls.idle {idle!r:.20} out of range (0, 3600] seconds")
    return {k: tls[k] for k in ("cert", "key", "ca", "certificate", "token", "idle")}


def _in_place(archive: Path, work: Path, member: Deferred) -> dict[str, object]:
    """Where our page daemon finds a memory image: its bytes in the archive.

    The restore's own temporary archives (a sealed archive's decrypted copy, a checkpoint image's
    exported layer) are removed as soon as they are unpacked, before the daemon opens them; the
    daemon gets a link of its own in the private work dir, which it removes once it has the file
    open, so the file lives exactly as long as the daemon needs it (and a crash's leftover goes
    with the work dir).
    """
    name = Path(member.name).name
    source, unlink = archive, False
    if archive == plaintext_path(work):
        source, unlink = work / f"{name}{PLAIN_SUFFIX}", True
    elif archive == layer_path(work):
        source, unlink = work / f"{name}{LAYER_SUFFIX}", True
    if unlink:
        source.unlink(missing_ok=True)  # a second prepare of the same work dir
        os.link(archive, source)
    return {"image": name, "archive": str(source), "offset": member.offset, "size": member.size, "unlink": unlink}


def _in_sealed(sealed: PartlyDecrypted, work: Path, member: Deferred) -> dict[str, object]:
    """Where our page daemon finds a memory image of a sealed archive: its plaintext offset in the
    sealed archive itself, and the node's key sources to open it with (shim.restore.sealed_pages)."""
    where = _in_place(sealed.archive, work, member)
    where["sealed"] = sealed.key_sources()
    return where


def check_memory_images(work: Path, deferred: tuple[Deferred, ...] = ()) -> None:
    """Every memory image unpacked whole holds exactly the bytes its pagemap accounts for.

    CRIU does not check: a pages-N.img shorter than its pagemap says makes an
    eager restore spin at 100% CPU until StartContainer's deadline. So it is
    refused here, before CRIU runs. (Images left in the archive for the page
    daemon are checked the same way by `prepare`.)
    """
    images = work / IMAGES_DIR
    in_archive = {Path(d.name).name for d in deferred}
    for pages_id, found in _pagemaps(images).items():
        name = f"pages-{pages_id}.img"
        if name in in_archive:
            continue
        try:
            size = (images / name).lstat().st_size
        except FileNotFoundError:
            size = 0
        if size != found.data_size:
            raise InvalidArgument(f"checkpoint image checkpoint/{name} ({size} bytes) has a pagemap of "
                                  f"{found.data_size} bytes: the memory image is inconsistent")


def release(work: Path) -> list[str]:
    """Release the loop devices of the restore unpacked into `work`."""
    return loopdev.release_tagged(tag(work))


def attached(work: Path) -> list[str]:
    """The loop devices still attached for the restore unpacked into `work`."""
    return loopdev.tagged(tag(work))


def release_all(work_root: Path) -> list[str]:
    """Release the loop devices of every restore under `work_root` (a node going down)."""
    return loopdev.release_tagged(tag_prefix(work_root))


def _read_ahead(archive: Path, member: Deferred) -> None:
    """Start reading the memory image into the page cache now (the kernel does it in the background).

    By the time the page daemon asks, most of it is in memory; without this a
    cold archive is read on demand, fault by fault.
    """
    fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, member.offset, member.size, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _pagemaps(images: Path) -> dict[int, pagemap.Pagemap]:
    maps: dict[int, pagemap.Pagemap] = {}
    for entry in os.scandir(images):
        if not _PAGEMAP.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        if entry.stat(follow_symlinks=False).st_size > _MAX_PAGEMAP:
            raise InvalidArgument(f"checkpoint image {entry.name} is over {_MAX_PAGEMAP} bytes")
        parsed = pagemap.parse(Path(entry.path).read_bytes(), f"checkpoint image {entry.name}")
        if parsed.pages_id in maps:
            raise InvalidArgument(f"checkpoint images: two pagemaps name pages-{parsed.pages_id}.img")
        maps[parsed.pages_id] = parsed
    return maps


def _fill_eager(archive: Path, work: Path, member: Deferred, maps: dict[int, pagemap.Pagemap],
                sealed: PartlyDecrypted | None = None) -> None:
    match = _PAGES.fullmatch(member.name.removeprefix("./"))
    assert match is not None  # deferrable() let only these through
    found = maps.get(int(match.group(1)))
    if found is None or found.data_size != member.size:
        described = "no pagemap" if found is None else f"a pagemap of {found.data_size} bytes"
        raise InvalidArgument(f"checkpoint image {member.name} ({member.size} bytes) has {described}: "
                              "the memory image is inconsistent")
    src = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(work / member.name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for offset, length in pagemap.eager_ranges(found):
                if sealed is not None:  # the copy has holes where the image is: decrypt these runs' chunks
                    sealed.fill(member.offset + offset, length)
                os.lseek(dst, offset, os.SEEK_SET)
                if short := kernel_copy(src, dst, length, member.offset + offset):
                    raise InvalidArgument(f"checkpoint image {member.name} ends {short} bytes early")
        finally:
            os.close(dst)
    finally:
        os.close(src)
