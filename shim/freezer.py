"""The cgroup freezer of a container, read and written directly (v1 and v2).

containerd keeps its own idea of whether a task is paused (the runc shim's
state machine) and the kernel keeps another (the freezer). They part ways
when CRIU dies mid-dump: CRIU thaws the cgroup once it holds the tasks with
ptrace, so the processes run again when it dies, while the shim still says
PAUSED and refuses both Resume ("container not paused", from runc) and a
new Pause. Recovery needs to see and set the kernel's side; this module is
that, and nothing else. Blocking file I/O: call it from a worker thread.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SETTLE_TIMEOUT = 10.0


class State(enum.Enum):
    THAWED = "THAWED"
    FROZEN = "FROZEN"
    FREEZING = "FREEZING"


class FreezerError(Exception):
    """The freezer could not be read or set (gone, or not settling)."""


def cgroup_dir(cgroups_path: str, root: Path = CGROUP_ROOT) -> Path:
    """The container's freezer directory, from the OCI spec's `linux.cgroupsPath`.

    `slice:prefix:name` is the systemd driver's form (runc: `<slice>/<prefix>-<name>.scope`);
    anything else is a path under the hierarchy.
    """
    parts = cgroups_path.split(":")
    if len(parts) == 3 and not cgroups_path.startswith("/"):
        slice_name, prefix, name = parts
        relative = f"{_expand_slice(slice_name or 'system.slice')}/{prefix}-{name}.scope"
    else:
        relative = cgroups_path.lstrip("/")
    v1 = root / "freezer"
    return (v1 if v1.is_dir() else root) / relative


def _expand_slice(slice_name: str) -> str:
    # systemd nests "a-b-c.slice" as a.slice/a-b.slice/a-b-c.slice.
    stem = slice_name.removesuffix(".slice")
    if stem in ("", "-"):
        return ""
    words = stem.split("-")
    return "/".join("-".join(words[:i]) + ".slice" for i in range(1, len(words) + 1))


def state(directory: Path) -> State:
    v1 = directory / "freezer.state"
    try:
        if v1.exists():
            return State(v1.read_text().strip())
        frozen = (directory / "cgroup.freeze").read_text().strip() == "1"
    except (OSError, ValueError) as exc:
        raise FreezerError(f"cannot read the freezer of {directory}: {exc}") from None
    return State.FROZEN if frozen else State.THAWED


def set_state(directory: Path, wanted: State, timeout: float = SETTLE_TIMEOUT) -> None:
    """Freeze or thaw, and wait until the kernel says it is done."""
    v1 = directory / "freezer.state"
    try:
        if v1.exists():
            v1.write_text(wanted.value)
        else:
            (directory / "cgroup.freeze").write_text("1" if wanted is State.FROZEN else "0")
    except OSError as exc:
        raise FreezerError(f"cannot set the freezer of {directory} to {wanted.value}: {exc}") from None
    deadline = time.monotonic() + timeout
    while (current := state(directory)) is not wanted:
        if time.monotonic() > deadline:
            raise FreezerError(f"the freezer of {directory} is {current.value} after {timeout:.0f}s, "
                               f"not {wanted.value}")
        time.sleep(0.005)  # polling the kernel's own state: it has no event for this


def processes(directory: Path) -> int:
    """How many processes (thread groups) the cgroup holds."""
    try:
        return len((directory / "cgroup.procs").read_text().split())
    except OSError as exc:
        raise FreezerError(f"cannot list the processes of {directory}: {exc}") from None


def freeze(directory: Path, timeout: float = SETTLE_TIMEOUT) -> None:
    """Freeze, and wait until every task is, as CRIU would (v2: `cgroup.freeze` says what was asked,
    `cgroup.events` says `frozen 1` once it is done)."""
    set_state(directory, State.FROZEN, timeout=timeout)
    events = directory / "cgroup.events"
    if (directory / "freezer.state").exists() or not events.exists():
        return
    deadline = time.monotonic() + timeout
    while "frozen 1" not in events.read_text():
        if time.monotonic() > deadline:
            raise FreezerError(f"{directory} did not freeze within {timeout:.0f} s")
        time.sleep(0.001)


def thaw_file(directory: Path) -> tuple[str, str]:
    """The file and the word that thaw it (v1 or v2): for a guard process's shell, which must thaw
    without this module."""
    v1 = directory / "freezer.state"
    return (str(v1), State.THAWED.value) if v1.exists() else (str(directory / "cgroup.freeze"), "0")
