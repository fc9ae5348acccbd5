"""Which CRIU options a checkpoint uses: node defaults, then pod annotations (pure).

The kubelet's checkpoint API passes no options, so users opt in per pod:

    checkpoint.criu-shim.io/tcp-established: "true"           # every container of the pod
    <container>.checkpoint.criu-shim.io/tcp-established: "true" # one container

Pod annotations reach the runtime as sandbox annotations, so no kubelet
change is needed. A per-container key wins over the pod-wide one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from shim.config import CheckpointDefaults
from shim.errors import InvalidArgument

PREFIX = "checkpoint.criu-shim.io/"
_KEYS = {"tcp-established": "tcp_established", "file-locks": "file_locks", "ext-unix-sockets": "ext_unix_sockets"}


@dataclass(frozen=True)
class CheckpointOptions:
    tcp_established: bool = False
    file_locks: bool = False
    ext_unix_sockets: bool = False

    @classmethod
    def from_defaults(cls, defaults: CheckpointDefaults) -> CheckpointOptions:
        return cls(**{f.name: getattr(defaults, f.name) for f in fields(cls)})  # fsync is not per pod


def annotation(option: str, container: str | None = None) -> str:
    """The annotation key for `option` ("tcp-established"...), pod-wide or for one container."""
    return f"{container}.{PREFIX}{option}" if container else f"{PREFIX}{option}"


def resolve(defaults: CheckpointDefaults, annotations: Mapping[str, str], container: str) -> CheckpointOptions:
    options = CheckpointOptions.from_defaults(defaults)
    for scope in (None, container):
        for option, attr in _KEYS.items():
            key = annotation(option, scope)
            if key in annotations:
                options = replace(options, **{attr: _boolean(key, annotations[key])})
    return options


def _boolean(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise InvalidArgument(f'annotation {key}: expected "true" or "false", got {value!r}')
    return lowered == "true"
