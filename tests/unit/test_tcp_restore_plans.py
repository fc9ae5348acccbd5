"""Pure parts of TCP across restore: which addresses to keep, the nft scripts of the network lock."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest

from shim import archive_layout
from shim.checkpoint import netlock
from shim.errors import FailedPrecondition, InvalidArgument
from shim.restore import network


def _archive(tmp_path: Path, ips: list[str]) -> Path:
    (tmp_path / archive_layout.FACTS).write_text(json.dumps({"pod_ips": ips, "tcp_established": True}))
    return tmp_path


def test_old_ips_are_kept_only_for_established_connections(tmp_path: Path) -> None:
    archive = _archive(tmp_path, ["10.1.0.5"])
    assert network.addresses_to_keep(archive, True, {}) == ["10.1.0.5"]
    assert network.addresses_to_keep(archive, False, {}) == []
    assert network.addresses_to_keep(tmp_path / "other-engine", True, {}) == []  # no record: nothing to keep


def test_a_live_pods_address_is_refused_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        network.addresses_to_keep(_archive(tmp_path, ["10.1.0.5"]), True, {"10.1.0.5": "default/web-0"})
    assert "still belongs to live pod default/web-0" in caught.value.message
    assert "tcp-close" in caught.value.message


def test_a_malformed_record_is_invalid(tmp_path: Path) -> None:
    (tmp_path / archive_layout.FACTS).write_text("[not json")
    with pytest.raises(InvalidArgument):
        network.recorded_ips(tmp_path)


def test_plan_round_trip(tmp_path: Path) -> None:
    network.write_plan(tmp_path, ["10.1.0.5"])
    assert json.loads((tmp_path / network.PLAN_FILE).read_text()) == {"add": ["10.1.0.5"]}
    network.write_plan(tmp_path / "none", [])  # nothing to add: no file, no error


def test_lock_drops_tcp_off_loopback_and_narrowing_names_each_connection() -> None:
    lock = netlock.lock_script()
    assert 'iifname != "lo" meta l4proto tcp drop' in lock and 'oifname != "lo" meta l4proto tcp drop' in lock
    assert "flush table inet criu_shim_lock" in lock  # a crashed attempt's table starts empty
    conn = netlock.Connection(socket.AF_INET, "10.1.0.5", 7000, "10.1.0.9", 51000)
    narrow = netlock.narrow_script([conn])
    assert "ip saddr 10.1.0.9 ip daddr 10.1.0.5 tcp sport 51000 tcp dport 7000 drop" in narrow
    assert "ip saddr 10.1.0.5 ip daddr 10.1.0.9 tcp sport 7000 tcp dport 51000 drop" in narrow
    assert 'iifname != "lo"' not in narrow
    assert netlock.unlock_script() == "delete table inet criu_shim_lock\n"


def test_criu_address_words_decode() -> None:
    word = struct.unpack("<I", socket.inet_aton("10.234.68.2"))[0]
    assert netlock._address(socket.AF_INET, [word]) == "10.234.68.2"
