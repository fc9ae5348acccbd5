"""A restored container keeps its old pod IP: established and bound sockets need it.

CRIU re-binds every restored socket to its original address; in a new pod
(which always has another IP) that fails with "Cannot assign requested
address". So before CRIU runs, the old pod IP is added to the new pod's eth0
as a /32: traffic for it then reaches the new pod (it answers ARP for any of
its addresses). The address is never taken while a live pod still holds it.
Which addresses to add is decided by the proxy at CreateContainer (it can see
the pods); the relay adds them in the new pod's namespace right before Start,
through pyroute2 (which switches namespace in a child, never in the relay).
"""

from __future__ import annotations

import ctypes
import enum
import json
from pathlib import Path

from shim import archive_layout
from shim.annotations import CHECKPOINT_PREFIX
from shim.checkpoint.addresses import INTERFACE
from shim.errors import FailedPrecondition, InvalidArgument

ARCHIVE_MEMBER = archive_layout.FACTS  # written by shim.checkpoint.checkpointer
PLAN_FILE = "network.json"


class TcpRestore(enum.Enum):
    """How a restore brings the checkpoint's TCP connections back (None: it had none to keep)."""

    ESTABLISHED = "established"  # the old pod IP is kept in the new pod (write_plan), connections resume
    CLOSE = "close"  # the fallback the user asked for: connections closed, address left alone


def recorded_ips(archive_dir: Path) -> list[str]:
    """The checkpointed pod's IPs, as the checkpoint recorded them (none in other engines' archives)."""
    member = archive_dir / ARCHIVE_MEMBER
    if not member.is_file():
        return []
    try:
        recorded = json.loads(member.read_text())
        return [str(ip) for ip in recorded.get("pod_ips", [])]
    except (ValueError, AttributeError, TypeError) as exc:
        raise InvalidArgument(f"{member.name} in the checkpoint is malformed: {exc}") from None


def taken(ips: list[str], live_ips: dict[str, str]) -> dict[str, str]:
    """Which of `ips` a live pod holds (ip -> pod)."""
    return {ip: live_ips[ip] for ip in ips if ip in live_ips}


def addresses_to_keep(archive_dir: Path, tcp_established: bool, live_ips: dict[str, str]) -> list[str]:
    """The checkpointed pod's IPs to add to the new pod (empty when no socket needs them)."""
    if not tcp_established:
        return []
    ips = recorded_ips(archive_dir)
    for ip in ips:
        if ip in live_ips:
            raise FailedPrecondition(
                f"the checkpoint's pod IP {ip} still belongs to live pod {live_ips[ip]}: its TCP connections "
                "cannot be restored without taking the address; remove that pod first (or checkpoint with "
                f"{CHECKPOINT_PREFIX}stop-after and delete it), or restore with "
                f'{CHECKPOINT_PREFIX}tcp-close: "true" to close the connections instead')
    return ips


def write_plan(work: Path, ips: list[str]) -> None:
    if ips:
        (work / PLAN_FILE).write_text(json.dumps({"add": ips}))


def add_planned_addresses(work: Path, netns: Path) -> list[str]:
    """Add the planned /32 addresses to eth0 in `netns`; returns what was added."""
    plan = work / PLAN_FILE
    if not plan.is_file():
        return []
    ips = [str(ip) for ip in json.loads(plan.read_text())["add"]]
    from pyroute2 import IPRoute, config

    # pyroute2 switches namespace in a forked child and ends it with SIGTERM. A child
    # keeping our (asyncio) SIGTERM handler writes the signal into the wakeup fd it shares
    # with us, and the relay would take it for its own SIGTERM and stop mid-restore.
    # With this set, the child dies on SIGTERM the default way instead.
    config.disable_mp_signal = True
    # pyroute2's child looks libc up with ctypes.util.find_library, which runs `ldconfig -p`: a
    # process start (10-20 ms on the 2-core VM) on every Start. This process's own symbols hold it.
    libc = ctypes.CDLL(None, use_errno=True)
    with IPRoute(netns=str(netns), libc=libc) as ipr:
        index = ipr.link_lookup(ifname=INTERFACE)[0]
        present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
        for ip in ips:
            if ip not in present:
                ipr.addr("add", index=index, address=ip, prefixlen=32 if ":" not in ip else 128)
    return ips


def netns_of(bundle: Path) -> Path | None:
    spec = json.loads((bundle / "config.json").read_text())
    for ns in spec.get("linux", {}).get("namespaces", []):
        if ns.get("type") == "network" and ns.get("path"):
            return Path(ns["path"])
    return None
