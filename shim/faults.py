"""Named fault points: where the fault-injection tests kill criu-shim on purpose.

`CRIU_SHIM_FAULT=<point>` in the environment of a criu-shim process makes it
SIGKILL itself when it reaches that point, exactly as the OOM killer or a
`systemctl kill` would, so recovery is tested at each phase of an operation
without racing a timer. Unset (always, in production) a point costs one
dictionary lookup. The points are listed here so the tests and the code agree.
"""

from __future__ import annotations

import enum
import os
import signal

VARIABLE = "CRIU_SHIM_FAULT"


class Point(enum.StrEnum):
    # CRIU holds the container (or, where we pause it ourselves, it is paused), no rootfs diff yet
    CHECKPOINT_FROZEN = "checkpoint-frozen"
    # the rootfs diff is taken, CRIU still holds the container at its last image (or it is still paused)
    CHECKPOINT_DUMPED = "checkpoint-dumped"
    # a stop-after dump's gate opened and CRIU's inventory kept: CRIU ends the container, the archive is not
    # complete yet (recovery completes it: shim.checkpoint.rollforward)
    CHECKPOINT_COMMITTED = "checkpoint-committed"
    CHECKPOINT_ARCHIVE = "checkpoint-archive"  # thawed; the memory image sits in the staging directory
    RESTORE_UNPACKED = "restore-unpacked"  # CreateContainer: unpacked, relay handed the restore, no container yet
    RESTORE_CREATED = "restore-created"  # containerd created the container; the relay not yet confirmed ready
    # StartContainer of a restore created from a first part (a lazy migration's): its second part not unpacked yet
    RESTORE_SECOND_PART = "restore-second-part"
    # `migrate --mode lazy`: CRIU waits in its pre-dump hook; no switch-over, lock or freeze yet
    MIGRATE_PREDUMP = "migrate-predump"
    # `migrate --mode lazy`: switched over (the target holds and claimed the IPs), our TCP lock on and the
    # container frozen by us; CRIU still waits in its hook for our "go"
    MIGRATE_FROZEN = "migrate-frozen"
    # the migration receiver created a lazy migration's container from the first part; the source not told yet
    MIGRATE_PREPARED = "migrate-prepared"
    # the migration receiver restored the container and claimed its addresses; the source not told yet
    MIGRATE_RESTORED = "migrate-restored"


def reached(point: Point) -> None:
    if os.environ.get(VARIABLE) == point.value:
        os.kill(os.getpid(), signal.SIGKILL)


def armed(point: Point) -> bool:
    """Whether this process dies at `point`: for the few points that must first wait for a state to be reached."""
    return os.environ.get(VARIABLE) == point.value
