"""A lazy restore's loop devices are detached once, and only while still tagged with that restore:
the number may meanwhile belong to the next restore (back-to-back restores lost their memory image)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.restore import lazy, loopdev
from shim.runtime.lazy_daemon import LazyPages


def test_devices_released_once_and_only_while_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "restore" / "abc"
    tags = {"/dev/loop7": lazy.tag(work), "/dev/loop8": "someone-else/xyz"}
    detached: list[str] = []
    monkeypatch.setattr(loopdev, "tag_of", lambda device: tags.get(device))
    monkeypatch.setattr(loopdev, "detach", detached.append)
    pages = LazyPages(work, Path("/usr/sbin/criu"), {"pages-1.img": "/dev/loop7", "pages-2.img": "/dev/loop8"})
    pages.close()  # the watcher's release at the end of the fill, then close(): the same path twice
    tags["/dev/loop7"] = "next-restore/def"  # the kernel gave loop7 to another restore meanwhile
    pages.close()
    assert detached == ["/dev/loop7"]
