"""The cgroup driver read from containerd's CRI config, by containerd 2.x's own rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shim.cgroup_driver import Decision, decide
from shim.errors import Unknown

RUNC = "io.containerd.runc.v2"


def config(runtimes: dict[str, Any], default: str = "runc") -> str:
    """The shape of containerd 1.6/1.7's verbose Status "config" entry (trimmed)."""
    return json.dumps({"containerd": {"defaultRuntimeName": default, "runtimes": runtimes},
                       "systemdCgroup": False})


def runc(systemd: bool | None) -> dict[str, Any]:
    options = {"BinaryName": "/usr/bin/runc"}
    if systemd is not None:
        options["SystemdCgroup"] = systemd
    return {"runtimeType": RUNC, "options": options}


@pytest.fixture
def no_systemd(tmp_path: Path) -> Path:
    return tmp_path / "absent"


@pytest.fixture
def systemd(tmp_path: Path) -> Path:
    (tmp_path / "system").mkdir()
    return tmp_path / "system"


@pytest.mark.parametrize(("value", "driver"), [(True, "systemd"), (False, "cgroupfs"), (None, "cgroupfs")])
def test_default_handler_runc_options_decide(value: bool | None, driver: str, systemd: Path) -> None:
    # SystemdCgroup absent means false for runc, even on a host that runs systemd
    assert decide(config({"runc": runc(value)}), systemd) == Decision(driver, "runc")  # type: ignore[arg-type]


def test_default_handler_comes_before_the_alphabetical_order(no_systemd: Path) -> None:
    runtimes = {"aaa": runc(False), "zzz": runc(True)}
    assert decide(config(runtimes, default="zzz"), no_systemd) == Decision("systemd", "zzz")


def test_other_handlers_in_alphabetical_order_when_the_default_says_nothing(no_systemd: Path) -> None:
    runtimes = {"criu": {"runtimeType": RUNC, "options": None}, "b": runc(True), "a": runc(False)}
    assert decide(config(runtimes, default="criu"), no_systemd) == Decision("cgroupfs", "a")


def test_non_runc_runtime_types_say_nothing(no_systemd: Path) -> None:
    runtimes = {"kata": {"runtimeType": "io.containerd.kata.v2", "options": {"SystemdCgroup": True}},
                "legacy": {"runtimeType": "io.containerd.runtime.v1.linux", "options": {"SystemdCgroup": True}},
                "z": runc(True)}
    assert decide(config(runtimes, default="kata"), no_systemd) == Decision("systemd", "z")


@pytest.mark.parametrize(("host", "driver"), [("systemd", "systemd"), ("no_systemd", "cgroupfs")])
def test_host_decides_when_no_handler_does(host: str, driver: str, request: pytest.FixtureRequest) -> None:
    run_dir = request.getfixturevalue(host)
    runtimes = {"runc": {"runtimeType": RUNC, "options": None}}
    assert decide(config(runtimes), run_dir) == Decision(driver, "host")  # type: ignore[arg-type]
    assert decide(config({}), run_dir) == Decision(driver, "host")  # type: ignore[arg-type]


def test_a_file_named_like_systemds_run_dir_is_not_systemd(tmp_path: Path) -> None:
    (tmp_path / "system").write_text("")
    assert decide(config({}), tmp_path / "system") == Decision("cgroupfs", "host")


@pytest.mark.parametrize("garbage", [
    "not json", "[]", "{}", '{"containerd": 5}', '{"containerd": {"runtimes": []}}',
    '{"containerd": {"runtimes": {}, "defaultRuntimeName": 3}}',
])
def test_unreadable_config_is_a_clear_error(garbage: str, no_systemd: Path) -> None:
    with pytest.raises(Unknown, match="^criu-shim: containerd's CRI config in its Status .*cgroup driver"):
        decide(garbage, no_systemd)


def test_missing_config_is_a_clear_error(no_systemd: Path) -> None:
    with pytest.raises(Unknown, match='has no "config" entry: cannot tell which cgroup driver it uses'):
        decide(None, no_systemd)


def test_malformed_handler_entries_say_nothing(no_systemd: Path) -> None:
    runtimes = {"a": "text", "b": {"runtimeType": RUNC, "options": ["SystemdCgroup"]},
                "c": {"runtimeType": RUNC, "options": {"SystemdCgroup": "true"}}}
    # "true" as a string is not TOML's true: containerd would refuse such a config; we say cgroupfs
    assert decide(config(runtimes), no_systemd) == Decision("cgroupfs", "c")
