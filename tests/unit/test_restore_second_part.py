"""A restore created from its checkpoint's first part, completed from the second at StartContainer:
real archives, the real unpacker; what is refused, and that a refused second part changes nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from shim import archive_layout as layout
from shim.annotations import IMAGES_FROM
from shim.api.cri.v1 import api_pb2 as cri
from shim.checkpoint.archive import Member, write_archive
from shim.errors import InvalidArgument, PermissionDenied
from shim.handoff import LAZY_PLAN
from shim.restore import second_part
from shim.restore.checkpoint_unpack import open_checkpoint
from shim.restore.lazy import remote_pages_file
from shim.restore.pagemap import PAGE_SIZE, PE_LAZY, PE_PRESENT
from tests.support.criu import pagemap_image

SPEC = json.dumps({"ociVersion": "1.0.2", "process": {"args": ["/server"], "cwd": "/"}}).encode()
CONFIG = json.dumps({"id": "0123abcd", "name": "server", "rootfsImageRef": "sha256:" + "b" * 64}).encode()
CRIU = Path("/usr/sbin/criu")


def first_part(path: Path, *extra: Member) -> Path:
    write_archive(path, [Member(layout.SPEC_DUMP, data=SPEC), Member(layout.CONFIG_DUMP, data=CONFIG), *extra])
    return path


def second(path: Path, *, spec: bytes = SPEC, pages: int = 2, lazy_pages: int = 0, log: bytes = b"line\n") -> Path:
    runs = [(pages, PE_PRESENT)] + ([(lazy_pages, PE_LAZY)] if lazy_pages else [])
    write_archive(path, [
        Member(layout.SPEC_DUMP, data=spec), Member(layout.CONFIG_DUMP, data=CONFIG),
        Member(layout.INVENTORY, data=b"inventory"),
        Member(f"{layout.IMAGES_DIR}/pagemap-1.img", data=pagemap_image(1, *runs)),
        Member(f"{layout.IMAGES_DIR}/pages-1.img", data=b"\x01" * (2 * PAGE_SIZE)),
        Member(layout.CONTAINER_LOG, data=log)])
    return path


def created(tmp_path: Path) -> Path:
    """A restore's work dir as CreateContainer left it from a first part."""
    work = tmp_path / "restore" / "w1"
    work.mkdir(parents=True, mode=0o700)
    second_part.check_first_part(open_checkpoint(first_part(tmp_path / "first.tar"), work, images_follow=True))
    return work


def later(tmp_path: Path, archive: Path) -> second_part.Later:
    (tmp_path / "logs").mkdir(exist_ok=True)
    return second_part.Later(archive, str(tmp_path / "logs"), "server.log")


def request(annotation: str | None) -> cri.CreateContainerRequest:
    req = cri.CreateContainerRequest()
    if annotation is not None:
        req.config.annotations[IMAGES_FROM] = annotation
    req.sandbox_config.log_directory, req.config.log_path = "/var/log/pods/x", "server/0.log"
    return req


# --- CreateContainer: the annotation and the first part --------------------------------------


def test_no_annotation_is_an_ordinary_restore(tmp_path: Path) -> None:
    assert second_part.requested(request(None), [tmp_path]) is None


def test_the_second_part_must_be_an_absolute_path_in_an_allowed_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="is not an absolute file path"):
        second_part.requested(request("migrate.tar"), [tmp_path])
    with pytest.raises(PermissionDenied, match="refused by rule restore.allowed_dirs"):
        second_part.requested(request("/etc/shadow"), [tmp_path])
    with pytest.raises(PermissionDenied, match="refused by rule restore.allowed_dirs"):
        second_part.requested(request(f"{tmp_path}/../elsewhere.tar"), [tmp_path])
    asked = second_part.requested(request(f"{tmp_path}/later.tar"), [tmp_path])  # need not exist yet
    assert asked == second_part.Later(tmp_path.resolve() / "later.tar", "/var/log/pods/x", "server/0.log")


def test_a_first_part_needs_no_inventory_and_may_bring_no_images(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(InvalidArgument, match="has no checkpoint/inventory.img"):
        open_checkpoint(first_part(tmp_path / "first.tar"), plain)
    assert list(plain.iterdir()) == []
    work = tmp_path / "w"
    work.mkdir()
    archive = open_checkpoint(first_part(tmp_path / "bad.tar", Member(layout.INVENTORY, data=b"i")), work,
                              images_follow=True)
    with pytest.raises(InvalidArgument, match="which only its second part"):
        second_part.check_first_part(archive)


# --- StartContainer: the second part ---------------------------------------------------------


def test_the_second_part_brings_the_images_and_the_log_into_the_work_dir(tmp_path: Path) -> None:
    work = created(tmp_path)
    part = second(tmp_path / "second.tar")
    assert second_part.complete(later(tmp_path, part), part, work, open_checkpoint, CRIU, "criu-shim") is False
    assert sorted(p.name for p in (work / layout.IMAGES_DIR).iterdir()) == [
        "inventory.img", "pagemap-1.img", "pages-1.img"]
    assert (tmp_path / "logs" / "server.log").read_bytes() == b"line\n"
    assert not (work / second_part.SECOND).exists()
    assert not (work / LAZY_PLAN).exists()  # every page is in the images: an eager restore


def test_a_lazy_migrations_second_part_plans_the_page_daemon(tmp_path: Path) -> None:
    work = created(tmp_path)
    part = second(tmp_path / "second.tar", lazy_pages=256)
    pages = remote_pages_file(part)
    pages.write_text(json.dumps({"port": 40123}))
    pages.chmod(0o600)
    assert second_part.complete(later(tmp_path, part), part, work, open_checkpoint, CRIU, "criu-shim") is True
    plan = json.loads((work / LAZY_PLAN).read_text())
    assert plan["page_server"]["port"] == 40123 and plan["daemon"] == "criu-shim"


def _unchanged(work: Path, before: set[str], tmp_path: Path) -> None:
    assert {p.name for p in work.iterdir()} == before
    assert not (tmp_path / "logs" / "server.log").exists()


@pytest.mark.parametrize(("make", "says"), [
    (lambda path: second(path, spec=SPEC.replace(b"/server", b"/other")), "their specs differ"),
    (lambda path: second(path, pages=3), "inconsistent"),  # the pagemap says 3 pages, the image holds 2
    (lambda path: second(path, lazy_pages=256), "only by `criu-shim migrate-receiver`"),  # no port file beside it
], ids=["another-container", "short-memory-image", "lazy-without-page-server"])
def test_a_refused_second_part_changes_nothing(tmp_path: Path, make: Callable[[Path], Path], says: str) -> None:
    work = created(tmp_path)
    before = {p.name for p in work.iterdir()}
    part = make(tmp_path / "second.tar")
    with pytest.raises(InvalidArgument, match=says):
        second_part.complete(later(tmp_path, part), part, work, open_checkpoint, CRIU, "criu-shim")
    _unchanged(work, before, tmp_path)


def test_a_hostile_second_part_is_refused_by_the_unpacker(tmp_path: Path) -> None:
    work = created(tmp_path)
    before = {p.name for p in work.iterdir()}
    part = tmp_path / "second.tar"
    part.write_bytes(b"not a tar at all" * 64)
    with pytest.raises(InvalidArgument):
        second_part.complete(later(tmp_path, part), part, work, open_checkpoint, CRIU, "criu-shim")
    _unchanged(work, before, tmp_path)
