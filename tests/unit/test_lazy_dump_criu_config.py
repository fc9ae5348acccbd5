"""The lazy dump's CRIU config (shim.migrate.lazy_dump): always our pre-dump hook (runc and CRIU start
before the pause, shim.migrate.predump_hook); CRIU's own network lock for the dump is nftables
wherever connections are dumped and the CRIU runc runs can do it, so no iptables process starts
inside the pause; elsewhere CRIU keeps its default method."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from shim.migrate import lazy_dump
from shim.migrate.lazy_dump import CRIU_DUMP_CONFIG, LazyDump
from shim.migrate.predump_hook import PreDumpHook


def _criu(tmp_path: Path, nftables: bool) -> Path:
    """A CRIU that answers `check --feature nftables` as told (and records that it was asked)."""
    criu = tmp_path / f"criu-{nftables}"
    criu.write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/asked\n"
                    f"[ \"$*\" = 'check --feature nftables' ] && exit {0 if nftables else 1}\nexit 2\n")
    criu.chmod(0o700)
    return criu


def _dump(tmp_path: Path, criu: Path, tcp: bool, name: str = "staging", target: bool = True) -> LazyDump:
    source = SimpleNamespace(target=SimpleNamespace(options=SimpleNamespace(tcp_established=tcp)))
    staging = tmp_path / name
    staging.mkdir(mode=0o700)
    return LazyDump(source, staging, Path("/bin/false"), criu, target_nftables=target)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_cached_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazy_dump, "_nftables", {})


def test_dumped_connections_are_locked_by_criu_with_nftables_when_it_can(tmp_path: Path) -> None:
    dump = _dump(tmp_path, _criu(tmp_path, nftables=True), tcp=True)
    asyncio.run(dump.prepare())  # before the switch-over: CRIU is asked here, not between it and the lock
    assert (tmp_path / "asked").read_text().count("check --feature nftables") == 1
    hook = PreDumpHook(dump.staging)
    env = asyncio.run(dump._criu_environment(hook))
    config = Path(env["CRIU_CONFIG_FILE"])
    assert config == dump.staging / CRIU_DUMP_CONFIG
    assert config.read_text() == hook.config_line() + "network-lock nftables\n"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    second = _dump(tmp_path, _criu(tmp_path, nftables=True), tcp=True, name="second")
    assert "network-lock nftables" in Path(asyncio.run(
        second._criu_environment(PreDumpHook(second.staging)))["CRIU_CONFIG_FILE"]).read_text()
    assert (tmp_path / "asked").read_text().count("check --feature nftables") == 1  # probed once


@pytest.mark.parametrize("nftables, tcp, target", [(False, True, True), (True, False, True), (True, True, False)],
                         ids=["this CRIU cannot", "no connections", "the target's CRIU cannot"])
def test_otherwise_criu_keeps_its_lock_method(tmp_path: Path, nftables: bool, tcp: bool, target: bool) -> None:
    dump = _dump(tmp_path, _criu(tmp_path, nftables), tcp, target=target)
    hook = PreDumpHook(dump.staging)
    env = asyncio.run(dump._criu_environment(hook))
    assert Path(env["CRIU_CONFIG_FILE"]).read_text() == hook.config_line()


def test_a_criu_that_cannot_run_means_no_nftables(tmp_path: Path) -> None:
    dump = _dump(tmp_path, tmp_path / "no-such-criu", tcp=True)
    hook = PreDumpHook(dump.staging)
    assert Path(asyncio.run(dump._criu_environment(hook))["CRIU_CONFIG_FILE"]).read_text() == hook.config_line()
