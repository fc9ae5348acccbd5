"""The old pod IP is added through pyroute2 without exposing the relay to its child's SIGTERM."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from types import TracebackType
from typing import Any

import pyroute2
import pytest

from shim.restore import network


class FakeIPRoute:
    """Stands in for pyroute2.IPRoute(netns=...): records the signal setting it was made under."""

    made: list[dict[str, Any]] = []

    def __init__(self, netns: str, libc: ctypes.CDLL | None = None) -> None:
        FakeIPRoute.made.append({"netns": netns, "disable_mp_signal": pyroute2.config.disable_mp_signal,
                                 "libc": libc})
        self.added: list[str] = []

    def __enter__(self) -> FakeIPRoute:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def link_lookup(self, ifname: str) -> list[int]:
        assert ifname == "eth0"
        return [2]

    def get_addr(self, index: int) -> list[Any]:
        return []

    def addr(self, command: str, **kwargs: Any) -> None:
        self.added.append(kwargs["address"])


def test_pyroute2_child_dies_on_sigterm_the_default_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A child with the relay's asyncio SIGTERM handler would write the signal into the
    # wakeup fd it shares with the relay: the relay stopped mid-restore (seen in CI).
    monkeypatch.setattr(pyroute2.config, "disable_mp_signal", False)
    monkeypatch.setattr(pyroute2, "IPRoute", FakeIPRoute)
    FakeIPRoute.made.clear()
    (tmp_path / network.PLAN_FILE).write_text(json.dumps({"add": ["10.0.0.7"]}))
    assert network.add_planned_addresses(tmp_path, Path("/proc/1/ns/net")) == ["10.0.0.7"]
    assert [{k: v for k, v in made.items() if k != "libc"} for made in FakeIPRoute.made] == [
        {"netns": "/proc/1/ns/net", "disable_mp_signal": True}]


def test_pyroute2_child_is_handed_libc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without it, pyroute2's namespace child looks libc up through ctypes.util.find_library,
    # which runs `ldconfig -p`: a process start on every restore's Start.
    monkeypatch.setattr(pyroute2, "IPRoute", FakeIPRoute)
    FakeIPRoute.made.clear()
    (tmp_path / network.PLAN_FILE).write_text(json.dumps({"add": ["10.0.0.7"]}))
    network.add_planned_addresses(tmp_path, Path("/proc/1/ns/net"))
    libc = FakeIPRoute.made[0]["libc"]
    assert isinstance(libc, ctypes.CDLL) and callable(libc.setns)
