"""The floor plan of shim/ (README "Layout"): arrows point down the layers, packages form no cycle,
product code never reaches the development node. Read from the source, nothing is imported."""

from __future__ import annotations

from pathlib import Path

from tests.support import imports
from tests.support.imports import Import

ALL = imports.all_imports()


def _show(found: list[Import]) -> str:
    return "\n".join(f"{imp.importer}:{imp.line} imports {imp.imported}" for imp in found)


def test_no_package_cycle() -> None:
    graph = imports.package_graph(ALL)
    assert imports.cycles(graph) == [], "package cycle(s), the imports behind them:\n" + _show(
        imports.cycle_edges(graph, ALL))


def test_imports_point_down_the_layers() -> None:
    found = imports.upward(ALL)
    assert not found, "imports of a higher layer (move the shared part down, see README Layout):\n" + _show(found)


def test_every_module_has_a_layer() -> None:
    missing = imports.unassigned(ALL)
    assert not missing, f"give these a layer in tests/support/imports.py LAYERS (and README Layout): {missing}"


def test_product_code_never_imports_the_development_node() -> None:
    found = imports.harness_users(ALL)
    assert not found, "shim.node is the development harness:\n" + _show(found)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_sees_an_upward_import_a_cycle_and_the_harness(tmp_path: Path) -> None:
    """The checks above could pass by seeing nothing: on a small tree that breaks every rule, they find it all."""
    root = _tree(tmp_path, {
        "shim/__init__.py": "",
        "shim/errors.py": "def f() -> None:\n    from shim.app import serve  # lazy, still an arrow\n",
        "shim/app.py": "from shim import errors\nserve = 1\n",
        "shim/proxy/__init__.py": "",
        "shim/proxy/server.py": "from ..cri import handler\n",
        "shim/cri/__init__.py": "",
        "shim/cri/handler.py": "from shim.proxy import server\nfrom shim.node.tools import x\n",
        "shim/node/__init__.py": "",
        "shim/node/tools.py": "x = 1\n",
        "shim/unplanned.py": "",
    })
    found = imports.all_imports(root)
    assert sorted((i.importer, i.imported) for i in imports.upward(found)) == [
        ("shim.cri.handler", "shim.node.tools"), ("shim.errors", "shim.app"), ("shim.proxy.server", "shim.cri.handler")]
    assert imports.cycles(imports.package_graph(found)) == [["app", "errors"], ["cri", "proxy"]]
    assert [i.importer for i in imports.harness_users(found)] == ["shim.cri.handler"]
    assert imports.unassigned(found, root) == ["shim.unplanned"]
