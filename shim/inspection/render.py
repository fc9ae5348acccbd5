"""Facts as checkpointctl's tree view (its labels and units), or as JSON (pure)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from shim.inspection.facts import Facts, Process


@dataclass
class Node:
    label: str
    children: list[Node] = field(default_factory=list)

    def add(self, label: str) -> Node:
        child = Node(label)
        self.children.append(child)
        return child


def byte_string(size: int) -> str:
    """checkpointctl's ByteToString: 1024-based, one decimal ("2.0 MiB", "512 B")."""
    if size < 1024:
        return f"{size} B"
    div, exp, n = 1024, 0, size // 1024
    while n >= 1024:
        div *= 1024
        exp += 1
        n //= 1024
    return f"{size / div:.1f} {'KMGTPE'[exp]}iB"


def tree(facts: Facts, signature: str, encryption: str) -> Node:
    root = Node(facts.name)
    for label, value in (("Image", facts.image), ("ID", facts.id), ("Runtime", facts.runtime),
                         ("Created", facts.created), ("Checkpointed", facts.checkpointed),
                         ("Engine", facts.engine)):
        root.add(f"{label}: {value}")
    if facts.ips:
        root.add(f"IP: {', '.join(facts.ips)}")
    size = root.add(f"Checkpoint size: {byte_string(facts.checkpoint_size)}")
    if facts.pages_size:
        size.add(f"Memory pages size: {byte_string(facts.pages_size)}")
    if facts.rootfs_diff_size:
        root.add(f"Root FS diff size: {byte_string(facts.rootfs_diff_size)}")
    root.add(f"Signature: {signature}")
    root.add(f"Encryption: {encryption}")
    if facts.pod or facts.namespace:
        meta = root.add("Metadata")
        meta.add(f"Pod name: {facts.pod}")
        meta.add(f"Kubernetes namespace: {facts.namespace}")
    processes = root.add("Process tree" if not facts.process_error else f"Process tree: {facts.process_error}")
    for process in facts.processes:
        _add_process(processes, process)
    mounts = root.add("Overview of mounts")
    for mount in facts.mounts:
        node = mounts.add(f"Destination: {mount.destination}")
        node.add(f"Type: {mount.type}")
        node.add(f"Source: {mount.source}")
    for problem in facts.problems:
        root.add(f"Unreadable: {problem}")
    return root


def _add_process(parent: Node, process: Process) -> None:
    tag = str(process.pid) if process.state == "alive" else f"{process.pid} ({process.state})"
    node = parent.add(f"[{tag}]  {process.command}")
    for child in process.children:
        _add_process(node, child)


def text(root: Node) -> str:
    """The tree drawn as treeprint draws it."""
    lines = [root.label]
    _draw(root, "", lines)
    return "\n".join(lines)


def _draw(node: Node, prefix: str, lines: list[str]) -> None:
    for index, child in enumerate(node.children):
        last = index == len(node.children) - 1
        lines.append(f"{prefix}{'└── ' if last else '├── '}{child.label}")
        _draw(child, prefix + ("    " if last else "│   "), lines)


def as_json(facts: Facts, signature: str, encryption: str) -> str:
    document = dataclasses.asdict(facts) | {"signature": signature, "encryption": encryption}
    return json.dumps(document, indent=2, ensure_ascii=False)
