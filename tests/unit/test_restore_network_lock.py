"""The restore's copy of inventory.img names the nftables lock when the proxy planned it (shim.restore.network_lock)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from pycriu.images import pb

from shim.config import parse
from shim.errors import InvalidArgument
from shim.restore import network_lock

IPTABLES, NFTABLES, SKIP = (network_lock.CRIU_METHODS[m] for m in ("iptables", "nftables", "skip"))


def inventory(method: int, run_id: str = "0cd19c47-e793-4149-8c62-0fca96c0d450") -> bytes:
    entry = pb.inventory_entry(img_version=2, fdinfo_per_id=True, lsmtype=0, network_lock_method=method,
                               dump_criu_run_id=run_id)
    for field, value in (("vm_id", 1), ("files_id", 1), ("fs_id", 1), ("sighand_id", 1)):
        setattr(entry.root_ids, field, value)
    payload = entry.SerializeToString()
    return struct.pack("<II", network_lock.INVENTORY_MAGIC, len(payload)) + payload


def restore_dir(tmp_path: Path, content: bytes, planned: bool = True) -> tuple[Path, Path]:
    work, images = tmp_path / "work", tmp_path / "work" / "images"
    images.mkdir(parents=True)
    (images / network_lock.INVENTORY).write_bytes(content)
    if planned:
        network_lock.plan(work)
    return work, images


def method_in(images: Path) -> int:
    data = (images / network_lock.INVENTORY).read_bytes()
    magic, size = struct.unpack_from("<II", data)
    assert magic == network_lock.INVENTORY_MAGIC and size == len(data) - 8
    return int(pb.inventory_entry.FromString(data[8:]).network_lock_method)


def test_a_planned_restore_of_an_iptables_dump_locks_with_nftables(tmp_path: Path) -> None:
    work, images = restore_dir(tmp_path, inventory(IPTABLES))
    assert network_lock.apply(work, images)
    assert method_in(images) == NFTABLES
    entry = pb.inventory_entry.FromString((images / network_lock.INVENTORY).read_bytes()[8:])
    # Everything else CRIU reads is kept: the dump's run id names the lock table.
    assert (entry.img_version, entry.dump_criu_run_id, entry.root_ids.vm_id) == (
        2, "0cd19c47-e793-4149-8c62-0fca96c0d450", 1)
    assert os.stat(images / network_lock.INVENTORY).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in images.iterdir()) == [network_lock.INVENTORY]
    assert not network_lock.apply(work, images)  # idempotent: already nftables


def test_without_a_plan_the_dumps_method_stays(tmp_path: Path) -> None:
    work, images = restore_dir(tmp_path, inventory(IPTABLES), planned=False)
    assert not network_lock.apply(work, images)
    assert method_in(images) == IPTABLES


@pytest.mark.parametrize("method", [NFTABLES, SKIP])
def test_a_dump_without_iptables_is_left_alone(tmp_path: Path, method: int) -> None:
    work, images = restore_dir(tmp_path, inventory(method))
    assert not network_lock.apply(work, images)
    assert method_in(images) == method


@pytest.mark.parametrize("content", [
    b"",
    b"\x16\x31\x31",
    b"garbage that is no image at all",
    struct.pack("<II", 0x12345678, 4) + b"\x08\x02\x10\x01",  # another magic
    inventory(IPTABLES) + b"trailing",  # the size does not cover the file
    inventory(IPTABLES)[:-3],  # cut short
    struct.pack("<II", network_lock.INVENTORY_MAGIC, 3) + b"\xff\xff\xff",  # not protobuf
    struct.pack("<II", network_lock.INVENTORY_MAGIC, 1 << 17) + b"\x00" * (1 << 17),  # over the cap
])
def test_a_hostile_inventory_is_left_for_criu_to_refuse(tmp_path: Path, content: bytes) -> None:
    work, images = restore_dir(tmp_path, content)
    assert not network_lock.apply(work, images)
    assert (images / network_lock.INVENTORY).read_bytes() == content
    assert sorted(p.name for p in images.iterdir()) == [network_lock.INVENTORY]


def test_a_symlinked_inventory_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.img"
    outside.write_bytes(inventory(IPTABLES))
    work, images = restore_dir(tmp_path, b"")
    (images / network_lock.INVENTORY).unlink()
    (images / network_lock.INVENTORY).symlink_to(outside)
    assert not network_lock.apply(work, images)
    assert outside.read_bytes() == inventory(IPTABLES)


def test_the_plan_is_roots_alone_and_names_only_nftables(tmp_path: Path) -> None:
    network_lock.plan(tmp_path)
    assert os.stat(tmp_path / network_lock.PLAN_FILE).st_mode & 0o777 == 0o600
    assert network_lock.planned(tmp_path) == "nftables"
    (tmp_path / network_lock.PLAN_FILE).write_text("skip\n")  # nothing but the one method is taken
    assert network_lock.planned(tmp_path) is None
    assert network_lock.planned(tmp_path / "none") is None


def test_the_network_lock_setting() -> None:
    assert parse({}).restore.network_lock == "nftables"
    assert parse({"restore": {"network_lock": "dump"}}).restore.network_lock == "dump"
    for bad in ("iptables", "", 1, ["nftables"]):
        with pytest.raises(InvalidArgument, match=r"restore.network_lock must be one of \['nftables', 'dump'\]"):
            parse({"restore": {"network_lock": bad}})
