"""The import graph of shim/, read from the source (AST), never by importing it.

`python -m tests.support.imports` prints the package-level graph (modules grouped by package:
proxy, cri, checkpoint, restore, runtime, ttrpc, node, api; top-level modules stand alone), its
cycles and the imports that point up the layers. tests/unit/test_layers.py asserts the same.

LAYERS is the floor plan (README "Layout"), top first: a module may import its own layer and
the layers below it, never one above; packages never import each other in a cycle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "shim"
# Generated gRPC/protobuf code: a leaf everybody may use, not worth reading.
GENERATED = "shim.api"


# Longest prefix wins: shim.runtime.main is composition, the rest of shim.runtime an adapter.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entry points", ("shim.__main__", "shim.cli", "shim.runtime.__main__",
                      "shim.kubectl.cli")),  # kubectl-checkpoint
    ("composition roots and commands", (
        "shim.app",  # criu-shim serve: the proxy's wiring
        "shim.runtime.main",  # containerd-shim-criu-v2: the runtime shim's wiring
        "shim.recovery",  # the crash reconciler, over checkpoint and restore
        "shim.preflight",  # criu-shim check
        "shim.install",  # criu-shim install
        "shim.kubectl",  # kubectl checkpoint: the API server client and the restore pod
        "shim.migrate",  # criu-shim migrate and migrate-receiver: live migration between nodes
        "shim.node",  # the development node (criu-shim node): only the CLI may import it
    )),
    ("adapters", (
        "shim.cri",  # the CRI verbs the proxy answers, one thin module each
        "shim.runtime",  # the ttrpc side: relay and page daemons of a restored task
    )),
    ("domain", ("shim.checkpoint", "shim.restore", "shim.retention",
                "shim.export",  # checkpoint images pushed to and pulled from registries
                "shim.inspection")),  # criu-shim inspect: an archive's contents, signature, encryption
    ("facades", (
        "shim.containerd", "shim.containerd_images", "shim.local_channel", "shim.node_tls", "shim.criu", "shim.ttrpc", "shim.proxy", "shim.cgroup_driver", "shim.freezer",
        "shim.registry",  # OCI distribution, through oras-py
        "shim.cosign",  # cosign signatures of checkpoint images, pushed through shim.registry
        "shim.sealed",  # encrypted archives: format, keys, reader, writer
    )),
    ("ground", (
        "shim.errors", "shim.config", "shim.policy", "shim.cleanup", "shim.journal", "shim.faults", "shim.fileio", "shim.arch",
        "shim.peer", "shim.annotations", "shim.handoff", "shim.archive_layout", "shim.oci", "shim.paths_env", "shim.hosttools", "shim.metrics", "shim.fillspool", "shim.api",
        "shim.signing",
        "shim.image_reference",  # HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]: the grammar's one owner
    )),
)
# The development node is a harness, not product: only the CLI's `node` command may reach it.
DEV_HARNESS = "shim.node"
DEV_HARNESS_USERS = ("shim.cli",)


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (or package)
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path = ROOT) -> Iterator[Path]:
    for path in sorted((root / PACKAGE).rglob("*.py")):
        if not module_name(path, root).startswith(GENERATED):
            yield path


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _submodule(base: str, name: str, root: Path) -> str:
    candidate = root.joinpath(*base.split("."), name)
    if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
        return f"{base}.{name}"
    return base


def imports_of(path: Path, root: Path = ROOT) -> Iterator[Import]:
    """Every shim import in a file, also those inside functions (a lazy import is still an arrow)."""
    importer = module_name(path, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, importer, path.name == "__init__.py")
            # `from shim.checkpoint import audit` imports the module shim.checkpoint.audit.
            targets = [_submodule(base, alias.name, root) for alias in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                yield Import(importer, target, node.lineno)


def all_imports(root: Path = ROOT) -> list[Import]:
    return [imp for path in source_files(root) for imp in imports_of(path, root)]


def group(module: str) -> str:
    """shim.proxy.splice -> proxy; shim.errors -> errors; shim.api.* -> api."""
    parts = module.split(".")
    if len(parts) == 1:
        return PACKAGE
    return parts[1]


def package_graph(imports: Iterable[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in imports:
        source, target = group(imp.importer), group(imp.imported)
        graph.setdefault(source, set())
        graph.setdefault(target, set())
        if source != target:
            graph[source].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def cycle_edges(graph: dict[str, set[str]], imports: Iterable[Import]) -> list[Import]:
    """The module imports behind each package cycle."""
    members = {package for component in cycles(graph) for package in component}
    component_of = {package: tuple(c) for c in cycles(graph) for package in c}
    edges = {(imp.importer, imp.imported): imp for imp in imports
             if group(imp.importer) in members and group(imp.importer) != group(imp.imported)
             and component_of.get(group(imp.importer)) == component_of.get(group(imp.imported))}
    return sorted(edges.values(), key=lambda imp: (imp.importer, imp.line, imp.imported))


def two_way(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """Index into LAYERS (0 = top), by the longest matching prefix; None when unassigned."""
    if module == PACKAGE:  # shim/__init__.py: the version string, nothing else
        return len(LAYERS) - 1
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(module, prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def upward(imports: Iterable[Import]) -> list[Import]:
    """Imports of a higher layer than the importer's own (unassigned modules are reported apart)."""
    found = []
    for imp in imports:
        source, target = layer_of(imp.importer), layer_of(imp.imported)
        if source is not None and target is not None and target < source:
            found.append(imp)
    return found


def unassigned(imports: Iterable[Import], root: Path = ROOT) -> list[str]:
    modules = {module_name(path, root) for path in source_files(root)}
    modules |= {imp.imported for imp in imports}
    return sorted(module for module in modules if layer_of(module) is None)


def harness_users(imports: Iterable[Import]) -> list[Import]:
    return [imp for imp in imports if _within(imp.imported, DEV_HARNESS) and not _within(imp.importer, DEV_HARNESS)
            and imp.importer not in DEV_HARNESS_USERS]


def render(imports: list[Import]) -> str:
    graph = package_graph(imports)
    lines = ["package graph of shim/ (importer -> imported):"]
    for source in sorted(graph):
        lines.append(f"  {source:14} -> {', '.join(sorted(graph[source])) or '-'}")
    found = cycles(graph)
    lines.append(f"package cycles: {len(found)}")
    for component in found:
        lines.append(f"  {' <-> '.join(component)}")
    lines.append("  two-way pairs: " + (", ".join(f"{a} <-> {b}" for a, b in two_way(graph)) or "-"))
    lines.append("  the module imports inside the cycles:")
    for imp in cycle_edges(graph, imports):
        lines.append(f"    {imp.importer}:{imp.line} -> {imp.imported}")
    lines.append("layers, top first (arrows point down only):")
    for name, prefixes in LAYERS:
        lines.append(f"  {name}: {', '.join(prefixes)}")
    against = upward(imports) + harness_users(imports)
    lines.append(f"imports against the layers: {len(against)}")
    lines += [f"  {imp.importer}:{imp.line} -> {imp.imported}" for imp in against]
    missing = unassigned(imports)
    lines.append(f"modules without a layer: {', '.join(missing) or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render(all_imports()) + "\n")
