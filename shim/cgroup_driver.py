"""Which cgroup driver containerd uses, decided from its CRI config the way containerd 2.x decides it.

containerd 1.6/1.7 do not implement the CRI `RuntimeConfig` call (the kubelet asks it for the
cgroup driver, and from 1.38 refuses a runtime that does not answer), but they publish their whole
CRI config in the verbose `Status` info. containerd 2.x's own answer (internal/cri/server/
runtime_config_linux.go) looks at the runtime handlers in a fixed order, the default handler first
and the others by name, and takes the first one whose options are runc options: `SystemdCgroup`
true means systemd, false or absent cgroupfs. A handler without options, or of another runtime
type, says nothing. When no handler says anything, systemd if it runs the host, else cgroupfs.
The same rule here gives the same answer containerd 2.x would give for the same config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shim.errors import Unknown

Driver = Literal["systemd", "cgroupfs"]

# Runtime types whose options are runc's (`io.containerd.runc.v1` is gone in 2.x, and in 1.x its
# options decode into the same message). `io.containerd.runtime.v1.linux` has RuncOptions, with no
# cgroup setting: like every other type, it says nothing.
RUNC_RUNTIME_TYPES = frozenset({"io.containerd.runc.v2", "io.containerd.runc.v1"})
# What containerd checks (internal/cri/systemd): systemd's run directory exists as a directory.
SYSTEMD_RUN_DIR = Path("/run/systemd/system")


@dataclass(frozen=True)
class Decision:
    driver: Driver
    source: str  # the handler whose runc options decided, or "host" when none did


def decide(config_json: str | None, systemd_run_dir: Path = SYSTEMD_RUN_DIR) -> Decision:
    """The driver for the CRI config JSON of containerd's verbose Status info (its "config" key)."""
    handlers, default = _runtimes(config_json)
    for name in sorted(handlers, key=lambda n: (n != default, n)):
        driver = _driver_of(handlers[name])
        if driver is not None:
            return Decision(driver, name)
    return Decision("systemd" if systemd_run_dir.is_dir() else "cgroupfs", "host")


def _runtimes(config_json: str | None) -> tuple[Mapping[str, Any], str]:
    if config_json is None:
        raise Unknown("criu-shim: containerd's verbose Status has no \"config\" entry: "
                      "cannot tell which cgroup driver it uses")
    try:
        config = json.loads(config_json)
        section = config["containerd"]
        runtimes = section.get("runtimes")
        default = section.get("defaultRuntimeName")
        runtimes = {} if runtimes is None else runtimes  # containerd writes null for no table
        default = "" if default is None else default
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Unknown(f"criu-shim: containerd's CRI config in its Status is not readable "
                      f"({type(exc).__name__}: {exc}): cannot tell which cgroup driver it uses") from None
    if not isinstance(runtimes, dict) or not isinstance(default, str):
        raise Unknown("criu-shim: containerd's CRI config in its Status has no runtimes table: "
                      "cannot tell which cgroup driver it uses")
    return runtimes, default


def _driver_of(runtime: object) -> Driver | None:
    if not isinstance(runtime, dict) or runtime.get("runtimeType") not in RUNC_RUNTIME_TYPES:
        return None
    options = runtime.get("options")
    if not isinstance(options, dict):  # no options table: containerd learns nothing from it either
        return None
    return "systemd" if options.get("SystemdCgroup") is True else "cgroupfs"
