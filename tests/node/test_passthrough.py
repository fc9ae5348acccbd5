"""The proxy is invisible: one CRI scenario, direct and through criu-shim, same results."""

from __future__ import annotations

import pytest

from tests.node.conftest import Node
from tests.node.cri_scenario import Scenario, new_label, normalise

pytestmark = pytest.mark.node


def test_scenario_identical_direct_and_through_proxy(node: Node) -> None:
    log_dir = str(node.dir / "pod-logs")
    runs = {}
    for name, endpoint in (("direct", node.containerd), ("proxy", node.cri)):
        label = new_label()
        scenario = Scenario(endpoint, label, log_dir)
        runs[name] = normalise(scenario.run(), (label,), scenario.ids)
    direct, proxied = runs["direct"], runs["proxy"]
    assert [r["method"] for r in direct] == [r["method"] for r in proxied]
    for a, b in zip(direct, proxied):
        assert a == b, f"{a['method']} differs"
    by_method: dict[str, dict[str, object]] = {}
    for result in direct:
        by_method.setdefault(result["method"], result)  # the first call of each method
    # The scenario must have exercised real behaviour, not a wall of errors.
    assert by_method["StartContainer"].get("ok") == {}
    assert "ok" in by_method["ExecSync"]
    assert by_method["garbage"]["code"] != "OK"
    assert by_method["unknown"]["code"] == "UNIMPLEMENTED"
