"""Undo what an interrupted checkpoint left: a frozen container, a network lock, a staging directory.

Two callers. The engine, when CRIU fails or dies under it: `ensure_running`
walks the container back to RUNNING in containerd's view and the kernel's.
The reconciler, for a checkpoint whose criu-shim died (journal record with a
dead owner): `undo` does the same from the record's facts and removes the
staging directory, which holds the process's memory (secrets). Before that, a
stop-after checkpoint whose gate had opened (its marker in the staging
directory) and whose CRIU went through has its archive completed and renamed
into place (`rollforward`): CRIU ended the container, the archive is the
workload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from shim import freezer, signing
from shim.api.cri.v1 import api_pb2 as cri
from shim.archive_layout import IMAGES_DIR
from shim.checkpoint import netlock, orphandump, rollforward
from shim.containerd import Containerd
from shim.errors import ShimError

log = logging.getLogger(__name__)

# Journal facts of a checkpoint (shim.journal records); spelled here only.
CONTAINER = "container_id"
LOCATION = "location"  # the archive asked for
STAGING = "staging"
PAUSED = "paused"  # paused by us around the dump
DUMPING = "dumping"  # dumped without a pause of ours: CRIU alone stops the container (dumpgate)
NETNS = "netns"
NETNS_TABLES = "netns_tables"  # the nftables tables the pod had before the checkpoint


async def ensure_running(containerd: Containerd, container_id: str) -> str:
    """Make the container RUNNING for containerd and thawed for the kernel; say what it took.

    containerd's runc shim can only leave PAUSED through a Resume that runc
    accepts, and runc accepts it only for a frozen cgroup. So a task the shim
    holds PAUSED over a thawed cgroup (CRIU died after it had thawed the
    cgroup to work under ptrace) is frozen again first, then resumed.
    """
    paused = await containerd.task_paused(container_id)
    if paused is None:
        return "the container has no task any more"
    directory = await freezer_dir(containerd, container_id)
    kernel = await asyncio.to_thread(freezer.state, directory) if directory else None
    if paused:
        if kernel is freezer.State.THAWED:
            assert directory is not None
            await asyncio.to_thread(freezer.set_state, directory, freezer.State.FROZEN)
        await containerd.resume(container_id)
        return "resumed the paused container"
    if directory is not None and kernel is not freezer.State.THAWED:
        await asyncio.to_thread(freezer.set_state, directory, freezer.State.THAWED)
        return "thawed the container's cgroup"
    return "the container was running"


async def resume(containerd: Containerd, container_id: str) -> None:
    """Resume after a dump; if containerd's and the kernel's views parted, reconcile them."""
    try:
        await containerd.resume(container_id)
    except ShimError as exc:
        log.warning("resuming %s failed (%s); reconciling its task with the freezer", container_id, exc.message)
        done = await ensure_running(containerd, container_id)
        log.warning("container %s: %s", container_id, done)


def busy(facts: dict[str, Any]) -> bool:
    """A dump may outlive its criu-shim (runc goes on): wait until no process works in its staging dir.

    The dump must fail, never finish: a stop-after dump that finished would end
    the container with no archive ever written. CRIU writing pages or waiting at
    the gate got EPIPE when the kernel closed the dead criu-shim's descriptors;
    a CRIU that opened a FIFO (a page image, the gate) only afterwards sleeps in
    its open holding the container: `orphandump` makes it fail there. Blocking.
    """
    staging = facts.get(STAGING)
    if not staging or not _process_mentions(str(staging)):
        return False
    images = Path(str(staging)) / IMAGES_DIR
    failed = orphandump.fail_waiting(images)
    if failed:
        log.warning("failed the dump of CRIU %s, left waiting at a FIFO in %s by a dead criu-shim", failed, images)
    return _process_mentions(str(staging))


async def undo(containerd: Containerd, facts: dict[str, Any], signing_key: Path | None = None) -> list[str]:
    """Undo an interrupted checkpoint from its journal facts; return what was done.

    A stop-after one past its gate is rolled forward first (its archive completed, signed with
    `signing_key` if given); the rest of the clean-up follows either way."""
    done: list[str] = []
    container_id = str(facts.get(CONTAINER, ""))
    staging = facts.get(STAGING)
    rolled = False
    if staging and container_id and rollforward.has_marker(Path(str(staging))):
        rolled, said = await roll_forward(Path(str(staging)), container_id, str(facts.get(LOCATION, "")),
                                          signing_key)
        done.append(said)
    if (facts.get(PAUSED) or facts.get(DUMPING)) and container_id and not rolled:  # else CRIU ended it
        try:
            done.append(await ensure_running(containerd, container_id))
        except (ShimError, freezer.FreezerError) as exc:
            done.append(f"could not thaw: {getattr(exc, 'message', exc)}")
    if staging and container_id and rollforward.has_marker(Path(str(staging))):
        done.append(await _container_state(containerd, container_id))
    if facts.get(NETNS):
        netns = Path(str(facts[NETNS]))
        if netns.exists():
            try:
                await netlock.run_nft(netns, netlock.unlock_script(), missing_ok=True)
                done.append(f"removed the network lock in {netns}")
                if NETNS_TABLES in facts:
                    dropped = await netlock.drop_new_empty_tables(netns, set(facts[NETNS_TABLES]))
                    done += [f"removed CRIU's empty table {t}" for t in dropped]
            except ShimError as exc:
                done.append(f"could not remove the network lock in {netns}: {exc.message}")
    if staging and Path(str(staging)).exists():
        await asyncio.to_thread(shutil.rmtree, str(staging), True)
        done.append(f"deleted staging directory {staging}")
    return done


async def roll_forward(staging: Path, container_id: str, location: str,
                       signing_key: Path | None) -> tuple[bool, str]:
    """Complete a stop-after archive whose criu-shim died after CRIU's gate opened; whether it was, and
    what happened."""
    try:
        marker = await asyncio.to_thread(rollforward.decide, staging, container_id, location)
        size = await asyncio.to_thread(rollforward.complete, marker)
    except (rollforward.RollForwardError, OSError, ValueError) as exc:
        log.error("stop-after checkpoint of container %s: archive %s NOT completed: %s", container_id, location, exc)
        return False, f"archive {location} not completed: {exc}"
    signed = ""
    if signing_key is not None:
        try:
            key = await asyncio.to_thread(signing.load_signing_key, signing_key)
            signed = f", signed ({await asyncio.to_thread(signing.sign_archive, marker.location, key)})"
        except (OSError, ValueError, ShimError) as exc:
            signed = f", NOT signed: {getattr(exc, 'message', exc)}"
    log.warning("stop-after checkpoint of container %s rolled forward: archive %s completed from %s (%d bytes)%s",
                container_id, location, staging, size, signed)
    return True, f"rolled forward: archive {location} completed ({size} bytes) after CRIU's gate had opened{signed}"


async def _container_state(containerd: Containerd, container_id: str) -> str:
    try:
        status, _ = await containerd.container_status(container_id)
    except ShimError as exc:
        return f"containerd does not report container {container_id}: {exc.message}"
    return f"containerd reports the container {cri.ContainerState.Name(status.state)}"


async def freezer_dir(containerd: Containerd, container_id: str) -> Path | None:
    cgroups = await containerd.cgroups_path(container_id)
    if not cgroups:
        return None
    directory = freezer.cgroup_dir(cgroups)
    return directory if directory.is_dir() else None


def _process_mentions(text: str) -> bool:
    needle = text.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle in f.read():
                    return True
        except OSError:
            continue
    return False
