"""CRIU's cache of its kernel probes on a machine whose /run is not tmpfs, as a real node has it.

CRIU probes the kernel (kerndat: iptables and nftables runs, test mappings, test processes) at the
start of every dump, restore and feature check: 35-45 ms on this project's VMs, three times inside a
lazy migration's pause (runc's feature check, the dump, the target's restore). It keeps the result
in /run/criu.kdat, but writes that file only where /run is tmpfs, so that a reboot (maybe into
another kernel) never meets a stale one (criu/kerndat.c). Every systemd host has a tmpfs /run, so a
real node pays the probes once per boot; a machine without one pays them every time, which would
make each node test and benchmark here slower than the real thing by that much.

`node up` gives such a machine what a real node has: the cache CRIU itself writes, made by `criu
check` in a private mount namespace with a tmpfs /run (a child process: the node harness never
enters a namespace itself), copied to /run/criu.kdat, with the boot and the CRIU it was made for
recorded beside it; made again when either changed. Where /run is tmpfs nothing is done: CRIU
keeps its own cache there.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from shim import preflight
from shim.fileio import write_atomically

log = logging.getLogger(__name__)

RUN = Path("/run")
CACHE = RUN / "criu.kdat"  # CRIU's own name for it (KDAT_RUNDIR "/criu.kdat")
ORIGIN = RUN / "criu-shim" / "criu.kdat.origin"  # the boot and the CRIU the cache was made for
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
MAKE_TIMEOUT = 30.0
# In a mount namespace of its own, /run a fresh tmpfs: CRIU writes its cache there, cat hands it out.
_MAKE = 'mount -t tmpfs -o mode=0755,size=1m criu-kdat /run && "$1" check >/dev/null 2>&1; cat /run/criu.kdat'


def run_is_tmpfs(mountinfo: str | None = None) -> bool:
    """What CRIU checks before it keeps its cache (there: statfs's f_type)."""
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    return preflight.fs_type_at(RUN, text) == "tmpfs"


def ensure_cache(criu: Path) -> str:
    """Make sure CRIU finds its probes cached, as on a node with a tmpfs /run; says what was done."""
    if run_is_tmpfs():
        return "CRIU caches its kernel probes itself (/run is tmpfs)"
    try:
        origin = f"boot {BOOT_ID.read_text().strip()}, {_criu_version(criu)}\n"
        if CACHE.is_file() and ORIGIN.is_file() and ORIGIN.read_text() == origin:
            return f"CRIU's kernel probes cached in {CACHE} already ({origin.strip()})"
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("CRIU's kernel probes not cached: %s", exc)
        return "CRIU's kernel probes not cached"
    try:
        made = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", _MAKE, "kdat",
                               str(criu)], capture_output=True, timeout=MAKE_TIMEOUT, check=False)
        why = made.stderr.decode(errors="replace").strip() or f"exit {made.returncode}"
        if made.returncode == 0 and made.stdout:
            ORIGIN.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_atomically(CACHE, made.stdout)
            write_atomically(ORIGIN, origin.encode())
            why = ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = str(exc)
    if why:  # a node without it works, only slower: each dump and restore probes again
        log.warning("CRIU's kernel probes could not be cached (each dump and restore probes again, ~40 ms): %s", why)
        return "CRIU's kernel probes not cached"
    return f"CRIU's kernel probes cached in {CACHE} ({origin.strip()}; /run is not tmpfs here, CRIU would not)"


def _criu_version(criu: Path) -> str:
    out = subprocess.run([str(criu), "--version"], capture_output=True, text=True, timeout=MAKE_TIMEOUT, check=False)
    return " ".join(out.stdout.split()) or f"{criu} (version unknown)"
