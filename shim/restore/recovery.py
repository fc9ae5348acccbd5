"""Undo what an interrupted restore left: an unpacked checkpoint, loop devices, a relay, a runc shim.

A restore is journaled (shim.journal) by two processes in turn, each under its
own record, told apart by the `role` fact:

- `create`: the proxy's CreateContainer, from before the work dir exists until
  containerd has the container and its relay is listening. If the proxy dies
  in between, the reconciler stops the relay (which cleans up after itself),
  releases the loop devices and deletes the work dir, the CRIU config and the
  exported layer; unless containerd already has a container restoring from
  that dir, which the relay then owns.
- `relay`: the restore relay, from its start until it has cleaned up at its
  end (shim.runtime.relay_daemon). If the relay is killed, the reconciler
  waits until the container no longer runs (a live container is never
  touched), then stops the page daemon, shuts the stock runc shim down
  (Delete, Shutdown: it removes its socket itself), releases the loop devices
  and deletes the work dir and the relay's files.

The journal fact names of a restore are spelled here only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shim.errors import Code
from shim.handoff import LAZY_WORK, RESTORE_DIR, criu_config
from shim.journal import Journal, Operation, Record
from shim.restore import lazy
from shim.restore.image import layer_path
from shim.restore.relay_processes import remove_files
from shim.restore.unseal import plaintext_path

if TYPE_CHECKING:  # the relay imports this module too: no gRPC on its start-up
    from shim.containerd import Containerd

log = logging.getLogger(__name__)

# Journal facts of a restore (shim.journal records).
ROLE = "role"
CREATE = "create"  # the proxy's CreateContainer
RELAY = "relay"  # the relay serving the restored task
WORK = "work"  # the unpacked checkpoint
SHIMS = "shims"  # the directory of the relay's files (<key>.sock, .pid, .log, .upstream)
JOURNAL = "journal"  # the journal directory (a relay's record defers to a live create record)
RELAY_PID = "relay_pid"
CONTAINER_ID = "container_id"  # also read by the reconciler's audit line
BUNDLE = "bundle"
UPSTREAM = "upstream"  # the stock runc shim's ttrpc socket
# Read by the reconciler's audit line.
POD, NAMESPACE, CONTAINER, LOCATION = "pod", "namespace", "container", "location"

# The runc shim of containerd 1.x serves task API v2, that of 2.x v3 only (the same messages).
TASK_SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")
SHIM_CALL_TIMEOUT = 10.0


def create_facts(work: Path, shims: Path, pod: str, namespace: str, container: str, location: str) -> dict[str, Any]:
    return {ROLE: CREATE, WORK: str(work), SHIMS: str(shims), POD: pod, NAMESPACE: namespace, CONTAINER: container,
            LOCATION: location}


def relay_facts(work: Path, shims: Path, journal: Path) -> dict[str, Any]:
    """The relay's own record; it names the pod and container as the proxy's record of the restore does
    (read from there: the relay is told only the work dir), for the audit line of a recovery."""
    facts: dict[str, Any] = {ROLE: RELAY, WORK: str(work), SHIMS: str(shims), JOURNAL: str(journal),
                             RELAY_PID: os.getpid()}
    for record in Journal(journal).records():
        if record.facts.get(ROLE) == CREATE and record.facts.get(WORK) == str(work):
            facts.update({k: record.facts[k] for k in (POD, NAMESPACE, CONTAINER, LOCATION) if k in record.facts})
    return facts


def task_facts(container_id: str, bundle: Path) -> dict[str, Any]:
    return {CONTAINER_ID: container_id, BUNDLE: str(bundle)}


def upstream_facts(address: Path) -> dict[str, Any]:
    return {UPSTREAM: str(address)}


def busy(facts: dict[str, Any]) -> bool:
    """Not yet: the restored container still runs, or the proxy is still creating it."""
    if facts.get(ROLE) != RELAY:
        return False
    if _container_runs(facts):
        return True  # what serves a live container is never touched
    return not facts.get(CONTAINER_ID) and _being_created(facts)


async def undo(containerd: Containerd, facts: dict[str, Any]) -> list[str]:
    """Undo an interrupted restore from its journal facts; return what was done."""
    work = Path(str(facts.get(WORK, "")))
    if not work.is_absolute() or work == Path("/"):
        return ["no work dir was recorded"]
    if facts.get(ROLE) == RELAY:
        return await _undo_relay(facts, work)
    return await _undo_create(containerd, facts, work)


async def _undo_create(containerd: Containerd, facts: dict[str, Any], work: Path) -> list[str]:
    used = await containerd.container_annotation_values(RESTORE_DIR)  # raises while containerd is down: later
    if str(work) in used:
        return [f"containerd has the container restoring from {work}: its relay owns it"]
    done: list[str] = []
    pid = _relay_pid(Path(str(facts.get(SHIMS, ""))), work)
    devices = await asyncio.to_thread(lazy.attached, work)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # it releases the page daemon, devices, files and work dir itself
            done.append(f"stopped relay {pid}")
    removed = await asyncio.to_thread(_remove_restore, work, Path(str(facts.get(SHIMS, ""))), pid is None)
    # The stopped relay and we race to release its loop devices: say each one went, whoever let it go.
    still = set(await asyncio.to_thread(lazy.attached, work))
    done += [line for line in (f"released loop device {d}" for d in devices if d not in still) if line not in removed]
    done += removed
    conf = criu_config(work)  # no container names it: nothing will read it
    if conf.exists():
        conf.unlink(missing_ok=True)
        done.append(f"deleted {conf}")
    return done


async def _undo_relay(facts: dict[str, Any], work: Path) -> list[str]:
    done: list[str] = []
    # `criu lazy-pages --images-dir <work>/...`, or ours (by its cwd): the page daemon, which outlives a killed relay.
    for pid in await asyncio.to_thread(_page_daemons, work):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            done.append(f"stopped page daemon {pid}")
    upstream, container_id = facts.get(UPSTREAM), str(facts.get(CONTAINER_ID, ""))
    if upstream and container_id:
        done.append(await _shut_runc_shim_down(Path(str(upstream)), container_id, Path(str(facts.get(BUNDLE)))))
    done += await asyncio.to_thread(_remove_restore, work, Path(str(facts.get(SHIMS, ""))), True)
    return done


def _remove_restore(work: Path, shims: Path, relay_gone: bool) -> list[str]:
    """Loop devices, work dir, exported layer, decrypted archive; the relay's files when no relay is left to remove them."""
    done = [f"released loop device {device}" for device in lazy.release(work)]
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
        done.append(f"deleted work dir {work}")
    # The exported layer, and the decrypted copy of a sealed archive (plaintext memory: a secret).
    for leftover in (layer_path(work), plaintext_path(work)):
        if leftover.exists():
            leftover.unlink(missing_ok=True)
            done.append(f"deleted {leftover}")
    if relay_gone and shims.is_absolute():
        done += [f"deleted {path}" for path in remove_files({work.name}, shims)]
    return done


async def _shut_runc_shim_down(address: Path, container_id: str, bundle: Path) -> str:
    """Delete then Shutdown through the runc shim's own API: it forgets the task, and ends (removing
    its socket itself) unless it still serves other containers (the pod's shim serves the whole pod).

    containerd removed the bundle when it gave the relay up for dead; the shim's Delete has
    runc log into it, so an empty one stands in for the call.
    """
    from shim.api.containerd.runtime.task.v2 import shim_pb2
    from shim.ttrpc.client import Client, TTRPCError

    stand_in = bundle.is_absolute() and not bundle.exists()
    if stand_in:
        bundle.mkdir(mode=0o700, parents=True)
    said = []
    services = list(TASK_SERVICES)
    try:
        async with Client.connect(address) as client:
            for method, request in (("Delete", shim_pb2.DeleteRequest(id=container_id)),
                                    ("Shutdown", shim_pb2.ShutdownRequest(id=container_id, now=True))):
                while services:
                    try:
                        await client.call(services[0], method, request.SerializeToString(),
                                          timeout=SHIM_CALL_TIMEOUT)
                    except TTRPCError as exc:
                        if exc.status.code == Code.UNIMPLEMENTED and len(services) > 1:
                            services.pop(0)  # a 2.x shim: ask again in v3
                            continue
                        said.append(f"{method}: {exc.status.message}")
                    break
    except OSError:
        return "the runc shim was gone"
    finally:
        if stand_in:
            shutil.rmtree(bundle, ignore_errors=True)
    return f"told the runc shim at {address} the task is gone" + (f" ({'; '.join(said)})" if said else "")


def _container_runs(facts: dict[str, Any]) -> bool:
    """The restored process is alive: the bundle's init.pid names a process in the container's cgroup."""
    bundle = facts.get(BUNDLE)
    if not bundle:
        return False
    try:
        pid = int(Path(str(bundle), "init.pid").read_text())
        return Path(str(bundle)).name in Path(f"/proc/{pid}/cgroup").read_text()
    except (OSError, ValueError):
        return False


def _being_created(facts: dict[str, Any]) -> bool:
    """A live proxy's CreateContainer still works on this restore (its failure path cleans up)."""
    journal = facts.get(JOURNAL)
    if not journal:
        return False
    work = str(facts.get(WORK))
    return any(r.operation is Operation.RESTORE and r.facts.get(ROLE) == CREATE and r.facts.get(WORK) == work
               and r.owner.alive() for r in Journal(Path(str(journal))).records())


def _relay_pid(shims: Path, work: Path) -> int | None:
    """The live relay of this restore, if any (its pid file, checked against its command line)."""
    try:
        pid = int((shims / f"{work.name}.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"shim.runtime" in cmdline else None


def _page_daemons(work: Path) -> list[int]:
    """The restore's page daemons: CRIU's names the work dir in its command line; ours (started by a
    spare relay before its restore was known) works in <work>/lazy-work."""
    needle, cwd, found = f"{work}/".encode(), str(work / LAZY_WORK), []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    cmdline = f.read()
                if b"lazy-pages" in cmdline and needle in cmdline or \
                        b"shim.runtime.page_daemon" in cmdline and os.readlink(f"/proc/{entry.name}/cwd") == cwd:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def sweep(containerd: Containerd, journal: Journal) -> list[tuple[Record, list[str]]]:
    """Stop live relays of restores no container stands for any more; what was stopped, per record.

    A relay created for a container that is removed before it ever starts would
    wait for containerd in vain (START_WAIT); one whose container was started
    ends with its runc shim and needs nothing.
    """
    waiting = [r for r in await asyncio.to_thread(journal.records)
               if r.operation is Operation.RESTORE and r.facts.get(ROLE) == RELAY and not r.facts.get(CONTAINER_ID)
               and r.owner.alive()]
    if not waiting:
        return []
    used = await containerd.container_annotation_values(RESTORE_DIR)
    stopped = []
    for record in waiting:
        work = str(record.facts.get(WORK))
        if work in used or not Path(work).is_dir() or await asyncio.to_thread(_being_created, record.facts):
            continue  # (no work dir: an undo of the same pass already stopped the relay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.owner.pid, signal.SIGTERM)  # it cleans up after itself and closes its record
            stopped.append((record, [f"stopped relay {record.owner.pid}: no container restores from {work}"]))
    return stopped
