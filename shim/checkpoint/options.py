"""Which CRIU options a checkpoint uses: node defaults, then pod annotations (pure).

The kubelet's checkpoint API passes no options, so users opt in per pod:

    checkpoint.criu-shim.io/tcp-established: "true"           # every container of the pod
    <container>.checkpoint.criu-shim.io/tcp-established: "true" # one container
    checkpoint.criu-shim.io/stop-after: "true"  # stop the container right after a good dump
    checkpoint.criu-shim.io/tcp-close: "true"   # restore: fallback when the old pod IP is taken

`stop-after` is for migrations: the source must not go on using (or resetting)
connections the restored copy resumes. It has no node default: the kubelet's
semantics are leave-running.

Pod annotations reach the runtime as sandbox annotations, so no kubelet
change is needed. A per-container key wins over the pod-wide one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from shim.annotations import CHECKPOINT_PREFIX, boolean
from shim.config import CheckpointDefaults

PREFIX = CHECKPOINT_PREFIX
_KEYS = {"tcp-established": "tcp_established", "file-locks": "file_locks", "ext-unix-sockets": "ext_unix_sockets",
         "stop-after": "stop_after", "tcp-close": "tcp_close"}


@dataclass(frozen=True)
class CheckpointOptions:
    tcp_established: bool = False
    file_locks: bool = False
    ext_unix_sockets: bool = False
    stop_after: bool = False
    tcp_close: bool = False  # restore only: if the old pod IP is still taken, close connections instead

    @classmethod
    def from_defaults(cls, defaults: CheckpointDefaults) -> CheckpointOptions:
        # fsync is node-only; stop_after is pod-only (the kubelet's semantics are leave-running)
        return cls(**{f.name: bool(getattr(defaults, f.name, False)) for f in fields(cls)})


def annotation(option: str, container: str | None = None) -> str:
    """The annotation key for `option` ("tcp-established"...), pod-wide or for one container."""
    return f"{container}.{PREFIX}{option}" if container else f"{PREFIX}{option}"


def resolve(defaults: CheckpointDefaults, annotations: Mapping[str, str], container: str) -> CheckpointOptions:
    options = CheckpointOptions.from_defaults(defaults)
    for scope in (None, container):
        for option, attr in _KEYS.items():
            key = annotation(option, scope)
            if key in annotations:
                options = replace(options, **{attr: boolean(key, annotations[key], lenient=True)})
    return options
