"""containerd 2.x: send a restored container's task through criu-shim's runtime handler.

containerd 2.x start one runc shim per pod. For a pod whose shim said bootstrap version 3 when it
started (the stock runc shim of 2.x does), containerd creates the pod's later containers over that
shim's connection without running the runtime handler's binary, so our launcher would never see a
restored container. containerd decides it for each new task from the pod's own task bundle: the
version in its `bootstrap.json` (core/runtime/v2/shim_manager.go, ShimManager.Start, 2.3 and 2.4).
Below 3 it runs the handler's `start`, as 1.x did for every container; the stock shim then answers
with the pod's own shim (it groups a pod's containers by the sandbox annotation), so the restored
task still lives in the pod's shim, with our relay in front, exactly as on 1.7.

So for the span of one restore's task creation the pod's `bootstrap.json` says version 2, and it
is put back byte for byte as soon as our launcher has handed the task to the relay (the relay's
upstream file appears) or StartContainer has ended, whichever is first. Only containerd reads that
file: at a new task of the pod (one started in that span also goes through our launcher, which
for a container not restored is the stock shim, as on 1.7) and when containerd itself restarts
(a restart inside that span, a few milliseconds, would reconnect the pod's sandbox task with
task API v2, which the 2.x shim does not serve).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from shim.errors import FailedPrecondition

log = logging.getLogger(__name__)

BOOTSTRAP = "bootstrap.json"
# containerd's task runtime keeps bundles at <state>/io.containerd.runtime.v2.task/<namespace>/<id>.
TASK_RUNTIME = "io.containerd.runtime.v2.task"
# From this bootstrap version on, containerd joins a pod's containers to the pod's shim directly.
JOINS_POD_SHIM = 3
RUNS_HANDLER = 2
# How often the hand-over is looked for: containerd runs our launcher a few ms into the start.
POLL = 0.005


def pod_bootstrap(containerd_state: Path, namespace: str, sandbox_id: str) -> Path:
    """The `bootstrap.json` of the pod sandbox's task (its shim's address and version)."""
    if not sandbox_id or "/" in sandbox_id or sandbox_id in (".", ".."):
        raise ValueError(f"not a sandbox id: {sandbox_id!r}")
    return containerd_state / TASK_RUNTIME / namespace / sandbox_id / BOOTSTRAP


def _joined_version(original: bytes) -> bytes | None:
    """The file saying RUNS_HANDLER, or None when containerd runs our handler for this pod anyway."""
    try:
        params = json.loads(original)
    except ValueError:
        return None
    if not isinstance(params, dict) or not isinstance(params.get("version"), int):
        return None
    if params["version"] < JOINS_POD_SHIM:
        return None
    params["version"] = RUNS_HANDLER
    return json.dumps(params, separators=(",", ":")).encode()


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Atomically: containerd may read the file at any moment."""
    temp = path.with_name(f".{path.name}.criu-shim")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(temp, path)


class PodShims:
    """Opens a pod's shim to our handler for one restore's task creation at a time (per pod)."""

    def __init__(self) -> None:
        self._locks: dict[Path, tuple[asyncio.Lock, int]] = {}  # a lock per pod and how many use it

    @contextlib.asynccontextmanager
    async def through_handler(self, bootstrap: Path, handed_over: Callable[[], bool]) -> AsyncIterator[None]:
        """Inside, a new task of the pod goes through the runtime handler's binary (see the module)."""
        async with self._pod(bootstrap) as lock:
            try:
                undo = await asyncio.to_thread(self._open, bootstrap)
            except BaseException as exc:
                lock.release()
                if isinstance(exc, OSError):
                    raise FailedPrecondition(f"cannot send the restored task through criu-shim's runtime "
                                             f"handler: {bootstrap}: {exc.strerror or exc}") from None
                raise
            if undo is None:
                lock.release()
                yield
                return
            closed = asyncio.Event()
            opened = time.monotonic()

            async def close() -> None:
                if not closed.is_set():
                    closed.set()
                    try:
                        await asyncio.to_thread(undo)
                    finally:
                        lock.release()
                    log.info("%s said version %d for %.1f ms (a restored task's creation)", bootstrap,
                             RUNS_HANDLER, (time.monotonic() - opened) * 1000)

            async def close_once_handed_over() -> None:
                while not handed_over():
                    await asyncio.sleep(POLL)
                await close()

            # Owned here: cancelled and awaited on the way out. (Not a TaskGroup: it would wrap
            # StartContainer's own error in an ExceptionGroup.)
            watcher = asyncio.create_task(close_once_handed_over())
            try:
                yield
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await close()

    @contextlib.asynccontextmanager
    async def _pod(self, bootstrap: Path) -> AsyncIterator[asyncio.Lock]:
        """The pod's lock, acquired (the caller releases it); forgotten when nobody needs it."""
        lock, users = self._locks.get(bootstrap, (asyncio.Lock(), 0))
        self._locks[bootstrap] = (lock, users + 1)
        try:
            await lock.acquire()
            yield lock
        finally:
            lock, users = self._locks[bootstrap]
            if users == 1:
                del self._locks[bootstrap]
            else:
                self._locks[bootstrap] = (lock, users - 1)

    @staticmethod
    def _open(bootstrap: Path) -> Callable[[], None] | None:
        """Write the version that makes containerd run our handler; the undo, or None if not needed."""
        try:
            original = bootstrap.read_bytes()
            mode = bootstrap.stat().st_mode & 0o7777
        except FileNotFoundError:
            return None  # containerd 1.x (no bootstrap.json), or the pod is gone: containerd will say so
        joined = _joined_version(original)
        if joined is None:
            return None
        _replace(bootstrap, joined, mode)

        def undo() -> None:
            try:
                if bootstrap.read_bytes() != joined:
                    return  # containerd wrote it since: its word stands
                _replace(bootstrap, original, mode)
            except FileNotFoundError:
                return  # the pod's task is gone
            except OSError as exc:
                log.error("could not put back %s (the pod's shim version): %s", bootstrap, exc)

        return undo
