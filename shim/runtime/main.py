"""Entry point of containerd-shim-criu-v2 for restores (the launcher script sends only those here).

`start`: start the stock runc shim exactly as containerd would have, then a
relay in front of it for this task, and print the relay's address; containerd
then talks to the task through us. `relay` is our own internal action: the
relay daemon itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from shim.handoff import RelayCommand, RelayFiles, relay_argv
from shim.runtime import bootstrap
from shim.runtime.bundle import restore_plan
from shim.runtime.flags import ShimArgs, parse

# The launcher exports the stock shim's path (it may be installed under that very name).
RUNC_SHIM = os.environ.get("CRIU_SHIM_RUNC_SHIM", "containerd-shim-runc-v2")
log = logging.getLogger(__name__)


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == RelayCommand.HOSTED:
        # Detach from the proxy that started us (it reaps our parent at once): the relay must
        # outlive proxy restarts, and must not linger as the proxy's zombie when it ends.
        if os.fork() > 0:
            os._exit(0)
        from shim.runtime.relay_daemon import run_hosted

        return run_hosted(Path(argv[1]), Path(argv[2]), Path(argv[3]), _journal(argv, 4))
    if argv and argv[0] == RelayCommand.SPARE:
        if os.fork() > 0:  # detached like a hosted relay
            os._exit(0)
        # Its start-up must not compete with a restore for the CPU: idle priority until assigned.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        from shim.runtime.relay_daemon import run_spare

        return run_spare(Path(argv[1]), Path(argv[2]), _journal(argv, 3))
    if argv and argv[0] == RelayCommand.SHIM:
        from shim.runtime.relay_daemon import run

        return run(Path(argv[1]), Path(argv[2]))
    args = parse(argv)
    if args.action != "start" or restore_plan(Path.cwd()) is None:
        os.execvp(RUNC_SHIM, [RUNC_SHIM, *argv])  # not ours to handle: the stock shim does it
    return start(args)


def _journal(argv: Sequence[str], index: int) -> Path | None:
    """The journal directory the proxy passed a relay (optional: a relay may run without one)."""
    return Path(argv[index]) if len(argv) > index else None


def start(args: ShimArgs) -> int:
    bundle = Path.cwd()
    listen = relay_socket(args)
    listen.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    listen.unlink(missing_ok=True)
    # The relay starts first and learns the runc shim's address on stdin: its
    # interpreter start-up overlaps the runc shim's.
    with open(bundle / "criu-shim-relay.log", "ab") as out:
        relay = subprocess.Popen(relay_argv(RelayCommand.SHIM, str(listen), str(bundle)),
                                 stdin=subprocess.PIPE, stdout=out, stderr=out, start_new_session=True, cwd=bundle)
    assert relay.stdin is not None
    # containerd 2.3+ hand the stock shim its parameters on stdin (ours, inherited) and read a
    # protobuf answer: bytes, answered in kind below (shim.runtime.bootstrap).
    started = subprocess.run([RUNC_SHIM, *args.argv], capture_output=True)
    if started.returncode != 0:
        relay.kill()
        sys.stderr.write(started.stderr.decode(errors="replace"))
        return started.returncode
    try:
        upstream = bootstrap.address_of(started.stdout)
    except (ValueError, KeyError, TypeError) as exc:
        relay.kill()
        sys.stderr.write(f"criu-shim: cannot read the runc shim's answer {started.stdout!r}: {exc}\n")
        return 1
    relay.stdin.write(upstream.encode() + b"\n")
    relay.stdin.close()
    # The mark the proxy's StartContainer looks for: this restore went through the shim.
    plan = restore_plan(bundle)
    if plan is not None:
        RelayFiles(plan.dir.name).upstream_file.write_text(upstream + "\n")
    if not _wait_for(listen, 10.0):
        sys.stderr.write(f"criu-shim relay did not listen on {listen}; see {bundle}/criu-shim-relay.log\n")
        return 1
    _point_address_at(bundle, listen)
    sys.stdout.buffer.write(bootstrap.with_address(started.stdout, f"unix://{listen}"))
    sys.stdout.flush()
    return 0


def _point_address_at(bundle: Path, listen: Path) -> None:
    """containerd 1.6/1.7 find a shim again after a restart by the bundle's `address` (the runc
    shim's): make it the relay's, so a restarted containerd comes back through the relay."""
    temp = bundle / "address.criu-shim.tmp"
    temp.write_text(f"unix://{listen}")
    os.replace(temp, bundle / "address")


def relay_socket(args: ShimArgs) -> Path:
    # Unique per containerd (address), namespace and task, like the runc shim's own.
    digest = hashlib.sha256(f"{args.address}|{args.namespace}|{args.id}".encode()).hexdigest()[:32]
    return RelayFiles(digest).socket


def _wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
