"""A lazy migration's restore: memory no image holds comes from the page server its receiver names.

The archive of a lazy dump has lazy runs without data (PE_LAZY, not PE_PRESENT). The restore plans a
page daemon that asks the port named in ARCHIVE.page-server (root's, 0600, written by the migration
receiver), and refuses such an archive when no such file is there: restored without its page server
the memory would read as zeros.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shim.config import PAGE_DAEMON_OURS
from shim.errors import InvalidArgument
from shim.migrate.tunnel import socket_uid
from shim.restore import lazy
from shim.restore.pagemap import PE_LAZY, PE_PRESENT
from shim.runtime import page_daemon
from shim.runtime.lazy_daemon import LazyPages
from tests.support.criu import pagemap_image


def _work(tmp_path: Path, *runs: tuple[int, int]) -> tuple[Path, Path]:
    work = tmp_path / "work"
    (work / "checkpoint").mkdir(parents=True)
    (work / "checkpoint" / "pagemap-1.img").write_bytes(pagemap_image(1, *runs))
    archive = tmp_path / "migrate-x.tar"
    archive.write_bytes(b"")
    return archive, work


def _name_port(archive: Path, port: object, mode: int = 0o600) -> Path:
    path = lazy.remote_pages_file(archive)
    path.write_text(json.dumps({"port": port}))
    path.chmod(mode)
    return path


def test_an_archive_holding_all_its_memory_plans_no_page_server(tmp_path: Path) -> None:
    archive, work = _work(tmp_path, (3, PE_PRESENT), (5, PE_PRESENT | PE_LAZY))
    _name_port(archive, 4000)  # ignored: nothing is missing
    assert lazy.plan_remote(archive, work, Path("/usr/sbin/criu")) is False
    assert not lazy.remote(work)


@pytest.mark.skipif(os.geteuid() != 0, reason="the page server file must be root's")
def test_missing_memory_is_asked_of_the_named_port(tmp_path: Path) -> None:
    archive, work = _work(tmp_path, (3, PE_PRESENT), (5, PE_LAZY))
    _name_port(archive, 40123)
    assert lazy.plan_remote(archive, work, Path("/usr/sbin/criu")) is True
    assert lazy.remote(work)
    daemon = LazyPages.planned(work)
    assert daemon is not None and daemon._page_server == ("127.0.0.1", 40123)


def test_missing_memory_without_a_page_server_is_refused(tmp_path: Path) -> None:
    archive, work = _work(tmp_path, (3, PE_PRESENT), (5, PE_LAZY))
    with pytest.raises(InvalidArgument, match="memory is not in it .* only by `criu-shim migrate-receiver`"):
        lazy.plan_remote(archive, work, Path("/usr/sbin/criu"))
    assert not (work / lazy.PLAN_FILE).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the page server file must be root's")
@pytest.mark.parametrize(("port", "mode", "error"), [
    (4000, 0o644, "not root's private file"),
    ("4000", 0o600, "out of range"),
    (0, 0o600, "out of range"),
    (70000, 0o600, "out of range"),
    (True, 0o600, "out of range"),
])
def test_a_hostile_page_server_file_is_refused(tmp_path: Path, port: object, mode: int, error: str) -> None:
    archive, work = _work(tmp_path, (5, PE_LAZY))
    _name_port(archive, port, mode)
    with pytest.raises(InvalidArgument, match=error):
        lazy.plan_remote(archive, work, Path("/usr/sbin/criu"))
    assert not (work / lazy.PLAN_FILE).exists()


def test_a_symlinked_page_server_file_is_refused(tmp_path: Path) -> None:
    archive, work = _work(tmp_path, (5, PE_LAZY))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text('{"port": 4000}')
    lazy.remote_pages_file(archive).symlink_to(elsewhere)
    with pytest.raises(InvalidArgument, match="not root's private file"):
        lazy.plan_remote(archive, work, Path("/usr/sbin/criu"))


def test_socket_uid_of_an_unknown_peer_is_none() -> None:
    assert socket_uid(("127.0.0.1", 1), 2) is None


DIRECT = {"address": "10.1.2.3", "port": 40123,
          "tls": {"cert": "/etc/criu-shim/node.crt", "key": "/etc/criu-shim/node.key", "ca": "/etc/criu-shim/ca.crt",
                  "certificate": "ab" * 32, "token": "cd" * 16, "idle": 30.0}}


def _name_source(archive: Path, named: object) -> None:
    path = lazy.remote_pages_file(archive)
    path.write_text(json.dumps(named))
    path.chmod(0o600)


@pytest.mark.skipif(os.geteuid() != 0, reason="the page server file must be root's")
def test_the_source_page_end_is_planned_for_our_daemon_with_its_pin(tmp_path: Path) -> None:
    archive, work = _work(tmp_path, (5, PE_LAZY))
    _name_source(archive, DIRECT)
    assert lazy.plan_remote(archive, work, Path("/usr/sbin/criu"), PAGE_DAEMON_OURS) is True
    plan = json.loads((work / lazy.PLAN_FILE).read_text())
    assert plan["page_server"] == DIRECT and plan["daemon"] == PAGE_DAEMON_OURS
    address, port, pinned = page_daemon._page_server(work / lazy.PLAN_FILE)  # type: ignore[misc]
    assert (address, port) == ("10.1.2.3", 40123) and pinned is not None
    assert pinned.creds.key == Path("/etc/criu-shim/node.key") and pinned.certificate == "ab" * 32


@pytest.mark.skipif(os.geteuid() != 0, reason="the page server file must be root's")
def test_the_source_page_end_is_refused_to_criu_s_daemon(tmp_path: Path) -> None:
    archive, work = _work(tmp_path, (5, PE_LAZY))
    _name_source(archive, DIRECT)
    with pytest.raises(InvalidArgument, match="only criu-shim's page daemon reaches.* is 'criu'"):
        lazy.plan_remote(archive, work, Path("/usr/sbin/criu"), "criu")
    assert not (work / lazy.PLAN_FILE).exists()


def _with(**changes: object) -> dict[str, object]:
    tls = {**DIRECT["tls"], **{k: v for k, v in changes.items() if k != "address"}}  # type: ignore[dict-item]
    return {**DIRECT, "tls": tls, **({"address": changes["address"]} if "address" in changes else {})}


@pytest.mark.skipif(os.geteuid() != 0, reason="the page server file must be root's")
@pytest.mark.parametrize(("named", "error"), [
    (_with(address="node-b"), "is not an IP address"),
    (_with(address=None), "is not an IP address"),
    ({**DIRECT, "tls": "yes"}, "tls is not an object"),
    (_with(cert="node.crt"), "tls.cert 'node.crt' is not an absolute path"),
    (_with(key=7), "tls.key 7 is not an absolute path"),
    (_with(certificate="AB" * 32), "tls.certificate .* is malformed"),
    (_with(certificate="ab" * 31), "tls.certificate .* is malformed"),
    (_with(token="../../x"), "tls.token .* is malformed"),
    (_with(idle=0), "tls.idle 0 out of range"),
    (_with(idle=True), "tls.idle True out of range"),
    (_with(idle=1e9), "out of range"),
])
def test_a_hostile_source_page_end_is_refused(tmp_path: Path, named: object, error: str) -> None:
    archive, work = _work(tmp_path, (5, PE_LAZY))
    _name_source(archive, named)
    with pytest.raises(InvalidArgument, match=error):
        lazy.plan_remote(archive, work, Path("/usr/sbin/criu"), PAGE_DAEMON_OURS)
    assert not (work / lazy.PLAN_FILE).exists()
