"""The proxy's [export] hook (shim.app._publisher): only kubelet archive names are published, a failed push
is logged and never fails the checkpoint, and a push still running at the call's deadline does not hold
the answer back (it finishes in its thread, its outcome logged)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import requests

from shim import app
from shim.config import Config, ExportSettings
from shim.export import Exporter, Pushed
from shim.image_reference import Reference
from tests.support import registries

KUBELET_NAME = "checkpoint-web_shop-app-2026-12-05T00:41:02Z.tar"


def _publisher(registry: str = "127.0.0.1:1") -> Callable[[Path, float | None], Awaitable[None]]:
    publish = app._publisher(Config(export=ExportSettings(registry)))
    assert publish is not None
    return publish


def test_off_without_a_registry() -> None:
    assert app._publisher(Config()) is None


def test_a_failed_push_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = tmp_path / KUBELET_NAME
    archive.write_bytes(b"not a tar")
    asyncio.run(_publisher()(archive, 10.0))
    assert f"checkpoint {archive} not published to 127.0.0.1:1: " in caplog.text
    assert "is not a readable checkpoint archive" in caplog.text and "Traceback" not in caplog.text


@pytest.mark.skipif(not os.access(registries.REGISTRY_BIN, os.X_OK), reason=f"{registries.REGISTRY_BIN} missing")
def test_a_garbage_archive_leaves_the_registry_as_it_was(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with registries.plain(tmp_path / "registry") as host:
        for garbage in (b"not a tar", b"\0" * 10240, b"x" * 700):
            archive = tmp_path / KUBELET_NAME
            archive.write_bytes(garbage)
            asyncio.run(_publisher(host)(archive, 10.0))
            assert f"checkpoint {archive} not published to {host}: " in caplog.text
            caplog.clear()
        catalog = requests.get(f"http://{host}/v2/_catalog", timeout=10).json()
    assert catalog["repositories"] == []  # no blob, no manifest, no tag


def test_other_names_are_not_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(Exporter, "publish", lambda self, archive: calls.append(archive))
    asyncio.run(_publisher()(tmp_path / "mine.tar", 10.0))
    assert calls == []


def test_a_slow_push_does_not_hold_the_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def slow(self: Exporter, archive: Path) -> Pushed:
        release.wait(10)
        raise OSError("registry went away")

    monkeypatch.setattr(Exporter, "publish", slow)
    caplog.set_level(logging.INFO)

    async def scenario() -> float:
        started = time.monotonic()
        await _publisher()(tmp_path / KUBELET_NAME, 0.2)
        answered = time.monotonic() - started
        release.set()
        deadline = time.monotonic() + 10
        while "not published" not in caplog.text:  # the done callback logs the outcome, on the loop
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        return answered

    answered = asyncio.run(scenario())
    assert answered < 2.0
    assert "still publishing to 127.0.0.1:1 at the call's deadline" in caplog.text
    assert "not published to 127.0.0.1:1" in caplog.text


def test_the_reference_is_the_pinned_one() -> None:
    pushed = Pushed(Reference("r.example", "a/b", "1"), "sha256:" + "0" * 64, 3)
    assert str(pushed.pinned) == "r.example/a/b:1@sha256:" + "0" * 64
