"""The network lock around a dump of established TCP connections.

CRIU locks the network only of namespaces it dumps itself. A pod's network
namespace is external to the container, so CRIU leaves the lock to its
caller, and runc does nothing: a segment arriving between the dump of a
socket's queues and the end of the dump is acknowledged by the old socket and
lost to the restored one; and once a stop-after dump has ended the process,
a retransmission finds no socket and the kernel answers with a reset, killing
the very connection the restored copy is about to resume. So criu-shim locks
the pod's network itself, with one nftables table in the pod's namespace:

- during the dump, every TCP segment on the pod's interfaces is dropped
  (loopback is left alone; the peers just retransmit);
- afterwards the table is removed, on every path (success, failure,
  deadline, CRIU killed), except after a successful stop-after dump: then it
  is narrowed to the dumped connections (read from CRIU's images), so their
  peers see silence instead of a reset until the restored copy takes over;
  it goes away with the pod's namespace.

nft runs under `nsenter --net` in a child process: the daemon never switches
its own namespace.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from shim.errors import Internal

TABLE = "criu_shim_lock"
_TCP = 6
_ESTABLISHED = 1


@dataclass(frozen=True)
class Connection:
    family: int
    local: str
    local_port: int
    remote: str
    remote_port: int


def lock_script() -> str:
    return "\n".join([
        f"add table inet {TABLE}",
        f"flush table inet {TABLE}",  # a table left by a crashed attempt starts empty again
        f"add chain inet {TABLE} input {{ type filter hook input priority -300 ; policy accept ; }}",
        f"add chain inet {TABLE} output {{ type filter hook output priority -300 ; policy accept ; }}",
        f'add rule inet {TABLE} input iifname != "lo" meta l4proto tcp drop',
        f'add rule inet {TABLE} output oifname != "lo" meta l4proto tcp drop',
    ]) + "\n"


def narrow_script(connections: list[Connection]) -> str:
    """Keep dropping only the dumped connections' segments."""
    lines = [f"flush chain inet {TABLE} input", f"flush chain inet {TABLE} output"]
    for c in connections:
        ip = "ip" if c.family == socket.AF_INET else "ip6"
        lines.append(f"add rule inet {TABLE} input {ip} saddr {c.remote} {ip} daddr {c.local} "
                     f"tcp sport {c.remote_port} tcp dport {c.local_port} drop")
        lines.append(f"add rule inet {TABLE} output {ip} saddr {c.local} {ip} daddr {c.remote} "
                     f"tcp sport {c.local_port} tcp dport {c.remote_port} drop")
    return "\n".join(lines) + "\n"


def unlock_script() -> str:
    return f"delete table inet {TABLE}\n"


CRIU_CHAIN = "CRIU"  # CRIU's own network lock (criu/net.c): accept its mark, drop the rest, jumped to from INPUT/OUTPUT
# ... and with `network-lock nftables`, a table of its own: "inet CRIU-<run id>" (criu/netfilter.c).
CRIU_TABLE_PREFIX = "CRIU-"


# What may go into an nft script we write from a listing: a pod with CAP_NET_ADMIN names its own
# tables and chains, and the kernel takes any bytes there (a newline, then `include "/etc/shadow"`).
_FAMILIES = frozenset({"ip", "ip6", "inet", "arp", "bridge", "netdev"})
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _safe(family: object, *names: object) -> bool:
    """A family nft knows and names of plain characters only: safe to write into an nft script."""
    return family in _FAMILIES and all(isinstance(n, str) and _NAME.fullmatch(n) for n in names)


def criu_unlock_script(ruleset: object) -> str:
    """From `nft -j list ruleset`: deletions of CRIU's own lock (the jumps to its chain, then the chain).

    A lazy dump that fails once CRIU serves pages ends without CRIU's unlock: its chain stays in the
    pod, dropping every packet but its own, and the source that runs on is unreachable (seen after a
    refused lazy restore). Only CRIU's chain and the rules jumping to it go, and the table CRIU
    makes instead with `network-lock nftables` (inet CRIU-<run id>)."""
    items = ruleset.get("nftables", []) if isinstance(ruleset, dict) else []
    jumps: list[str] = []
    chains: list[str] = []
    for item in items if isinstance(items, list) else []:
        rule = item.get("rule") if isinstance(item, dict) else None
        chain = item.get("chain") if isinstance(item, dict) else None
        if isinstance(rule, dict) and _safe(rule.get("family"), rule.get("table"), rule.get("chain")) \
                and isinstance(rule.get("handle"), int) and isinstance(rule.get("expr"), list) \
                and any(isinstance(e, dict) and isinstance(e.get("jump"), dict)
                        and e["jump"].get("target") == CRIU_CHAIN for e in rule["expr"]):
            jumps.append(f"delete rule {rule['family']} {rule['table']} {rule['chain']} handle {rule['handle']}")
        if isinstance(chain, dict) and chain.get("name") == CRIU_CHAIN and _safe(chain.get("family"), chain.get("table")):
            where = f"{chain['family']} {chain['table']} {CRIU_CHAIN}"  # nft deletes only an empty chain
            chains += [f"flush chain {where}", f"delete chain {where}"]
        table = item.get("table") if isinstance(item, dict) else None
        if isinstance(table, dict) and table.get("family") == "inet" and _criu_table(table.get("name")):
            chains.append(f"delete table inet {table['name']}")  # its chains and rules go with it
    return "".join(f"{line}\n" for line in jumps + chains)


def _criu_table(name: object) -> bool:
    """CRIU's nftables lock table: CRIU- and its run id (a UUID's characters: nothing to quote)."""
    if not isinstance(name, str) or not name.startswith(CRIU_TABLE_PREFIX):
        return False
    run_id = name.removeprefix(CRIU_TABLE_PREFIX)
    return 0 < len(run_id) <= 64 and all(c.isascii() and (c.isalnum() or c == "-") for c in run_id)


async def remove_criu_lock(netns: Path) -> None:
    """Remove CRIU's own network lock left in the namespace, if any (criu_unlock_script)."""
    script = criu_unlock_script(json.loads(await _nft_output(netns, "-j", "list", "ruleset")))
    if script:
        await run_nft(netns, script, missing_ok=True)


async def run_nft(netns: Path, script: str, missing_ok: bool = False) -> None:
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={netns}", "nft", "-f", "-", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate(script.encode())
    if proc.returncode != 0 and not (missing_ok and b"No such file or directory" in err):
        raise Internal(f"nft in {netns} failed: {err.decode(errors='replace').strip()}")


async def tables(netns: Path) -> set[str]:
    """The nftables tables in the namespace, as "family name"."""
    out = await _nft_output(netns, "list", "tables")
    return {line.removeprefix("table ").strip() for line in out.splitlines() if line.startswith("table ")}


async def drop_new_empty_tables(netns: Path, before: set[str]) -> list[str]:
    """Delete tables that appeared since `before` and hold no rule; return their names.

    CRIU locks each dumped connection with iptables; through iptables-nft that
    creates `ip filter` / `ip6 filter` tables in the pod, and CRIU's unlock
    removes its rules but not the tables. Only what was not there before and is
    empty now goes: nobody else's rules are touched. Two nft runs whatever the
    number of tables (one listing of the ruleset, one batch of deletions): each
    run costs a process start inside a stop-after checkpoint's answer.
    """
    ruleset = json.loads(await _nft_output(netns, "-j", "list", "ruleset"))
    doomed = empty_new_tables(ruleset, before)
    if doomed:
        await run_nft(netns, "".join(f"delete table {table}\n" for table in doomed), missing_ok=True)
    return doomed


def empty_new_tables(ruleset: object, before: set[str]) -> list[str]:
    """From `nft -j list ruleset`: the tables ("family name") not in `before`, not ours, with no rule."""
    items = ruleset.get("nftables", []) if isinstance(ruleset, dict) else []
    named: set[str] = set()
    ruled: set[str] = set()
    for item in items if isinstance(items, list) else []:
        for kind, into in (("table", named), ("rule", ruled)):
            body = item.get(kind) if isinstance(item, dict) else None
            if isinstance(body, dict):
                table = body.get("name") if kind == "table" else body.get("table")
                if kind == "rule" or _safe(body.get("family"), table):  # a table we may name in a script
                    into.add(f"{body.get('family')} {table}")
    return sorted(named - ruled - before - {f"inet {TABLE}"})


async def _nft_output(netns: Path, *argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={netns}", "nft", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise Internal(f"nft {' '.join(argv)} in {netns} failed: {err.decode(errors='replace').strip()}")
    return out.decode()


def _address(family: int, words: list[int]) -> str:
    packed = b"".join(struct.pack("<I", w) for w in words)
    return socket.inet_ntop(family, packed)


def dumped_connections(images: Path) -> list[Connection]:
    """Established TCP connections in CRIU's images (files.img)."""
    import pycriu.images

    files = images / "files.img"
    if not files.is_file():
        return []
    entries = pycriu.images.load(io.BytesIO(files.read_bytes()))["entries"]
    found = []
    for entry in entries:
        isk = entry.get("isk")
        if not isk or isk.get("proto") != _TCP or isk.get("state") != _ESTABLISHED:
            continue
        family = int(isk["family"])
        found.append(Connection(family, _address(family, isk["src_addr"]), int(isk["src_port"]),
                                _address(family, isk["dst_addr"]), int(isk["dst_port"])))
    return found
