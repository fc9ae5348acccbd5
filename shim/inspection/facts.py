"""What a checkpoint archive says about its container, as checkpointctl shows it (pure).

Fields and their sources follow checkpointctl's `inspect` (internal/tree.go, lib/metadata.go):
the name from the engine's annotation in `spec.dump`, image, ID, runtime and times from
`config.dump`, the engine from which annotations the spec carries, the checkpoint size as the
sum of the CRIU images, memory pages as the sum of `pages-*.img`, the rootfs diff as the size
of `rootfs-diff.tar`, the process tree from `pstree.img` and each task's `core-<pid>.img`, the
mounts from the spec. Every member is hostile: a malformed one is reported, never trusted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shim import archive_layout as layout
from shim import oci
from shim.inspection.contents import CORE_PREFIX, MAX_SMALL, PAGES_PREFIX, PSTREE, Contents

# CRIU's task states (images/core.proto, TASK_*), as checkpointctl names them.
_TASK_STATES = {1: "alive", 2: "dead", 3: "stopped", 6: "zombie"}
_MAX_DEPTH = 512  # a process tree deeper than this is not a real one (and would exhaust the stack)


@dataclass
class Process:
    pid: int
    command: str
    state: str = "alive"
    children: list[Process] = field(default_factory=list)


@dataclass
class Mount:
    destination: str
    type: str
    source: str


@dataclass
class Facts:
    name: str
    image: str
    id: str
    runtime: str
    created: str
    checkpointed: str
    engine: str
    ips: tuple[str, ...]
    checkpoint_size: int
    pages_size: int
    rootfs_diff_size: int
    pod: str = ""
    namespace: str = ""
    processes: list[Process] = field(default_factory=list)
    process_error: str = ""  # why the process tree could not be shown
    mounts: list[Mount] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # members that could not be read


def facts(contents: Contents) -> Facts:
    problems: list[str] = [f"{name}: over {MAX_SMALL} bytes, not read" for name in contents.too_large]
    spec = _json_object(contents, layout.SPEC_DUMP, problems)
    config = _json_object(contents, layout.CONFIG_DUMP, problems)
    ours = _json_object(contents, layout.FACTS, problems) if layout.FACTS in contents.sizes else {}
    annotations = _strings(spec.get("annotations"))
    engine = _engine(annotations)
    images = {n: s for n, s in contents.sizes.items() if n.startswith(layout.IMAGES_DIR + "/")}
    processes, process_error = _process_tree(contents)
    return Facts(
        name=annotations.get(oci.CRI_CONTAINER_NAME) or _text(config.get("name")) or "Container",
        image=_text(config.get("rootfsImageName")) or _text(config.get("rootfsImage")),
        id=_text(config.get("id")), runtime=_text(config.get("runtime")),
        created=_text(config.get("createdTime")), checkpointed=_text(config.get("checkpointedTime")),
        engine=engine, ips=tuple(_strings_list(ours.get("pod_ips"))),
        checkpoint_size=sum(images.values()),
        pages_size=sum(s for n, s in images.items() if n.startswith(PAGES_PREFIX) and n.endswith(".img")),
        rootfs_diff_size=contents.sizes.get(layout.ROOTFS_DIFF, 0),
        pod=annotations.get(oci.CRI_SANDBOX_NAME, ""), namespace=annotations.get(oci.CRI_SANDBOX_NAMESPACE, ""),
        processes=processes, process_error=process_error, mounts=_mounts(spec.get("mounts")), problems=problems)


def _engine(annotations: dict[str, str]) -> str:
    """checkpointctl's rule: Podman by its manager annotation, CRI-O by its metadata, containerd by its name."""
    if annotations.get("io.container.manager") == "libpod":
        return "Podman"
    if oci.CRIO_METADATA in annotations:
        return "CRI-O"
    if oci.CRI_CONTAINER_NAME in annotations:
        return "containerd"
    return "unknown"


def _json_object(contents: Contents, name: str, problems: list[str]) -> dict[str, Any]:
    data = contents.small.get(name)
    if data is None:
        return {}
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{name}: not JSON ({exc})")
        return {}
    if not isinstance(value, dict):
        problems.append(f"{name}: not a JSON object")
        return {}
    return value


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _strings(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _strings_list(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _mounts(value: object) -> list[Mount]:
    if not isinstance(value, list):
        return []
    return [Mount(_text(m.get("destination")), _text(m.get("type")), _text(m.get("source")))
            for m in value if isinstance(m, dict)]


def _process_tree(contents: Contents) -> tuple[list[Process], str]:
    """The roots of the process tree; or no roots and why it cannot be shown."""
    data = contents.small.get(PSTREE)
    if data is None:
        return [], f"{PSTREE} is {'too large' if PSTREE in contents.too_large else 'missing'}"
    try:
        import pycriu.images  # type: ignore[import-untyped, unused-ignore]  # Debian's pycriu, no stubs
    except ImportError:
        return [], "the Python module pycriu is missing (Debian package python3-pycriu)"
    try:
        entries = pycriu.images.loads(data)["entries"]
        return _tree(entries, lambda pid: _core(contents, pid, pycriu.images)), ""
    except Exception as exc:  # noqa: BLE001  # hostile image bytes: pycriu raises anything
        return [], f"{PSTREE} is unreadable: {type(exc).__name__}: {exc}"


def _core(contents: Contents, pid: int, images: Any) -> tuple[str, str]:
    data = contents.small.get(f"{CORE_PREFIX}{pid}.img")
    if data is None:
        return "?", "alive"
    tc = images.loads(data)["entries"][0].get("tc", {})
    state = tc.get("task_state", 1)
    return str(tc.get("comm", "?")), _TASK_STATES.get(state, str(state)) if isinstance(state, int) else str(state)


def _tree(entries: list[dict[str, Any]], core: Any) -> list[Process]:
    by_pid: dict[int, Process] = {}
    parents: dict[int, int] = {}
    for entry in entries:
        pid, ppid = int(entry["pid"]), int(entry.get("ppid", 0))
        if pid in by_pid:
            raise ValueError(f"pid {pid} appears twice")
        command, state = core(pid)
        by_pid[pid] = Process(pid, command, state)
        parents[pid] = ppid
    roots = []
    for pid, process in by_pid.items():
        parent = by_pid.get(parents[pid])
        if parent is None:
            roots.append(process)
        else:
            parent.children.append(process)
    _check_acyclic(roots, len(by_pid))
    return roots


def _check_acyclic(roots: list[Process], count: int) -> None:
    """A pstree whose parents form a loop (hostile) would leave tasks out of every root."""
    seen, stack = 0, [(r, 0) for r in roots]
    while stack:
        process, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise ValueError(f"process tree deeper than {_MAX_DEPTH}")
        seen += 1
        stack.extend((child, depth + 1) for child in process.children)
    if seen != count:
        raise ValueError("the parents of some tasks form a loop")
