"""The addresses a pod's sockets may be bound to, recorded so that a restore can bring them back.

A pod's own IP is in its CRI status, but a container that was itself restored with its
connections also holds the addresses of the pods it came from (a restore adds them to the
new pod's eth0 as /32s, see `shim.restore.network`). Its sockets are bound to those, so a
checkpoint of it must record them too, or its next restore fails in CRIU with "Cannot
assign requested address". They are read from the interface itself, in a child (`nsenter`),
never by switching the daemon's namespace.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

INTERFACE = "eth0"  # the pod interface CNI plugins create, where a restore adds the old addresses

log = logging.getLogger(__name__)


def global_addresses(ip_json: str) -> list[str]:
    """The global-scope addresses in `ip -j addr show` output, in their order (link-local ones are never kept)."""
    found = []
    for link in json.loads(ip_json or "[]"):
        for info in link.get("addr_info", []):
            if info.get("scope") == "global" and info.get("local"):
                found.append(str(info["local"]))
    return found


async def pod_addresses(netns: Path, cri_ips: tuple[str, ...]) -> tuple[str, ...]:
    """The pod's CRI IPs first, then every other global address on its eth0 (carried in by a restore)."""
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={netns}", "ip", "-j", "addr", "show", "dev", INTERFACE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        # A pod without eth0 (host network, another CNI naming): only what CRI says is known.
        log.debug("no %s in %s: %s", INTERFACE, netns, err.decode(errors="replace").strip())
        return cri_ips
    try:
        carried = [ip for ip in global_addresses(out.decode()) if ip not in cri_ips]
    except (ValueError, AttributeError, TypeError):
        return cri_ips
    return (*cri_ips, *carried)
