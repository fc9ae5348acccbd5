"""A restored task's `Stats`: the runc shim's own answer when it has one, else the cgroup's figures.

The runc shim of containerd 2.x never loads the cgroup of a task created from
a checkpoint (see `shim.runtime.cgroup_stats`) and answers its `Stats` with
NOT_FOUND "cgroup does not exist"; containerd's CRI then fails ContainerStats
("unexpected metrics response: []"). The relay asks the shim first, on a
connection of its own, and answers from cgroupfs only when the shim says
exactly that. Why not always answer for a restored task: where the shim has
the cgroup (containerd 1.6/1.7, or a 2.x that one day loads it at Start) its
answer is the reference, with every controller containerd/cgroups reads
(block I/O, hugetlb, PSI) and none of our reading's approximations; asking it
first costs one local round trip per Stats of a restored task only.
Anything else the shim says (another error, no connection) is left to it: the
request goes on unchanged and containerd gets the shim's own answer.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from google.protobuf.message import DecodeError

from shim.api.containerd.runtime.task.v2 import shim_pb2
from shim.errors import Code, NotFound
from shim.runtime.cgroup_stats import CgroupFs, stats_response
from shim.ttrpc.client import Client, TTRPCError
from shim.ttrpc.relay import Answer
from shim.ttrpc.status import Status

# The runc shim's answer while it holds no cgroup for the task (cmd/containerd-shim-runc-v2/task/service.go:
# errgrpc.ToGRPCf(errdefs.ErrNotFound, "cgroup does not exist"), on the wire "cgroup does not exist: not found").
CGROUP_NOT_LOADED = "cgroup does not exist"
log = logging.getLogger(__name__)


async def restored_task_stats(service: str, payload: bytes, upstream: Path, bundle: Path | None,
                              fs: CgroupFs | None = None) -> bytes | Answer:
    """The reply to a `Stats` request, or `payload` to send it on to the runc shim unchanged."""
    try:
        request = shim_pb2.StatsRequest.FromString(payload)
    except DecodeError:
        return payload  # the shim refuses it with its own words
    if bundle is None or request.id != bundle.name:  # the bundle is named after the container
        return payload  # not the restored task (or before its Create): the shim's business
    # No deadline of our own: the relay's rewrite runs under the request's.
    try:
        shims = await _ask_shim(service, payload, upstream)
    except OSError:
        return payload
    if isinstance(shims, bytes):
        return Answer(shims)
    if shims.code != Code.NOT_FOUND or not shims.message.startswith(CGROUP_NOT_LOADED):
        return payload
    try:
        pid = int((bundle / "init.pid").read_text())
        return Answer(await asyncio.to_thread(stats_response, pid, request.id, fs))
    except (OSError, ValueError, NotFound) as exc:  # not started, or already gone: the shim's NOT_FOUND stands
        log.info("no cgroup figures for %s: %s", request.id, exc)
        return payload


async def _ask_shim(service: str, payload: bytes, upstream: Path) -> bytes | Status:
    """The shim's reply to `Stats`, or the error status it answered with."""
    async with Client.connect(upstream) as client:
        try:
            return await client.call(service, "Stats", payload)
        except TTRPCError as exc:  # caught in here: the client's TaskGroup would wrap it in a group
            return exc.status
