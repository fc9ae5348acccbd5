"""Where the host tools live: the one file `make setup` writes them to.

`scripts/paths.env` (KEY=VALUE lines, shell-compatible) is committed and static;
setup installs the tools where it says. `CRIU_SHIM_PATHS` overrides its location.
It is read by shim.paths_env (product code uses it too); this module adds the
development node's view (which containerd, which tools).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shim.errors import FailedPrecondition
from shim.paths_env import load_paths

REPO_ROOT = Path(__file__).resolve().parents[2]
# "2.x" is Debian's 2.1 (from `make setup`), run as the native reference with containerd's own
# handler only; "2.1" is the same binary with criu-shim's handler, as 1.6/1.7 have it; "2.3" and
# "2.4" are built from the Go module proxy (`make peers`) and run with criu-shim's handler too;
# "2.3-native" is 2.3 as the native reference: its own handler only, and its own restore through
# CreateContainer switched on (`enable_experimental_restore_via_create`, off by default since 2.3.4).
CONTAINERD_VERSIONS = ("1.7", "1.6", "2.x", "2.1", "2.3", "2.4", "2.3-native")
BUILT_FROM_GO = ("2.3", "2.4", "2.3-native")
# The variants that are containerd's own handler only (no criu-shim runtime handler).
NATIVE = ("2.x", "2.3-native")
# The binaries a variant runs: its paths.env key is CONTAINERD_<release>.
_RELEASE = {"2.1": "2.x", "2.3-native": "2.3"}


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
    release = _RELEASE.get(containerd_version, containerd_version)
    key = "CONTAINERD_" + release.replace(".", "_").upper()
    tools = Tools(Path(paths[key]), Path(paths["RUNC_BIN"]), Path(paths["CRIU_BIN"]),
                  Path(paths["CNI_BIN_DIR"]), Path(paths["CHECKPOINTCTL_BIN"]))
    if not tools.containerd.exists():
        target = "make peers" if containerd_version in BUILT_FROM_GO else "make setup"
        raise FailedPrecondition(f"{tools.containerd} is missing: run `{target}` first")
    return tools
