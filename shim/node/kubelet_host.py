"""What a kubelet puts on the host outside its root dir, and taking it back (blocking).

- iptables (nft here): KUBE-FIREWALL (jumped to from filter INPUT/OUTPUT), KUBE-KUBELET-CANARY
  and KUBE-IPTABLES-HINT, in tables of both families that iptables-nft creates if missing.
  The kubelet has no switch for them; it re-creates them while it runs.
- /var/lib/kubelet/device-plugins/kubelet.sock: the device manager's socket path is fixed,
  whatever --root-dir says.
Both are shared by every kubelet on the host, so they are removed only when the last local
kubelet is gone. A table is deleted only if it did not exist before the first local kubelet
started (recorded in TABLES_FILE) and nothing but empty base chains is left in it.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from shim.errors import FailedPrecondition
from shim.node import procs

log = logging.getLogger(__name__)

KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")
TABLES = [(family, table) for family in ("ip", "ip6") for table in ("filter", "mangle", "nat")]
DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")
TABLES_FILE = Path("/run/criu-shim/kubelet-host-tables.json")


def host_ip() -> str:
    """The host's source address for its default route, else its first global IPv4 address."""
    out = subprocess.run(["ip", "-o", "route", "get", "1.1.1.1"], capture_output=True, text=True).stdout.split()
    if "src" in out:
        return out[out.index("src") + 1]
    for line in subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"],
                               capture_output=True, text=True).stdout.splitlines():
        return line.split()[3].split("/")[0]
    raise FailedPrecondition("no non-loopback IPv4 address: a kubelet's node IP may not be loopback")


def kubelet_running() -> bool:
    """A live kubelet on the host (zombies do not count: PID 1 here may reap them late)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "kubelet" and procs.alive(
                    int(entry.name)):
                return True
        except OSError:
            continue
    return False


def record_tables() -> None:
    """Before the first local kubelet starts: which of its tables the host already has."""
    if kubelet_running() and TABLES_FILE.exists():
        return
    present = [f"{family} {table}" for family, table in TABLES if _items(family, table) is not None]
    TABLES_FILE.parent.mkdir(parents=True, exist_ok=True)
    TABLES_FILE.write_text(json.dumps(present) + "\n")


def remove_leftovers() -> list[str]:
    """The kubelet's iptables chains and device-plugin socket, if no kubelet runs any more."""
    if kubelet_running():
        return []
    try:
        keep = set(json.loads(TABLES_FILE.read_text()))
    except (OSError, ValueError):
        keep = {f"{family} {table}" for family, table in TABLES}  # unknown: delete no table
    done = []
    for family, table in TABLES:
        done += _clean_table(family, table, delete_empty=f"{family} {table}" not in keep)
    TABLES_FILE.unlink(missing_ok=True)
    if DEVICE_PLUGIN_SOCKET.exists() or DEVICE_PLUGIN_SOCKET.is_symlink():
        DEVICE_PLUGIN_SOCKET.unlink()
        done.append(f"removed {DEVICE_PLUGIN_SOCKET}")
    for directory in (DEVICE_PLUGIN_SOCKET.parent, DEVICE_PLUGIN_SOCKET.parent.parent):
        try:
            directory.rmdir()  # only when empty: a real kubelet's files stay
            done.append(f"removed {directory}")
        except OSError:
            break
    return done


def _nft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", *args], capture_output=True, text=True)


def _items(family: str, table: str) -> list[dict[str, Any]] | None:
    res = _nft("-j", "list", "table", family, table)
    if res.returncode != 0:
        return None  # no such table
    items: list[dict[str, Any]] = json.loads(res.stdout).get("nftables", [])
    return items


def _jump_target(rule: dict[str, Any]) -> str | None:
    for expr in rule.get("expr", []):
        if isinstance(expr, dict) and "jump" in expr:
            return str(expr["jump"].get("target"))
    return None


def _clean_table(family: str, table: str, delete_empty: bool) -> list[str]:
    items = _items(family, table)
    if items is None:
        return []
    done = []
    for item in items:
        rule = item.get("rule")
        if rule and _jump_target(rule) in KUBELET_CHAINS:
            _nft("delete", "rule", family, table, rule["chain"], "handle", str(rule["handle"]))
    for item in items:
        chain = item.get("chain")
        if chain and chain["name"] in KUBELET_CHAINS:
            _nft("flush", "chain", family, table, chain["name"])
            if _nft("delete", "chain", family, table, chain["name"]).returncode == 0:
                done.append(f"removed iptables chain {chain['name']} ({family} {table})")
    if delete_empty and _only_empty_base_chains(_items(family, table) or []):
        _nft("delete", "table", family, table)
        done.append(f"removed empty table {family} {table}")
    return done


def _only_empty_base_chains(items: list[dict[str, Any]]) -> bool:
    chains = [i["chain"] for i in items if "chain" in i]
    if any("rule" in i or "set" in i or "map" in i for i in items):
        return False
    return all("hook" in c and c.get("policy", "accept") == "accept" for c in chains)
