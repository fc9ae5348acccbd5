"""The node's address hook: moves a pod IP's route to the node that now runs its container.

A container whose TCP connections follow it keeps its old pod IP, so the network must send
that IP to the new node. How depends on the cluster (a /32 announced by BGP, a cloud route
table, the development fabric's router): criu-shim runs an executable the operator names,

    HOOK claim IP VIA    on the target, at the switch-over (its packets held there until the
                         container runs: hold.py) or, without the hold, once it runs: route IP to the
                         local pod VIA; on the source again when a migration fails after that
    HOOK release IP      on the source, after the target claimed it: drop what routes IP here
    HOOK reserve IP      on the source, right after `release`: IP left the pod this node's IPAM
                         gave it to; keep the IPAM from giving it to another pod once that pod is
                         deleted (a no-op for an address this node's IPAM does not own)
    HOOK free IP         where a migrated container holding IP was removed, after `release`: the
                         address is free again for the IPAM that owns it, unless another node has
                         claimed IP since (then a no-op: the container lives on there)
    HOOK check           at preflight: can the hook work now (exit 0)?

with no shell in between (arguments are validated IP addresses). `reserve` and `free` came later:
a hook that fails them (an older one's usage error) only gets a warning.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from shim.errors import FailedPrecondition

TIMEOUT = 30.0


async def run(hook: Path, *args: str) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(str(hook), *args, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        raise FailedPrecondition(f"address hook {hook} cannot run: {exc}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise FailedPrecondition(f"address hook `{hook} {' '.join(args)}` did not finish in {TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip()[-500:]
        raise FailedPrecondition(f"address hook `{hook} {' '.join(args)}` failed (exit {proc.returncode}): {tail}")
