"""Where the host tools live: the one file `make setup` writes them to.

`scripts/paths.env` (KEY=VALUE lines, shell-compatible) is committed and static;
setup installs the tools where it says. `CRIU_SHIM_PATHS` overrides its location.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from shim.errors import FailedPrecondition

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINERD_VERSIONS = ("1.7", "1.6", "2.x")


@cache
def load_paths() -> dict[str, str]:
    path = Path(os.environ.get("CRIU_SHIM_PATHS", REPO_ROOT / "scripts" / "paths.env"))
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"')
    return values


@dataclass(frozen=True)
class Tools:
    containerd_bin_dir: Path
    runc: Path
    criu: Path
    cni_bin_dir: Path
    checkpointctl: Path

    @property
    def containerd(self) -> Path:
        return self.containerd_bin_dir / "containerd"

    @property
    def ctr(self) -> Path:
        return self.containerd_bin_dir / "ctr"


def tools_for(containerd_version: str) -> Tools:
    if containerd_version not in CONTAINERD_VERSIONS:
        raise FailedPrecondition(
            f"unknown containerd version {containerd_version!r}; choose one of {', '.join(CONTAINERD_VERSIONS)}")
    paths = load_paths()
    key = "CONTAINERD_" + containerd_version.replace(".", "_").upper()
    tools = Tools(Path(paths[key]), Path(paths["RUNC_BIN"]), Path(paths["CRIU_BIN"]),
                  Path(paths["CNI_BIN_DIR"]), Path(paths["CHECKPOINTCTL_BIN"]))
    if not tools.containerd.exists():
        raise FailedPrecondition(f"{tools.containerd} is missing: run `make setup` first")
    return tools
