"""CRIU's lock of the TCP connections it restores: nftables in CRIU's own process, not iptables runs.

CRIU keeps every connection it restores locked (a peer's segment is dropped, never answered with a
reset) until the tasks resume. With its default method, iptables, that costs process starts: in
the restore of one connection on the development VM, a `sh -c iptables ...` to lock it, a second
one to unlock it and two iptables-restore/ip6tables-restore pairs, 60-75 ms of a 0.13-0.18 s
restore (an exec trace of a lazy migration's target). With the nftables method CRIU does the same
through libnftables, inside its own process (a table named after the dump's run id, one set element
per connection and direction, the table deleted at the unlock): the unlock took 6 ms there.

CRIU 4.2.1 ignores `network-lock` on a restore ("Network lock method from dump will be used in
restore"): the method is the dump's, recorded in inventory.img (`network_lock_method`). So for a
restore of established connections on a node whose CRIU has nftables support (libnftables and the
kernel's set concatenations: `criu check --feature nftables`), the proxy plans the nftables lock
(`plan`) and the relay, which hands the images to runc, switches the restore's own copy of
inventory.img from iptables to nftables (`apply`) before CRIU reads it. Only the lock of the
restore changes: the dump's own lock ended with the dump (CRIU removes it when the dump ends), and
a later checkpoint of the restored container locks with whatever its own CRIU config says.

inventory.img is archive content, so hostile: it is decoded only as CRIU's InventoryEntry (the
protobuf pycriu ships), and anything unexpected leaves the file as it was for CRIU to judge.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLAN_FILE = "network-lock"  # in the restore's work dir: the method the relay puts into inventory.img
NFTABLES = "nftables"
# CRIU's enum NETWORK_LOCK_METHOD (criu/include/cr_options.h), stored as is in inventory.img.
CRIU_METHODS = {"iptables": 0, NFTABLES: 1, "skip": 2}
INVENTORY = "inventory.img"
INVENTORY_MAGIC = 0x58313116  # criu/include/magic.h: the image's magic, then the entry's size, then the entry
MAX_INVENTORY = 64 << 10  # a real one is under a hundred bytes
_HEAD = struct.Struct("<II")


def plan(work: Path) -> None:
    """The restore in `work` locks its connections with nftables (written by the proxy)."""
    path = work / PLAN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(NFTABLES + "\n")


def planned(work: Path) -> str | None:
    """The method planned for the restore in `work`, or None (CRIU keeps the dump's)."""
    try:
        method = (work / PLAN_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return method if method == NFTABLES else None


def apply(work: Path, images: Path) -> bool:
    """Switch the images' lock method from iptables to the planned one; whether inventory.img changed.

    Idempotent. A dump that said nftables or skip is left alone (nothing slower to replace), and so
    is an inventory.img that is not what CRIU writes (CRIU refuses it itself).
    """
    method = planned(work)
    if method is None:
        return False
    path = images / INVENTORY
    data = _read_small(path)
    entry = _decode(data) if data is not None else None
    if entry is None:
        log.warning("%s is not a CRIU inventory image: the restore keeps the dump's network lock", path)
        return False
    if entry.network_lock_method != CRIU_METHODS["iptables"]:
        return False
    entry.network_lock_method = CRIU_METHODS[method]
    payload = entry.SerializeToString()
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(_HEAD.pack(INVENTORY_MAGIC, len(payload)) + payload)
    os.replace(temp, path)
    return True


def _read_small(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_INVENTORY + 1)
    return data if len(data) <= MAX_INVENTORY else None


def _decode(data: bytes) -> Any | None:
    """The InventoryEntry in `data` (magic, size, entry, nothing after it), or None."""
    from google.protobuf.message import DecodeError
    from pycriu.images import pb

    if len(data) < _HEAD.size:
        return None
    magic, size = _HEAD.unpack_from(data)
    if magic != INVENTORY_MAGIC or size != len(data) - _HEAD.size:
        return None
    try:
        return pb.inventory_entry.FromString(data[_HEAD.size:])
    except DecodeError:
        return None
