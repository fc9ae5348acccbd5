"""The restore hand-off: the names the proxy, the relay and the launcher agree on.

Three programs meet over files and annotations, never over a Python call: the proxy
(shim.restore) unpacks a checkpoint into a work dir and marks the container's spec; the
launcher (node-config/containerd-shim-criu-v2, sh) finds the relay by the work dir's name;
the relay (shim.runtime) reads its plan back from the OCI bundle. Every one of those names
is spelled here; tests/unit/test_handoff.py checks the sh launcher's copies against them.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from pathlib import Path

from shim import archive_layout
from shim.annotations import RESTORE_PREFIX

# Annotations the proxy sets on a restored container. Both are allow-listed for the "criu"
# runtime handler (containerd copies allow-listed request annotations into the OCI spec).
RESTORE_DIR = RESTORE_PREFIX + "dir"  # the restore's work dir; the launcher greps for it
CRIU_CONFIG_ANNOTATION = "org.criu.config"  # runc hands this file to CRIU as its config
RESTORE_ANNOTATIONS = (RESTORE_PREFIX + "*", CRIU_CONFIG_ANNOTATION)

# Where relays and launchers meet: <key>.sock, <key>.upstream, <key>.pid, <key>.log, the key
# being the work dir's name. The launcher honours SHIM_DIR_ENV (tests point it elsewhere).
SHIM_DIR = Path("/run/criu-shim/shims")
# The relay that starts a spare page daemon names itself here: a spare whose parent is another is an orphan.
SPARE_PARENT_ENV = "CRIU_SHIM_SPARE_PARENT"
SHIM_DIR_ENV = "CRIU_SHIM_SHIMS_DIR"
CRIU_CONFIG_SUFFIX = ".criu.conf"
# How long a relay waits for containerd to start its restore before it gives up; the proxy
# forgets a pending restore (shim.restore.pending) at that age too.
RELAY_START_WAIT = 15 * 60.0
# A lazy restore: the proxy writes the plan into the work dir, the relay starts the page daemon
# from it and, once the daemon is done, takes LAZY_CRIU_OPTION out of the CRIU config.
LAZY_PLAN = "lazy-pages.json"
LAZY_CRIU_OPTION = "lazy-pages"
# The page daemon's own work dir inside the restore dir, and its working directory: a daemon a
# spare relay started ahead of need has no restore in its command line, so it is found by its cwd.
LAZY_WORK = "lazy-work"
# A lazy migration's archive holds no lazy memory: its pages stay with the source node. The
# receiver writes ARCHIVE + this suffix beside the archive (root's, 0600, JSON): where the
# restore's page daemon asks for them, either the source's page end itself, which criu-shim's
# daemon dials with TLS ({"address", "port", "tls": {cert, key, ca, certificate, token, idle}},
# shim.restore.remote_pages.Pinned), or the loopback end of the receiver's tunnel ({"port": N},
# for CRIU's daemon). Only a file of root's in the restore's allowed dirs can name one.
REMOTE_PAGES_SUFFIX = ".page-server"


class RelayCommand(enum.StrEnum):
    """How a relay process is started: `python -m shim.runtime COMMAND ARGS...`."""

    HOSTED = "relay-for"  # by the proxy at CreateContainer, for one restore: SOCKET UPSTREAM_FILE WORK [JOURNAL]
    SPARE = "relay-spare"  # by the proxy ahead of need, given its work dir on stdin: DIRECTORY WORK_ROOT [JOURNAL]
    SHIM = "relay"  # by the runtime shim when no proxy relay listens: LISTEN BUNDLE


def relay_argv(command: RelayCommand, *args: str) -> list[str]:
    return [sys.executable, "-m", "shim.runtime", command, *args]


def criu_config(work: Path) -> Path:
    """The CRIU config of the restore in `work`, next to it (outlives the work dir's clean-up)."""
    return work.parent / f"{work.name}{CRIU_CONFIG_SUFFIX}"


@dataclass(frozen=True)
class RelayFiles:
    """The rendezvous files of the relay for the restore whose work dir is named `key`."""

    key: str
    directory: Path = SHIM_DIR

    @property
    def socket(self) -> Path:
        return self.directory / f"{self.key}.sock"

    @property
    def upstream_file(self) -> Path:
        """The runc shim's address, written by the launcher, read by the relay at first connection."""
        return self.directory / f"{self.key}.upstream"

    @property
    def pid_file(self) -> Path:
        return self.directory / f"{self.key}.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / f"{self.key}.log"

    @property
    def every_file(self) -> tuple[Path, ...]:
        """All a relay may leave behind, for clean-up (a temporary upstream file included)."""
        return (self.socket, self.pid_file, self.log_file, self.upstream_file,
                self.upstream_file.with_name(self.upstream_file.name + ".tmp"))


@dataclass(frozen=True)
class RestorePlan:
    """Where the unpacked checkpoint is: CRIU images, rootfs diff, deleted files."""

    dir: Path

    @property
    def images(self) -> Path:
        return self.dir / archive_layout.IMAGES_DIR

    @property
    def rootfs_diff(self) -> Path:
        return self.dir / archive_layout.ROOTFS_DIFF

    @property
    def deleted_files(self) -> Path:
        return self.dir / archive_layout.DELETED_FILES
